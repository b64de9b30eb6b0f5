"""LoKr maths: Kronecker delta of two factors (full or low-rank)."""

from __future__ import annotations

import torch


def make_kron(lokr_w1: torch.Tensor, lokr_w2: torch.Tensor) -> torch.Tensor:
    """``ΔW = kron(w1, w2)`` laid out as a layer weight (unscaled).

    ``lokr_w1 (a, c)``, ``lokr_w2 (b, d, *k)`` → ``(a·b, c·d, *k)``. ``w1`` is given trailing unit
    dims so the kernel dims of ``w2`` stay in place for every kernel rank (PEFT only does this for
    4-D ``w2``, which scrambles Conv1d full-``w2`` layouts).
    """
    w1 = lokr_w1.reshape(*lokr_w1.shape, *([1] * (lokr_w2.dim() - 2)))
    return torch.kron(w1, lokr_w2.contiguous())
