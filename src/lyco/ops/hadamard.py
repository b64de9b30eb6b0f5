"""LoHa maths: ``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b)`` and its CP form, with custom autograd.

The autograd functions save only the factors (a few ``r × d`` matrices) and recompute the
``out × in`` products in backward, instead of keeping two dense products alive per layer.
All functions return the *unscaled* delta; the adapter applies ``alpha / r`` once.
"""

from __future__ import annotations

import torch

from .amp import autocast_state
from .tucker import cp_rebuild


class _HadaWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b):  # type: ignore[override]
        ctx.save_for_backward(w1a, w1b, w2a, w2b)
        ctx.amp = autocast_state(w1a.device.type)
        return (w1a @ w1b) * (w2a @ w2b)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        w1a, w1b, w2a, w2b = ctx.saved_tensors
        with torch.autocast(**ctx.amp):
            g1 = grad * (w2a @ w2b)
            g2 = grad * (w1a @ w1b)
            return g1 @ w1b.mT, w1a.mT @ g1, g2 @ w2b.mT, w2a.mT @ g2


def hada_delta(
    hada_w1_a: torch.Tensor, hada_w1_b: torch.Tensor, hada_w2_a: torch.Tensor, hada_w2_b: torch.Tensor
) -> torch.Tensor:
    """``(w1_a (o, r) @ w1_b (r, i)) ⊙ (w2_a (o, r) @ w2_b (r, i))`` → ``(o, i)``, memory-lean backward
    (plain formula when no gradient is needed: the custom function's call overhead buys nothing then)."""
    ws = (hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b)
    if not (torch.is_grad_enabled() and any(w.requires_grad for w in ws)):
        return (hada_w1_a @ hada_w1_b).mul_(hada_w2_a @ hada_w2_b)  # in place on a fresh product
    return _HadaWeight.apply(*ws)


def _cp_grads(grad: torch.Tensor, t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor):
    """Gradients of ``cp_rebuild(t, wa, wb)`` for an upstream ``grad (o, i, *k)``: two contractions over the
    full ``(o, i, *k)`` tensor (``grad·wa`` and ``grad·(t·wb)``), the rest on ``r``-sized tensors."""
    ga = torch.einsum("pq...,ip->iq...", grad, wa)  # (r, i, *k)
    g_t = torch.einsum("iq...,jq->ij...", ga, wb)
    g_wb = torch.einsum("iq...,ij...->jq", ga, t)
    tb = torch.einsum("ij...,jq->iq...", t, wb)  # (r, i, *k)
    g_wa = torch.einsum("pq...,iq...->ip", grad, tb)
    return g_t, g_wa, g_wb


class _HadaWeightCP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t1, w1a, w1b, t2, w2a, w2b):  # type: ignore[override]
        ctx.save_for_backward(t1, w1a, w1b, t2, w2a, w2b)
        ctx.amp = autocast_state(t1.device.type)
        return cp_rebuild(t1, w1a, w1b) * cp_rebuild(t2, w2a, w2b)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        t1, w1a, w1b, t2, w2a, w2b = ctx.saved_tensors
        with torch.autocast(**ctx.amp):
            g1 = grad * cp_rebuild(t2, w2a, w2b)
            g2 = grad * cp_rebuild(t1, w1a, w1b)
            gt1, g1a, g1b = _cp_grads(g1, t1, w1a, w1b)
            gt2, g2a, g2b = _cp_grads(g2, t2, w2a, w2b)
            return gt1, g1a, g1b, gt2, g2a, g2b


def hada_delta_cp(
    hada_t1: torch.Tensor,
    hada_w1_a: torch.Tensor,
    hada_w1_b: torch.Tensor,
    hada_t2: torch.Tensor,
    hada_w2_a: torch.Tensor,
    hada_w2_b: torch.Tensor,
) -> torch.Tensor:
    """CP LoHa: ``cp(t1 (r, r, *k), w1_a (r, o), w1_b (r, i)) ⊙ cp(t2, w2_a, w2_b)`` → ``(o, i, *k)``."""
    ws = (hada_t1, hada_w1_a, hada_w1_b, hada_t2, hada_w2_a, hada_w2_b)
    if not (torch.is_grad_enabled() and any(w.requires_grad for w in ws)):
        return cp_rebuild(hada_t1, hada_w1_a, hada_w1_b) * cp_rebuild(hada_t2, hada_w2_a, hada_w2_b)
    return _HadaWeightCP.apply(*ws)


def hada_delta_naive(hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, hada_t1=None, hada_t2=None) -> torch.Tensor:
    """Reference formula with plain autograd (for tests): same result as :func:`hada_delta` / ``_cp``."""
    if hada_t1 is None:
        return (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b)
    r1 = torch.einsum("ij...,jr,ip->pr...", hada_t1, hada_w1_b, hada_w1_a)
    r2 = torch.einsum("ij...,jr,ip->pr...", hada_t2, hada_w2_b, hada_w2_a)
    return r1 * r2


def hada_khatri_rao(
    hada_w1_a: torch.Tensor, hada_w1_b: torch.Tensor, hada_w2_a: torch.Tensor, hada_w2_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor the LoHa delta as ``ΔW = ka @ kb`` with inner rank ``r1·r2`` (Khatri-Rao products).

    ``ka[o, s·r2+t] = w1_a[o, s]·w2_a[o, t]`` → ``(o, r1·r2)``; ``kb[s·r2+t, i] = w1_b[s, i]·w2_b[t, i]``
    → ``(r1·r2, i)``. Then ``(w1_a @ w1_b) ⊙ (w2_a @ w2_b) == ka @ kb``.
    """
    ka = (hada_w1_a.unsqueeze(2) * hada_w2_a.unsqueeze(1)).flatten(1)
    kb = (hada_w1_b.unsqueeze(1) * hada_w2_b.unsqueeze(0)).flatten(0, 1)
    return ka, kb


def hada_apply(
    x: torch.Tensor,
    hada_w1_a: torch.Tensor,
    hada_w1_b: torch.Tensor,
    hada_w2_a: torch.Tensor,
    hada_w2_b: torch.Tensor,
) -> torch.Tensor:
    """``x (..., i) → (..., o)`` times the unscaled LoHa delta, never materialising ``ΔW (o, i)``."""
    ka, kb = hada_khatri_rao(hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b)
    return torch.nn.functional.linear(torch.nn.functional.linear(x, kb), ka)
