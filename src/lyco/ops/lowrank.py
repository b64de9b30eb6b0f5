"""Low-rank approximations: truncated SVD and the nearest Kronecker product (Van Loan–Pitsianis).

Used by the adapter-file tools (``lyco extract``, ``resize``, ``to-lora``). All functions compute in
float64 on the input's device (the matrices involved are at most one layer weight) and return float32
unless the input was float64.
"""

from __future__ import annotations

import math

import torch

from ..errors import ShapeMismatchError
from .factorize import LoKrPlan


def _out_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def svd_factors(matrix: torch.Tensor, rank: int, pad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factors of ``matrix (m, n)`` in the Frobenius norm (Eckart–Young).

    Returns ``a (m, k)``, ``b (k, n)`` with ``a @ b`` the truncated SVD and the singular values split
    evenly (``a = U·√S``, ``b = √S·Vᵀ``); ``k = min(rank, m, n)``, or ``k = rank`` with ``pad=True``
    (columns past ``min(m, n)`` are zero). The sign of each component is fixed (largest entry of ``a``'s
    column positive) so the result is deterministic.

    >>> w = torch.outer(torch.arange(1.0, 4.0), torch.ones(2))
    >>> a, b = svd_factors(w, 1)
    >>> a.shape, b.shape, torch.allclose(a @ b, w)
    (torch.Size([3, 1]), torch.Size([1, 2]), True)
    """
    if matrix.dim() != 2:
        raise ShapeMismatchError(f"svd_factors needs a matrix, got shape {tuple(matrix.shape)}")
    if rank < 1:
        raise ValueError(f"rank must be positive, got {rank}")
    m, n = matrix.shape
    k = min(rank, m, n)
    u, s, vh = truncated_svd(matrix.to(torch.float64), k)
    sign = torch.sign(u.gather(0, u.abs().argmax(0, keepdim=True))).squeeze(0)
    sign[sign == 0] = 1
    root = s.sqrt() * sign
    a, b = u * root, root[:, None] * vh
    if pad and rank > k:
        a = torch.cat([a, a.new_zeros(m, rank - k)], dim=1)
        b = torch.cat([b, b.new_zeros(rank - k, n)], dim=0)
    dt = _out_dtype(matrix)
    return a.to(dt), b.to(dt)


DENSE_SVD_MAX = 512  # below this size (or for ranks ≥ a quarter of it) a full SVD is cheap enough
SUBSPACE_ITERS = 30
SUBSPACE_TOL = 1e-9
OVERSAMPLE = 8


def truncated_svd(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top ``k`` singular triplets ``u (m, k)``, ``s (k,)``, ``vh (k, n)`` of ``matrix``.

    Small matrices (or ``k`` ≥ a quarter of the smaller side) use a full SVD. Large ones use seeded
    subspace iteration with ``k + 8`` vectors and a Rayleigh–Ritz step, stopped when the top-``k``
    residual ``‖A·v − u·s‖ / s₁`` falls below 1e-9. A matrix whose spectrum drops after ``k`` (an exact
    or nearly exact low-rank / Kronecker structure) converges in a few iterations; a flat spectrum (pure
    noise) stops at the 30-iteration cap with the top singular values within a few per cent — callers
    measure and report the error they actually get. (A full SVD of a 4096² layer's rearranged matrix
    takes minutes on a CPU; this takes seconds.)
    """
    m, n = matrix.shape
    small = min(m, n)
    if small <= DENSE_SVD_MAX or 4 * k >= small:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        return u[:, :k], s[:k], vh[:k]
    q = min(k + OVERSAMPLE, small)
    gen = torch.Generator(device=matrix.device).manual_seed(0)
    start = torch.randn(n, q, generator=gen, dtype=matrix.dtype, device=matrix.device)
    basis = torch.linalg.qr(matrix @ start).Q  # (m, q)
    for _ in range(SUBSPACE_ITERS):
        basis = torch.linalg.qr(matrix @ torch.linalg.qr(matrix.mT @ basis).Q).Q
        ub, s, vh = torch.linalg.svd(basis.mT @ matrix, full_matrices=False)  # Rayleigh–Ritz: (q, n)
        u = basis @ ub[:, :k]
        # Aᵀu = v·s holds by construction; A·v = u·s only once the basis holds the top-k subspace
        residual = torch.linalg.matrix_norm(matrix @ vh[:k].mT - u * s[:k]) / s[0].clamp_min(1e-300)
        if residual < SUBSPACE_TOL:
            break
    return u, s[:k], vh[:k]


def svd_tail_error(matrix: torch.Tensor, rank: int) -> float:
    """Relative Frobenius error of the best rank-``rank`` approximation: ``√(Σ_{i>rank} sᵢ²) / √(Σ sᵢ²)``."""
    s = torch.linalg.svdvals(matrix.to(torch.float64))
    total = float(s.square().sum())
    return math.sqrt(float(s[rank:].square().sum()) / total) if total > 0 else 0.0


def kron_rearrange(
    weight: torch.Tensor, left: tuple[int, int], right: tuple[int, int]
) -> torch.Tensor:
    """Van Loan–Pitsianis rearrangement ``R (out_l·in_l, out_r·in_r·∏k)`` of ``weight (out, in, *k)``.

    ``R[(i, j), (p, q, …)] = W[i·out_r + p, j·in_r + q, …]``, so ``kron(A, B)`` maps to the rank-1
    matrix ``vec(A) vec(B)ᵀ`` and ``‖W − kron(A, B)‖_F = ‖R − vec(A) vec(B)ᵀ‖_F``.
    """
    (out_l, in_l), (out_r, in_r) = left, right
    if weight.dim() < 2 or weight.shape[0] != out_l * out_r or weight.shape[1] != in_l * in_r:
        raise ShapeMismatchError(
            f"weight {tuple(weight.shape)} is not ({out_l}·{out_r}, {in_l}·{in_r}, *k): cannot split it as kron"
        )
    kernel = tuple(weight.shape[2:])
    w = weight.reshape(out_l, out_r, in_l, in_r, math.prod(kernel))
    return w.permute(0, 2, 1, 3, 4).reshape(out_l * in_l, out_r * in_r * math.prod(kernel))


def nearest_kronecker(
    weight: torch.Tensor, left: tuple[int, int], right: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``A (out_l, in_l)``, ``B (out_r, in_r, *k)`` minimising ``‖W − kron(A, B)‖_F`` (Van Loan–Pitsianis).

    ``weight (out_l·out_r, in_l·in_r, *k)``: the rank-1 SVD ``s·u·vᵀ`` of :func:`kron_rearrange`'s matrix
    gives ``A = √s·u``, ``B = √s·v`` (norms balanced; the largest entry of ``A`` is positive). ``kron`` is
    laid out as :func:`lyco.ops.kron.make_kron` does: ``ΔW[i·out_r + p, j·in_r + q, …] = A[i, j]·B[p, q, …]``.

    >>> from lyco.ops.kron import make_kron
    >>> a, b = torch.randn(2, 3), torch.randn(4, 5)
    >>> a2, b2 = nearest_kronecker(make_kron(a, b), (2, 3), (4, 5))
    >>> torch.allclose(make_kron(a2, b2), make_kron(a, b), atol=1e-5)
    True
    """
    rearranged = kron_rearrange(weight, left, right)
    a, b = svd_factors(rearranged, 1, pad=True)
    kernel = tuple(weight.shape[2:])
    return a.reshape(left), b.reshape(*right, *kernel)


def relative_error(target: torch.Tensor, approx: torch.Tensor) -> float:
    """``‖target − approx‖_F / ‖target‖_F`` in float64 (0 when both are zero, inf when only target is)."""
    t, a = target.to(torch.float64), approx.to(torch.float64)
    norm = float(torch.linalg.vector_norm(t))
    diff = float(torch.linalg.vector_norm(t - a))
    if norm == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / norm


def lokr_factors(weight: torch.Tensor, plan: LoKrPlan) -> dict[str, torch.Tensor]:
    """LoKr tensors (on-disk names, unscaled) approximating ``weight (out, in, *k)`` under ``plan``.

    The nearest Kronecker product ``kron(w1, w2)`` first; then ``w1`` is replaced by its rank-``r`` SVD
    factors ``w1_a @ w1_b`` unless ``plan.use_w1``, and ``w2`` (flattened to ``(out_r, in_r·∏k)``) by
    ``w2_a @ w2_b`` unless ``plan.use_w2``. CP plans are not produced (``plan.use_cp`` must be false).
    """
    if plan.use_cp:
        raise ValueError("lokr_factors does not produce CP (use_cp) factors")
    if tuple(weight.shape) != plan.weight_shape:
        raise ShapeMismatchError(f"weight {tuple(weight.shape)} does not match the plan's {plan.weight_shape}")
    w1, w2 = nearest_kronecker(weight, (plan.out_l, plan.in_l), (plan.out_r, plan.in_r))
    out: dict[str, torch.Tensor] = {}
    if plan.use_w1:
        out["lokr_w1"] = w1
    else:
        out["lokr_w1_a"], out["lokr_w1_b"] = svd_factors(w1, plan.w1_rank, pad=True)
    if plan.use_w2:
        out["lokr_w2"] = w2
    else:
        out["lokr_w2_a"], out["lokr_w2_b"] = svd_factors(w2.reshape(plan.out_r, -1), plan.r, pad=True)
    return out


def lora_factors(weight: torch.Tensor, rank: int) -> dict[str, torch.Tensor]:
    """kohya LoRA tensors ``lora_down (k, in, *kernel)``, ``lora_up (out, k, 1…)`` whose product is the best
    rank-``k`` approximation of ``weight (out, in, *kernel)``, ``k = min(rank, out, in·∏kernel)``."""
    out_f, in_f, *kernel = weight.shape
    up, down = svd_factors(weight.reshape(out_f, -1), rank)
    k = up.shape[1]
    return {"lora_down": down.reshape(k, in_f, *kernel), "lora_up": up.reshape(out_f, k, *[1] * len(kernel))}

