"""LoHa maths: ``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b)`` and its CP form, with custom autograd; fitting LoHa
factors to a given ``ΔW``.

The autograd functions save only the factors (a few ``r × d`` matrices) and recompute the
``out × in`` products in backward, instead of keeping two dense products alive per layer.
All functions return the *unscaled* delta; the adapter applies ``alpha / r`` once.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .amp import autocast_state
from .lowrank import relative_error, svd_factors
from .tucker import cp_rebuild

LOHA_STEPS = 300
LOHA_LR = 1e-2


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


def loha_delta(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Unscaled LoHa ``ΔW`` from tensors keyed by on-disk name: CP form ``(o, i, *k)`` when ``hada_t1`` /
    ``hada_t2`` are present, else ``(o, i·∏k)`` (callers reshape to the layer's weight shape)."""
    t = tensors
    if "hada_t1" in t:
        return hada_delta_cp(t["hada_t1"], t["hada_w1_a"], t["hada_w1_b"], t["hada_t2"], t["hada_w2_a"], t["hada_w2_b"])
    return hada_delta(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"])


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


def fit_loha(
    target: torch.Tensor,
    rank: int,
    steps: int = LOHA_STEPS,
    seed: int = 0,
    lr: float = LOHA_LR,
    init: dict[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """LoHa factors with ``(w1_a @ w1_b) ⊙ (w2_a @ w2_b) ≈ target (out, n)`` and their relative error.

    Start: branch 1 = the rank-``rank`` SVD of ``target``, branch 2 ≈ the all-ones matrix (first column
    of ``w2_a`` and row of ``w2_b`` one, the rest small seeded noise), so the fit starts at the SVD error;
    or ``init`` (``hada_w1_a (out, r)`` … ``hada_w2_b (r, n)``). Then ``steps`` Adam steps on the
    normalised target; the best iterate is returned (never worse than the start). Deterministic for a
    given ``seed``; runs on ``target``'s device. Returns fp32 CPU tensors ``hada_w1_a (out, r)``, ``hada_w1_b (r, n)``, ``hada_w2_a``,
    ``hada_w2_b`` (unscaled: use alpha = r) and the relative Frobenius error.
    """
    out, n = target.shape
    t = target.detach().to(torch.float64)
    norm = float(t.square().mean().sqrt())
    if norm == 0:
        zeros = {"hada_w1_a": torch.zeros(out, rank), "hada_w1_b": torch.zeros(rank, n)}
        return {**zeros, "hada_w2_a": torch.zeros(out, rank), "hada_w2_b": torch.zeros(rank, n)}, 0.0
    t = t / norm  # unit RMS: one learning rate fits every layer
    gen = torch.Generator().manual_seed(seed)

    def noise(*shape: int, std: float) -> torch.Tensor:  # seeded on the CPU: same start on every device
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(t.device)

    if init is None:
        w1_a, w1_b = svd_factors(t, rank, pad=True)
        w2_a, w2_b = noise(out, rank, std=1e-2), noise(rank, n, std=1e-2)
        w2_a[:, 0], w2_b[0, :] = 1.0, 1.0
        # padded (zero) SVD components get a little noise too, or their gradients stay zero
        w1_a = w1_a.double() + noise(out, rank, std=1e-3)
        w1_b = w1_b.double() + noise(rank, n, std=1e-3)
        params = [w1_a, w1_b, w2_a, w2_b]
    else:
        scale = norm ** -0.25  # each of the four factors carries a quarter of the normalisation
        names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        params = [init[k].detach().to(t.device, torch.float64) * scale for k in names]
    params = [p.clone().requires_grad_(True) for p in params]
    opt = torch.optim.Adam(params, lr=lr)

    def loss_of(ps: list[torch.Tensor]) -> torch.Tensor:
        return ((ps[0] @ ps[1]) * (ps[2] @ ps[3]) - t).square().mean()

    best_loss, best = float("inf"), [p.detach().clone() for p in params]
    for step in range(steps + 1):
        opt.zero_grad()
        loss = loss_of(params)
        if loss.item() < best_loss:
            best_loss, best = loss.item(), [p.detach().clone() for p in params]
        if step == steps:
            break
        loss.backward()
        opt.step()
    scale = norm ** 0.25
    w1_a, w1_b, w2_a, w2_b = (p * scale for p in best)
    approx = (w1_a @ w1_b) * (w2_a @ w2_b)
    factors = {"hada_w1_a": w1_a, "hada_w1_b": w1_b, "hada_w2_a": w2_a, "hada_w2_b": w2_b}
    return {k: v.float().cpu() for k, v in factors.items()}, relative_error(target, approx)
