"""Shape planning for LoKr and LoHa: every shape decision in one place.

``plan_lokr`` / ``plan_loha`` are used by adapter creation; ``infer_lokr_plan`` /
``infer_loha_plan`` rebuild the same plans from tensor shapes found in a file, so loading never
recomputes a factorization (a file from another trainer may use another split).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ConfigError, ShapeMismatchError

Shape = tuple[int, ...]


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)`` with ``m * n == dimension`` and ``m <= n`` (PEFT/LyCORIS rule).

    With ``factor > 0`` dividing ``dimension`` the split is ``(factor, dimension // factor)``
    (kept in that order, as PEFT does). Otherwise the divisor pair with the smallest sum is searched
    from 1 upwards, never taking ``m > factor`` when ``factor > 0``.

    >>> factorization(256), factorization(128), factorization(128, 4), factorization(127)
    ((16, 16), (8, 16), (4, 32), (1, 127))
    """
    if isinstance(dimension, bool) or not isinstance(dimension, int) or dimension < 1:
        raise ConfigError(f"factorization needs a positive integer dimension, got {dimension!r}")
    if isinstance(factor, bool) or not isinstance(factor, int):
        raise ConfigError(f"factorization needs an integer factor, got {factor!r}")
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor <= 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    if m > n:
        m, n = n, m
    return m, n


@dataclass(frozen=True)
class LoKrPlan:
    """Every shape decision of one LoKr adapter.

    ``ΔW (out_l·out_r, in_l·in_r, *kernel) = kron(w1 (out_l, in_l), w2 (out_r, in_r, *kernel))``.
    ``use_w1``/``use_w2``: the factor is a full matrix; otherwise ``w1 = w1_a (out_l, r) @ w1_b (r, in_l)``
    and ``w2 = w2_a (out_r, r) @ w2_b (r, in_r·prod(kernel))``, or with ``use_cp`` the CP form
    ``w2 = einsum(t2 (r, r, *kernel), w2_a (r, out_r), w2_b (r, in_r))``.
    """

    out_l: int
    out_r: int
    in_l: int
    in_r: int
    kernel: Shape
    r: int
    use_w1: bool
    use_w2: bool
    use_cp: bool
    r1: int | None = None  # w1_a/w1_b's rank where it differs from w2's (files from other tools); None: r

    @property
    def w1_rank(self) -> int:
        return self.r if self.r1 is None else self.r1

    @property
    def out_features(self) -> int:
        return self.out_l * self.out_r

    @property
    def in_features(self) -> int:
        return self.in_l * self.in_r

    @property
    def weight_shape(self) -> Shape:
        return (self.out_features, self.in_features, *self.kernel)

    @property
    def both_full(self) -> bool:
        """Both Kronecker factors are full matrices: LyCORIS files then use scale 1 whatever alpha says."""
        return self.use_w1 and self.use_w2

    @property
    def ranked(self) -> bool:
        """The tensors carry the rank ``r`` (not when both factors are full: ``r`` is then only ``alpha / r``'s)."""
        return not self.both_full

    def param_shapes(self) -> dict[str, Shape]:
        """On-disk parameter names and their shapes."""
        k = self.kernel
        shapes: dict[str, Shape] = {}
        if self.use_w1:
            shapes["lokr_w1"] = (self.out_l, self.in_l)
        else:
            shapes["lokr_w1_a"] = (self.out_l, self.w1_rank)
            shapes["lokr_w1_b"] = (self.w1_rank, self.in_l)
        if self.use_w2:
            shapes["lokr_w2"] = (self.out_r, self.in_r, *k)
        elif self.use_cp:
            shapes["lokr_t2"] = (self.r, self.r, *k)
            shapes["lokr_w2_a"] = (self.r, self.out_r)
            shapes["lokr_w2_b"] = (self.r, self.in_r)
        else:
            shapes["lokr_w2_a"] = (self.out_r, self.r)
            shapes["lokr_w2_b"] = (self.r, self.in_r * math.prod(k))
        return shapes


