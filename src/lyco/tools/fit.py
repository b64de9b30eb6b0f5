"""Fitting LoHa factors to a given ``ΔW`` (no closed form exists: a short deterministic Adam fit)."""

from __future__ import annotations

import torch

from ..ops.lowrank import relative_error, svd_factors

LOHA_STEPS = 300
LOHA_LR = 1e-2


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
