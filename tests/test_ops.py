"""Pure tensor maths in ``lyco.ops``: factorization, shape plans, LoHa custom autograd, kron, CP."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lyco
from conftest import hada_delta_naive
from lyco.ops import (
    LoHaPlan,
    LoKrPlan,
    cp_rebuild,
    factorization,
    hada_delta,
    hada_delta_cp,
    infer_loha_plan,
    infer_lokr_plan,
    make_kron,
    plan_loha,
    plan_lokr,
)

FP64_TOL = 1e-10  # custom autograd vs plain autograd, float64
FP32_TOL = 1e-5  # CP contraction order vs naive einsum, float32
SETTINGS = settings(deadline=None, max_examples=40)

dims = st.integers(1, 96)
kernels = st.lists(st.integers(1, 3), max_size=2).map(tuple)
ranks = st.integers(1, 12)
factors = st.one_of(st.just(-1), st.integers(1, 12))


# -- factorization -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dim", "factor", "expected"),
    [(256, -1, (16, 16)), (128, -1, (8, 16)), (128, 4, (4, 32)), (127, -1, (1, 127)), (1, -1, (1, 1)),
     (6, -1, (2, 3)), (64, 16, (16, 4)), (12, 5, (3, 4)), (12, 2, (2, 6))],
)  # fmt: skip
def test_factorization_examples(dim, factor, expected):
    assert factorization(dim, factor) == expected
    assert lyco.factorization is factorization


def _oracle_small(dim: int, factor: int) -> int:
    """Largest divisor ``m`` with ``m² <= dim`` (and ``m <= factor`` for a positive factor)."""
    return max(d for d in range(1, dim + 1) if dim % d == 0 and d * d <= dim and (factor <= 0 or d <= factor))


@SETTINGS
@given(dim=st.integers(1, 5000), factor=st.one_of(st.just(-1), st.integers(1, 80)))
def test_factorization_properties(dim, factor):
    m, n = factorization(dim, factor)
    assert m * n == dim
    if factor > 0 and dim % factor == 0:
        assert (m, n) == (factor, dim // factor)  # PEFT keeps an explicit factor first, even if larger
    else:
        assert 1 <= m <= n
        assert m == _oracle_small(dim, factor)  # the divisor pair with the smallest sum


@pytest.mark.parametrize("dim", [0, -4])
def test_factorization_rejects_non_positive(dim):
    with pytest.raises(lyco.ConfigError):
        factorization(dim)


# -- LoKr plans ----------------------------------------------------------------------------------
def _rand(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.randn(v) for k, v in shapes.items()}


def compose_lokr(plan: LoKrPlan, t: dict[str, torch.Tensor]) -> torch.Tensor:
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = cp_rebuild(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = (t["lokr_w2_a"] @ t["lokr_w2_b"]).reshape(plan.out_r, plan.in_r, *plan.kernel)
    return make_kron(w1, w2)


@SETTINGS
@given(out=dims, in_=dims, kernel=kernels, r=ranks, factor=factors, both=st.booleans(), eff=st.booleans())
def test_plan_lokr_properties(out, in_, kernel, r, factor, both, eff):
    plan = plan_lokr(out, in_, kernel, r, factor, both, eff)
    assert (plan.out_l, plan.out_r) == factorization(out, factor)
    assert (plan.in_l, plan.in_r) == factorization(in_, factor)
    assert plan.weight_shape == (out, in_, *kernel)
    assert plan.use_w1 == (not both or r >= max(plan.out_l, plan.in_l) / 2)
    assert plan.use_w2 == (r >= max(plan.out_r, plan.in_r) / 2)
    assert plan.use_cp == (eff and math.prod(kernel) > 1 and not plan.use_w2)
    assert plan.both_full == (plan.use_w1 and plan.use_w2)
    shapes = plan.param_shapes()
    assert compose_lokr(plan, _rand(shapes)).shape == plan.weight_shape
    assert infer_lokr_plan(shapes, plan.weight_shape, r=plan.r if plan.both_full else None) == plan


@SETTINGS
@given(out=dims, in_=dims, kernel=kernels, r=ranks, factor=factors, both=st.booleans(), eff=st.booleans(),
       data=st.data())  # fmt: skip
def test_infer_lokr_plan_rejects_mismatch(out, in_, kernel, r, factor, both, eff, data):
    plan = plan_lokr(out, in_, kernel, r, factor, both, eff)
    shapes = plan.param_shapes()
    for wrong in [(2 * out, in_, *kernel), (out, 2 * in_, *kernel), (out, in_, *kernel, 2)]:
        with pytest.raises(lyco.ShapeMismatchError):
            infer_lokr_plan(shapes, wrong, r=r)
    missing = data.draw(st.sampled_from(sorted(shapes)))
    with pytest.raises(lyco.ShapeMismatchError):
        infer_lokr_plan({k: v for k, v in shapes.items() if k != missing}, plan.weight_shape, r=r)


def test_infer_lokr_plan_unequal_factor_ranks():
    """w1 rank 2, w2 rank 3 (files ComfyUI and AUTOMATIC1111 load): the plan keeps both, alpha / r takes w2's."""
    shapes = {"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 4), "lokr_w2_a": (8, 3), "lokr_w2_b": (3, 8)}
    plan = infer_lokr_plan(shapes, (32, 32))
    assert (plan.r, plan.w1_rank, plan.r1) == (3, 2, 2) and plan.param_shapes() == shapes
    assert infer_lokr_plan({**shapes, "lokr_w1_a": (4, 3), "lokr_w1_b": (3, 4)}, (32, 32)).r1 is None  # equal
    with pytest.raises(lyco.ShapeMismatchError):  # w1_a / w1_b ranks disagree
        infer_lokr_plan({**shapes, "lokr_w1_b": (3, 4), "lokr_w1_a": (4, 2)}, (32, 32))


def test_infer_lokr_plan_keeps_foreign_split():
    """A file may use another split than our factorization (lycoris-lora 4.1.3 Conv2d 4→8, factor 8)."""
    plan = infer_lokr_plan({"lokr_w1": (1, 2), "lokr_w2": (8, 2, 3, 3)}, (8, 4, 3, 3), r=4)
    assert (plan.out_l, plan.out_r, plan.in_l, plan.in_r) == (1, 8, 2, 2)
    assert plan.both_full and plan.r == 4


@pytest.mark.parametrize("r", [0, -1])
def test_plans_reject_bad_rank(r):
    with pytest.raises(lyco.ConfigError):
        plan_lokr(8, 8, (), r)
    with pytest.raises(lyco.ConfigError):
        plan_loha(8, 8, (), r)


# -- LoHa plans ----------------------------------------------------------------------------------
def compose_loha(plan: LoHaPlan, t: dict[str, torch.Tensor]) -> torch.Tensor:
    if plan.use_cp:
        return hada_delta_cp(
            t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"], t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"]
        )
    return hada_delta(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"]).reshape(
        plan.weight_shape
    )