def plan_lokr(
    out_features: int,
    in_features: int,
    kernel: Shape = (),
    r: int = 8,
    factor: int = -1,
    decompose_both: bool = False,
    use_effective_conv2d: bool = False,
    full_matrix: bool = False,
    unbalanced_factorization: bool = False,
    ordered_splits: bool = False,
) -> LoKrPlan:
    """Plan a LoKr adapter for a weight ``(out_features, in_features, *kernel)`` (PEFT's rules).

    ``w1`` is full unless ``decompose_both`` and ``r < max(out_l, in_l) / 2``; ``w2`` is full when
    ``r >= max(out_r, in_r) / 2``; the CP core is used for kernels with more than one element only.
    LyCORIS's options: ``full_matrix`` makes both factors full; ``unbalanced_factorization`` swaps the output
    split (``w1`` gets the larger part of ``out_features``); ``ordered_splits``: lycoris-lora 4's factorization,
    which orders each split smaller part first also when ``factor`` divides the dimension (PEFT keeps
    ``(factor, dim // factor)``: ``factorization(8, 4)`` is ``(4, 2)`` there, ``(2, 4)`` in LyCORIS).
    """
    if r <= 0:
        raise ConfigError(f"LoKr rank r must be a positive integer, got {r}")
    out_l, out_r = factorization(out_features, factor)
    in_l, in_r = factorization(in_features, factor)
    if ordered_splits:
        (out_l, out_r), (in_l, in_r) = sorted((out_l, out_r)), sorted((in_l, in_r))
    if unbalanced_factorization:
        out_l, out_r = out_r, out_l
    use_w1 = full_matrix or not (decompose_both and r < max(out_l, in_l) / 2)
    use_w2 = full_matrix or r >= max(out_r, in_r) / 2
    use_cp = bool(use_effective_conv2d and kernel and math.prod(kernel) > 1 and not use_w2)
    return LoKrPlan(out_l, out_r, in_l, in_r, tuple(kernel), r, use_w1, use_w2, use_cp)


def _mismatch(what: str, shapes: Mapping[str, Shape], weight_shape: Shape) -> ShapeMismatchError:
    got = ", ".join(f"{k}{tuple(v)}" for k, v in sorted(shapes.items()))
    return ShapeMismatchError(f"{what}: tensors {got} do not fit a layer weight of shape {tuple(weight_shape)}")


def infer_lokr_plan(shapes: Mapping[str, Shape], weight_shape: Shape, r: int | None = None) -> LoKrPlan:
    """Rebuild a :class:`LoKrPlan` from the tensor shapes of one module (loading never refactorizes).

    ``r`` is only used when both factors are full matrices (the tensors then carry no rank). Low-rank
    factors of different ranks load (ComfyUI and AUTOMATIC1111 read them; ``alpha / r`` takes ``w2``'s rank).

    Raises :class:`ShapeMismatchError` when the tensors are incomplete or do not compose to ``weight_shape``.
    """
    out_f, in_f, *kernel = weight_shape
    kernel = tuple(kernel)
    s = {k: tuple(v) for k, v in shapes.items()}
    try:
        if "lokr_w1" in s:
            out_l, in_l = s["lokr_w1"]
            r1 = None
        else:
            out_l, r1 = s["lokr_w1_a"]
            _, in_l = s["lokr_w1_b"]
        if out_f % out_l or in_f % in_l:
            raise _mismatch("LoKr w1", s, weight_shape)
        out_r, in_r = out_f // out_l, in_f // in_l
        if "lokr_w2" in s:
            use_w2, use_cp, r2 = True, False, None
            if s["lokr_w2"] != (out_r, in_r, *kernel):
                raise _mismatch("LoKr w2", s, weight_shape)
        elif "lokr_t2" in s:
            use_w2, use_cp = False, True
            r2 = s["lokr_t2"][0]
            if s["lokr_t2"] != (r2, r2, *kernel) or s["lokr_w2_a"] != (r2, out_r) or s["lokr_w2_b"] != (r2, in_r):
                raise _mismatch("LoKr t2/w2 (CP)", s, weight_shape)
        else:
            use_w2, use_cp = False, False
            r2 = s["lokr_w2_a"][1]
            if s["lokr_w2_a"] != (out_r, r2) or s["lokr_w2_b"] != (r2, in_r * math.prod(kernel)):
                raise _mismatch("LoKr w2_a/w2_b", s, weight_shape)
        if r1 is not None and s["lokr_w1_b"] != (r1, in_l):
            raise _mismatch("LoKr w1_a/w1_b", s, weight_shape)
    except KeyError as exc:
        raise ShapeMismatchError(f"LoKr tensors incomplete: missing {exc.args[0]!r} among {sorted(s)}") from None
    rank = r2 if r2 is not None else r1 if r1 is not None else (r if r is not None else 1)  # alpha / r: w2's rank first
    own_r1 = r1 if r1 is not None and r2 is not None and r1 != r2 else None
    return LoKrPlan(out_l, out_r, in_l, in_r, kernel, rank, r1 is None, use_w2, use_cp, own_r1)


