"""LoKr maths: Kronecker delta of two factors (full or low-rank)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from .amp import autocast_state
from .factorize import LoKrPlan
from .paths import element_cost, small_conv_cost
from .tucker import cp_rebuild


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


def lokr_w1(tensors: Mapping[str, torch.Tensor], plan: LoKrPlan) -> torch.Tensor:
    """Left factor ``w1 (out_l, in_l)``: ``lokr_w1``, or ``lokr_w1_a (out_l, r) @ lokr_w1_b (r, in_l)``."""
    return tensors["lokr_w1"] if plan.use_w1 else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]


def lokr_w2(tensors: Mapping[str, torch.Tensor], plan: LoKrPlan) -> torch.Tensor:
    """Right factor ``w2 (out_r, in_r, *k)``: ``lokr_w2``; CP ``cp(lokr_t2, lokr_w2_a, lokr_w2_b)``; or
    ``lokr_w2_a (out_r, r) @ lokr_w2_b (r, in_r·∏k)`` reshaped."""
    if plan.use_w2:
        return tensors["lokr_w2"]
    if plan.use_cp:
        return cp_rebuild(tensors["lokr_t2"], tensors["lokr_w2_a"], tensors["lokr_w2_b"])
    return (tensors["lokr_w2_a"] @ tensors["lokr_w2_b"]).reshape(plan.out_r, plan.in_r, *plan.kernel)


def lokr_delta(tensors: Mapping[str, torch.Tensor], plan: LoKrPlan) -> torch.Tensor:
    """Unscaled LoKr ``ΔW = kron(w1, w2)`` ``(out, in, *k)`` from tensors keyed by on-disk name."""
    return make_kron(lokr_w1(tensors, plan), lokr_w2(tensors, plan))


def _apply_w2(t: torch.Tensor, w2: torch.Tensor | None, w2_a: torch.Tensor | None, w2_b: torch.Tensor | None):
    """``t (..., in_r) → (..., out_r)``: ``t @ w2ᵀ``, thin when ``w2 = w2_a @ w2_b``."""
    return F.linear(t, w2) if w2 is not None else F.linear(F.linear(t, w2_b), w2_a)


def _apply_w2_t(t: torch.Tensor, w2: torch.Tensor | None, w2_a: torch.Tensor | None, w2_b: torch.Tensor | None):
    """``t (..., out_r) → (..., in_r)``: ``t @ w2``."""
    return t @ w2 if w2 is not None else (t @ w2_a) @ w2_b


def _apply_w1(t: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """``w1 (p, q)`` on dim 1: ``t (m, q, k) → (m, p, k)`` as one ``bmm`` with ``w1`` broadcast (stride 0).

    No transposed copies, and unlike ``torch.matmul`` the kernel does not depend on ``requires_grad``
    (matmul folds differently then), so a trainable and a frozen copy of an adapter round alike.
    """
    return torch.bmm(w1.expand(t.shape[0], *w1.shape), t)


class _KronApply(torch.autograd.Function):
    """``Y = w1 X w2ᵀ`` per row ``X (in_l, in_r)``; saves only ``x`` and the factors (no ``(rows, ·)``
    intermediates) and recomputes the one it needs in backward: ``∂X = w1ᵀ G w2``, ``∂w1 = Σ G w2 Xᵀ``,
    ``∂w2 = Σ Gᵀ w1 X``. Every product is a plain matmul on the last dim or a broadcast ``bmm``."""

    @staticmethod
    def forward(ctx, xs, w1, w2, w2_a, w2_b, right_first):  # type: ignore[override]
        ctx.save_for_backward(xs, w1, w2, w2_a, w2_b)
        ctx.amp = autocast_state(xs.device.type)
        ctx.right_first = right_first
        if right_first:
            return _apply_w1(_apply_w2(xs, w2, w2_a, w2_b), w1)
        return _apply_w2(_apply_w1(xs, w1), w2, w2_a, w2_b)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        xs, w1, w2, w2_a, w2_b = ctx.saved_tensors
        with torch.autocast(**ctx.amp):  # backward runs outside autocast: re-enter the forward's state
            return _KronApply._grads(ctx, g.contiguous(), xs, w1, w2, w2_a, w2_b)

    @staticmethod
    def _grads(ctx, g, xs, w1, w2, w2_a, w2_b):
        need_x, need_w1 = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_w2 = any(ctx.needs_input_grad[2:5])
        out_r, in_r = g.shape[-1], xs.shape[-1]
        grad_x = grad_w1 = full = None
        if ctx.right_first:  # Z = X w2ᵀ (m, in_l, out_r), Y = w1 Z
            g_z = _apply_w1(g, w1.mT) if need_x or need_w2 else None  # w1ᵀ G
            if need_w1:
                grad_w1 = torch.bmm(g, _apply_w2(xs, w2, w2_a, w2_b).mT).sum(0)
            if need_x:
                grad_x = _apply_w2_t(g_z, w2, w2_a, w2_b)
            if need_w2:
                full = g_z.reshape(-1, out_r).mT @ xs.reshape(-1, in_r)
        else:  # Z = w1 X (m, out_l, in_r), Y = Z w2ᵀ
            g_z = _apply_w2_t(g, w2, w2_a, w2_b)  # G w2
            if need_x:
                grad_x = _apply_w1(g_z, w1.mT)
            if need_w1:
                grad_w1 = torch.bmm(g_z, xs.mT).sum(0)
            if need_w2:
                full = g.reshape(-1, out_r).mT @ _apply_w1(xs, w1).reshape(-1, in_r)
        grad_w2 = grad_a = grad_b = None
        if full is not None:  # Σ Gᵀ w1 X  (out_r, in_r)
            if w2 is not None:
                grad_w2 = full
            else:
                grad_a, grad_b = full @ w2_b.mT, w2_a.mT @ full
        return grad_x, grad_w1, grad_w2, grad_a, grad_b, None


class _KronApplyLowRank(torch.autograd.Function):
    """``Y = (w1 (X w2_bᵀ)) w2_aᵀ`` per row ``X (in_l, in_r)`` (``x2 (m, in_l·in_r)``), optionally plus a frozen
    or trainable base linear ``x2 Wᵀ + b`` in the same node.

    ``w1`` acts on the rank-``r`` intermediate, not on an ``in_r``- or ``out_r``-wide one. The intermediates are
    kept rank-major — ``Tᵀ = w2_b X (r, m·in_l)``, ``Uᵀ (r, m·out_l)`` — so that every product, forward and
    backward, is one plain 2-D matmul (no batched small matmuls, no transposed copies). With a base, the
    adapter's output and input gradient are accumulated in place (``addmm_``) into the base's: no separate
    output tensor, no gradient sum. Saves ``x2`` and the factors; recomputes ``T``/``U`` in backward.
    """

    @staticmethod
    def forward(ctx, x2, w1, w2_a, w2_b, weight, bias):  # type: ignore[override]
        ctx.save_for_backward(x2, w1, w2_a, w2_b, weight)
        ctx.amp = autocast_state(x2.device.type)
        ctx.has_bias = bias is not None
        m, (out_l, in_l), (out_r, rank) = x2.shape[0], w1.shape, w2_a.shape
        u_t = _t_t(x2, w2_b, in_l).view(rank * m, in_l) @ w1.mT  # (r·m, out_l)
        u = u_t.view(rank, m * out_l).mT
        if weight is None:
            return (u @ w2_a.mT).view(m, out_l * out_r)
        y = F.linear(x2, weight, bias)
        y.view(m * out_l, out_r).addmm_(u, w2_a.mT)
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x2, w1, w2_a, w2_b, weight = ctx.saved_tensors
        with torch.autocast(**ctx.amp):
            need_x, need_w1, need_a, need_b, need_w, need_bias = ctx.needs_input_grad
            m, (out_l, in_l), (out_r, rank) = x2.shape[0], w1.shape, w2_a.shape
            in_r = w2_b.shape[1]
            g = g.contiguous()
            g2 = g.view(m * out_l, out_r)
            gu_t = w2_a.mT @ g2.mT  # (r, m·out_l)
            grad_w1 = grad_a = None
            if need_w1 or need_a:
                t_t = _t_t(x2, w2_b, in_l).view(rank * m, in_l)
                if need_a:  # (r, m·out_l) @ (m·out_l, out_r), transposed: both operands row-major (a long K on a
                    # transposed view is several times slower on CPU)
                    grad_a = ((t_t @ w1.mT).view(rank, m * out_l) @ g2).mT
                if need_w1:
                    grad_w1 = gu_t.view(rank * m, out_l).mT @ t_t
            grad_x = grad_b = None
            if need_x or need_b:
                gt_t = (gu_t.view(rank * m, out_l) @ w1).view(rank, m * in_l)  # (r, m·in_l)
                if need_b:
                    grad_b = gt_t @ x2.view(m * in_l, in_r)
                if need_x and weight is None:
                    grad_x = (gt_t.mT @ w2_b).view(m, in_l * in_r)
                elif need_x:
                    grad_x = g @ weight.to(g.dtype)
                    grad_x.view(m * in_l, in_r).addmm_(gt_t.mT, w2_b)
            grad_w = g.mT @ x2 if need_w else None
            grad_bias = g.sum(0) if need_bias and ctx.has_bias else None
            return grad_x, grad_w1, grad_a, grad_b, grad_w, grad_bias


def _t_t(x2: torch.Tensor, w2_b: torch.Tensor, in_l: int) -> torch.Tensor:
    """``w2_b Xᵀ`` of every row, rank-major: ``(r, m·in_l)``."""
    return w2_b @ x2.view(-1, w2_b.shape[1]).mT


def linear_kron_apply(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lokr_w1: torch.Tensor,
    lokr_w2_a: torch.Tensor,
    lokr_w2_b: torch.Tensor,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + x · kron(w1, w2_a @ w2_b)ᵀ`` as one autograd node (the LoKr term in the
    ``"middle"`` order, accumulated in place into the linear's output and input gradient).

    ``x (..., in_l·in_r)``, ``weight (out_l·out_r, in_l·in_r)``, ``w1 (out_l, in_l)``, ``w2_a (out_r, r)``,
    ``w2_b (r, in_r)`` → ``(..., out_l·out_r)``. All in one dtype; not for autocast.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    y = _KronApplyLowRank.apply(x2, lokr_w1, lokr_w2_a, lokr_w2_b, weight, bias)
    return y.view(*lead, y.shape[-1])


def kron_apply(
    x: torch.Tensor,
    lokr_w1: torch.Tensor,
    lokr_w2: torch.Tensor | None = None,
    lokr_w2_a: torch.Tensor | None = None,
    lokr_w2_b: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x (..., in_l·in_r) → (..., out_l·out_r)`` times ``kron(w1, w2)`` without building it.

    ``kron(w1, w2)·vec(X) = vec(w1 X w2ᵀ)`` with ``X (in_l, in_r)`` per row. ``w1 (out_l, in_l)``; ``w2 (out_r,
    in_r)`` full or as ``w2_a (out_r, r) @ w2_b (r, in_r)``. The order with the fewest multiply-adds runs
    (:func:`kron_order`): ``w2`` first, ``w1`` first, or for a low-rank ``w2`` ``w1`` in the middle, on the
    rank-``r`` intermediate. Backward saves ``x`` and the factors only.
    """
    out_l, in_l = lokr_w1.shape
    low_rank = lokr_w2 is None
    in_r = lokr_w2_b.shape[1] if low_rank else lokr_w2.shape[1]
    out_r = lokr_w2_a.shape[0] if low_rank else lokr_w2.shape[0]
    rank = lokr_w2_a.shape[1] if low_rank else None
    lead = x.shape[:-1]
    xs = x.reshape(-1, in_l, in_r)
    order = kron_order(out_l, in_l, out_r, in_r, rank)
    if order == "middle":
        y = _KronApplyLowRank.apply(xs.reshape(xs.shape[0], -1).contiguous(), lokr_w1, lokr_w2_a, lokr_w2_b, None, None)
    else:
        y = _KronApply.apply(xs, lokr_w1, lokr_w2, lokr_w2_a, lokr_w2_b, order == "right")
    return y.reshape(*lead, out_l * out_r)


