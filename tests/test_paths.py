"""Dense vs factored forward paths: same outputs and gradients, and the cost model's choices.

Both paths are forced per adapter (``adapter.path``) and through ``LYCO_PATH``; every comparison is
against the naive seed formula ``F.linear(x, ΔW·scale)`` built independently of lyco's ops.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lyco
from lyco.ops.paths import call_costs, choose_path, forced_path

RTOL_FP32, ATOL_FP32 = 1e-5, 1e-5  # relative to the output scale, fp32
BF16_TOL = 3e-2  # bf16 vs fp32 reference, relative to max |output|


def naive_delta(adapter) -> torch.Tensor:
    """Seed formula for a linear-like adapter (unscaled)."""
    if isinstance(adapter, lyco.methods.LoHaAdapter):
        return (adapter.hada_w1_a @ adapter.hada_w1_b) * (adapter.hada_w2_a @ adapter.hada_w2_b)
    p = adapter.plan
    w1 = adapter.lokr_w1 if p.use_w1 else adapter.lokr_w1_a @ adapter.lokr_w1_b
    w2 = adapter.lokr_w2 if p.use_w2 else adapter.lokr_w2_a @ adapter.lokr_w2_b
    return torch.kron(w1, w2)


def adapted_linear(cfg_cls, in_f: int, out_f: int, **kw) -> tuple[lyco.LycoModel, lyco.AdaptedLayer]:
    model = lyco.get_model(nn.Sequential(nn.Linear(in_f, out_f)), cfg_cls(target_modules=["0"], init_weights=False, **kw))
    return model, model.model[0]


def out_and_grads(model, layer, x, path):
    for a in layer.lyco_adapters.values():
        a.path = path
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return y.detach(), x.grad.clone(), grads


def reference(layer, x):
    a = layer.lyco_adapters["default"]
    x = x.clone().requires_grad_(True)
    y = layer.base_layer(x) + F.linear(x, naive_delta(a) * a.scaling)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in a.named_parameters()}
    for p in a.parameters():
        p.grad = None
    return y.detach(), x.grad.clone(), grads


def assert_close_rel(a, b, rtol=RTOL_FP32, atol=ATOL_FP32):
    scale = max(1.0, float(b.abs().max()))
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol * scale)


SETTINGS = settings(max_examples=40, deadline=None)
dims = st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16, 24, 32])


@SETTINGS
@given(
    method=st.sampled_from(["loha", "lokr"]), in_f=dims, out_f=dims, r=st.integers(1, 6),
    lead=st.sampled_from([(1,), (5,), (2, 3), (2, 1, 4)]), factor=st.sampled_from([-1, 2, 4]),
    both=st.booleans(),
)  # fmt: skip
def test_dense_factored_and_naive_agree(method, in_f, out_f, r, lead, factor, both):
    torch.manual_seed(0)
    extra = {} if method == "loha" else {"decompose_factor": factor, "decompose_both": both}
    cfg_cls = lyco.LoHaConfig if method == "loha" else lyco.LoKrConfig
    model, layer = adapted_linear(cfg_cls, in_f, out_f, r=r, alpha=2 * r, **extra)
    x = torch.randn(*lead, in_f)
    ref_y, ref_gx, ref_g = reference(layer, x)
    for path in ("dense", "factored"):
        y, gx, grads = out_and_grads(model, layer, x, path)
        assert_close_rel(y, ref_y)
        assert_close_rel(gx, ref_gx)
        for name, g in ref_g.items():
            assert_close_rel(grads[f"model.0.lyco_adapters.default.{name}"], g)


@pytest.mark.parametrize("cfg_cls", [lyco.LoHaConfig, lyco.LoKrConfig])
@pytest.mark.parametrize("path", ["dense", "factored"])
def test_bf16_paths_match_fp32_reference(cfg_cls, path):
    torch.manual_seed(0)
    model, layer = adapted_linear(cfg_cls, 64, 48, r=4, alpha=4)
    x = torch.randn(3, 7, 64)
    ref, _, _ = reference(layer, x)
    model.to(torch.bfloat16)
    for a in layer.lyco_adapters.values():
        a.path = path
    with torch.no_grad():
        y = model(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() <= BF16_TOL * ref.abs().max()


@pytest.mark.parametrize("path", ["dense", "factored"])
def test_lyco_path_env_forces_every_layer(monkeypatch, path):
    monkeypatch.setenv("LYCO_PATH", path)
    assert forced_path() == path
    assert choose_path(dense_cost=1.0, factored_cost=2.0) == path
    assert choose_path(dense_cost=2.0, factored_cost=1.0) == path


def test_lyco_path_env_rejects_unknown(monkeypatch):
    monkeypatch.setenv("LYCO_PATH", "fast")
    with pytest.raises(lyco.ConfigError, match="LYCO_PATH"):
        forced_path()


@pytest.mark.parametrize(
    ("cfg_cls", "in_f", "out_f", "rows", "expected"),
    [
        (lyco.LoHaConfig, 1024, 1024, 512, "factored"),  # r² = 64 ≪ o·i/(o+i) = 512
        (lyco.LoHaConfig, 1024, 1024, 1, "factored"),  # decode: building ΔW costs 2·r·o·i
        (lyco.LoHaConfig, 16, 16, 512, "dense"),  # tiny layer: r² = 64 > o·i/(o+i) = 8
        (lyco.LoKrConfig, 1024, 1024, 512, "factored"),
        (lyco.LoKrConfig, 4, 4, 512, "dense"),
        (lyco.LoKrConfig, 64, 64, 512, "dense"),  # benchmarks/compare.py: factored 1.3-1.6× slower on CPU here
        (lyco.LoKrConfig, 1024, 1024, 1, "factored"),  # decode on a big layer: skip building ΔW
    ],
)  # fmt: skip
def test_cost_model_choices(monkeypatch, cfg_cls, in_f, out_f, rows, expected):
    monkeypatch.delenv("LYCO_PATH", raising=False)
    _, layer = adapted_linear(cfg_cls, in_f, out_f, r=8)
    adapter = layer.lyco_adapters["default"]
    assert choose_path(*adapter.path_costs(rows)) == expected


@pytest.mark.parametrize(
    ("cfg_cls", "rows", "grad", "fused", "expected"),
    [
        (lyco.LoHaConfig, 2048, False, True, "dense"),  # inference: W + ΔW costs a build, no extra matmul
        (lyco.LoHaConfig, 2048, False, False, "factored"),  # unfused: a second 2048-row matmul
        # 512 rows: building ΔW writes three 1024² tensors (4 ms measured on CPU) vs 1 ms factored
        (lyco.LoHaConfig, 512, False, True, "factored"),
        (lyco.LoHaConfig, 512, True, True, "factored"),  # training: the weight gradient is a full matmul
        (lyco.LoHaConfig, 1, False, True, "factored"),  # decode: the build costs more than 1 row factored
        (lyco.LoKrConfig, 4096, False, True, "dense"),
        (lyco.LoKrConfig, 512, False, True, "factored"),  # measured a tie (5.4 ms each, base 5.1 ms)
        (lyco.LoKrConfig, 512, True, True, "factored"),
        (lyco.LoKrConfig, 1, False, True, "factored"),
    ],
)  # fmt: skip
def test_cost_model_with_grad_and_fusion(monkeypatch, cfg_cls, rows, grad, fused, expected):
    monkeypatch.delenv("LYCO_PATH", raising=False)
    _, layer = adapted_linear(cfg_cls, 1024, 1024, r=8)
    adapter = layer.lyco_adapters["default"]
    assert adapter.select_path(rows, "cpu", grad=grad, fused=fused) == expected


def test_call_costs_formula():
    assert call_costs(10, 7, 100, grad=False, fused=False) == (110, 7)
    assert call_costs(10, 7, 100, grad=False, fused=True) == (10, 7)
    assert call_costs(10, 7, 100, grad=True, fused=False) == (330, 21)
    assert call_costs(10, 7, 100, grad=True, fused=True) == (130, 21)