@SETTINGS
@given(out=dims, in_=dims, kernel=kernels, r=ranks, eff=st.booleans(), data=st.data())
def test_plan_loha_properties(out, in_, kernel, r, eff, data):
    plan = plan_loha(out, in_, kernel, r, eff)
    assert plan.weight_shape == (out, in_, *kernel)
    assert plan.use_cp == (eff and math.prod(kernel) > 1)
    shapes = plan.param_shapes()
    assert compose_loha(plan, _rand(shapes)).shape == plan.weight_shape
    assert infer_loha_plan(shapes, plan.weight_shape) == plan
    for wrong in [(2 * out, in_, *kernel), (out, 2 * in_, *kernel), (out, in_, *kernel, 2)]:
        with pytest.raises(lyco.ShapeMismatchError):
            infer_loha_plan(shapes, wrong)
    missing = data.draw(st.sampled_from(sorted(shapes)))
    with pytest.raises(lyco.ShapeMismatchError):
        infer_loha_plan({k: v for k, v in shapes.items() if k != missing}, plan.weight_shape)


# -- LoHa custom autograd -------------------------------------------------------------------------
def _fp64(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


def _plain_inputs(o=5, i=4, r=3):
    return [_fp64(o, r), _fp64(r, i), _fp64(o, r), _fp64(r, i)]


def _cp_inputs(o, i, kernel, r=3):
    return [_fp64(r, r, *kernel), _fp64(r, o), _fp64(r, i), _fp64(r, r, *kernel), _fp64(r, o), _fp64(r, i)]


CP_CASES = [
    (3, 5, (3,)),
    (5, 3, (3,)),
    (3, 5, (3, 2)),
    (5, 3, (2, 3)),
]  # o < i and o > i: both contraction orders


def test_hada_delta_gradcheck():
    assert torch.autograd.gradcheck(hada_delta, _plain_inputs())


@pytest.mark.parametrize(("o", "i", "kernel"), CP_CASES)
def test_hada_delta_cp_gradcheck(o, i, kernel):
    assert torch.autograd.gradcheck(hada_delta_cp, _cp_inputs(o, i, kernel))


def _value_and_grads(fn, inputs, upstream):
    out = fn(*inputs)
    return out, torch.autograd.grad(out, inputs, upstream)


def _assert_same_as_naive(custom, naive, inputs):
    upstream = torch.randn(custom(*inputs).shape, dtype=torch.float64)
    got, got_grads = _value_and_grads(custom, inputs, upstream)
    want, want_grads = _value_and_grads(naive, inputs, upstream)
    torch.testing.assert_close(got, want, atol=FP64_TOL, rtol=FP64_TOL)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=FP64_TOL, rtol=FP64_TOL)


