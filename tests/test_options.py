"""LyCORIS's options trainers set, on lyco's methods: ``use_scalar``, ``use_rslora`` (LyCORIS ``rs_lora``) on
LoHa/LoKr, LoKr ``full_matrix`` / ``unbalanced_factorization`` / factors of unequal rank, LoHa
``rank_dropout_scale``. lycoris-lora oracles for them are in test_lycoris_oracle.py; here the maths, the
files and the real ``peft`` reading lyco's folders.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import lyco
from conftest import X, base_model
from lyco.ops.factorize import factorization

peft = pytest.importorskip("peft")

ATOL = 1e-5  # fp32, two implementations of one ΔW
TARGETS = ["conv2d", "conv1d", "fc"]  # conftest's MixedNet: Conv2d 4→16 k3, Conv1d 16→32 k3, Linear 32→16
LOW_RANK = {"lora": lyco.LoRAConfig, "loha": lyco.LoHaConfig, "lokr": lyco.LoKrConfig}


def run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def set_scalars(model: lyco.LycoModel, value: float) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".scalar"):
                p.fill_(value)


# -- use_scalar ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(LOW_RANK))
def test_use_scalar_starts_at_zero_with_random_factors(method):
    model = lyco.get_model(base_model(), LOW_RANK[method](r=2, alpha=3, target_modules=TARGETS, use_scalar=True))
    torch.testing.assert_close(run(model), run(base_model()), atol=0, rtol=0)
    for _, layer in model.adapted_layers():
        adapter = layer.lyco_adapters["default"]
        assert float(adapter.scalar.detach()) == 0.0 and tuple(adapter.scalar.shape) == (1,)
        assert all(t.abs().sum() > 0 for t in adapter.tensors().values())  # no zero factor: all train
    model.train()
    model(X).square().mean().backward()
    scalars = [p.grad for n, p in model.named_parameters() if n.endswith(".scalar")]
    assert len(scalars) == 3 and all(g is not None and g.abs().max() > 0 for g in scalars)


@pytest.mark.parametrize("method", list(LOW_RANK))
def test_use_scalar_multiplies_delta_and_is_folded_into_files(tmp_path, method):
    cfg = LOW_RANK[method](r=2, alpha=3, target_modules=TARGETS, use_scalar=True, init_weights=False)
    model = lyco.get_model(base_model(), cfg).eval()
    unit = {name: layer.get_delta_weight("default").clone() for name, layer in model.adapted_layers()}
    set_scalars(model, -0.35)
    for name, layer in model.adapted_layers():
        torch.testing.assert_close(layer.get_delta_weight("default"), -0.35 * unit[name], atol=ATOL, rtol=1e-5)
    want = run(model)
    model.save_pretrained(tmp_path / "peft")
    lyco.save_lycoris(model, tmp_path / "a.safetensors")
    assert not any("scalar" in k for k in load_file(tmp_path / "a.safetensors"))
    assert not any("scalar" in k for k in load_file(tmp_path / "peft" / "adapter_model.safetensors"))
    reloaded = lyco.LycoModel.from_pretrained(base_model(), tmp_path / "peft", is_trainable=True)
    assert all(float(p.detach()) == 1.0 for n, p in reloaded.named_parameters() if n.endswith(".scalar"))
    assert all(p.requires_grad for n, p in reloaded.named_parameters() if n.endswith(".scalar"))
    torch.testing.assert_close(run(reloaded), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(run(lyco.load_lycoris(base_model(), tmp_path / "a.safetensors")), want, atol=ATOL, rtol=0)
    torch.testing.assert_close(run(model.merge_and_unload()), want, atol=ATOL, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "Unexpected keyword arguments ['use_scalar'] ... ignored"
        in_peft = peft.PeftModel.from_pretrained(base_model(), tmp_path / "peft")
    torch.testing.assert_close(run(in_peft), want, atol=ATOL, rtol=0)


def test_use_scalar_refuses_a_string_init():
    with pytest.raises(lyco.ConfigError, match="use_scalar"):
        lyco.LoKrConfig(use_scalar=True, init_weights="lycoris")


# -- use_rslora on LoHa / LoKr ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_rslora_scale_files_and_peft(tmp_path, method):
    """Scale ``alpha / √r``; LyCORIS files store ``alpha·√r``; PEFT (which lacks the option) gets the ratio folded
    into the tensors, so PEFT's ``alpha / r`` computes lyco's ΔW, and lyco reads its folder back exactly."""
    cfg = LOW_RANK[method](r=2, alpha=3, target_modules=TARGETS, use_rslora=True, init_weights=False,
                           decompose_both=True) if method == "lokr" else \
        LOW_RANK[method](r=4, alpha=3, target_modules=TARGETS, use_rslora=True, init_weights=False, rank_pattern={"fc": 2})  # fmt: skip
    model = lyco.get_model(base_model(), cfg).eval()
    for name, layer in model.adapted_layers():
        adapter = layer.lyco_adapters["default"]
        if adapter.plan.ranked:
            assert layer.scaling["default"] == pytest.approx(3 / math.sqrt(adapter.r)), name
    want = run(model)
    lyco.save_lycoris(model, tmp_path / "a.safetensors")
    file = load_file(tmp_path / "a.safetensors")
    fc = model.model.fc.lyco_adapters["default"]
    fc_r = fc.r
    assert fc.plan.ranked and float(file["lycoris_fc.alpha"]) == pytest.approx(3 * math.sqrt(fc_r))
    torch.testing.assert_close(run(lyco.load_lycoris(base_model(), tmp_path / "a.safetensors")), want, atol=ATOL, rtol=0)
    model.save_pretrained(tmp_path / "peft")
    torch.testing.assert_close(run(lyco.LycoModel.from_pretrained(base_model(), tmp_path / "peft")), want, atol=ATOL, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft: "Unexpected keyword arguments ['use_rslora'] ... ignored"
        in_peft = peft.PeftModel.from_pretrained(base_model(), tmp_path / "peft")
    torch.testing.assert_close(run(in_peft), want, atol=ATOL, rtol=0)


# -- LoKr full_matrix / unbalanced_factorization / unequal ranks ---------------------------------------------
def test_full_matrix_makes_both_factors_full_and_scale_one(tmp_path):
    cfg = lyco.LoKrConfig(r=1, alpha=7, target_modules=TARGETS, full_matrix=True, init_weights=False)
    model = lyco.get_model(base_model(), cfg).eval()
    for _, layer in model.adapted_layers():
        adapter = layer.lyco_adapters["default"]
        assert adapter.plan.both_full and set(adapter.tensors()) == {"lokr_w1", "lokr_w2"}
        assert layer.scaling["default"] == 1.0
    want = run(model)
    with pytest.warns(UserWarning, match=r"full_matrix.*PEFT"):
        model.save_pretrained(tmp_path)
    torch.testing.assert_close(run(lyco.LycoModel.from_pretrained(base_model(), tmp_path)), want, atol=ATOL, rtol=0)


def test_full_matrix_alpha_zero_cannot_be_a_peft_folder(tmp_path):
    model = lyco.get_model(base_model(), lyco.LoKrConfig(r=1, alpha=0, target_modules=["fc"], full_matrix=True))
    with pytest.warns(UserWarning), pytest.raises(lyco.FormatError, match=r"'fc'.*alpha 0"):
        model.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_unbalanced_factorization_gives_w1_the_larger_output_part():
    cfg = lyco.LoKrConfig(r=1, target_modules=["conv1d", "fc"], unbalanced_factorization=True, init_weights=False)
    model = lyco.get_model(base_model(), cfg)
    for name, layer in model.adapted_layers():
        plan = layer.lyco_adapters["default"].plan
        small, large = factorization(plan.out_features)
        assert (plan.out_l, plan.out_r) == (large, small), name
        assert (plan.in_l, plan.in_r) == factorization(plan.in_features), name


def test_unequal_factor_ranks_load_with_w2_rank_scale(tmp_path):
    """w1 rank 2, w2 rank 3 on Linear 32→16 (w1 (4, 4)… split 4×4 / 4×8): ComfyUI's and AUTOMATIC1111's rule
    ``alpha / r`` with ``w2``'s rank; the file round-trips with its shapes."""
    g = torch.Generator().manual_seed(5)
    t = {"lokr_w1_a": torch.randn(4, 2, generator=g), "lokr_w1_b": torch.randn(2, 4, generator=g),
         "lokr_w2_a": torch.randn(4, 3, generator=g), "lokr_w2_b": torch.randn(3, 8, generator=g)}  # fmt: skip
    save_file({**{f"lycoris_fc.{k}": v for k, v in t.items()}, "lycoris_fc.alpha": torch.tensor(1.5)}, tmp_path / "u.safetensors")
    model = lyco.load_lycoris(base_model(), tmp_path / "u.safetensors")
    layer = model.model.fc
    assert layer.scaling["default"] == pytest.approx(1.5 / 3)
    want_delta = torch.kron(t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * 0.5
    torch.testing.assert_close(layer.get_delta_weight("default"), want_delta, atol=ATOL, rtol=1e-5)
    h = torch.randn(5, 32, generator=g)
    base_fc = base_model().fc
    with torch.no_grad():
        want = torch.nn.functional.linear(h, base_fc.weight + want_delta, base_fc.bias)
        torch.testing.assert_close(layer(h), want, atol=ATOL, rtol=0)
    lyco.save_lycoris(model, tmp_path / "back.safetensors")
    back = load_file(tmp_path / "back.safetensors")
    assert {k: tuple(v.shape) for k, v in back.items() if k != "lycoris_fc.alpha"} == {
        f"lycoris_fc.{k}": tuple(v.shape) for k, v in t.items()
    }
    torch.testing.assert_close(run(lyco.load_lycoris(base_model(), tmp_path / "back.safetensors")), run(model), atol=ATOL, rtol=0)
