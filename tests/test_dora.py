"""DoRA beyond the layer table: training gradients equal PEFT's, transformers Conv1D, file tools (merge, resize,
to-lora, inspect, convert) and metadata. Oracles for files: test_lycoris_oracle.py, test_lora_peft_oracle.py."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import lyco
from conftest import X, base_model, shake_dora
from lyco.formats import read_adapter
from lyco.formats.io import read_metadata
from lyco.tools.describe import describe
from lyco.tools.merge import merge_file
from lyco.tools.resize import resize_adapter, to_lora

peft = pytest.importorskip("peft")

ATOL = 1e-5  # fp32, two implementations of one formula
TARGETS = ["conv2d", "conv1d", "fc"]


def run(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def dora_model(cfg: lyco.AdapterConfig, base: nn.Module | None = None) -> lyco.LycoModel:
    torch.manual_seed(3)
    model = lyco.get_model(copy.deepcopy(base if base is not None else base_model()), cfg)
    shake_dora(model)
    return model.eval()


@pytest.mark.parametrize("path", ["dense", "factored"])
def test_training_gradients_equal_peft(tmp_path, path):
    """Same folder, same batch: loss and every gradient (factors and magnitude) equal PEFT's — both treat the norm
    as a constant (DoRA paper §4.3)."""
    base = base_model()
    torch.manual_seed(11)
    cfg = peft.LoraConfig(r=2, lora_alpha=3, target_modules=TARGETS, use_dora=True, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    shake_dora(pm)
    pm.save_pretrained(tmp_path)
    model = lyco.LycoModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    for _, layer in model.adapted_layers():
        layer.lyco_adapters["default"].path = path
    pm.train()
    model.train()
    pm(X).square().mean().backward()
    model(X).square().mean().backward()
    names = {"lora_A": "lora_down", "lora_B": "lora_up", "lora_magnitude_vector": "dora_scale"}
    checked = 0
    for name, p in pm.named_parameters():
        if not p.requires_grad:
            continue
        module, kind = name.removeprefix("base_model.model.").split(".")[:2]
        ours = model.model.get_submodule(module).lyco_adapters["default"]
        grad = getattr(ours, names[kind]).grad
        want = p.grad.reshape(grad.shape) if kind != "lora_magnitude_vector" or p.grad.dim() == 1 else p.grad.transpose(0, 1)
        torch.testing.assert_close(grad, want.reshape(grad.shape), atol=1e-5, rtol=1e-4, msg=name)
        checked += 1
    assert checked == 9


def test_transformers_conv1d_against_peft(tmp_path):
    """GPT-2 style Conv1D (weight (in, out), PEFT's fan_in_fan_out): the norm is per output feature."""
    base = nn.Sequential(Conv1D(24, 16), nn.ReLU(), Conv1D(8, 24))
    x = torch.randn(4, 16)
    torch.manual_seed(2)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], use_dora=True, fan_in_fan_out=True,
                          init_lora_weights=False)  # fmt: skip
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    shake_dora(pm)
    pm.eval()
    pm.save_pretrained(tmp_path)
    model = lyco.LycoModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    torch.testing.assert_close(run(model, x), run(pm, x), atol=ATOL, rtol=0)
    torch.testing.assert_close(run(model.merge_and_unload(), x), run(pm, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "cfg",
    [
        lyco.LoRAConfig(r=2, alpha=3, target_modules=TARGETS, use_dora=True, init_weights=False),
        lyco.LoHaConfig(r=2, alpha=3, target_modules=TARGETS, weight_decompose=True, wd_on_out=False, init_weights=False),
        lyco.LoKrConfig(r=2, alpha=3, target_modules=TARGETS, weight_decompose=True, init_weights=False),
    ],
    ids=["lora-out", "loha-in", "lokr-out"],
)
def test_merge_tool_equals_the_model_merge(tmp_path, cfg):
    base = base_model()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base.safetensors")
    model = dora_model(cfg, base)
    lyco.save_lycoris(model, tmp_path / "a.safetensors", style="kohya")
    want = {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}
    af = read_adapter(tmp_path / "a.safetensors")
    merge_file(tmp_path / "base.safetensors", af, tmp_path / "m.safetensors")
    got = load_file(tmp_path / "m.safetensors")
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=ATOL, rtol=0, msg=key)


def test_merge_tool_transposed_conv1d(tmp_path):
    base = nn.Sequential(Conv1D(24, 16))
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, tmp_path / "base.safetensors")
    model = dora_model(lyco.LoRAConfig(r=2, alpha=3, target_modules=["0"], use_dora=True, init_weights=False), base)
    lyco.save_lycoris(model, tmp_path / "a.safetensors")
    want = model.merge_and_unload()[0].weight.detach()
    report = merge_file(tmp_path / "base.safetensors", read_adapter(tmp_path / "a.safetensors"), tmp_path / "m.safetensors")
    assert report.transposed == ["0"]
    torch.testing.assert_close(load_file(tmp_path / "m.safetensors")["0.weight"], want, atol=ATOL, rtol=0)


