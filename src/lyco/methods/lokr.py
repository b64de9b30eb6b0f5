"""LoKr: low-rank Kronecker product adapter (LyCORIS ``lokr``).

``ΔW = kron(w1, w2) · alpha / r`` with ``w1 (out_l, in_l)`` and ``w2 (out_r, in_r, *k)``, each a full
matrix or a rank-``r`` product (``w2`` optionally in CP form with core ``t2``); splits come from
:func:`lyco.ops.factorize.factorization`. Parameters: full factors ``out_l·in_l + out_r·in_r·prod(k)``;
low-rank factors ``r·(out_l + in_l)`` and ``r·(out_r + in_r·prod(k))``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..ops.factorize import infer_lokr_plan, plan_lokr
from ..ops.kron import (
    kron_apply,
    kron_apply_cost,
    kron_conv_apply,
    kron_conv_cost,
    kron_order,
    linear_kron_apply,
    make_kron,
)
from ..ops.paths import element_cost, op_overhead
from ..ops.tucker import cp_rebuild
from .base import Adapter, AdapterConfig, as_dtype, register_method


@dataclass
class LoKrConfig(AdapterConfig):
    """LoKr config; fields, names and defaults equal ``peft.LoKrConfig``.

    ``decompose_both``: also factor ``w1`` (when ``r < max(out_l, in_l)/2``). ``decompose_factor``:
    the split factor (-1: near square root). ``rank_dropout_scale``: rescale kept rows by the kept
    fraction. ``init_weights``: ``True`` zero ``w1`` (zero delta), ``False`` random, ``"lycoris"``
    zero ``w2`` (LyCORIS's own init).

    >>> LoKrConfig(r=4, decompose_both=True).decompose_factor
    -1
    """

    peft_type = "LOKR"
    init_choices = (True, False, "lycoris")

    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        f = self.decompose_factor
        if isinstance(f, bool) or not isinstance(f, int) or (f <= 0 and f != -1):
            raise ConfigError(f"LoKrConfig.decompose_factor must be -1 or a positive integer, got {f!r}")


@register_method
class LoKrAdapter(Adapter):
    """One LoKr adapter; which of ``lokr_w1``/``lokr_w1_a,b``/``lokr_w2``/``lokr_w2_a,b``/``lokr_t2``
    exist is decided by :class:`lyco.ops.factorize.LoKrPlan` (``self.plan``)."""

    config_cls = LoKrConfig
    param_names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    rank_dropout_scale_default = False
    factored_conv = True

    @classmethod
    def infer_plan(cls, shapes, weight_shape, r):
        return infer_lokr_plan(shapes, weight_shape, r)

    def create_parameters(self, config: LoKrConfig, *, device, dtype) -> None:
        s = self.spec
        if self.plan is None:
            self.plan = plan_lokr(
                s.out_features, s.in_features, s.kernel, self.r,
                config.decompose_factor, config.decompose_both, config.use_effective_conv2d,
            )  # fmt: skip
        for name, shape in self.plan.param_shapes().items():
            self.add_param(name, shape, device, dtype)

    def reset_parameters(self, init_weights: bool | str) -> None:
        names = self.plan.param_shapes()
        for name in names:
            nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5))
        if init_weights == "lycoris":
            nn.init.zeros_(self.lokr_w2 if "lokr_w2" in names else self.lokr_w2_b)
        elif init_weights:
            nn.init.zeros_(self.lokr_w1 if "lokr_w1" in names else self.lokr_w1_a)

    def w1(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Left factor ``(out_l, in_l)`` in ``dtype`` (default: the parameters')."""
        if self.plan.use_w1:
            return as_dtype(self.lokr_w1, dtype)
        return as_dtype(self.lokr_w1_a, dtype) @ as_dtype(self.lokr_w1_b, dtype)

    def w2(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Right factor ``(out_r, in_r, *k)`` in ``dtype`` (default: the parameters')."""
        p = self.plan
        if p.use_w2:
            return as_dtype(self.lokr_w2, dtype)
        a, b = as_dtype(self.lokr_w2_a, dtype), as_dtype(self.lokr_w2_b, dtype)
        if p.use_cp:
            return cp_rebuild(as_dtype(self.lokr_t2, dtype), a, b)
        return (a @ b).reshape(p.out_r, p.in_r, *p.kernel)

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return make_kron(self.w1(dtype), self.w2(dtype))

    # The factored path runs three more kernels than the dense one (two transposed copies, one matmul).
    FACTORED_EXTRA_OPS = 3

    def _w1_build(self) -> int:
        p = self.plan
        return 0 if p.use_w1 else p.out_l * p.in_l * p.r

    def build_cost(self, device_type: str = "cpu") -> float:
        """Low-rank factor products plus the ``o·i`` Kronecker product it writes (linear-like layers)."""
        p = self.plan
        w2_build = 0 if p.use_w2 else p.out_r * p.in_r * p.r
        return self._w1_build() + w2_build + (1 + element_cost(device_type)) * p.out_features * p.in_features

    def factored_cost(self, n_rows: int, device_type: str = "cpu") -> float:
        """The factor products plus, per row (conv: per input position, strides ignored), the work of
        :func:`lyco.ops.kron.kron_apply_cost` / :func:`lyco.ops.kron.kron_conv_cost`, and the extra kernel calls
        (:func:`lyco.ops.paths.op_overhead`)."""
        p = self.plan
        rank = None if p.use_w2 else p.r
        if self.spec.kind == "conv":
            ksize = math.prod(p.kernel)
            w2_build = 0 if p.use_w2 else p.r * p.out_r * ksize * (p.in_r + (p.r if p.use_cp else 0))
            per_row = kron_conv_cost(p.out_l, p.in_l, p.out_r, p.in_r, ksize, device_type)
            return self._w1_build() + w2_build + n_rows * per_row + self.FACTORED_EXTRA_OPS * op_overhead(device_type)
        per_row = kron_apply_cost(p.out_l, p.in_l, p.out_r, p.in_r, rank, device_type)
        return self._w1_build() + n_rows * per_row + self.FACTORED_EXTRA_OPS * op_overhead(device_type)

    def fused_linear(self, x, weight, bias, scale):
        """The low-rank-``w2`` "middle" order (:func:`lyco.ops.kron.linear_kron_apply`): the LoKr term is
        accumulated in place into the linear's output and input gradient."""
        p = self.plan
        if p.use_w2 or kron_order(p.out_l, p.in_l, p.out_r, p.in_r, p.r) != "middle":
            return None
        w1 = self.w1(x.dtype) * scale
        return linear_kron_apply(x, weight, bias, w1, self.lokr_w2_a.to(x.dtype), self.lokr_w2_b.to(x.dtype))

    def factored_delta(
        self, x: torch.Tensor, scale: float | torch.Tensor = 1.0, conv: Callable[..., torch.Tensor] | None = None
    ) -> torch.Tensor:
        w1 = self.w1(x.dtype) * scale  # (out_l, in_l): the smallest place to apply the scale
        if self.spec.kind == "conv":
            return kron_conv_apply(x, w1, self.w2(x.dtype), conv)
        if self.plan.use_w2:
            return kron_apply(x, w1, self.lokr_w2.to(x.dtype))
        return kron_apply(x, w1, None, self.lokr_w2_a.to(x.dtype), self.lokr_w2_b.to(x.dtype))
