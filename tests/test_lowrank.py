"""ops/lowrank: truncated SVD and the nearest Kronecker product (Van Loan–Pitsianis), property-tested."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lyco.errors import ShapeMismatchError
from lyco.ops.factorize import plan_lokr
from lyco.ops.kron import make_kron
from lyco.ops.lowrank import (
    kron_rearrange,
    lokr_factors,
    nearest_kronecker,
    relative_error,
    svd_factors,
    svd_tail_error,
)

dims = st.integers(1, 6)
kernels = st.sampled_from([(), (3,), (2, 2)])
seeds = st.integers(0, 2**16)
SETTINGS = settings(max_examples=40, deadline=None)


def rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def fro(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t))


@SETTINGS
@given(out_l=dims, in_l=dims, out_r=dims, in_r=dims, kernel=kernels, seed=seeds)
def test_nearest_kronecker_recovers_an_exact_product(out_l, in_l, out_r, in_r, kernel, seed):
    a, b = rand(out_l, in_l, seed=seed), rand(out_r, in_r, *kernel, seed=seed + 1)
    w = make_kron(a, b)
    a2, b2 = nearest_kronecker(w, (out_l, in_l), (out_r, in_r))
    assert a2.shape == a.shape and b2.shape == b.shape
    torch.testing.assert_close(make_kron(a2, b2), w, rtol=1e-9, atol=1e-9)
    # the factors themselves are recovered up to a scale c (sign included): a2 = c·a, b2 = b / c
    c = (a2 * a).sum() / (a * a).sum()
    torch.testing.assert_close(a2, c * a, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(b2, b / c, rtol=1e-7, atol=1e-9)
    assert math.isclose(fro(a2), fro(b2), rel_tol=1e-9)  # norms balanced


@SETTINGS
@given(out_l=dims, in_l=dims, out_r=dims, in_r=dims, kernel=kernels, seed=seeds, eps=st.sampled_from([1e-3, 0.1, 1.0]))
def test_nearest_kronecker_beats_any_perturbation(out_l, in_l, out_r, in_r, kernel, seed, eps):
    w = rand(out_l * out_r, in_l * in_r, *kernel, seed=seed)
    a, b = nearest_kronecker(w, (out_l, in_l), (out_r, in_r))
    best = fro(w - make_kron(a, b))
    for i in range(4):
        pa, pb = rand(*a.shape, seed=seed + 10 + i), rand(*b.shape, seed=seed + 20 + i)
        assert best <= fro(w - make_kron(a + eps * pa, b + eps * pb)) + 1e-9
    # and the optimum is what the rearranged matrix's top singular value says: ‖W‖² − s₁²
    s = torch.linalg.svdvals(kron_rearrange(w, (out_l, in_l), (out_r, in_r)))
    assert math.isclose(best**2, max(fro(w) ** 2 - float(s[0]) ** 2, 0.0), rel_tol=1e-6, abs_tol=1e-9)


def test_rearrangement_maps_kron_to_rank_one() -> None:
    a, b = rand(2, 3, seed=0), rand(4, 5, seed=1)
    r = kron_rearrange(make_kron(a, b), (2, 3), (4, 5))
    torch.testing.assert_close(r, torch.outer(a.reshape(-1), b.reshape(-1)))


def test_nearest_kronecker_rejects_a_split_that_does_not_fit() -> None:
    with pytest.raises(ShapeMismatchError, match="cannot split"):
        nearest_kronecker(torch.zeros(6, 4), (4, 2), (2, 2))


@SETTINGS
@given(m=st.integers(1, 9), n=st.integers(1, 9), rank=st.integers(1, 10), seed=seeds)
def test_svd_factors_are_eckart_young_optimal(m, n, rank, seed):
    w = rand(m, n, seed=seed)
    a, b = svd_factors(w, rank)
    k = min(rank, m, n)
    assert a.shape == (m, k) and b.shape == (k, n)
    s = torch.linalg.svdvals(w)
    tail = math.sqrt(float(s[k:].square().sum()))
    assert math.isclose(fro(w - a @ b), tail, rel_tol=1e-7, abs_tol=1e-9)
    assert math.isclose(relative_error(w, a @ b), svd_tail_error(w, rank), rel_tol=1e-7, abs_tol=1e-9)
    # any other rank-k product is no better
    for i in range(3):
        pa, pb = rand(m, k, seed=seed + i + 1), rand(k, n, seed=seed + i + 7)
        assert tail <= fro(w - (a + 0.05 * pa) @ (b + 0.05 * pb)) + 1e-9


@SETTINGS
@given(m=st.integers(1, 9), n=st.integers(1, 9), true_rank=st.integers(1, 4), extra=st.integers(0, 3), seed=seeds)
def test_svd_factors_recover_a_low_rank_matrix(m, n, true_rank, extra, seed):
    w = rand(m, true_rank, seed=seed) @ rand(true_rank, n, seed=seed + 1)
    a, b = svd_factors(w, true_rank + extra, pad=True)
    assert a.shape == (m, true_rank + extra) and b.shape == (true_rank + extra, n)
    torch.testing.assert_close(a @ b, w, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(m=st.integers(2, 9), n=st.integers(2, 9), seed=seeds)
def test_svd_error_never_grows_with_rank(m, n, seed):
    w = rand(m, n, seed=seed)
    errors = [relative_error(w, torch.matmul(*svd_factors(w, r))) for r in range(1, min(m, n) + 1)]
    assert all(e2 <= e1 + 1e-12 for e1, e2 in itertools.pairwise(errors))
    assert errors[-1] < 1e-9


def test_large_matrices_use_subspace_iteration_with_the_full_svd_result(monkeypatch: pytest.MonkeyPatch) -> None:
    from lyco.ops import lowrank

    monkeypatch.setattr(lowrank, "DENSE_SVD_MAX", 16)  # keep the matrix tiny, still take the iterative path
    w = rand(40, 3, seed=0) @ rand(3, 30, seed=1) + 1e-3 * rand(40, 30, seed=2)
    u, s, vh = lowrank.truncated_svd(w, 2)
    u0, s0, vh0 = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(s, s0[:2], rtol=1e-9, atol=0)
    torch.testing.assert_close(u * s @ vh, (u0[:, :2] * s0[:2]) @ vh0[:2], rtol=1e-7, atol=1e-9)
    a, b = lowrank.nearest_kronecker(make_kron(rand(5, 6, seed=3), rand(8, 5, seed=4)), (5, 6), (8, 5))
    assert relative_error(make_kron(rand(5, 6, seed=3), rand(8, 5, seed=4)), make_kron(a, b)) < 1e-12


def test_svd_factors_dtype_and_determinism() -> None:
    w = torch.randn(6, 5)
    a1, b1 = svd_factors(w, 3)
    a2, b2 = svd_factors(w.clone(), 3)
    assert a1.dtype == torch.float32 and torch.equal(a1, a2) and torch.equal(b1, b2)
    assert (a1.gather(0, a1.abs().argmax(0, keepdim=True)) > 0).all()  # sign convention
    with pytest.raises(ValueError):
        svd_factors(w, 0)


def test_relative_error_edge_cases() -> None:
    z = torch.zeros(2, 2)
    assert relative_error(z, z) == 0.0
    assert relative_error(z, torch.ones(2, 2)) == math.inf
    assert relative_error(torch.ones(2, 2), torch.zeros(2, 2)) == 1.0


@pytest.mark.parametrize(
    ("shape", "r", "decompose_both"),
    [((64, 48), 2, False), ((64, 48), 2, True), ((64, 48), 8, False), ((16, 8, 3, 3), 1, False), ((16, 12, 3), 2, True)],
)
def test_lokr_factors_follow_the_plan_and_recover_an_exact_lokr(shape, r, decompose_both) -> None:
    plan = plan_lokr(shape[0], shape[1], shape[2:], r, -1, decompose_both)
    # an exact LoKr weight under this plan: rank-r factors where the plan makes them low-rank
    w1 = rand(plan.out_l, r, seed=0) @ rand(r, plan.in_l, seed=1) if not plan.use_w1 else rand(plan.out_l, plan.in_l, seed=2)
    w2 = rand(plan.out_r, r, seed=3) @ rand(r, plan.in_r * math.prod(plan.kernel), seed=4)
    w = make_kron(w1, w2.reshape(plan.out_r, plan.in_r, *plan.kernel))
    tensors = lokr_factors(w, plan)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == plan.param_shapes()
    rebuilt_w1 = tensors["lokr_w1"] if plan.use_w1 else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
    rebuilt_w2 = tensors["lokr_w2"] if plan.use_w2 else tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]
    approx = make_kron(rebuilt_w1, rebuilt_w2.reshape(plan.out_r, plan.in_r, *plan.kernel))
    assert relative_error(w, approx) < 1e-9
