"""peft's LoRA as oracle: its LoraConfig folders (Linear, Conv1d, Conv2d, transformers Conv1D, rank-stabilised,
patterns, dropout, modules_to_save) load in lyco with its outputs, and lyco's LoRA folders load in peft."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import lyco
from conftest import ALL, X, base_model, random_lyco_model
from lyco.formats import read_peft_adapter, write_lycoris_file

peft = pytest.importorskip("peft")

ATOL = 1e-5  # fp32; peft and lyco compute the same products in other orders
MOVED = 1e-4

CASES = [
    ("plain", {"r": 2, "lora_alpha": 3, "target_modules": ALL}),
    ("rslora", {"r": 4, "lora_alpha": 3, "target_modules": ALL, "use_rslora": True}),
    ("patterns", {"r": 2, "lora_alpha": 4, "target_modules": ALL, "rank_pattern": {"conv1d": 3, "fc": 1},
                  "alpha_pattern": {"conv2d": 1.5}}),
    ("dropout", {"r": 2, "lora_alpha": 2, "target_modules": ["fc", "conv1d"], "lora_dropout": 0.3}),
    ("modules-to-save", {"r": 2, "lora_alpha": 2, "target_modules": ["fc"], "modules_to_save": ["head"]}),
]  # fmt: skip
IDS = [c[0] for c in CASES]


def run(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def peft_lora(base: nn.Module, kwargs: dict, seed: int = 11) -> nn.Module:
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **kwargs))
    if "modules_to_save" in kwargs:
        with torch.no_grad():
            model.base_model.model.head.modules_to_save["default"].bias.add_(0.25)
    return model.eval()


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=IDS)
def test_peft_lora_loads_in_lyco(tmp_path, name, kwargs):
    base = base_model()
    pm = peft_lora(base, kwargs)
    expected = run(pm)
    assert (expected - run(base)).abs().max() > MOVED
    pm.save_pretrained(tmp_path)
    model = lyco.LycoModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert isinstance(model.peft_config["default"], lyco.LoRAConfig)
    torch.testing.assert_close(run(model), expected, atol=ATOL, rtol=0)
    for lname, layer in model.adapted_layers():
        peft_layer = pm.base_model.model.get_submodule(lname)
        assert layer.r["default"] == peft_layer.r["default"], lname
        assert layer.scaling["default"] == pytest.approx(peft_layer.scaling["default"]), lname
    torch.testing.assert_close(run(model.merge_and_unload()), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("name", "kwargs"), CASES, ids=IDS)
def test_lyco_lora_loads_in_peft(tmp_path, name, kwargs):
    base = base_model()
    model, expected = random_lyco_model(base, lyco.LoRAConfig(init_weights=False, **kwargs))
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "LORA" and "lora_alpha" in data and "alpha" not in data and "rank_dropout" not in data
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith(".lora_A.weight") for k in keys) and not any("lora_down" in k for k in keys)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    # PEFT warns about config fields its LoraConfig lacks: lyco writes none at their defaults
    assert not [w for w in seen if "Unexpected keyword" in str(w.message)], [str(w.message) for w in seen]
    torch.testing.assert_close(run(pm), expected, atol=ATOL, rtol=0)


class GPT2ish(nn.Module):
    """transformers' GPT-2 style Conv1D projections (weights stored (in, out))."""

    def __init__(self) -> None:
        super().__init__()
        self.c_attn = Conv1D(48, 16)
        self.c_proj = Conv1D(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.c_attn(x).relu())