@dataclass(frozen=True)
class LoHaPlan:
    """Every shape decision of one LoHa adapter.

    Plain: ``ΔW = (w1_a (out, r) @ w1_b (r, in·prod(k))) ⊙ (w2_a @ w2_b)`` reshaped to ``(out, in, *k)``.
    CP (``use_cp``): ``w1_a (r, out)``, ``w1_b (r, in)``, ``t1 (r, r, *k)`` (same for the 2-branch),
    ``ΔW = cp(t1, w1_a, w1_b) ⊙ cp(t2, w2_a, w2_b)``.
    """

    out_features: int
    in_features: int
    kernel: Shape
    r: int
    use_cp: bool

    @property
    def weight_shape(self) -> Shape:
        return (self.out_features, self.in_features, *self.kernel)

    ranked = True  # the tensors carry the rank r

    def param_shapes(self) -> dict[str, Shape]:
        o, i, r, k = self.out_features, self.in_features, self.r, self.kernel
        if self.use_cp:
            return {
                "hada_w1_a": (r, o), "hada_w1_b": (r, i), "hada_t1": (r, r, *k),
                "hada_w2_a": (r, o), "hada_w2_b": (r, i), "hada_t2": (r, r, *k),
            }  # fmt: skip
        flat = i * math.prod(k)
        return {"hada_w1_a": (o, r), "hada_w1_b": (r, flat), "hada_w2_a": (o, r), "hada_w2_b": (r, flat)}


def plan_loha(
    out_features: int, in_features: int, kernel: Shape = (), r: int = 8, use_effective_conv2d: bool = False
) -> LoHaPlan:
    """Plan a LoHa adapter; the CP form is used only for kernels with more than one element."""
    if r <= 0:
        raise ConfigError(f"LoHa rank r must be a positive integer, got {r}")
    use_cp = bool(use_effective_conv2d and kernel and math.prod(kernel) > 1)
    return LoHaPlan(out_features, in_features, tuple(kernel), r, use_cp)


def infer_loha_plan(shapes: Mapping[str, Shape], weight_shape: Shape) -> LoHaPlan:
    """Rebuild a :class:`LoHaPlan` from tensor shapes; :class:`ShapeMismatchError` if they do not fit."""
    out_f, in_f, *kernel = weight_shape
    s = {k: tuple(v) for k, v in shapes.items()}
    if "hada_w1_a" not in s:
        raise ShapeMismatchError(f"LoHa tensors incomplete: missing 'hada_w1_a' among {sorted(s)}")
    use_cp = "hada_t1" in s
    r = s["hada_w1_a"][0] if use_cp else s["hada_w1_a"][-1]
    plan = LoHaPlan(out_f, in_f, tuple(kernel), r, use_cp)
    if s != plan.param_shapes():
        raise _mismatch("LoHa", s, weight_shape)
    return plan


@dataclass(frozen=True)
class LoRAPlan:
    """Every shape decision of one LoRA / LoCon adapter.

    Linear: ``lora_down (r, in)``, ``lora_up (out, r)``, ``ΔW = up @ down``. Conv: ``lora_down (r, in, *k)``,
    ``lora_up (out, r, 1…)``; with a Tucker core (``use_tucker``, kernels with more than one element)
    ``lora_down (r, in, 1…)``, ``lora_mid (r, r, *k)``, ``ΔW = cp(mid, upᵀ, down)``.
    """

    out_features: int
    in_features: int
    kernel: Shape
    r: int
    use_tucker: bool

    ranked = True

    @property
    def weight_shape(self) -> Shape:
        return (self.out_features, self.in_features, *self.kernel)

    def param_shapes(self) -> dict[str, Shape]:
        o, i, r, k = self.out_features, self.in_features, self.r, self.kernel
        ones = (1,) * len(k)
        if self.use_tucker:
            return {"lora_down": (r, i, *ones), "lora_mid": (r, r, *k), "lora_up": (o, r, *ones)}
        return {"lora_down": (r, i, *k), "lora_up": (o, r, *ones)}


def plan_lora(
    out_features: int, in_features: int, kernel: Shape = (), r: int = 8, use_effective_conv2d: bool = False
) -> LoRAPlan:
    """Plan a LoRA adapter; the Tucker core is used only for kernels with more than one element."""
    if r <= 0:
        raise ConfigError(f"LoRA rank r must be a positive integer, got {r}")
    use_tucker = bool(use_effective_conv2d and kernel and math.prod(kernel) > 1)
    return LoRAPlan(out_features, in_features, tuple(kernel), r, use_tucker)


def infer_lora_plan(shapes: Mapping[str, Shape], weight_shape: Shape) -> LoRAPlan:
    """Rebuild a :class:`LoRAPlan` from tensor shapes (canonical layout); :class:`ShapeMismatchError` if
    they do not fit ``weight_shape``."""
    out_f, in_f, *kernel = weight_shape
    s = {k: tuple(v) for k, v in shapes.items()}
    if "lora_down" not in s:
        raise ShapeMismatchError(f"LoRA tensors incomplete: missing 'lora_down' among {sorted(s)}")
    plan = LoRAPlan(out_f, in_f, tuple(kernel), s["lora_down"][0], "lora_mid" in s)
    if s != plan.param_shapes():
        raise _mismatch("LoRA", s, weight_shape)
    return plan
