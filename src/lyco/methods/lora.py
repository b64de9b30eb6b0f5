"""LoRA / LoCon (PEFT ``LoraConfig``, LyCORIS ``lora``/``locon``, kohya ``networks.lora``): config, adapter and
its tensors on disk.

``ΔW = lora_up @ lora_down · alpha / r`` (rank-stabilised, ``use_rslora``: ``alpha / √r``). Linear and
transformers ``Conv1D`` layers: ``lora_down (r, in)``, ``lora_up (out, r)``. Conv layers: ``lora_down (r, in,
*k)``, ``lora_up (out, r, 1…)``; with a Tucker core (``use_effective_conv2d``, LyCORIS's ``use_tucker``)
``lora_down (r, in, 1…)``, ``lora_mid (r, r, *k)``, ``ΔW = cp(mid, upᵀ, down)``. Parameters: ``r·(out +
in·∏k)``, Tucker ``r·(out + in) + r²·∏k``. Files: LyCORIS/kohya ``lora_down.weight`` / ``lora_up.weight`` /
``lora_mid.weight``; PEFT folders ``lora_A.weight`` / ``lora_B.weight`` (PEFT has no Tucker core). DyLoRA
files (``lora_up`` / ``lora_down``) read as LoRA.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..ops.dora import lora_row_norm
from ..ops.factorize import LoRAPlan, infer_lora_plan, plan_lora
from ..ops.lora_math import lora_apply, lora_delta, lora_linear
from ..ops.lowrank import lora_factors, svd_factors
from ..ops.paths import element_cost, op_overhead
from ..ops.rows import block_diag_rows, common_scale
from .adapter import Adapter
from .config import LowRankConfig
from .registry import register_method
from .schema import FitOptions, Param, RowPart, Shape, check_dense

# PEFT LoraConfig fields for features lyco does not have, readable only at their neutral values.
_PEFT_FIXED = {
    "bias": ("none",), "lora_bias": (False,), "use_qalora": (False,), "use_bdlora": (None, False),
    "layer_replication": (None,), "target_parameters": (None, []), "trainable_token_indices": (None,),
    "loftq_config": ({}, None), "eva_config": (None,), "corda_config": (None,), "lora_ga_config": (None,),
    "megatron_config": (None,), "alora_invocation_tokens": (None,), "arrow_config": (None,), "kasa_config": (None,),
    "monteclora_config": (None,), "velora_config": (None,), "runtime_config": (None, {}),
    "ensure_weight_tying": (False,),
}  # fmt: skip


@dataclass
class LoRAConfig(LowRankConfig):
    """LoRA / LoCon config. PEFT's names are accepted as aliases (``lora_alpha`` = ``alpha``, ``lora_dropout``
    = ``dropout``, ``init_lora_weights`` = ``init_weights``) and written to PEFT folders, so a PEFT
    ``adapter_config.json`` of a LoRA loads as it is.

    ``use_rslora``: scale ``alpha / √r``. ``use_effective_conv2d``: Tucker core ``lora_mid`` for conv kernels
    larger than 1. ``fan_in_fan_out``: accepted for PEFT configs; lyco reads each layer's layout itself
    (transformers ``Conv1D``). ``init_weights=True`` zeroes ``lora_up`` (zero delta); ``False`` random.

    >>> LoRAConfig(r=4, lora_alpha=8).alpha
    8
    """

    peft_type = "LORA"
    # PEFT's data-driven initialisations are accepted so that folders trained with them load (the weights are
    # read, not initialised); creating a fresh adapter with one is an error naming it.
    init_choices = (True, False, "gaussian", "pissa", "olora", "loftq", "eva", "corda", "orthogonal", "lora_ga")
    peft_aliases: ClassVar[dict[str, str]] = {"lora_alpha": "alpha", "lora_dropout": "dropout",
                                              "init_lora_weights": "init_weights", "use_dora": "weight_decompose"}  # fmt: skip
    lyco_only: ClassVar[frozenset[str]] = frozenset(
        {"rank_dropout", "module_dropout", "rank_dropout_scale", "use_effective_conv2d", "use_scalar", "wd_on_out"}
    )
    peft_fixed: ClassVar[dict[str, tuple]] = _PEFT_FIXED
    peft_ignored: ClassVar[frozenset[str]] = frozenset({"megatron_core", "qalora_group_size"})  # with megatron/QALoRA
    peft_lacks: ClassVar[frozenset[str]] = frozenset({"use_effective_conv2d", "wd_on_out"})  # no Tucker, DoRA on out

    lora_alpha: float | None = None
    lora_dropout: float | None = None
    init_lora_weights: bool | None = None
    use_effective_conv2d: bool = False
    fan_in_fan_out: bool = False
    rank_dropout_scale: bool = False
    use_dora: bool | None = None


@register_method
class LoRAAdapter(Adapter):
    """One LoRA / LoCon adapter; which tensors exist is decided by :class:`lyco.ops.factorize.LoRAPlan`."""

    config_cls = LoRAConfig
    algo = "lora"
    diffusers_reads = None  # every architecture's loader converts LoRA files
    sd_scripts_reads = True
    lycoris_algos = ("locon",)  # LyCORIS's name of the same module (LoRA with conv layers)
    title = "LoRA"
    plus_params = ("lora_up",)
    params = (
        Param("lora_down", min_ndim=2, key="lora_down.weight", peft_key="lora_A.weight"),
        Param("lora_up", min_ndim=2, key="lora_up.weight", peft_key="lora_B.weight"),
        Param("lora_mid", min_ndim=3, key="lora_mid.weight", peft_key="lora_mid.weight"),
    )
    param_names = tuple(p.name for p in params)
    required = (("lora_down",), ("lora_up",))
    pairs = (("lora_mid", "lora_down"),)
    supports_dora = True
    rank_dropout_scale_default = False
    factored_conv = True
    FACTORED_EXTRA_OPS = 0  # two thin products (x·downᵀ, then one addmm) where dense has the build and W + c·ΔW

    # -- module --------------------------------------------------------------------------------
    def create_parameters(self, config: LoRAConfig, *, device, dtype) -> None:
        s = self.spec
        if self.plan is None:
            self.plan = plan_lora(s.out_features, s.in_features, s.kernel, self.r, config.use_effective_conv2d)
        for name, shape in self.plan.param_shapes().items():
            self.add_param(name, shape, device, dtype)

    def reset_parameters(self, init_weights: bool | str) -> None:
        """``True``: ``lora_down`` Kaiming-uniform, ``lora_up`` zero (PEFT's default); ``"gaussian"``: ``lora_down``
        ~ N(0, 1/r), ``lora_up`` zero; ``False``: all random. PEFT's data-driven inits are refused here."""
        if isinstance(init_weights, str) and init_weights != "gaussian":
            raise ConfigError(
                f"LoRAConfig.init_weights={init_weights!r} is a data-driven PEFT initialisation lyco does not "
                "implement: use True, False or 'gaussian' (folders trained with it load all the same)"
            )
        for name in self.plan.param_shapes():
            nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5))
        if init_weights == "gaussian":
            nn.init.normal_(self.lora_down, std=1 / self.r)
        if init_weights:
            nn.init.zeros_(self.lora_up)

    @classmethod
    def peft_scaling(cls, config, r: int, alpha: float) -> float:
        """PEFT's LoRA has ``use_rslora`` too: the same rule as lyco's."""
        return cls.config_scaling(config, r, alpha)

    def build_cost(self, device_type: str = "cpu") -> float:
        """The rank-``r`` product (Tucker: two contractions) and the ``ΔW``-sized tensor it writes."""
        p = self.plan
        size = math.prod(p.weight_shape)
        return size * (p.r + (p.r if p.use_tucker else 0) + element_cost(device_type))

    def factored_cost(self, n_rows: int, device_type: str = "cpu") -> float:
        """Per row (conv: per input position, strides ignored) ``r·(in·∏k + out)`` (Tucker: ``r·(in + r·∏k +
        out)``), plus the extra kernel calls."""
        p = self.plan
        ksize = math.prod(p.kernel)
        per_row = p.r * (p.in_features + p.r * ksize + p.out_features) if p.use_tucker else p.r * (
            p.in_features * ksize + p.out_features
        )
        return n_rows * per_row + self.FACTORED_EXTRA_OPS * op_overhead(device_type)

    def norm_needs_delta(self) -> bool:
        return not self.wd_on_out or self.plan.use_tucker

    def weight_norm(self, weight, scale, delta=None):
        """Output-axis norms of ``W + s·up @ down`` from the factors (:func:`lyco.ops.dora.lora_row_norm`: no
        weight-sized tensor, ``O(out·in·r)``), in fp32; the Tucker form and the input axis build the sum."""
        if self.norm_needs_delta():
            return super().weight_norm(weight, scale, delta)
        dtype = torch.promote_types(weight.dtype, torch.float32)  # the sum cancels: fp32 at least (fp64 stays)
        with torch.no_grad():
            t = self.tensors(dtype)
            w = weight.reshape(weight.shape[0], -1).to(dtype)
            norm = lora_row_norm(w, t["lora_down"].flatten(1), t["lora_up"].flatten(1), scale, self.base_row_sq(weight, w))
            return norm.to(weight.dtype).reshape(self.dora_scale.shape)

    def fused_linear(self, x, weight, bias, scale):
        """The base linear and the LoRA term in one step (:func:`lyco.ops.lora_math.lora_linear`)."""
        t = self.tensors(x.dtype)
        return lora_linear(x, t["lora_down"], t["lora_up"], scale, weight, bias)

    def factored_delta(
        self, x: torch.Tensor, scale: float | torch.Tensor = 1.0, conv: Callable[..., torch.Tensor] | None = None
    ) -> torch.Tensor:
        t = self.tensors(x.dtype)
        if self.spec.kind != "conv":
            return lora_linear(x, t["lora_down"], t["lora_up"], scale)
        return lora_apply(x, t["lora_down"], t["lora_up"] * scale, t.get("lora_mid"), conv)

    # -- tensors on disk ---------------------------------------------------------------------------
    @classmethod
    def canonical(cls, tensors, kernel=None):
        """Layer-dependent layouts other tools write: a linear layer's ``(r, in, 1, 1)`` / ``(out, r, 1, 1)``
        flattened; a conv layer's 2-D ``lora_up (out, r)`` (and a 1×1 conv's 2-D ``lora_down``) given the
        kernel's unit dims."""
        out = super().canonical(tensors, kernel)
        if kernel is None:
            return out
        if not kernel:  # linear
            for name in ("lora_down", "lora_up"):
                if name in out and out[name].dim() > 2 and math.prod(out[name].shape[2:]) == 1:
                    out[name] = out[name].flatten(1)
            return out
        unit = (1,) * len(kernel)
        if "lora_up" in out and out["lora_up"].dim() == 2:
            out["lora_up"] = out["lora_up"].reshape(*out["lora_up"].shape, *unit)
        if "lora_down" in out and out["lora_down"].dim() == 2 and ("lora_mid" in out or math.prod(kernel) == 1):
            out["lora_down"] = out["lora_down"].reshape(*out["lora_down"].shape, *unit)
        return out

    @classmethod
    def rank(cls, shapes: Mapping[str, Shape]) -> int:
        return int(shapes["lora_down"][0])

    @classmethod
    def guess_weight_shape(cls, shapes: Mapping[str, Shape]) -> Shape:
        """``(out, in, *k)``: the kernel lives in ``lora_down`` (or in the Tucker core)."""
        if "lora_mid" in shapes:
            return (shapes["lora_up"][0], shapes["lora_down"][1], *shapes["lora_mid"][2:])
        return (shapes["lora_up"][0], *shapes["lora_down"][1:])

    @classmethod
    def infer_plan(cls, shapes: Mapping[str, Shape], weight_shape: Shape, r: int | None = None) -> LoRAPlan:
        return infer_lora_plan(cls.factor_shapes(shapes), weight_shape)

    @classmethod
    def compose(cls, tensors: Mapping[str, torch.Tensor], plan: LoRAPlan | None) -> torch.Tensor:
        return lora_delta(tensors["lora_up"], tensors["lora_down"], tensors.get("lora_mid"))

    @classmethod
    def matvec(cls, tensors, plan, v):
        if "lora_mid" in tensors:
            return super().matvec(tensors, plan, v)
        return tensors["lora_up"].flatten(1) @ (tensors["lora_down"].flatten(1) @ v)

    @classmethod
    def take_rows(cls, tensors, plan, rows):
        """``lora_up[rows]`` (``(out, r, 1…)``, Tucker too); ``lora_down`` (and ``lora_mid``) and the rank unchanged."""
        return {**tensors, "lora_up": tensors["lora_up"][rows]}

    @classmethod
    def stack_rows(cls, parts: list[RowPart]):
        """Rank ``Σr_i``: ``lora_down = cat(down_i) (Σr, in, *k)``, ``lora_up`` block-diagonal ``(Σout, Σr, 1…)``
        with ``up_i · scale_i / scale`` (:func:`lyco.ops.rows.common_scale`); exact. ``None`` with a Tucker core."""
        present = [p for p in parts if p.tensors is not None]
        if any("lora_mid" in p.tensors for p in present):
            return None
        scale = common_scale([p.scale for p in present])
        ups = [
            p.weight_shape[0] if p.tensors is None else p.tensors["lora_up"] * (p.scale / scale if scale else 1.0)
            for p in parts
        ]
        return {"lora_down": torch.cat([p.tensors["lora_down"] for p in present]), "lora_up": block_diag_rows(ups)}, scale

    @classmethod
    def fit_config(cls, plans, base_r):
        """``use_effective_conv2d`` when any module has a Tucker core; modules planned otherwise."""
        use_tucker = any(p.use_tucker for p in plans.values())
        problems = cls.replan_problems(plans, lambda p: plan_lora(p.out_features, p.in_features, p.kernel, p.r, use_tucker))
        return plans, {"use_effective_conv2d": use_tucker}, problems

    @classmethod
    def network_args(cls, modules):
        return {"use_tucker": "True"} if any("lora_mid" in shapes for shapes, _ in modules) else {}

    @classmethod
    def extract(cls, delta: torch.Tensor, opts: FitOptions) -> dict[str, torch.Tensor]:
        """The rank-``r`` truncated SVD of ``delta`` (the best rank-``r`` approximation; LoCon for convs)."""
        return lora_factors(delta, opts.rank)

    @classmethod
    def resize(cls, tensors, plan: LoRAPlan, opts: FitOptions) -> dict[str, torch.Tensor]:
        """The truncated SVD of ``lora_up @ lora_down`` without building it: QR of both factors, then the SVD
        of the small ``(r, r)`` core; kernel layouts kept. A Tucker module comes out plain (from its ΔW)."""
        if plan.use_tucker:
            check_dense(plan.weight_shape, tensors, "LoRA resize")
            return lora_factors(cls.compose(tensors, plan).reshape(plan.weight_shape), opts.rank)
        down, up = tensors["lora_down"], tensors["lora_up"]
        q_up, r_up = torch.linalg.qr(up.flatten(1))
        q_down, r_down = torch.linalg.qr(down.flatten(1).T)
        a, b = svd_factors(r_up @ r_down.T, opts.rank)
        a, b = q_up @ a, b @ q_down.T
        return {
            "lora_down": b.reshape(b.shape[0], *down.shape[1:]),
            "lora_up": a.reshape(a.shape[0], a.shape[1], *[1] * (down.dim() - 2)),
        }
