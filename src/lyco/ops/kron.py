"""LoKr maths: Kronecker delta of two factors (full or low-rank)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .amp import autocast_state
from .paths import ELEMENT_COST


def make_kron(lokr_w1: torch.Tensor, lokr_w2: torch.Tensor) -> torch.Tensor:
    """``ΔW = kron(w1, w2)`` laid out as a layer weight (unscaled).

    ``lokr_w1 (a, c)``, ``lokr_w2 (b, d, *k)`` → ``(a·b, c·d, *k)``. ``w1`` is given trailing unit
    dims so the kernel dims of ``w2`` stay in place for every kernel rank (PEFT only does this for
    4-D ``w2``, which scrambles Conv1d full-``w2`` layouts).
    """
    a, c = lokr_w1.shape
    b, d, *k = lokr_w2.shape
    unit = [1] * len(k)
    # Broadcast product (a, b, c, d, *k) then merge (a, b) and (c, d): torch.kron views its inputs and fails
    # on tensors whose size-1 dims carry odd strides (as einsum outputs can).
    prod = lokr_w1.reshape(a, 1, c, 1, *unit) * lokr_w2.reshape(1, b, 1, d, *k)
    return prod.reshape(a * b, c * d, *k)


def _apply_w2(t: torch.Tensor, w2: torch.Tensor | None, w2_a: torch.Tensor | None, w2_b: torch.Tensor | None):
    """``t (..., in_r) → (..., out_r)``: ``t @ w2ᵀ``, thin when ``w2 = w2_a @ w2_b``."""
    return F.linear(t, w2) if w2 is not None else F.linear(F.linear(t, w2_b), w2_a)


def _apply_w2_t(t: torch.Tensor, w2: torch.Tensor | None, w2_a: torch.Tensor | None, w2_b: torch.Tensor | None):
    """``t (..., out_r) → (..., in_r)``: ``t @ w2``."""
    return t @ w2 if w2 is not None else (t @ w2_a) @ w2_b


def _left(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``w (p, q)`` on the second-to-last dim: ``t (m, q, k) → (m, p, k)``, one folded matmul.

    F.linear on a contiguous transposed copy: on a strided view, matmul's folding depends on
    ``requires_grad``, so a trainable and a frozen copy of one adapter would round differently.
    """
    return F.linear(t.mT.contiguous(), w).mT.contiguous()


class _KronApply(torch.autograd.Function):
    """``y = vec(w1 X w2ᵀ)`` per row; saves only ``x`` and the factors (no ``(rows, ·)`` intermediates),
    recomputing in backward: ``∂X = w1ᵀ G w2``, ``∂w1 = Σ G w2 Xᵀ``, ``∂w2 = Σ Gᵀ w1 X``."""

    @staticmethod
    def forward(ctx, xs, w1, w2, w2_a, w2_b, right_first):  # type: ignore[override]
        ctx.save_for_backward(xs, w1, w2, w2_a, w2_b)
        ctx.amp = autocast_state(xs.device.type)
        if right_first:
            return _left(_apply_w2(xs, w2, w2_a, w2_b), w1)
        return _apply_w2(_left(xs, w1), w2, w2_a, w2_b)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        xs, w1, w2, w2_a, w2_b = ctx.saved_tensors
        with torch.autocast(**ctx.amp):  # backward runs outside autocast: re-enter the forward's state
            return _KronApply._grads(ctx, g, xs, w1, w2, w2_a, w2_b)

    @staticmethod
    def _grads(ctx, g, xs, w1, w2, w2_a, w2_b):
        # Transposed copies are made once and shared; every contraction is then one plain matmul.
        out_l, in_l = w1.shape
        gw2_t = _apply_w2_t(g, w2, w2_a, w2_b).mT.contiguous()  # (m, in_r, out_l) = (G w2)ᵀ
        xs_t = xs.mT.contiguous()  # (m, in_r, in_l) = Xᵀ
        grad_x = (gw2_t @ w1).mT if ctx.needs_input_grad[0] else None  # w1ᵀ G w2
        grad_w1 = gw2_t.reshape(-1, out_l).mT @ xs_t.reshape(-1, in_l) if ctx.needs_input_grad[1] else None
        grad_w2 = grad_a = grad_b = None
        if any(ctx.needs_input_grad[2:5]):
            w1x = F.linear(xs_t, w1).mT.contiguous()  # (m, out_l, in_r) = w1 X
            full = g.reshape(-1, g.shape[-1]).mT @ w1x.reshape(-1, w1x.shape[-1])  # Σ Gᵀ w1 X  (out_r, in_r)
            if w2 is not None:
                grad_w2 = full
            else:
                grad_a, grad_b = full @ w2_b.mT, w2_a.mT @ full
        return grad_x, grad_w1, grad_w2, grad_a, grad_b, None


def kron_apply(
    x: torch.Tensor,
    lokr_w1: torch.Tensor,
    lokr_w2: torch.Tensor | None = None,
    lokr_w2_a: torch.Tensor | None = None,
    lokr_w2_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x (..., in_l·in_r) → (..., out_l·out_r)`` times ``kron(w1, w2)`` without building it.

    ``kron(w1, w2)·vec(X) = vec(w1 X w2ᵀ)`` with ``X (in_l, in_r)`` per row. ``w1 (out_l, in_l)``; ``w2 (out_r,
    in_r)`` full or as ``w2_a (out_r, r) @ w2_b (r, in_r)`` (applied as two thin products). The side
    with fewer multiply-adds goes first. Backward saves ``x`` and the factors only.
    """
    out_l, in_l = lokr_w1.shape
    low_rank = lokr_w2 is None
    in_r = lokr_w2_b.shape[1] if low_rank else lokr_w2.shape[1]
    out_r = lokr_w2_a.shape[0] if low_rank else lokr_w2.shape[0]
    rank = lokr_w2_a.shape[1] if low_rank else None
    lead = x.shape[:-1]
    xs = x.reshape(-1, in_l, in_r)
    right_first = _right_first(out_l, in_l, out_r, in_r, rank)
    y = _KronApply.apply(xs, lokr_w1, lokr_w2, lokr_w2_a, lokr_w2_b, right_first)
    return y.reshape(*lead, out_l * out_r)


def _w2_cost(out_r: int, in_r: int, rank: int | None) -> int:
    return in_r * out_r if rank is None else rank * (in_r + out_r)


def _right_first(out_l: int, in_l: int, out_r: int, in_r: int, rank: int | None) -> bool:
    w2 = _w2_cost(out_r, in_r, rank)
    return in_l * w2 + out_l * in_l * out_r <= out_l * in_l * in_r + out_l * w2


def kron_apply_cost(out_l: int, in_l: int, out_r: int, in_r: int, rank: int | None = None) -> int:
    """Work of :func:`kron_apply` per input row (``rank``: ``w2`` low-rank, else full): multiply-adds plus
    the elements its two transposed copies move, each worth :data:`lyco.ops.paths.ELEMENT_COST`."""
    w2 = _w2_cost(out_r, in_r, rank)
    if _right_first(out_l, in_l, out_r, in_r, rank):
        return in_l * w2 + out_l * in_l * out_r + ELEMENT_COST * (in_l * out_r + out_l * out_r)
    return out_l * in_l * in_r + out_l * w2 + ELEMENT_COST * (in_l * in_r + out_l * in_r)