def test_hada_delta_matches_naive():
    _assert_same_as_naive(hada_delta, hada_delta_naive, _plain_inputs(o=7, i=6, r=4))


@pytest.mark.parametrize(("o", "i", "kernel"), CP_CASES)
def test_hada_delta_cp_matches_naive(o, i, kernel):
    def naive(t1, w1a, w1b, t2, w2a, w2b):
        return hada_delta_naive(w1a, w1b, w2a, w2b, hada_t1=t1, hada_t2=t2)

    _assert_same_as_naive(hada_delta_cp, naive, _cp_inputs(o, i, kernel))


# -- CP rebuild ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("o", "i"), [(3, 7), (7, 3), (4, 4)])
@pytest.mark.parametrize("kernel", [(), (3,), (2, 3)])
def test_cp_rebuild_matches_einsum(o, i, kernel):
    r = 3
    t, wa, wb = torch.randn(r, r, *kernel), torch.randn(r, o), torch.randn(r, i)
    want = torch.einsum("ij...,ip,jq->pq...", t, wa, wb)
    got = cp_rebuild(t, wa, wb)
    assert got.shape == (o, i, *kernel)
    torch.testing.assert_close(got, want, atol=FP32_TOL, rtol=FP32_TOL)


# -- kron layout -------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernel", [(), (3,), (3, 2)], ids=["2d", "3d-conv1d", "4d-conv2d"])
def test_make_kron_layout(kernel):
    """``delta[i·b+j, p·d+q, *k] == w1[i, p] · w2[j, q, *k]`` for every kernel rank (PEFT scrambles 3-D w2)."""
    a, c, b, d = 2, 3, 4, 5
    w1, w2 = torch.randn(a, c), torch.randn(b, d, *kernel)
    delta = make_kron(w1, w2)
    assert delta.shape == (a * b, c * d, *kernel)
    for i in range(a):
        for p in range(c):
            for j in range(b):
                for q in range(d):
                    assert torch.equal(delta[i * b + j, p * d + q], w1[i, p] * w2[j, q])


def test_make_kron_conv1d_regression():
    """The exact case PEFT got wrong: Conv1d with a full (out_r, in_r, k) w2."""
    w1, w2 = torch.randn(2, 2), torch.randn(3, 4, 5)
    want = torch.einsum("ip,jqk->ijpqk", w1, w2).reshape(6, 8, 5)
    assert torch.equal(make_kron(w1, w2), want)


def test_make_kron_accepts_odd_strides_on_unit_dims():
    """Regression: einsum can return a 'contiguous' tensor whose size-1 dim has a stride torch.kron's
    internal view rejects (found by hypothesis: out=2, in=6, kernel=(2, 1), r=1, effective conv)."""
    w2 = torch.randn(2, 3, 2, 12).as_strided((2, 3, 2, 1), (6, 2, 1, 12))
    assert w2.is_contiguous()
    w1 = torch.randn(1, 2)
    expected = torch.kron(w1[:, :, None, None], w2.clone().reshape(2, 3, 2).unsqueeze(-1).contiguous())
    torch.testing.assert_close(make_kron(w1, w2), expected)
