"""Output rows of layer weights: block-diagonal stacking of factors, Kronecker-aligned row sets.

Used by the methods' ``take_rows`` / ``stack_rows`` hooks (fused ↔ split projections): ``ΔW[rows]`` and the
row stack ``[ΔW_1; ΔW_2; …]`` expressed in each method's own factors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def block_diag_rows(blocks: Sequence[torch.Tensor | int]) -> torch.Tensor:
    """Blocks ``(o_i, r_i, *unit)`` on the diagonal of a ``(Σo_i, Σr_i, *unit)`` tensor (zeros elsewhere); an
    ``int`` ``o`` is ``o`` zero rows with no columns. At least one block must be a tensor.

    With ``up = block_diag_rows(ups)`` and ``down = cat(downs)``, ``up @ down`` is the row stack of the
    ``ups[i] @ downs[i]`` (a stacked LoRA of rank ``Σr_i``).

    >>> block_diag_rows([torch.ones(1, 1), 2, torch.ones(1, 2)]).tolist()
    [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    """
    tensors = [b for b in blocks if isinstance(b, torch.Tensor)]
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    rows = sum(b.shape[0] if isinstance(b, torch.Tensor) else b for b in blocks)
    cols = sum(t.shape[1] for t in tensors)
    out = tensors[0].new_zeros((rows, cols, *tensors[0].shape[2:]), dtype=dtype)
    row = col = 0
    for b in blocks:
        if isinstance(b, torch.Tensor):
            out[row : row + b.shape[0], col : col + b.shape[1]] = b
            row, col = row + b.shape[0], col + b.shape[1]
        else:
            row += b
    return out


def is_permutation(rows: torch.Tensor, n: int) -> bool:
    """Whether ``rows`` (1-D indices) lists each of ``0 … n-1`` exactly once."""
    return rows.numel() == n and bool(torch.equal(rows.sort().values, torch.arange(n, device=rows.device)))


def is_identity(rows: torch.Tensor, n: int) -> bool:
    """Whether ``rows`` is ``0 … n-1`` in order (all rows, unmoved)."""
    return rows.numel() == n and bool(torch.equal(rows, torch.arange(n, device=rows.device)))


def kron_rows(rows: torch.Tensor, out_r: int) -> torch.Tensor | None:
    """The rows of ``w1`` whose Kronecker product with a ``w2`` of ``out_r`` rows gives rows ``rows`` of
    ``kron(w1, w2)``, or ``None`` when ``rows`` is not made of whole aligned blocks.

    Row ``a·out_r + j`` of ``kron(w1, w2)`` is ``kron(w1[a], w2[j])``, so ``kron(w1, w2)[rows] == kron(w1[idx],
    w2)`` exactly when ``rows`` is ``[idx[0]·out_r + 0 … idx[0]·out_r + out_r-1, idx[1]·out_r + 0 …]``.

    >>> kron_rows(torch.tensor([4, 5, 6, 7, 0, 1, 2, 3]), 4).tolist(), kron_rows(torch.arange(2, 6), 4)
    ([1, 0], None)
    """
    if rows.numel() == 0 or rows.numel() % out_r:
        return None
    blocks = rows.reshape(-1, out_r)
    idx = blocks[:, 0] // out_r
    expected = idx[:, None] * out_r + torch.arange(out_r, device=rows.device)
    return idx if torch.equal(blocks, expected) else None


def common_scale(scales: Sequence[float]) -> float:
    """The scale a stack keeps outside its tensors: the first non-zero one (0 when all are 0); each part then
    carries ``scale_i / common`` in its own factor."""
    return next((s for s in scales if s != 0), 0.0)