def _w2_cost(out_r: int, in_r: int, rank: int | None) -> int:
    return in_r * out_r if rank is None else rank * (in_r + out_r)


def _order_costs(out_l: int, in_l: int, out_r: int, in_r: int, rank: int | None) -> dict[str, tuple[int, int]]:
    """Per row and order: (multiply-adds, elements written to intermediates and the output)."""
    w2 = _w2_cost(out_r, in_r, rank)
    costs = {
        "right": (in_l * w2 + out_l * in_l * out_r, in_l * out_r + out_l * out_r),
        "left": (out_l * in_l * in_r + out_l * w2, out_l * in_r + out_l * out_r),
    }
    if rank is not None:
        costs["middle"] = (rank * (in_l * in_r + out_l * in_l + out_l * out_r), rank * (in_l + out_l) + out_l * out_r)
    return costs


def kron_order(out_l: int, in_l: int, out_r: int, in_r: int, rank: int | None = None) -> str:
    """``"right"`` (``X w2ᵀ`` first), ``"left"`` (``w1 X`` first) or ``"middle"`` (low-rank ``w2`` only:
    ``w1`` on ``X w2_bᵀ``), whichever has the fewest multiply-adds (ties: the earlier of middle, right)."""
    costs = _order_costs(out_l, in_l, out_r, in_r, rank)
    return min(("middle", "right", "left"), key=lambda o: costs[o][0] if o in costs else float("inf"))


