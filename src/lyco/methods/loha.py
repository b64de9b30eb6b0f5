"""LoHa: low-rank Hadamard product adapter (FedPara / LyCORIS ``loha``), its config and its tensors on disk.

``ΔW = (w1_a @ w1_b) ⊙ (w2_a @ w2_b) · alpha / r``; for conv kernels with more than one element
and ``use_effective_conv2d`` the CP form ``cp(t1, w1_a, w1_b) ⊙ cp(t2, w2_a, w2_b)``.
Parameters: plain ``2·r·(out + in·prod(k))``, CP ``2·r·(out + in) + 2·r²·prod(k)``.
Files (PEFT folders and LyCORIS/kohya files alike): ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``,
``hada_w2_b`` and, in CP form, the cores ``hada_t1`` / ``hada_t2``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..ops.dora import lora_row_norm
from ..ops.factorize import LoHaPlan, infer_loha_plan, plan_loha
from ..ops.hadamard import fit_loha, hada_apply, hada_khatri_rao, loha_delta
from ..ops.lowrank import svd_factors
from ..ops.paths import element_cost
from ..ops.rows import block_diag_rows, common_scale
from ..ops.tucker import cp_rebuild
from .adapter import Adapter
from .config import LowRankConfig
from .registry import register_method
from .schema import FitOptions, Param, RowPart, Shape, check_dense


@dataclass
class LoHaConfig(LowRankConfig):
    """LoHa config; fields, names and defaults equal ``peft.LoHaConfig``.

    ``init_weights=True`` zeroes ``w2_b`` (zero initial delta); ``False`` draws every factor at random.
    ``use_effective_conv2d``: CP form (``hada_t1``/``hada_t2``) for conv kernels larger than 1.
    ``rank_dropout_scale`` (not in PEFT): rescale the rows rank dropout keeps by the kept fraction — PEFT's
    LoHa always does (the default here); ``False`` is lycoris-lora's default.

    >>> LoHaConfig(r=4, alpha=8, target_modules=["q_proj"]).r
    4
    """

    peft_type = "LOHA"
    lyco_only: ClassVar[frozenset[str]] = LowRankConfig.lyco_only | {"rank_dropout_scale"}

    use_effective_conv2d: bool = False
    rank_dropout_scale: bool = True  # PEFT's LoHa always rescales kept rows; lycoris-lora's default is False


@register_method
class LoHaAdapter(Adapter):
    """One LoHa adapter. Shapes: plain ``hada_w{1,2}_a (out, r)``, ``hada_w{1,2}_b (r, in·prod(k))``;
    CP ``hada_w{1,2}_a (r, out)``, ``hada_w{1,2}_b (r, in)``, ``hada_t{1,2} (r, r, *k)``."""

    config_cls = LoHaConfig
    algo = "loha"
    title = "LoHa"
    params = (
        Param("hada_w1_a", ndim=2), Param("hada_w1_b", ndim=2), Param("hada_w2_a", ndim=2), Param("hada_w2_b", ndim=2),
        Param("hada_t1", min_ndim=3, core=True), Param("hada_t2", min_ndim=3, core=True),
    )  # fmt: skip
    param_names = tuple(p.name for p in params)
    required = (("hada_w1_a",), ("hada_w1_b",), ("hada_w2_a",), ("hada_w2_b",))
    pairs = (("hada_t1", "hada_t2"), ("hada_t2", "hada_t1"))
    supports_dora = True
    rank_dropout_scale_default = True  # PEFT's LoHa always rescales kept rows

    def norm_needs_delta(self) -> bool:
        """Output-axis norms come from the Khatri-Rao factors (inner rank ``r²``) when that is cheaper than building
        ``ΔW``: ``r²`` multiply-adds per weight element against two rank-``r`` products and about four
        weight-sized tensors written (:func:`lyco.ops.paths.element_cost`); CP cores and the input axis build it."""
        if not self.wd_on_out or self.plan.use_cp:
            return True
        r = self.plan.r
        return r * r > 2 * r + 4 * element_cost(self.first_param().device.type)

    def weight_norm(self, weight, scale, delta=None):
        """Output-axis norms of ``W + s·(w1_a w1_b) ⊙ (w2_a w2_b)`` as those of ``W + s·ka @ kb``
        (:func:`lyco.ops.hadamard.hada_khatri_rao`, :func:`lyco.ops.dora.lora_row_norm`: no weight-sized tensor),
        in fp32; otherwise from the built sum."""
        if delta is not None or self.norm_needs_delta():
            return super().weight_norm(weight, scale, delta)
        dtype = torch.promote_types(weight.dtype, torch.float32)  # the sum cancels: fp32 at least (fp64 stays)
        with torch.no_grad():
            t = self.tensors(dtype)
            ka, kb = hada_khatri_rao(t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"])
            w = weight.reshape(weight.shape[0], -1).to(dtype)
            norm = lora_row_norm(w, kb, ka, scale, self.base_row_sq(weight, w))
            return norm.to(weight.dtype).reshape(self.dora_scale.shape)

    # -- module --------------------------------------------------------------------------------
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

    # -- tensors on disk ---------------------------------------------------------------------------
    @classmethod
    def rank(cls, shapes: Mapping[str, Shape]) -> int:
        return int(shapes["hada_w1_b"][0])

    @classmethod
    def guess_weight_shape(cls, shapes: Mapping[str, Shape]) -> Shape:
        """CP: ``(out, in, *k)`` from the cores; otherwise linear ``(out, in·∏k)`` (a flat conv kernel)."""
        if "hada_t1" in shapes:
            return (shapes["hada_w1_a"][1], shapes["hada_w1_b"][1], *shapes["hada_t1"][2:])
        return (shapes["hada_w1_a"][0], shapes["hada_w1_b"][1])

    @classmethod
    def infer_plan(cls, shapes: Mapping[str, Shape], weight_shape: Shape, r: int | None = None) -> LoHaPlan:
        return infer_loha_plan(cls.factor_shapes(shapes), weight_shape)

    @classmethod
    def compose(cls, tensors: Mapping[str, torch.Tensor], plan: LoHaPlan | None) -> torch.Tensor:
        return loha_delta(tensors)

    @classmethod
    def matvec(cls, tensors, plan, v):
        """Khatri-Rao factors (inner rank r²), never the dense product; CP modules build it."""
        if "hada_t1" in tensors:
            return super().matvec(tensors, plan, v)
        return hada_apply(v.T, *(tensors[n] for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))).T

    @classmethod
    def take_rows(cls, tensors, plan, rows):
        """The output rows of both Hadamard factors: ``hada_w{1,2}_a[rows]`` (CP: their columns, ``(r, out)``)."""
        dim = 1 if "hada_t1" in tensors else 0
        return {**tensors, **{n: tensors[n].index_select(dim, rows) for n in ("hada_w1_a", "hada_w2_a")}}

    @classmethod
    def stack_rows(cls, parts: list[RowPart]):
        """Both factors stacked alike, rank ``Σr_i``: ``hada_w{1,2}_a`` block-diagonal ``(Σout, Σr)`` (part ``i``'s
        ``scale_i / scale`` folded into its ``w1_a`` block), ``hada_w{1,2}_b = cat(…) (Σr, in)``; row block ``i`` of
        the product is ``(w1_a w1_b) ⊙ (w2_a w2_b)`` of part ``i``, exactly. ``None`` for CP modules."""
        present = [p for p in parts if p.tensors is not None]
        if any("hada_t1" in p.tensors for p in present):
            return None
        scale = common_scale([p.scale for p in present])

        def blocks(name: str, fold: bool) -> list[torch.Tensor | int]:
            return [
                p.weight_shape[0] if p.tensors is None
                else p.tensors[name] * (p.scale / scale if fold and scale else 1.0)
                for p in parts
            ]  # fmt: skip

        out = {"hada_w1_a": block_diag_rows(blocks("hada_w1_a", True)),
               "hada_w2_a": block_diag_rows(blocks("hada_w2_a", False))}  # fmt: skip
        for name in ("hada_w1_b", "hada_w2_b"):
            out[name] = torch.cat([p.tensors[name] for p in present])
        return out, scale

    @classmethod
    def fit_config(cls, plans, base_r):
        """``use_effective_conv2d`` when any module has CP cores; modules PEFT would plan otherwise."""
        use_cp = any(p.use_cp for p in plans.values())
        problems = cls.replan_problems(plans, lambda p: plan_loha(p.out_features, p.in_features, p.kernel, p.r, use_cp))
        return plans, {"use_effective_conv2d": use_cp}, problems

    @classmethod
    def network_args(cls, modules):
        return {"use_tucker": "True"} if any("hada_t1" in shapes for shapes, _ in modules) else {}

    @classmethod
    def extract(cls, delta: torch.Tensor, opts: FitOptions) -> dict[str, torch.Tensor]:
        """No closed form: :func:`lyco.ops.hadamard.fit_loha` (SVD start, seeded Adam, best iterate)."""
        tensors, _ = fit_loha(delta.reshape(delta.shape[0], -1), opts.rank, steps=opts.steps, seed=opts.seed)
        return tensors

    @classmethod
    def resize(cls, tensors, plan: LoHaPlan, opts: FitOptions) -> dict[str, torch.Tensor]:
        """Each branch truncated by SVD as the start, then the seeded fit of the whole Hadamard product (rank
        ``r`` LoHa reaches rank ``r²``; branch-wise SVD alone is not optimal). CP branches come out plain."""

        def branch(i: int) -> torch.Tensor:  # (out, in·∏k)
            if plan.use_cp:
                return cp_rebuild(tensors[f"hada_t{i}"], tensors[f"hada_w{i}_a"], tensors[f"hada_w{i}_b"]).flatten(1)
            return tensors[f"hada_w{i}_a"] @ tensors[f"hada_w{i}_b"]

        check_dense(plan.weight_shape, tensors, "LoHa resize")  # the fit works on the dense product
        b1, b2 = branch(1), branch(2)
        init = {}
        init["hada_w1_a"], init["hada_w1_b"] = svd_factors(b1, opts.rank, pad=True)
        init["hada_w2_a"], init["hada_w2_b"] = svd_factors(b2, opts.rank, pad=True)
        fitted, _ = fit_loha(b1 * b2, opts.rank, steps=opts.steps, seed=opts.seed, init=init)
        return fitted
