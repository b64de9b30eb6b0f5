"""Factored apply ops: values and float64 gradients against the dense formula, and what they save."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import hada_delta_naive
from lyco.ops.hadamard import hada_apply
from lyco.ops.kron import _KronApply, _KronApplyLowRank, kron_apply, kron_order, linear_kron_apply, make_kron

F64 = torch.float64
TOL = 1e-10  # float64


def _rand(*shape):
    return torch.randn(*shape, dtype=F64, requires_grad=True)


@pytest.mark.parametrize("right_first", [True, False])
@pytest.mark.parametrize("rank", [None, 2])
def test_kron_apply_both_orders_gradcheck(right_first, rank):
    torch.manual_seed(0)
    out_l, in_l, out_r, in_r = 3, 2, 4, 5
    x, w1 = _rand(6, in_l, in_r), _rand(out_l, in_l)
    w2_parts = (_rand(out_r, in_r), None, None) if rank is None else (None, _rand(out_r, rank), _rand(rank, in_r))

    def f(x, w1, *parts):
        return _KronApply.apply(x, w1, *parts, right_first)

    inputs = (x, w1, *[p for p in w2_parts if p is not None])
    if rank is None:
        assert torch.autograd.gradcheck(lambda x, w1, w2: f(x, w1, w2, None, None), inputs)
        w2 = w2_parts[0]
    else:
        assert torch.autograd.gradcheck(lambda x, w1, a, b: f(x, w1, None, a, b), inputs)
        w2 = w2_parts[1] @ w2_parts[2]
    dense = x.reshape(6, -1) @ make_kron(w1, w2).T
    got = f(x, w1, *w2_parts).reshape(6, -1)
    torch.testing.assert_close(got, dense, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("with_base", [False, True])
def test_kron_low_rank_middle_order_gradcheck(with_base):
    """The "middle" order, alone and fused with a (here trainable) base linear: every input's gradient."""
    torch.manual_seed(0)
    out_l, in_l, out_r, in_r, rank, m = 3, 2, 4, 5, 2, 6
    x, w1, a, b = _rand(m, in_l * in_r), _rand(out_l, in_l), _rand(out_r, rank), _rand(rank, in_r)
    base = (_rand(out_l * out_r, in_l * in_r), _rand(out_l * out_r)) if with_base else (None, None)
    inputs = (x, w1, a, b, *[t for t in base if t is not None])

    def f(x, w1, a, b, *wb):
        return _KronApplyLowRank.apply(x, w1, a, b, *(wb or (None, None)))

    assert torch.autograd.gradcheck(f, inputs)
    want = x @ make_kron(w1, a @ b).T
    if with_base:
        want = want + torch.nn.functional.linear(x, *base)
    torch.testing.assert_close(f(*inputs), want, atol=TOL, rtol=TOL)


@settings(max_examples=40, deadline=None)
@given(
    out_l=st.integers(1, 5), in_l=st.integers(1, 5), out_r=st.integers(1, 6), in_r=st.integers(1, 6),
    rank=st.integers(1, 4), lead=st.lists(st.integers(1, 3), min_size=0, max_size=2), frozen=st.booleans(),
)  # fmt: skip
def test_linear_kron_apply_matches_formula(out_l, in_l, out_r, in_r, rank, lead, frozen):
    """Base linear + LoKr term in one node == F.linear + x·kron(w1, w2_a w2_b)ᵀ: outputs and gradients."""
    g = torch.Generator().manual_seed(out_l * 1000 + in_l * 100 + out_r * 10 + in_r)
    ts = [torch.randn(*s, generator=g, dtype=F64) for s in
          ((*lead, in_l * in_r), (out_l * out_r, in_l * in_r), (out_l * out_r,), (out_l, in_l), (out_r, rank), (rank, in_r))]  # fmt: skip
    for i, t in enumerate(ts):
        t.requires_grad_(not (frozen and i in (1, 2)))
    x, w, bias, w1, a, b = ts
    got = linear_kron_apply(x, w, bias, w1, a, b)
    want = torch.nn.functional.linear(x, w, bias) + x @ make_kron(w1, a @ b).T
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    up = torch.randn(got.shape, generator=g, dtype=F64)
    grads = torch.autograd.grad((got * up).sum(), [t for t in ts if t.requires_grad])
    wants = torch.autograd.grad((want * up).sum(), [t for t in ts if t.requires_grad])
    for gg, ww in zip(grads, wants, strict=True):
        torch.testing.assert_close(gg, ww, atol=TOL, rtol=TOL)


def test_kron_order_picks_fewest_multiply_adds():
    assert kron_order(32, 32, 32, 32, 8) == "middle"  # 24.6k vs 48k per row
    assert kron_order(32, 32, 32, 32, None) == "right"  # tie: right first
    assert kron_order(2, 64, 64, 64, None) == "left"  # w1 shrinks 64 → 2 first
    assert kron_order(2, 64, 64, 64, 64) in ("left", "middle")


def _saved_storages(fn) -> set[int]:
    ptrs: set[int] = set()

    def pack(t):
        ptrs.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return ptrs


def test_kron_apply_saves_only_input_and_factors():
    torch.manual_seed(0)
    x = torch.randn(32, 64, requires_grad=True)
    w1 = torch.randn(8, 8, requires_grad=True)
    a, b = torch.randn(8, 2, requires_grad=True), torch.randn(2, 8, requires_grad=True)
    saved = _saved_storages(lambda: kron_apply(x, w1, None, a, b))
    allowed = {t.untyped_storage().data_ptr() for t in (x, w1, a, b)}
    assert saved <= allowed


def test_hada_apply_matches_dense_and_grads():
    torch.manual_seed(0)
    w1a, w1b, w2a, w2b = _rand(5, 3), _rand(3, 7), _rand(5, 2), _rand(2, 7)
    x = _rand(4, 7)
    assert torch.autograd.gradcheck(hada_apply, (x, w1a, w1b, w2a, w2b))
    dense = x @ hada_delta_naive(w1a, w1b, w2a, w2b).T
    torch.testing.assert_close(hada_apply(x, w1a, w1b, w2a, w2b), dense, atol=TOL, rtol=TOL)