def test_resize_to_lora_inspect_and_metadata_keep_dora(tmp_path):
    cfg = lyco.LoHaConfig(r=4, alpha=3, target_modules=["fc"], weight_decompose=True, wd_on_out=False, init_weights=False)
    model = dora_model(cfg)
    lyco.save_lycoris(model, tmp_path / "a.safetensors")
    args = json.loads(read_metadata(tmp_path / "a.safetensors")["ss_network_args"])
    assert args["dora_wd"] == "True" and args["wd_on_output"] == "False"
    af = read_adapter(tmp_path / "a.safetensors")
    magnitude = af.modules["lycoris_fc"].dora
    report = describe(af, tmp_path / "a.safetensors")
    assert [m.dora for m in report.modules] == ["in"]
    resized, results = resize_adapter(af, 1, steps=20)
    assert torch.equal(resized.modules["lycoris_fc"].dora, magnitude) and "DoRA magnitude kept" in results[0].note
    lora, _ = to_lora(af, 2)
    assert lora.modules["lycoris_fc"].algo == "lora" and torch.equal(lora.modules["lycoris_fc"].dora, magnitude)
    # the to-lora file is LoRA + DoRA: it loads as such, its ΔW the rank-2 SVD of the LoHa's
    lyco.formats.write_adapter(lora, tmp_path / "l.safetensors")
    loaded = lyco.load_lycoris(base_model(), tmp_path / "l.safetensors")
    assert isinstance(loaded.peft_config["default"], lyco.LoRAConfig) and not loaded.peft_config["default"].wd_on_out


def test_peft_folder_round_trip_through_lycoris_file(tmp_path):
    model = dora_model(lyco.LoRAConfig(r=2, alpha=3, target_modules=TARGETS, use_dora=True, init_weights=False))
    want = run(model)
    lyco.save_lycoris(model, tmp_path / "a.safetensors")
    af = lyco.formats.read_lycoris_file(tmp_path / "a.safetensors", model=base_model())
    lyco.formats.write_peft_adapter(af, tmp_path / "peft", base_model=base_model())
    torch.testing.assert_close(run(peft.PeftModel.from_pretrained(base_model(), tmp_path / "peft")), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(run(lyco.LycoModel.from_pretrained(base_model(), tmp_path / "peft")), want, atol=ATOL, rtol=0)


def test_dora_on_full_is_refused():
    with pytest.raises(TypeError):
        lyco.FullConfig(target_modules=["fc"], weight_decompose=True)  # Full has no such option


def test_lora_row_norm_matches_the_dense_norm():
    from lyco.ops.dora import dora_norm, lora_row_norm

    g = torch.Generator().manual_seed(0)
    w, down, up = torch.randn(32, 24, generator=g, dtype=torch.float64), torch.randn(3, 24, generator=g, dtype=torch.float64), \
        torch.randn(32, 3, generator=g, dtype=torch.float64)  # fmt: skip
    for s in (0.0, 0.3, -2.0):
        torch.testing.assert_close(lora_row_norm(w, down, up, s), dora_norm(w + s * up @ down, True).reshape(-1),
                                   atol=1e-12, rtol=1e-12)  # fmt: skip


@pytest.mark.parametrize("r", [3, 12], ids=["khatri-rao", "built"])  # r² ≤ 2r + 64 on CPU: from the factors
def test_loha_norm_from_factors_or_built_equals_the_formula(r):
    model = dora_model(lyco.LoHaConfig(r=r, alpha=5, target_modules=["fc"], weight_decompose=True, init_weights=False))
    adapter = model.model.fc.lyco_adapters["default"]
    assert adapter.norm_needs_delta() == (r == 12)
    w = model.model.fc.base_layer.weight
    t = dict(adapter.named_parameters())
    total = w + (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"]) * 0.7
    want = total.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps
    torch.testing.assert_close(adapter.weight_norm(w, 0.7), want, atol=1e-5, rtol=1e-5)


def test_cached_base_norm_follows_changes_of_the_base_weight():
    """LoRA keeps ‖W_i‖² of a frozen base between calls; an in-place change of the base (copy_, a merge of another
    adapter) must show in the next forward."""
    model = dora_model(lyco.LoRAConfig(r=2, alpha=3, target_modules=["fc"], use_dora=True, init_weights=False))
    layer = model.model.fc
    x = torch.randn(3, 32)
    first = layer(x)
    assert torch.equal(layer(x), first)  # the cached path gives the same output
    with torch.no_grad():
        layer.base_layer.weight.mul_(1.5)
    adapter = layer.lyco_adapters["default"]
    total = layer.base_layer.weight + adapter.delta_weight() * adapter.scaling
    merged = adapter.dora_scale * total / (total.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps)
    torch.testing.assert_close(layer(x), x @ merged.T + layer.base_layer.bias, atol=ATOL, rtol=1e-5)
    copy.deepcopy(model)(X)  # copies recompute for their own weights
