"""Full (LyCORIS ``full``, "native fine-tuning"): a trainable full-size weight delta ``diff`` and, for layers
with a bias, a bias delta ``diff_b`` — native fine-tuning deltas kept apart from the base, in the same
tooling (save, load, merge, convert, inspect) as the low-rank methods.

``W' = W + diff``, ``b' = b + diff_b``; no rank, so no ``alpha / r``: the scale is 1 (``set_scale`` still
multiplies it), as lycoris-lora applies it. Files: ``diff`` (the layer's canonical weight layout
``(out, in, *k)``) and ``diff_b`` ``(out,)``, no alpha; PEFT has no such method (lyco's folders of it carry
``peft_type`` ``"FULL"``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ShapeMismatchError
from ..ops.paths import element_cost
from .adapter import Adapter
from .config import AdapterConfig
from .registry import register_method
from .schema import FitOptions, Param, RowPart, Shape


@dataclass(frozen=True)
class FullPlan:
    """Shapes of one Full adapter: ``diff`` the layer's canonical weight shape, ``diff_b (out,)`` when ``bias``."""

    weight_shape: Shape
    bias: bool
    r: int = 1
    ranked = False  # no rank: a model keeps the config's r

    def param_shapes(self) -> dict[str, Shape]:
        shapes = {"diff": tuple(self.weight_shape)}
        if self.bias:
            shapes["diff_b"] = (self.weight_shape[0],)
        return shapes


@dataclass
class FullConfig(AdapterConfig):
    """Full-weight deltas; ``r`` and ``alpha`` are unused (the scale is 1). ``init_weights=True`` starts at zero
    (the base model); ``False`` draws small random deltas (for tests). ``rank_dropout`` drops output rows of
    ``diff`` and ``diff_b`` alike; ``rank_dropout_scale`` rescales the kept ones (lycoris-lora's default: no).

    >>> FullConfig(target_modules=["fc"]).peft_type
    'FULL'
    """

    peft_type = "FULL"

    rank_dropout_scale: bool = False


@register_method
class FullAdapter(Adapter):
    """One full delta: ``diff`` shaped like the layer's canonical weight, ``diff_b (out,)`` when it has a bias."""

    config_cls = FullConfig
    algo = "full"
    title = "Full"
    params = (Param("diff", min_ndim=2), Param("diff_b", ndim=1))
    param_names = ("diff", "diff_b")
    required = (("diff",),)
    pairs = (("diff_b", "diff"),)
    unranked = "a full delta"
    rank_dropout_scale_default = False
    stores_alpha = False  # lycoris-lora writes none; ComfyUI and AUTOMATIC1111 ignore one on diff

    # -- module --------------------------------------------------------------------------------
    def create_parameters(self, config: FullConfig, *, device, dtype) -> None:
        if self.plan is None:
            self.plan = FullPlan(self.spec.weight_shape, self.spec.has_bias, self.r)
        if self.plan.bias and not self.spec.has_bias:
            raise ShapeMismatchError(
                "Full: diff_b (a bias delta) given for a layer without a bias; drop the tensor or give the layer one"
            )
        for name, shape in self.plan.param_shapes().items():
            self.add_param(name, shape, device, dtype)

    def reset_parameters(self, init_weights: bool | str) -> None:
        for p in self.parameters():
            nn.init.zeros_(p) if init_weights else nn.init.normal_(p, std=0.02)

    @classmethod
    def config_scaling(cls, config: AdapterConfig, r: int, alpha: float) -> float:
        return 1.0

    def build_cost(self, device_type: str = "cpu") -> float:
        """Nothing to build: ``diff`` is ``ΔW``; only the ``W + ΔW`` sum is written."""
        return element_cost(device_type) * math.prod(self.spec.weight_shape)

    # -- tensors on disk ---------------------------------------------------------------------------
    @classmethod
    def guess_weight_shape(cls, shapes: Mapping[str, Shape]) -> Shape:
        return tuple(shapes["diff"])

    @classmethod
    def infer_plan(cls, shapes: Mapping[str, Shape], weight_shape: Shape, r: int | None = None) -> FullPlan:
        """``diff`` must have the layer's exact weight shape (no reshape: a transposed weight must not fit)."""
        plan = FullPlan(tuple(weight_shape), "diff_b" in shapes, r or 1)
        if {k: tuple(v) for k, v in shapes.items()} != plan.param_shapes():
            got = ", ".join(f"{k}{tuple(v)}" for k, v in sorted(shapes.items()))
            raise ShapeMismatchError(f"Full: tensors {got} do not fit a layer weight of shape {tuple(weight_shape)}")
        return plan

    @classmethod
    def compose(cls, tensors: Mapping[str, torch.Tensor], plan: object) -> torch.Tensor:
        return tensors["diff"]

    @classmethod
    def compose_bias(cls, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        return tensors.get("diff_b")

    @classmethod
    def matvec(cls, tensors, plan, v):
        return tensors["diff"].reshape(tensors["diff"].shape[0], -1) @ v

    @classmethod
    def fold_scale(cls, tensors, factor):
        """Both deltas scale (``ΔW`` and ``Δb`` are linear in them)."""
        return {k: t * factor if factor != 1 else t for k, t in tensors.items()}

    @classmethod
    def take_rows(cls, tensors, plan, rows):
        """``diff[rows]`` and ``diff_b[rows]``."""
        return {k: t[rows] for k, t in tensors.items()}

    @classmethod
    def stack_rows(cls, parts: list[RowPart]):
        """``diff = cat(scale_i·diff_i)`` (zeros for a part without tensors), ``diff_b`` likewise when any part has
        one; scale 1."""
        present = [p.tensors for p in parts if p.tensors is not None]
        like = present[0]["diff"]

        def block(p: RowPart, name: str, shape: Shape) -> torch.Tensor:
            if p.tensors is None or name not in p.tensors:
                return like.new_zeros(shape)
            return p.tensors[name] * p.scale

        out = {"diff": torch.cat([block(p, "diff", p.weight_shape) for p in parts])}
        if any("diff_b" in t for t in present):
            out["diff_b"] = torch.cat([block(p, "diff_b", p.weight_shape[:1]) for p in parts])
        return out, 1.0

    @classmethod
    def dense_tensors(cls, delta, bias_delta):
        """``diff = delta``, ``diff_b = bias_delta`` (when given): any ``ΔW`` and bias delta, exactly."""
        return {"diff": delta} if bias_delta is None else {"diff": delta, "diff_b": bias_delta}

    @classmethod
    def extract(cls, delta: torch.Tensor, opts: FitOptions) -> dict[str, torch.Tensor]:
        """The difference itself (exact)."""
        return {"diff": delta.clone()}

    @classmethod
    def extract_bias(cls, bias_delta: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"diff_b": bias_delta.clone()}
