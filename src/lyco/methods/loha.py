"""LoHa: low-rank Hadamard product adapter (FedPara / LyCORIS ``loha``).

``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r``; for conv kernels with more than one element
and ``use_effective_conv2d`` the CP form ``cp(t1, w1_a, w1_b) ⊙ cp(t2, w2_a, w2_b)``.
Parameters: plain ``2·r·(out + in·prod(k))``, CP ``2·r·(out + in) + 2·r²·prod(k)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..ops.factorize import infer_loha_plan, plan_loha
from ..ops.hadamard import hada_apply, hada_delta, hada_delta_cp
from ..ops.paths import element_cost
from .base import Adapter, AdapterConfig, as_dtype, register_method


@dataclass
class LoHaConfig(AdapterConfig):
    """LoHa config; fields, names and defaults equal ``peft.LoHaConfig``.

    ``init_weights=True`` zeroes ``w2_b`` (zero initial delta); ``False`` draws every factor at random.
    ``use_effective_conv2d``: CP form (``hada_t1``/``hada_t2``) for conv kernels larger than 1.

    >>> LoHaConfig(r=4, alpha=8, target_modules=["q_proj"]).r
    4
    """

    peft_type = "LOHA"

    use_effective_conv2d: bool = False


@register_method
class LoHaAdapter(Adapter):
    """One LoHa adapter. Shapes: plain ``hada_w{1,2}_a (out, r)``, ``hada_w{1,2}_b (r, in·prod(k))``;
    CP ``hada_w{1,2}_a (r, out)``, ``hada_w{1,2}_b (r, in)``, ``hada_t{1,2} (r, r, *k)``."""

    config_cls = LoHaConfig
    param_names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
    rank_dropout_scale_default = True  # PEFT's LoHa always rescales kept rows

    @classmethod
    def infer_plan(cls, shapes, weight_shape, r):
        return infer_loha_plan(shapes, weight_shape)

    def create_parameters(self, config: LoHaConfig, *, device, dtype) -> None:
        s = self.spec
        if self.plan is None:
            self.plan = plan_loha(s.out_features, s.in_features, s.kernel, self.r, config.use_effective_conv2d)
        for name, shape in self.plan.param_shapes().items():
            self.add_param(name, shape, device, dtype)

    def reset_parameters(self, init_weights: bool | str) -> None:
        for name in self.plan.param_shapes():
            nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.hada_w2_b)

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w1a, w1b, w2a, w2b = (as_dtype(w, dtype) for w in (self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b))
        if self.plan.use_cp:
            return hada_delta_cp(as_dtype(self.hada_t1, dtype), w1a, w1b, as_dtype(self.hada_t2, dtype), w2a, w2b)
        return hada_delta(w1a, w1b, w2a, w2b).reshape(self.plan.weight_shape)

    def build_cost(self, device_type: str = "cpu") -> float:
        """``2·r·o·i`` for the two rank-``r`` products plus ``o·i`` for their Hadamard product, and three
        ``o·i`` tensors written."""
        return (2 * self.r + 1 + 3 * element_cost(device_type)) * math.prod(self.plan.weight_shape)

    def factored_cost(self, n_rows: int, device_type: str = "cpu") -> float | None:
        """Khatri-Rao factors (``r²·(o + i)``) and their application (``n·r²·(o + i)``); none for CP. Both paths
        run about as many kernels, so ``device_type`` does not matter here."""
        if self.plan.use_cp:
            return None
        o, i = self.plan.out_features, self.plan.in_features
        return (1 + n_rows) * self.r * self.r * (o + i)

    def factored_delta(
        self, x: torch.Tensor, scale: float | torch.Tensor = 1.0, conv: Callable[..., torch.Tensor] | None = None
    ) -> torch.Tensor:
        w1a = self.hada_w1_a.to(x.dtype) * scale  # (o, r): the smallest place to apply the scale
        return hada_apply(x, w1a, *(w.to(x.dtype) for w in (self.hada_w1_b, self.hada_w2_a, self.hada_w2_b)))
