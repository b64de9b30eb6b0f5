"""DoRA (weight-decomposed adaptation): the norms and gains, pure maths on canonical tensors.

``W' = m ⊙ (W + ΔW) / ‖W + ΔW‖`` with the norm taken per output row (``wd_on_out``: ``m (out, 1, …)``) or per
input column (``m (1, in, …)``), ``ΔW`` already scaled; ``ε = finfo(dtype).eps`` is added to the norm as
lycoris-lora and ComfyUI do. The gain ``g = m / ‖W + ΔW‖`` turns the forward into ``g ⊙ (W + ΔW)·x`` — on the
output channels (``wd_on_out``) or on the input channels (else).
"""

from __future__ import annotations

import torch


def gain_shape(weight_shape: tuple[int, ...], wd_on_out: bool) -> tuple[int, ...]:
    """Shape of ``m`` (LyCORIS's ``dora_scale``) for a canonical weight ``(out, in, *k)``: ``(out, 1, 1…)`` or
    ``(1, in, 1…)``."""
    ones = (1,) * (len(weight_shape) - 1)
    return (weight_shape[0], *ones) if wd_on_out else (1, weight_shape[1], *ones[1:])


def dora_norm(weight: torch.Tensor, wd_on_out: bool) -> torch.Tensor:
    """``‖weight‖ + ε`` per output row ``(out, 1, …)`` (``wd_on_out``) or per input column ``(1, in, …)``, for a
    canonical ``weight (out, in, *k)``."""
    eps = torch.finfo(weight.dtype).eps
    if wd_on_out:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1)
    else:
        norm = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return norm.reshape(gain_shape(tuple(weight.shape), wd_on_out)) + eps


def lora_row_norm(
    weight: torch.Tensor,
    lora_down: torch.Tensor,
    lora_up: torch.Tensor,
    scale: float | torch.Tensor,
    weight_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """``‖W + s·up @ down‖ + ε`` per output row ``(out,)`` without building the ``(out, in)`` sum:
    ``‖W_i‖² + 2s·⟨(W downᵀ)_i, up_i⟩ + s²·up_i (down downᵀ) up_iᵀ`` — ``O(out·in·r)`` work and ``(out, r)``
    memory. ``weight (out, in·∏k)``, ``lora_down (r, in·∏k)``, ``lora_up (out, r)``, all in one dtype (fp32
    or wider recommended: the sum cancels where ``ΔW ≈ −W``); ``weight_sq``: ``‖W_i‖²`` when known (a frozen
    base's, computed once)."""
    wd = weight @ lora_down.T  # (out, r)
    gram = lora_down @ lora_down.T  # (r, r)
    return _sum_norm(weight, weight_sq, (wd * lora_up).sum(1), ((lora_up @ gram) * lora_up).sum(1), scale)


def lokr_row_norm(
    weight: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    scale: float | torch.Tensor,
    weight_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """``‖W + s·kron(w1, w2)‖ + ε`` per output row ``(out,)`` without building the Kronecker product: with rows
    ``(a, c)`` and columns ``(b, d)``, ``‖ΔW_(a,c)‖² = ‖w1_a‖²·‖w2_c‖²`` and ``⟨W_(a,c), ΔW_(a,c)⟩ = Σ_b w1_ab
    Σ_d W_(a,c),(b,d) w2_cd`` — one pass over ``W`` and no ``W``-sized temporary (a matmul batched over the row
    blocks ``(a, c)``, which reads ``W`` in place; an einsum copies it into a batched layout, a broadcast product
    writes one — both a second ``W``-sized memory pass). ``weight (out_l·out_r, in_l·in_r·∏k)``,
    ``w1 (out_l, in_l)``, ``w2 (out_r, in_r·∏k)`` (a conv kernel folded into ``w2``'s columns), one dtype."""
    out_l, in_l = w1.shape
    out_r = w2.shape[0]
    w4 = weight.reshape(out_l, out_r, in_l, w2.shape[1])
    inner = torch.matmul(w4, w2.unsqueeze(-1)).squeeze(-1)  # (a, c, b): Σ_d W_(a,c),(b,d) w2_cd
    cross = (inner * w1.unsqueeze(1)).sum(-1).reshape(-1)
    delta_sq = torch.outer(w1.square().sum(1), w2.square().sum(1)).reshape(-1)
    return _sum_norm(weight, weight_sq, cross, delta_sq, scale)


def _sum_norm(
    weight: torch.Tensor, weight_sq: torch.Tensor | None, cross: torch.Tensor, delta_sq: torch.Tensor, scale: float | torch.Tensor
) -> torch.Tensor:
    """``√(‖W_i‖² + 2s·⟨W_i, ΔW_i⟩ + s²·‖ΔW_i‖²) + ε`` per row from its parts (``weight_sq``: ``‖W_i‖²`` when known),
    clamped at 0 where the sum cancels."""
    own = row_sq(weight) if weight_sq is None else weight_sq
    sq = own + 2 * scale * cross + scale * scale * delta_sq
    return sq.clamp_min(0).sqrt() + torch.finfo(weight.dtype).eps


def row_sq(weight: torch.Tensor) -> torch.Tensor:
    """``‖W_i‖²`` per row of ``weight (out, n)`` → ``(out,)``."""
    return weight.square().sum(1)


def dora_weight(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, wd_on_out: bool
) -> torch.Tensor:
    """The merged DoRA weight ``m ⊙ (W + ΔW) / (‖W + ΔW‖ + ε)`` (canonical layout, ``delta`` scaled)."""
    total = weight + delta
    return total * (magnitude / dora_norm(total, wd_on_out))