def kron_apply_cost(
    out_l: int, in_l: int, out_r: int, in_r: int, rank: int | None = None, device_type: str = "cpu"
) -> int:
    """Work of :func:`kron_apply` per input row (``rank``: ``w2`` low-rank, else full): multiply-adds plus
    the elements of its intermediate and output, each worth :func:`lyco.ops.paths.element_cost`."""
    macs, elements = _order_costs(out_l, in_l, out_r, in_r, rank)[kron_order(out_l, in_l, out_r, in_r, rank)]
    return macs + element_cost(device_type) * elements


def kron_conv_apply(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, conv: Callable[..., torch.Tensor]) -> torch.Tensor:
    """A convolution with ``kron(w1, w2)`` without building it: ``w2`` convolves each of the ``in_l`` channel
    groups, ``w1`` mixes the groups (or ``w1`` first, then ``w2`` on each of the ``out_l`` mixed groups),
    whichever order has fewer multiply-adds.

    ``x (N, in_l·in_r, *spatial)`` (or unbatched ``(in_l·in_r, *spatial)``), ``w1 (out_l, in_l)``, ``w2 (out_r,
    in_r, *k)``; ``conv(input, weight)`` is the base layer's convolution (its stride, padding, padding mode and
    dilation; ``groups`` must be 1) → ``(N, out_l·out_r, *spatial')``. Plain autograd.
    """
    unbatched = x.dim() == w2.dim() - 1
    if unbatched:
        x = x.unsqueeze(0)
    n, spatial = x.shape[0], x.shape[2:]
    (out_l, in_l), (out_r, in_r), ksize = w1.shape, w2.shape[:2], math.prod(w2.shape[2:])
    if kron_conv_order(out_l, in_l, out_r, in_r, ksize) == "conv":
        z = conv(x.reshape(n * in_l, in_r, *spatial), w2)  # (N·in_l, out_r, *spatial')
        out_spatial = z.shape[2:]
        y = _apply_w1(z.reshape(n, in_l, -1), w1)  # (N, out_l, out_r·spatial')
    else:
        z = _apply_w1(x.reshape(n, in_l, -1), w1).reshape(n * out_l, in_r, *spatial)
        y = conv(z, w2)  # (N·out_l, out_r, *spatial')
        out_spatial = y.shape[2:]
    y = y.reshape(n, out_l * out_r, *out_spatial)
    return y.squeeze(0) if unbatched else y


