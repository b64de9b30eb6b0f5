"""LoRA maths: ``ΔW = lora_up @ lora_down`` (Tucker form ``cp(lora_mid, upᵀ, down)``), applied without building
``ΔW``, and a linear layer plus its LoRA term as one autograd node.

All functions use the unscaled factors; callers fold the scale into ``lora_up`` (the adapter applies
``alpha / r`` once).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .amp import autocast_state
from .tucker import cp_rebuild


def lora_delta(lora_up: torch.Tensor, lora_down: torch.Tensor, lora_mid: torch.Tensor | None = None) -> torch.Tensor:
    """Unscaled LoRA ``ΔW``: ``lora_up (out, r, 1…) @ lora_down (r, in, *k)`` → ``(out, in·∏k)``; with a Tucker
    core ``lora_mid (r, r, *k)`` (``lora_down (r, in, 1…)``) ``cp(mid, upᵀ, down)`` → ``(out, in, *k)``."""
    if lora_mid is not None:
        return cp_rebuild(lora_mid, lora_up.flatten(1).T, lora_down.flatten(1))
    return lora_up.flatten(1) @ lora_down.flatten(1)


def lora_apply(
    x: torch.Tensor,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    lora_mid: torch.Tensor | None = None,
    conv: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """``ΔW x`` without building ``ΔW``. Linear: ``x (..., in) → (..., out)`` as two thin products. Conv
    (``conv(input, weight)``: the base layer's convolution with its stride, padding and dilation): ``x (N,
    in, *spatial)``; ``lora_down`` runs as that convolution (or, with a Tucker core, as a 1×1 convolution
    followed by ``lora_mid`` as that convolution) and ``lora_up`` as a 1×1 convolution."""
    if conv is None:
        return F.linear(F.linear(x, lora_down), lora_up)
    pointwise = (F.conv1d, F.conv2d, F.conv3d)[lora_down.dim() - 3]
    h = conv(pointwise(x, lora_down), lora_mid) if lora_mid is not None else conv(x, lora_down)
    return pointwise(h, lora_up)


def _scaled(t: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    return t if isinstance(scale, (int, float)) and scale == 1 else t * scale


def lora_apply_scaled(
    x: torch.Tensor, lora_down: torch.Tensor, lora_up: torch.Tensor, scale: float | torch.Tensor
) -> torch.Tensor:
    """``scale · ΔW x`` for a linear layer, the scale applied to the smallest of ``lora_down (r, in)``,
    ``lora_up (out, r)`` and the rank-``r`` intermediate (a decode-size batch scales the intermediate)."""
    rows = x.numel() // max(x.shape[-1], 1)
    if rows <= min(lora_up.shape[0], lora_down.shape[1]):
        return F.linear(_scaled(F.linear(x, lora_down), scale), lora_up)
    if lora_up.shape[0] <= lora_down.shape[1]:
        return F.linear(F.linear(x, lora_down), _scaled(lora_up, scale))
    return F.linear(F.linear(x, _scaled(lora_down, scale)), lora_up)


# Below this many rows the custom node's fixed costs outweigh what it saves (measured on CPU, 1024→2752, r=8:
# 12 % slower at 1-16 rows, 2 % faster at 64, 16 % at 512); plain autograd runs instead.
NODE_MIN_ROWS = 48


class _LoRA(torch.autograd.Function):
    """``Y = s·(x downᵀ) upᵀ``, optionally plus a linear ``x Wᵀ + b`` in the same node: the LoRA product is then
    accumulated in place into the linear's output (forward) and input gradient (backward), so the layer
    allocates one output and one input gradient and saves ``x`` once. ``s`` is a number (``addmm``'s
    ``alpha``: no scaled copy of any tensor). Saves ``x``, the factors, ``W`` and ``h = x downᵀ`` (rank r);
    ``∂up`` is computed as ``(hᵀ g)ᵀ``: with the rank-``r`` operand on the left the CPU kernel is about 3×
    faster than ``gᵀ h`` (what autograd's ``mm`` backward runs)."""

    @staticmethod
    def forward(ctx, x2, lora_down, lora_up, scale, weight, bias):  # type: ignore[override]
        h = x2 @ lora_down.mT  # (m, r)
        if weight is None:
            y = torch.mm(h, lora_up.mT).mul_(scale)
        else:
            y = F.linear(x2, weight, bias)
            y.addmm_(h, lora_up.mT, alpha=scale)
        ctx.save_for_backward(x2, lora_down, lora_up, h, weight)
        ctx.amp = autocast_state(x2.device.type)
        ctx.has_bias = bias is not None
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x2, lora_down, lora_up, h, weight = ctx.saved_tensors
        need_x, need_down, need_up, _, need_w, need_bias = ctx.needs_input_grad
        s = ctx.scale
        with torch.autocast(**ctx.amp):
            g = g.contiguous()
            gu = g @ lora_up  # (m, r), unscaled
            grad_x = None
            if need_x and weight is None:
                grad_x = torch.mm(gu, lora_down).mul_(s)
            elif need_x:
                grad_x = g @ weight.to(g.dtype)
                grad_x.addmm_(gu, lora_down, alpha=s)
            grad_down = torch.mm(gu.mT, x2).mul_(s) if need_down else None
            grad_up = torch.mm(h.mT, g).mul_(s).mT if need_up else None
            grad_w = g.mT @ x2 if need_w else None
            grad_bias = g.sum(0) if need_bias and ctx.has_bias else None
            return grad_x, grad_down, grad_up, None, grad_w, grad_bias


def lora_linear(
    x: torch.Tensor,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    scale: float | torch.Tensor = 1.0,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scale · x (lora_up @ lora_down)ᵀ``, plus ``F.linear(x, weight, bias)`` when ``weight`` is given (the
    base and the LoRA term as one step). Plain ops for small batches and without gradients, else one
    autograd node (:class:`_LoRA`). ``scale``: a number, or a ``(1,)`` tensor (module dropout's factor, folded
    into ``lora_down``).

    ``x (..., in)``, ``lora_down (r, in)``, ``lora_up (out, r)``, ``weight (out, in)`` → ``(..., out)``. All in
    one dtype; not for autocast.
    """
    if isinstance(scale, torch.Tensor):
        lora_down, scale = lora_down * scale, 1.0
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x2, lora_down, lora_up, weight))
    if grad and x2.shape[0] >= NODE_MIN_ROWS:
        y = _LoRA.apply(x2.contiguous(), lora_down, lora_up, float(scale), weight, bias)
    elif weight is None:
        y = lora_apply_scaled(x2, lora_down, lora_up, scale)
    else:
        y = F.linear(x2, weight, bias)
        y = y.addmm_(F.linear(x2, lora_down), lora_up.mT, alpha=scale)
    return y.view(*lead, y.shape[-1])
