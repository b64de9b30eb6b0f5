"""Factored LoKr convolution: ``kron_conv_apply`` equals a convolution with ``kron(w1, w2)`` (both orders,
Conv1d/Conv2d, stride/padding/padding mode/dilation, unbatched), gradients included; the layer's factored and
dense paths agree; grouped convolutions and LoHa stay dense; the cost model picks by size.
Tolerances: float64 1e-12 relative (same maths, different summation order)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lyco
from lyco.ops.kron import kron_conv_apply, kron_conv_order, make_kron

F64 = dict(dtype=torch.float64)


def _conv(dims: int, **kw) -> nn.Module:
    return (nn.Conv1d if dims == 1 else nn.Conv2d)(1, 1, 1, **kw)  # only its conv settings are used


@settings(max_examples=40, deadline=None)
@given(
    out_l=st.integers(1, 4), in_l=st.integers(1, 4), out_r=st.integers(1, 4), in_r=st.integers(1, 4),
    k=st.sampled_from([1, 3]), dims=st.sampled_from([1, 2]), stride=st.sampled_from([1, 2]),
    padding=st.sampled_from([0, 1, "same"]), dilation=st.sampled_from([1, 2]),
    mode=st.sampled_from(["zeros", "reflect", "circular"]), batch=st.sampled_from([0, 1, 3]),
)  # fmt: skip
def test_kron_conv_apply_matches_dense_conv(out_l, in_l, out_r, in_r, k, dims, stride, padding, dilation, mode, batch):
    if padding == "same" and stride != 1:
        stride = 1  # torch: padding="same" needs stride 1
    base = _conv(dims, stride=stride, padding=padding, dilation=dilation, padding_mode=mode)
    g = torch.Generator().manual_seed(out_l + 10 * in_l + 100 * out_r + 1000 * in_r + k)
    w1 = torch.randn(out_l, in_l, generator=g, **F64)
    w2 = torch.randn(out_r, in_r, *([k] * dims), generator=g, **F64)
    spatial = [7] * dims
    x = torch.randn(*([batch] if batch else []), in_l * in_r, *spatial, generator=g, **F64)
    conv = partial(base._conv_forward, bias=None)
    want = conv(x, make_kron(w1, w2))
    got = kron_conv_apply(x, w1, w2, conv)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shapes", [(2, 3, 4, 2), (4, 2, 2, 3)])  # one per contraction order
def test_kron_conv_apply_gradcheck_both_orders(shapes):
    out_l, in_l, out_r, in_r = shapes
    base = nn.Conv2d(1, 1, 3, stride=2, padding=1)
    conv = partial(base._conv_forward, bias=None)
    g = torch.Generator().manual_seed(0)
    w1 = torch.randn(out_l, in_l, generator=g, **F64, requires_grad=True)
    w2 = torch.randn(out_r, in_r, 3, 3, generator=g, **F64, requires_grad=True)
    x = torch.randn(2, in_l * in_r, 5, 5, generator=g, **F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: kron_conv_apply(x, a, b, conv), (x, w1, w2))


def test_kron_conv_order_picks_fewer_multiply_adds():
    # conv-first: in_l·out_r·(in_r·k + out_l); mix-first: out_l·in_r·(in_l + out_r·k)
    seen = set()
    for out_l, in_l, out_r, in_r, k in [(2, 3, 4, 2, 9), (4, 2, 2, 3, 9), (16, 16, 20, 20, 9), (8, 32, 8, 8, 1)]:
        conv_first = in_l * out_r * (in_r * k + out_l)
        mix_first = out_l * in_r * (in_l + out_r * k)
        order = kron_conv_order(out_l, in_l, out_r, in_r, k)
        assert order == ("conv" if conv_first <= mix_first else "mix")
        seen.add(order)
    assert seen == {"conv", "mix"}


CONFIGS = {
    "full_w2": dict(),
    "low_rank_both": dict(decompose_both=True),
    "cp": dict(use_effective_conv2d=True),
}


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.Conv2d(32, 64, 3, stride=2, padding=1),
        lambda: nn.Conv2d(32, 32, 3, padding=2, padding_mode="reflect", dilation=2),
        lambda: nn.Conv1d(16, 24, 5, padding="same"),
    ],
    ids=["conv2d_stride", "conv2d_reflect_dilated", "conv1d_same"],
)
def test_layer_factored_and_dense_conv_agree(cfg, make):
    torch.manual_seed(0)
    net = nn.Sequential(make()).double()
    model = lyco.get_model(net, lyco.LoKrConfig(r=4, alpha=8, init_weights=False, target_modules=["0"], **CONFIGS[cfg]))
    model.double().train()
    conv = model.model[0].base_layer
    x = torch.randn(2, conv.in_channels, *([9, 11] if conv.weight.dim() == 4 else [13]), **F64, requires_grad=True)
    adapter = model.model[0].lyco_adapters["default"]
    results = {}
    for path in ("dense", "factored"):
        adapter.path = path
        model.zero_grad(set_to_none=True)
        x.grad = None
        y = model(x)
        y.square().sum().backward()
        results[path] = [y.detach(), x.grad, *(p.grad for p in adapter.parameters())]
    for got, want in zip(results["factored"], results["dense"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12 * want.abs().max().item())


def test_grouped_conv_stays_dense(monkeypatch):
    monkeypatch.setenv("LYCO_PATH", "factored")
    torch.manual_seed(0)
    model = lyco.get_model(nn.Sequential(nn.Conv2d(8, 8, 3, groups=2)), lyco.LoKrConfig(r=2, init_weights=False, target_modules=["0"]))
    layer = model.model[0]
    called = []
    adapter = layer.lyco_adapters["default"]
    adapter.factored_delta = lambda *a, **k: called.append(1)  # must not be reached
    x = torch.randn(1, 8, 6, 6)
    want = layer.base_layer(x) + layer.base_layer._conv_forward(x, layer.get_delta_weight("default"), None)
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    assert not called


def test_loha_conv_is_always_dense(monkeypatch):
    monkeypatch.setenv("LYCO_PATH", "factored")
    model = lyco.get_model(nn.Sequential(nn.Conv2d(8, 8, 3)), lyco.LoHaConfig(r=2, target_modules=["0"]))
    assert model.model[0].lyco_adapters["default"].select_path(100, "cpu") == "dense"


@pytest.mark.parametrize(
    "channels, positions, grad, expected",
    [
        (320, 2 * 32 * 32, True, "factored"),  # UNet-size 3×3 conv, training: no full weight-gradient conv
        (640, 2 * 16 * 16, True, "factored"),
        (64, 2 * 64 * 64, True, "dense"),  # 8-channel slices are too slow for what they save
        (320, 2 * 32 * 32, False, "dense"),  # inference: the fused W + ΔW conv costs only the build
    ],
)
def test_cost_model_for_lokr_conv(monkeypatch, channels, positions, grad, expected):
    monkeypatch.delenv("LYCO_PATH", raising=False)
    model = lyco.get_model(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1)), lyco.LoKrConfig(r=8, target_modules=["0"]))
    adapter = model.model[0].lyco_adapters["default"]
    assert adapter.select_path(positions, "cpu", grad=grad, fused=True) == expected


def test_factored_conv_compiles_without_graph_breaks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.SiLU(), nn.Conv2d(16, 32, 3, stride=2))
    model = lyco.get_model(net, lyco.LoKrConfig(r=4, init_weights=False, target_modules=["0", "2"])).train()
    for layer in (model.model[0], model.model[2]):
        layer.lyco_adapters["default"].path = "factored"
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    want = model(x)
    want.sum().backward()
    want_grad, x.grad = x.grad.clone(), None
    got = torch.compile(model, fullgraph=True)(x)  # fullgraph: any graph break raises
    got.sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, want_grad, rtol=1e-5, atol=1e-5)
