"""Dense vs factored: pick the cheaper way to compute ``ΔW·x`` from a multiply-add count.

``LYCO_PATH=dense|factored|auto`` (environment, read per call) forces a path for every layer, so
both paths can always be tested and compared; ``auto`` (default) uses the cost model.
"""

from __future__ import annotations

import os

from ..errors import ConfigError

PATHS = ("auto", "dense", "factored")

# Fixed cost of one extra kernel call, in multiply-adds of useful work it could have done instead.
# CPU: ~10 µs of dispatch and small-tensor overhead at ~25 GFLOP/s per core (benchmarks/compare.py: a
# LoKr factored path on 64-wide layers lost to the dense one by 1.3-1.6× before this term).
# CUDA: ~5 µs launch latency at tens of TFLOP/s.
OP_OVERHEAD = {"cpu": 250_000, "cuda": 50_000_000}

# Multiply-adds worth of one element written to a fresh tensor or moved by a copy (bandwidth-bound, and on
# CPU a fresh large tensor also pays page faults). CPU: without it 64-wide LoKr layers took the factored
# path and lost, and building a 1024² LoHa ΔW (two rank-8 products, their Hadamard product, W + ΔW) took
# 4 ms, not the 0.3 ms its multiply-adds predict. CUDA: not calibrated on a GPU yet — about 1/3 of an H100's
# bf16 multiply-add rate per element-byte moved, rounded down.
ELEMENT_COST = {"cpu": 16, "cuda": 64}

# How many times slower, per multiply-add, a factored LoKr convolution runs than the base layer's: it
# convolves ``in_r``- to ``out_r``-channel slices (a 3×3 conv with 20 channels in and out on 32 images instead
# of one with 320 on 2). CPU: measured 3.5-7× on 64-640-channel 3×3 convs (benchmarks/RESULTS.md); 4 picks the
# faster path in 7 of 8 measured cases. CUDA: not calibrated, the same value.
SMALL_CONV_COST = {"cpu": 4, "cuda": 4}


def op_overhead(device_type: str) -> int:
    """Multiply-add equivalent of one extra kernel call on this device type."""
    return OP_OVERHEAD.get(device_type, OP_OVERHEAD["cuda"])


def small_conv_cost(device_type: str) -> int:
    """Per-multiply-add slowdown of a factored (small-channel) convolution on this device type."""
    return SMALL_CONV_COST.get(device_type, SMALL_CONV_COST["cuda"])


def element_cost(device_type: str) -> int:
    """Multiply-add equivalent of writing or copying one tensor element on this device type."""
    return ELEMENT_COST.get(device_type, ELEMENT_COST["cuda"])


def forced_path() -> str:
    """The path forced by ``LYCO_PATH`` (``"auto"`` when unset)."""
    path = os.environ.get("LYCO_PATH", "auto").strip().lower() or "auto"
    if path not in PATHS:
        raise ConfigError(f"LYCO_PATH={path!r} is not one of {PATHS}")
    return path


def call_costs(build: float, factored: float, dense_apply: float, *, grad: bool, fused: bool) -> tuple[float, float]:
    """Cost ``(dense, factored)`` of one adapter call, forward plus backward when ``grad``.

    ``build``: multiply-adds to build ``ΔW``; ``factored``: the factored path's forward; ``dense_apply``:
    applying ``ΔW`` to the rows (``rows·o·i``). ``fused``: the dense ``ΔW`` is added to the base weight and
    applied by the base layer's own matmul, so it costs no apply in the forward and only the weight
    gradient (``rows·o·i``) in backward; unfused, the apply runs three times (forward, input gradient,
    weight gradient). Backward of a build or of the factored path costs about twice its forward.
    """
    if grad:
        return 3 * build + (1 if fused else 3) * dense_apply, 3 * factored
    return build + (0 if fused else dense_apply), factored


def choose_path(dense_cost: float, factored_cost: float, override: str | None = None) -> str:
    """``"dense"`` or ``"factored"``: ``override`` or ``LYCO_PATH`` if set, else the cheaper one.

    Costs are multiply-adds of one forward call, including building whatever the path builds
    (the dense ``ΔW``, or the small factor products); backward scales both by about the same factor.
    """
    path = override if override not in (None, "auto") else forced_path()
    if path != "auto":
        return path
    return "factored" if factored_cost < dense_cost else "dense"
