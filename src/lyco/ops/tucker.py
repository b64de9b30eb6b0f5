"""CP/Tucker core contractions for "effective conv" adapters (any kernel rank)."""

from __future__ import annotations

import torch


def cp_rebuild(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Rebuild a conv weight from a CP core: ``W[p, q, *k] = Σ_ij t[i, j, *k] · wa[i, p] · wb[j, q]``.

    ``t (r, r, *k)``, ``wa (r, out)``, ``wb (r, in)`` → ``(out, in, *k)``. The factor with the smaller
    output dimension is contracted first, so the intermediate stays as small as possible.
    """
    if wa.shape[1] <= wb.shape[1]:
        tmp = torch.einsum("ij...,ip->pj...", t, wa)
        return torch.einsum("pj...,jq->pq...", tmp, wb)
    tmp = torch.einsum("ij...,jq->iq...", t, wb)
    return torch.einsum("iq...,ip->pq...", tmp, wa)