def _conv_order_costs(out_l: int, in_l: int, out_r: int, in_r: int, ksize: int) -> dict[str, tuple[int, int]]:
    """Per input position and order of :func:`kron_conv_apply`: (multiply-adds, elements written)."""
    return {
        "conv": (in_l * out_r * (in_r * ksize + out_l), in_l * out_r + out_l * out_r),
        "mix": (out_l * in_r * (in_l + out_r * ksize), out_l * in_r + out_l * out_r),
    }


def kron_conv_order(out_l: int, in_l: int, out_r: int, in_r: int, ksize: int) -> str:
    """``"conv"`` (``w2`` on the ``in_l`` input groups first) or ``"mix"`` (``w1`` first, ``w2`` on ``out_l``
    groups): per position, ``in_l·out_r·(in_r·k + out_l)`` vs ``out_l·in_r·(in_l + out_r·k)`` multiply-adds."""
    costs = _conv_order_costs(out_l, in_l, out_r, in_r, ksize)
    return "conv" if costs["conv"][0] <= costs["mix"][0] else "mix"


def kron_conv_cost(out_l: int, in_l: int, out_r: int, in_r: int, ksize: int, device_type: str = "cpu") -> int:
    """Work of :func:`kron_conv_apply` per input position (strides ignored): multiply-adds plus the elements
    of its intermediate and output, each worth :func:`lyco.ops.paths.element_cost`, all times
    :func:`lyco.ops.paths.small_conv_cost` (small-channel convolutions run far below the base's rate)."""
    order = kron_conv_order(out_l, in_l, out_r, in_r, ksize)
    macs, elements = _conv_order_costs(out_l, in_l, out_r, in_r, ksize)[order]
    return small_conv_cost(device_type) * (macs + element_cost(device_type) * elements)