def test_transformers_conv1d_with_fan_in_fan_out_both_ways(tmp_path):
    torch.manual_seed(0)
    base = GPT2ish()
    x = torch.randn(2, 5, 16)
    pm = peft_lora(base, {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn", "c_proj"], "fan_in_fan_out": True})
    expected = run(pm, x)
    pm.save_pretrained(tmp_path / "peft")
    model = lyco.LycoModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(run(model, x), expected, atol=ATOL, rtol=0)
    model.save_pretrained(tmp_path / "lyco")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lyco")
    torch.testing.assert_close(run(back, x), expected, atol=ATOL, rtol=0)


def test_peft_lora_folder_to_lycoris_file(tmp_path):
    """PEFT folder → AdapterFile → kohya file → lyco model: the same outputs (rank-stabilised scale folded
    into the stored alpha, alpha·√r, as lycoris-lora writes it)."""
    base = base_model()
    pm = peft_lora(base, {"r": 4, "lora_alpha": 3, "target_modules": ALL, "use_rslora": True})
    expected = run(pm)
    pm.save_pretrained(tmp_path / "peft")
    af = read_peft_adapter(tmp_path / "peft", model=base)
    assert af.modules["fc"].alpha == pytest.approx(3 * 2.0)  # alpha·√4
    write_lycoris_file(af, tmp_path / "a.safetensors", style="kohya")
    model = lyco.load_lycoris(copy.deepcopy(base), tmp_path / "a.safetensors")
    torch.testing.assert_close(run(model), expected, atol=ATOL, rtol=0)


def _shake_magnitudes(model: nn.Module) -> None:
    """Scale every DoRA magnitude by a random factor in [0.5, 1.5): at init the magnitude equals ‖W + s·ΔW‖, which
    makes DoRA's output its plain-LoRA one — a comparison would then prove nothing about DoRA."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "magnitude" in name or name.endswith("dora_scale"):
                p.mul_(torch.rand(p.shape, generator=g) + 0.5)


DORA_CASES = [
    ("dora", {"r": 2, "lora_alpha": 3, "target_modules": ALL, "use_dora": True}),
    ("dora-rslora-patterns", {"r": 4, "lora_alpha": 3, "target_modules": ALL, "use_dora": True, "use_rslora": True,
                              "rank_pattern": {"fc": 2}}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "kwargs"), DORA_CASES, ids=[c[0] for c in DORA_CASES])
def test_peft_dora_both_ways(tmp_path, name, kwargs):
    """PEFT's ``use_dora`` folders (``lora_magnitude_vector``: Linear ``(out,)``, conv ``(1, out, 1…)``) load in lyco
    with PEFT's outputs and merge to them; lyco's DoRA folders load in PEFT."""
    base = base_model()
    pm = peft_lora(base, kwargs)
    plain = run(pm)
    _shake_magnitudes(pm)
    expected = run(pm)
    assert (expected - plain).abs().max() > MOVED  # the magnitudes matter
    pm.save_pretrained(tmp_path / "peft")
    model = lyco.LycoModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    assert model.peft_config["default"].weight_decompose and model.peft_config["default"].use_dora
    torch.testing.assert_close(run(model), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(run(copy.deepcopy(model).merge_and_unload()), expected, atol=ATOL, rtol=0)
    torch.manual_seed(13)
    ours = lyco.get_model(copy.deepcopy(base), lyco.LoRAConfig(init_weights=False, **kwargs)).eval()
    _shake_magnitudes(ours)
    want = run(ours)
    ours.save_pretrained(tmp_path / "lyco")
    assert json.loads((tmp_path / "lyco" / "adapter_config.json").read_text())["use_dora"] is True
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lyco")
    assert not [w for w in seen if "Unexpected keyword" in str(w.message)], [str(w.message) for w in seen]
    torch.testing.assert_close(run(back), want, atol=ATOL, rtol=0)


def test_dora_init_equals_peft(tmp_path):
    """A fresh DoRA adapter's magnitude is PEFT's: ‖W + s·ΔW‖ per output row (here after a random LoRA init)."""
    base = base_model()
    pm = peft_lora(base, {"r": 2, "lora_alpha": 3, "target_modules": ALL, "use_dora": True})
    pm.save_pretrained(tmp_path)
    model = lyco.LycoModel.from_pretrained(copy.deepcopy(base), tmp_path)
    for lname, layer in model.adapted_layers():
        adapter = layer.lyco_adapters["default"]
        loaded = adapter.dora_scale.detach().clone()
        adapter.init_dora(layer._canonical_weight(torch.float32))
        torch.testing.assert_close(adapter.dora_scale.detach(), loaded, atol=1e-5, rtol=1e-5, msg=lname)


def test_peft_only_features_are_refused_by_name(tmp_path):
    base = base_model()
    peft_lora(base, {"r": 2, "target_modules": ["fc"]}).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "bias": "all"}))
    with pytest.raises(lyco.FormatError, match="bias='all' is a PEFT feature lyco does not have"):
        lyco.LycoModel.from_pretrained(copy.deepcopy(base), tmp_path)


def test_input_dropout_in_training_is_peft_lora_dropout(tmp_path):
    """Training forward and gradients with lora_dropout equal peft's for the same random stream."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["0", "2"], "lora_dropout": 0.5}
    pm = peft_lora(base, kwargs).train()
    pm.save_pretrained(tmp_path)
    model = lyco.LycoModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True).train()
    x = torch.randn(6, 16)
    outs = []
    for m in (pm, model):
        torch.manual_seed(5)
        y = m(x)
        y.square().sum().backward()
        outs.append(y.detach())
    torch.testing.assert_close(outs[1], outs[0], atol=ATOL, rtol=0)
    assert not torch.allclose(outs[0], run(pm.eval(), x), atol=1e-3)  # dropout really dropped something
    grad_peft = pm.base_model.model[0].lora_A["default"].weight.grad
    grad_lyco = model.model[0].lyco_adapters["default"].lora_down.grad
    torch.testing.assert_close(grad_lyco, grad_peft, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("init", ["gaussian", "pissa", "eva"])
def test_folders_of_any_peft_init_load(tmp_path, init):
    """The init only matters for a fresh adapter: a folder's weights are read, whatever it was initialised with."""
    base = base_model()
    pm = peft_lora(base, {"r": 2, "lora_alpha": 2, "target_modules": ["fc"]})
    expected = run(pm)
    pm.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "init_lora_weights": init}))
    torch.testing.assert_close(run(lyco.LycoModel.from_pretrained(copy.deepcopy(base), tmp_path)), expected, atol=ATOL, rtol=0)
    if init != "gaussian":
        with pytest.raises(lyco.ConfigError, match="data-driven"):
            lyco.get_model(copy.deepcopy(base), lyco.LoRAConfig(r=2, target_modules=["fc"], init_lora_weights=init))
