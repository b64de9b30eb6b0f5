"""LoRA maths: factored apply == dense ΔW applied the layer's way (linear, conv of every geometry, Tucker),
the fused linear + LoRA node == the two-step forward (outputs and gradients), gradcheck in float64."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lyco
from lyco.ops.lora_math import lora_apply, lora_apply_scaled, lora_delta, lora_linear

TOL = 1e-5  # fp32, relative to the output scale


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 7), i=st.integers(1, 9), o=st.integers(1, 9), r=st.integers(1, 5), seed=st.integers(0, 999))
def test_linear_factored_equals_dense(rows, i, o, r, seed):
    g = torch.Generator().manual_seed(seed)
    x, down, up = torch.randn(rows, 3, i, generator=g), torch.randn(r, i, generator=g), torch.randn(o, r, generator=g)
    want = x @ lora_delta(up, down).T
    torch.testing.assert_close(lora_apply(x, down, up), want, atol=TOL * (1 + want.abs().max()), rtol=0)


CONVS = {
    "conv2d": lambda: nn.Conv2d(6, 8, 3, padding=1),
    "conv2d_strided_dilated": lambda: nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2),
    "conv2d_reflect": lambda: nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"),
    "conv1d_circular": lambda: nn.Conv1d(6, 8, 5, padding=2, padding_mode="circular"),
    "conv2d_1x1": lambda: nn.Conv2d(6, 8, 1),
}


@pytest.mark.parametrize("tucker", [False, True], ids=["plain", "tucker"])
@pytest.mark.parametrize("kind", list(CONVS))
def test_conv_factored_equals_dense(kind, tucker):
    torch.manual_seed(0)
    base = CONVS[kind]()
    cfg = lyco.LoRAConfig(r=3, alpha=3, target_modules=["0"], init_weights=False, use_effective_conv2d=tucker)
    model = lyco.get_model(nn.Sequential(base), cfg)
    layer = model.model[0]
    x = torch.randn(2, 6, *([9] * (base.weight.dim() - 2)))
    outs = {}
    for path in ("dense", "factored"):
        layer.lyco_adapters["default"].path = path
        with torch.no_grad():
            outs[path] = layer(x)
    torch.testing.assert_close(outs["factored"], outs["dense"], atol=1e-5, rtol=1e-5)
    assert (outs["dense"] - layer.base_layer(x)).abs().max() > 1e-3


@pytest.mark.parametrize("rows", [5, 60], ids=["plain-autograd", "node"])  # below / above NODE_MIN_ROWS
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "alone"])
def test_gradcheck_lora_linear(rows, with_base):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    x, down, up, weight, bias = rnd(rows, 4), rnd(2, 4), rnd(6, 2), rnd(6, 4), rnd(6)
    if with_base:
        assert torch.autograd.gradcheck(lambda *a: lora_linear(*a, 0.7, weight, bias), (x, down, up), atol=1e-8)
        assert torch.autograd.gradcheck(lambda w, b: lora_linear(x, down, up, 0.7, w, b), (weight, bias), atol=1e-8)
    else:
        assert torch.autograd.gradcheck(lambda *a: lora_linear(*a, 0.7), (x, down, up), atol=1e-8)
    want = 0.7 * x @ (up @ down).T + (x @ weight.T + bias if with_base else 0)
    got = lora_linear(x, down, up, 0.7, weight, bias) if with_base else lora_linear(x, down, up, 0.7)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("rows", [1, 3, 40])
def test_scaled_apply_folds_the_scale_anywhere(rows):
    g = torch.Generator().manual_seed(rows)
    x, down, up = torch.randn(rows, 16, generator=g), torch.randn(3, 16, generator=g), torch.randn(24, 3, generator=g)
    want = 0.3 * x @ lora_delta(up, down).T
    torch.testing.assert_close(lora_apply_scaled(x, down, up, 0.3), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lora_apply_scaled(x, down, up, torch.tensor([0.3])), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_fused_lora_equals_unfused(train, monkeypatch):
    calls = []
    real = lyco.methods.lora.lora_linear
    monkeypatch.setattr(lyco.methods.lora, "lora_linear", lambda *a: calls.append(len(a)) or real(*a))
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 16))
    cfg = lyco.LoRAConfig(r=4, alpha=8, target_modules=["0", "2"], init_weights=False)
    models = []
    for _ in range(2):
        torch.manual_seed(1)  # the same random adapters
        models.append(lyco.get_model(copy.deepcopy(base), cfg))
    fused, plain = models
    for m in (fused, plain):
        m.train(train)
        for _, layer in m.adapted_layers():
            layer.lyco_adapters["default"].path = "factored"
    for _, layer in plain.adapted_layers():
        layer.fuse_dense = False
    x = torch.randn(3, 20, 32, requires_grad=True)  # 60 rows: the custom node (NODE_MIN_ROWS)
    outs, grads = [], []
    for m in (fused, plain):
        y = m(x)
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append([x.grad.clone(), *(p.grad.clone() for p in m.parameters() if p.requires_grad)])
        x.grad = None
    assert calls == [6, 6, 4, 4]  # the fused model ran base + LoRA as one step per layer, the other LoRA alone
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
