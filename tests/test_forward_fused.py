"""The fused dense forward (``F.linear(x, W + ΔW, b)``), when it applies, and the compute-dtype policy.

Fused and unfused forwards must agree (outputs and every gradient, fp32 1e-5) for every layer kind
and option of the adapter table, with several adapters, rank dropout and module dropout (same seed →
same masks); fusing must never bypass what the base layer's ``__call__`` would run (hooks), never run
on low-precision weights or under autocast, and ``compute_dtype`` decides the dtype of the adapter maths.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lyco
from conftest import Container, adapt, make_input
from test_layers import CASES

TOL = 1e-5  # fp32, fused vs unfused (one matmul of W + ΔW vs two matmuls, different rounding)


def _forward_and_grads(model: lyco.LycoModel, x: torch.Tensor, fuse: bool, seed: int = 1):
    for _, layer in model.adapted_layers():
        layer.fuse_dense = fuse
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = model(x)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads


@pytest.fixture
def dense_path(monkeypatch):
    monkeypatch.setenv("LYCO_PATH", "dense")


@pytest.mark.parametrize(("opt", "kind"), CASES)
def test_fused_equals_unfused_outputs_and_grads(opt, kind, dense_path):
    model, layer = adapt(kind, opt.config())
    model.train()
    x = make_input(kind)
    fusable = kind in ("linear",) or kind.startswith("conv")
    assert layer.can_fuse(x) is fusable  # transformers' Conv1D keeps the unfused path
    out_f, gx_f, g_f = _forward_and_grads(model, x, fuse=True)
    out_u, gx_u, g_u = _forward_and_grads(model, x, fuse=False)
    assert (out_f - layer.base_layer(x)).abs().max() > 1e-3  # the adapter moves the output
    torch.testing.assert_close(out_f, out_u, atol=TOL, rtol=TOL)
    torch.testing.assert_close(gx_f, gx_u, atol=TOL, rtol=TOL)
    assert g_f.keys() == g_u.keys() and g_f
    for name in g_f:
        torch.testing.assert_close(g_f[name], g_u[name], atol=TOL, rtol=TOL, msg=name)
    assert layer.base_layer.weight.grad is None  # the base stays frozen through W + ΔW


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_fused_with_two_adapters_and_dropouts(kind, dense_path):
    cfg = dict(target_modules=["layer"], init_weights=False, rank_dropout=0.5, module_dropout=0.3)
    model, _ = adapt(kind, lyco.LoHaConfig(r=2, alpha=4, **cfg))
    model.add_adapter("other", lyco.LoKrConfig(r=2, alpha=2, **cfg))
    model.set_adapter(["default", "other"])
    model.train()
    x = make_input(kind)
    for seed in range(6):  # different draws: some drop a whole adapter, all drop rows
        out_f, gx_f, g_f = _forward_and_grads(model, x, fuse=True, seed=seed)
        out_u, gx_u, g_u = _forward_and_grads(model, x, fuse=False, seed=seed)
        torch.testing.assert_close(out_f, out_u, atol=TOL, rtol=TOL)
        torch.testing.assert_close(gx_f, gx_u, atol=TOL, rtol=TOL)
        for name in g_u:
            torch.testing.assert_close(g_f[name], g_u[name], atol=TOL, rtol=TOL, msg=name)


def test_fused_matches_explicit_formula_in_eval(dense_path):
    model, layer = adapt("linear", lyco.LoKrConfig(r=2, alpha=3, target_modules=["layer"], init_weights=False))
    model.eval()
    x = make_input("linear")
    with torch.no_grad():
        want = layer.base_layer(x) + x @ layer.get_delta_weight("default").T
        torch.testing.assert_close(model(x), want, atol=TOL, rtol=TOL)


def test_hooks_on_the_base_layer_still_run(dense_path):
    model, layer = adapt("linear", lyco.LoHaConfig(r=2, target_modules=["layer"], init_weights=False))
    x = make_input("linear")
    assert layer.can_fuse(x)
    seen = []
    handle = layer.base_layer.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    try:
        assert not layer.can_fuse(x)
        model(x)
        assert seen == [torch.Size([2, 5, 64])]
    finally:
        handle.remove()
    assert layer.can_fuse(x)
    handle = nn.modules.module.register_module_forward_pre_hook(lambda mod, inp: None)
    try:
        assert not layer.can_fuse(x)
    finally:
        handle.remove()


class _QuantLinear(nn.Linear):
    """A Linear subclass with its own forward (as quantised layers are): must not be fused."""

    def forward(self, x):
        return super().forward(x) + 1.0


def test_no_fusing_for_subclasses_low_precision_and_autocast(dense_path):
    model = lyco.get_model(Container(_QuantLinear(8, 8)), lyco.LoHaConfig(r=2, target_modules=["layer"]))
    x = torch.randn(3, 8)
    assert not model.model.layer.can_fuse(x)
    torch.testing.assert_close(model(x), model.model.layer.base_layer(x))  # zero-init delta: base output only

    _, layer = adapt("linear", lyco.LoHaConfig(r=2, target_modules=["layer"]))
    x = make_input("linear")
    assert layer.can_fuse(x)
    assert not layer.can_fuse(x.double())  # input dtype differs from the weight's
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not layer.can_fuse(x)
    layer.fuse_dense = False
    assert not layer.can_fuse(x)

    _, half = adapt("linear", lyco.LoHaConfig(r=2, target_modules=["layer"]), dtype=torch.bfloat16)
    assert not half.can_fuse(make_input("linear", dtype=torch.bfloat16))


def test_fused_path_keeps_a_small_delta_that_bf16_would_round_away(dense_path):
    """Why low-precision weights are not fused: ``W + ΔW`` in bf16 loses a delta below W's rounding step."""
    model, layer = adapt("linear", lyco.LoHaConfig(r=2, target_modules=["layer"], init_weights=False))
    with torch.no_grad():
        layer.lyco_adapters["default"].hada_w2_b.mul_(1e-4)
    x = make_input("linear")
    with torch.no_grad():
        moved = model(x) - layer.base_layer(x)
        want = x @ layer.get_delta_weight("default").T
    torch.testing.assert_close(moved, want, atol=1e-6, rtol=1e-3)
    w = layer.base_layer.weight
    assert ((w.bfloat16() + layer.get_delta_weight("default").bfloat16()) == w.bfloat16()).float().mean() > 0.5


