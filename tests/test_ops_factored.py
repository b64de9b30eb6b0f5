"""Factored apply ops: values and float64 gradients against the dense formula, and what they save."""

from __future__ import annotations

import pytest
import torch

from lyco.ops.hadamard import hada_apply, hada_delta_naive
from lyco.ops.kron import _KronApply, kron_apply, make_kron

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
