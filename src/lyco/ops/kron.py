"""LoKr maths: Kronecker delta of two factors (full or low-rank)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    with fewer multiply-adds goes first.
    """
    out_l, in_l = lokr_w1.shape
    low_rank = lokr_w2 is None
    in_r = lokr_w2_b.shape[1] if low_rank else lokr_w2.shape[1]
    out_r = lokr_w2_a.shape[0] if low_rank else lokr_w2.shape[0]

    def right(t: torch.Tensor) -> torch.Tensor:  # (..., k, in_r) -> (..., k, out_r)
        if low_rank:
            return F.linear(F.linear(t, lokr_w2_b), lokr_w2_a)
        return F.linear(t, lokr_w2)

    lead = x.shape[:-1]
    xs = x.reshape(*lead, in_l, in_r)
    rank = lokr_w2_a.shape[1] if low_rank else None
    # w1 acts on the second-to-last dim: F.linear on a contiguous transposed copy folds every leading dim
    # into one matmul. (On a strided view, matmul's folding depends on requires_grad, so a trainable and a
    # frozen copy of the same adapter would round differently.)
    if _right_first(out_l, in_l, out_r, in_r, rank):
        y = right(xs)  # (..., in_l, out_r)
        y = F.linear(y.mT.contiguous(), lokr_w1).mT  # (..., out_l, out_r)
    else:
        y = F.linear(xs.mT.contiguous(), lokr_w1).mT.contiguous()  # (..., out_l, in_r)
        y = right(y)  # (..., out_l, out_r)
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