# -- compute dtype ---------------------------------------------------------------------------------------
def _seen_dtypes(layer: lyco.AdaptedLayer) -> list[torch.dtype]:
    """Wrap the adapter's factored_delta/delta_weight to record the dtype it computes in."""
    adapter = layer.lyco_adapters["default"]
    seen: list[torch.dtype] = []
    fd, dw = adapter.factored_delta, adapter.delta_weight

    def factored_delta(x, scale=1.0, conv=None):
        seen.append(x.dtype)
        return fd(x, scale, conv)

    def delta_weight(dtype=None):
        out = dw(dtype)
        seen.append(out.dtype)
        return out

    adapter.factored_delta, adapter.delta_weight = factored_delta, delta_weight
    return seen


@pytest.mark.parametrize("path", ["dense", "factored"])
@pytest.mark.parametrize(
    ("mode", "want"), [("input", torch.bfloat16), ("adapter", torch.float32), (torch.float64, torch.float64)]
)
def test_compute_dtype(monkeypatch, path, mode, want):
    monkeypatch.setenv("LYCO_PATH", path)
    model, layer = adapt("linear", lyco.LoHaConfig(r=2, target_modules=["layer"], init_weights=False),
                         dtype=torch.bfloat16)  # fmt: skip
    assert layer.lyco_adapters["default"].dtype == torch.float32  # fp32 master weights (default)
    assert layer.compute_dtype == "input"
    model.set_compute_dtype(mode)
    seen = _seen_dtypes(layer)
    x = make_input("linear", dtype=torch.bfloat16)
    out = model(x)
    assert out.dtype == torch.bfloat16 and seen == [want]
    out.float().square().mean().backward()
    for p in layer.lyco_adapters["default"].parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32


def test_compute_dtype_input_is_faithful_in_bf16(dense_path):
    """bf16 adapter maths from fp32 master weights tracks the fp32 computation within bf16 tolerance."""
    model, layer = adapt("linear", lyco.LoKrConfig(r=2, target_modules=["layer"], init_weights=False),
                         dtype=torch.bfloat16)  # fmt: skip
    x = make_input("linear", dtype=torch.bfloat16)
    with torch.no_grad():
        got = model(x).float()
        base32 = copy.deepcopy(layer.base_layer).float()
        want = base32(x.float()) + x.float() @ layer.get_delta_weight("default").float().T
    assert (got - want).abs().max() <= 3e-2 * want.abs().max()


def test_set_compute_dtype_rejects_unknown():
    model, _ = adapt("linear", lyco.LoHaConfig(r=2, target_modules=["layer"]))
    with pytest.raises(lyco.ConfigError, match="compute_dtype"):
        model.set_compute_dtype("fp8")
    with pytest.raises(lyco.ConfigError, match="compute_dtype"):
        model.set_compute_dtype(torch.int8)


@pytest.mark.parametrize("trainable_base", [False, True])
def test_lokr_fused_with_the_base_linear(monkeypatch, trainable_base):
    """LoKr (low-rank w2, "middle" order) on the factored path is fused with a plain Linear base into one
    node (``LoKrAdapter.fused_linear``): same outputs and gradients as base + factored delta, also with a
    second adapter, module dropout and a trainable base weight."""
    monkeypatch.setenv("LYCO_PATH", "factored")
    cfg = dict(r=2, alpha=3, target_modules=["layer"], init_weights=False, module_dropout=0.4)
    model, layer = adapt("linear", lyco.LoKrConfig(**cfg))
    model.add_adapter("other", lyco.LoHaConfig(**cfg))
    model.set_adapter(["default", "other"])
    if trainable_base:
        layer.base_layer.weight.requires_grad_(True)
        layer.base_layer.bias.requires_grad_(True)
    adapter = layer.lyco_adapters["default"]
    calls = []
    original = adapter.fused_linear
    adapter.fused_linear = lambda *a: calls.append(1) or original(*a)
    model.train()
    x = make_input("linear")
    for seed in range(4):
        out_f, gx_f, g_f = _forward_and_grads(model, x, fuse=True, seed=seed)
        out_u, gx_u, g_u = _forward_and_grads(model, x, fuse=False, seed=seed)
        torch.testing.assert_close(out_f, out_u, atol=TOL, rtol=TOL)
        torch.testing.assert_close(gx_f, gx_u, atol=TOL, rtol=TOL)
        assert g_f.keys() == g_u.keys()
        assert ("model.layer.base_layer.weight" in g_f) is trainable_base
        for name in g_u:
            torch.testing.assert_close(g_f[name], g_u[name], atol=TOL, rtol=TOL, msg=name)
    assert len(calls) == 4  # fused_linear ran (and returned a result) in every fused forward
