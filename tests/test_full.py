"""Full (LyCORIS ``full``): a full-size ``diff`` and a bias delta ``diff_b``, scale 1, in models and files.

The layer table (test_layers.py), behaviour grid (test_layers_behaviour.py), PEFT-folder round trip
(test_model_io.py) and lycoris-lora oracle (test_lycoris_oracle.py) carry Full rows; here is what only Full has.
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lyco

ATOL = 1e-6  # fp32, same tensors through two code paths


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.nob = nn.Linear(16, 4, bias=False)
        self.conv = nn.Conv2d(3, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        img = self.conv(x[:, :3].reshape(-1, 3, 1, 1).expand(-1, 3, 4, 4)).mean((-1, -2))
        return self.nob(self.fc(x).relu()) + img.sum(-1, keepdim=True)


X = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
TARGETS = ["fc", "nob", "conv"]


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def full_model() -> lyco.LycoModel:
    torch.manual_seed(1)
    return lyco.get_model(net(), lyco.FullConfig(target_modules=TARGETS, init_weights=False))


def test_parameters_and_scale():
    """``diff`` like the weight, ``diff_b`` only where the layer has a bias; r/alpha never scale it."""
    model = lyco.get_model(net(), lyco.FullConfig(r=4, alpha=64, target_modules=TARGETS, init_weights=False))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    assert shapes == {
        "model.fc.lyco_adapters.default.diff": (16, 8), "model.fc.lyco_adapters.default.diff_b": (16,),
        "model.nob.lyco_adapters.default.diff": (4, 16),
        "model.conv.lyco_adapters.default.diff": (5, 3, 3, 3), "model.conv.lyco_adapters.default.diff_b": (5,),
    }  # fmt: skip
    fc = model.model.fc
    assert fc.scaling["default"] == 1.0
    torch.testing.assert_close(fc.get_delta_weight("default"), fc.lyco_adapters["default"].diff.detach())
    model.set_scale("default", 0.5)
    torch.testing.assert_close(fc.get_delta_bias("default"), 0.5 * fc.lyco_adapters["default"].diff_b.detach())


def test_forward_equals_base_with_added_weights_and_merge_writes_bias():
    model = full_model().eval()
    want_model = copy.deepcopy(net())
    with torch.no_grad():
        for name in TARGETS:
            a = model.model.get_submodule(name).lyco_adapters["default"]
            base = want_model.get_submodule(name)
            base.weight += a.diff
            if base.bias is not None:
                base.bias += a.diff_b
    want = want_model(X)
    torch.testing.assert_close(model(X), want, atol=ATOL, rtol=0)
    bias0 = model.model.fc.base_layer.bias.detach().clone()
    model.merge_adapter()
    torch.testing.assert_close(model.model.fc.base_layer.bias, want_model.fc.bias, atol=ATOL, rtol=0)
    torch.testing.assert_close(model(X), want, atol=ATOL, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(model.model.fc.base_layer.bias, bias0, atol=ATOL, rtol=0)
    plain = model.merge_and_unload()
    torch.testing.assert_close(plain(X), want, atol=ATOL, rtol=0)
    assert plain.nob.bias is None  # a bias-less layer stays bias-less


@pytest.mark.parametrize("style", ["lycoris", "kohya"])
def test_file_keys_and_round_trip(tmp_path, style):
    """lycoris-lora's keys: ``diff`` / ``diff_b``, no ``.alpha`` (it writes none; consumers ignore one)."""
    model = full_model().eval()
    path = tmp_path / "full.safetensors"
    lyco.save_lycoris(model, path, style=style)
    keys = sorted(load_file(path))
    stem = {"lycoris": "lycoris_", "kohya": "lora_unet_"}[style]
    assert keys == sorted(f"{stem}{m}.{p}" for m in TARGETS for p in ("diff", "diff_b") if (m, p) != ("nob", "diff_b"))
    loaded = lyco.load_lycoris(net(), path)
    torch.testing.assert_close(loaded(X), model(X), atol=ATOL, rtol=0)


def test_bias_delta_for_a_layer_without_bias_is_refused_untouched(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"lycoris_nob.diff": torch.randn(4, 16), "lycoris_nob.diff_b": torch.randn(4)}, path)
    base = net()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(lyco.ShapeMismatchError, match=r"module 'nob'.*diff_b.*without a bias"):
        lyco.load_lycoris(base, path)
    assert isinstance(base.nob, nn.Linear) and all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_transposed_diff_does_not_fit(tmp_path):
    """No reshape of ``diff``: a (in, out) tensor for a square-free layer is a shape error naming the module."""
    path = tmp_path / "t.safetensors"
    save_file({"lycoris_fc.diff": torch.randn(8, 16)}, path)
    with pytest.raises(lyco.ShapeMismatchError, match=r"fc.*diff\(8, 16\).*\(16, 8\)"):
        lyco.load_lycoris(net(), path)


def test_zero_init_trains_from_the_base():
    model = lyco.get_model(net(), lyco.FullConfig(target_modules=TARGETS))
    assert torch.equal(model(X), net()(X))
    model.train()
    model(X).square().mean().backward()
    fc = model.model.fc.lyco_adapters["default"]
    assert fc.diff.grad.abs().max() > 0 and fc.diff_b.grad.abs().max() > 0
