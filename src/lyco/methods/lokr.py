"""LoKr: low-rank Kronecker product adapter (LyCORIS ``lokr``), its config and its tensors on disk.

``ΔW = kron(w1, w2) · alpha / r`` with ``w1 (out_l, in_l)`` and ``w2 (out_r, in_r, *k)``, each a full
matrix or a rank-``r`` product (``w2`` optionally in CP form with core ``t2``); splits come from
:func:`lyco.ops.factorize.factorization`. Parameters: full factors ``out_l·in_l + out_r·in_r·prod(k)``;
low-rank factors ``r·(out_l + in_l)`` and ``r·(out_r + in_r·prod(k))``. Files: ``lokr_w1`` or
``lokr_w1_a/b``, ``lokr_w2`` or ``lokr_w2_a/b``, optional CP core ``lokr_t2``; every split, full factor and
CP choice is read from the tensor shapes, never recomputed by a factorization. A LoKr with both factors
full has no rank: files scale it by 1 whatever alpha says (lycoris-lora, kohya, ComfyUI).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..ops.dora import lokr_row_norm
from ..ops.factorize import LoKrPlan, factorization, infer_lokr_plan, plan_lokr
from ..ops.kron import (
    kron_apply,
    kron_apply_cost,
    kron_conv_apply,
    kron_conv_cost,
    kron_order,
    linear_kron_apply,
    lokr_delta,
    lokr_w1,
    lokr_w2,
)
from ..ops.lowrank import lokr_factors, svd_factors
from ..ops.paths import element_cost, op_overhead
from ..ops.rows import kron_rows
from .adapter import Adapter
from .config import LowRankConfig
from .registry import register_method
from .schema import FitOptions, Param, Shape


@dataclass
class LoKrConfig(LowRankConfig):
    """LoKr config; fields, names and defaults equal ``peft.LoKrConfig``.

    ``decompose_both``: also factor ``w1`` (when ``r < max(out_l, in_l)/2``). ``decompose_factor``:
    the split factor (-1: near square root). ``rank_dropout_scale``: rescale kept rows by the kept
    fraction. LyCORIS's options (not in PEFT): ``full_matrix`` — both factors full and scale 1 whatever
    ``alpha`` says (LyCORIS's rule; without it a LoKr whose factors come out full keeps PEFT's ``alpha / r``);
    ``unbalanced_factorization`` — ``w1`` takes the larger part of the output split. ``init_weights``: ``True`` zero ``w1`` (zero delta), ``False`` random, ``"lycoris"``
    zero ``w2`` (LyCORIS's own init).

    >>> LoKrConfig(r=4, decompose_both=True).decompose_factor
    -1
    """

    peft_type = "LOKR"
    init_choices = (True, False, "lycoris")
    lyco_only: ClassVar[frozenset[str]] = LowRankConfig.lyco_only | {"full_matrix", "unbalanced_factorization"}
    peft_lacks: ClassVar[frozenset[str]] = LowRankConfig.peft_lacks | {"full_matrix", "unbalanced_factorization"}

    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    full_matrix: bool = False
    unbalanced_factorization: bool = False

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
    algo = "lokr"
    diffusers_reads = frozenset({"flux2", "zimage"})  # Flux2 / ZImageLoraLoaderMixin (diffusers 0.42)
    title = "LoKr"
    params = (
        Param("lokr_w1", ndim=2), Param("lokr_w1_a", ndim=2), Param("lokr_w1_b", ndim=2), Param("lokr_w2", min_ndim=2),
        Param("lokr_w2_a", ndim=2), Param("lokr_w2_b", min_ndim=2), Param("lokr_t2", min_ndim=3, core=True),
    )  # fmt: skip
    param_names = tuple(p.name for p in params)
    required = (("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a"))
    pairs = (("lokr_w1_a", "lokr_w1_b"), ("lokr_w1_b", "lokr_w1_a"), ("lokr_w2_a", "lokr_w2_b"),
             ("lokr_w2_b", "lokr_w2_a"), ("lokr_t2", "lokr_w2_a"))  # fmt: skip
    exclusive = (("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a"))
    unranked = "both LoKr factors full"
    supports_dora = True
    rank_dropout_scale_default = False
    factored_conv = True

    # -- module --------------------------------------------------------------------------------
    def create_parameters(self, config: LoKrConfig, *, device, dtype) -> None:
        s = self.spec
        if self.plan is None:
            self.plan = plan_lokr(
                s.out_features, s.in_features, s.kernel, self.r, config.decompose_factor, config.decompose_both,
                config.use_effective_conv2d, config.full_matrix, config.unbalanced_factorization,
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

    lycoris_fields: ClassVar[dict[str, str]] = {
        **Adapter.lycoris_fields, "factor": "decompose_factor", "decompose_both": "decompose_both",
        "full_matrix": "full_matrix", "unbalanced_factorization": "unbalanced_factorization",
    }  # fmt: skip
    lycoris_init = "lycoris"

    @classmethod
    def lycoris_config(cls, spec, r: int, alpha: float, options) -> tuple[LoKrConfig, LoKrPlan]:
        """LyCORIS's LoKr: its factorization (each split smaller part first, :func:`plan_lokr`'s ``ordered_splits``),
        and scale ``alpha = r`` whatever alpha says when both factors come out full (1; √r with ``rs_lora``): such a
        layer gets ``full_matrix`` (scale 1, the same shapes), or ``alpha = r`` with rs_lora."""
        config, _ = super().lycoris_config(spec, r, alpha, options)
        assert isinstance(config, LoKrConfig)
        plan = plan_lokr(
            spec.out_features, spec.in_features, spec.kernel, r, config.decompose_factor, config.decompose_both,
            config.use_effective_conv2d, config.full_matrix, config.unbalanced_factorization, ordered_splits=True,
        )  # fmt: skip
        if plan.use_w1 and plan.use_w2 and not config.full_matrix:
            if config.use_rslora:
                return dataclasses.replace(config, alpha=float(r)), plan
            return dataclasses.replace(config, full_matrix=True), plan
        return config, plan

    @classmethod
    def config_scaling(cls, config, r: int, alpha: float) -> float:
        """``full_matrix``: 1 (LyCORIS); otherwise ``alpha / r`` (``alpha / √r`` with ``use_rslora``)."""
        if getattr(config, "full_matrix", False):
            return 1.0
        return super().config_scaling(config, r, alpha)

    def norm_needs_delta(self) -> bool:
        return not self.wd_on_out

    def weight_norm(self, weight, scale, delta=None):
        """Output-axis norms of ``W + s·kron(w1, w2)`` from the factors (:func:`lyco.ops.dora.lokr_row_norm`: one
        pass over ``W``, no Kronecker product built), in fp32; the input axis builds the sum."""
        if self.norm_needs_delta():
            return super().weight_norm(weight, scale, delta)
        dtype = torch.promote_types(weight.dtype, torch.float32)
        with torch.no_grad():
            t, p = self.tensors(dtype), self.plan
            w = weight.reshape(weight.shape[0], -1).to(dtype)
            w2 = lokr_w2(t, p).reshape(p.out_r, -1)
            norm = lokr_row_norm(w, lokr_w1(t, p), w2, scale, self.base_row_sq(weight, w))
            return norm.to(weight.dtype).reshape(self.dora_scale.shape)

    def w1(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Left factor ``(out_l, in_l)`` in ``dtype`` (default: the parameters')."""
        return lokr_w1(self.tensors(dtype), self.plan)

    def w2(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Right factor ``(out_r, in_r, *k)`` in ``dtype`` (default: the parameters')."""
        return lokr_w2(self.tensors(dtype), self.plan)

    # The factored path runs three more kernels than the dense one (two transposed copies, one matmul).
    FACTORED_EXTRA_OPS = 3

    def _w1_build(self) -> int:
        p = self.plan
        return 0 if p.use_w1 else p.out_l * p.in_l * p.w1_rank

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
        t = self.tensors(x.dtype)
        return linear_kron_apply(x, weight, bias, lokr_w1(t, p) * scale, t["lokr_w2_a"], t["lokr_w2_b"])

    def factored_delta(
        self, x: torch.Tensor, scale: float | torch.Tensor = 1.0, conv: Callable[..., torch.Tensor] | None = None
    ) -> torch.Tensor:
        t, p = self.tensors(x.dtype), self.plan
        w1 = lokr_w1(t, p) * scale  # (out_l, in_l): the smallest place to apply the scale
        if self.spec.kind == "conv":
            return kron_conv_apply(x, w1, lokr_w2(t, p), conv)
        if p.use_w2:
            return kron_apply(x, w1, t["lokr_w2"])
        return kron_apply(x, w1, None, t["lokr_w2_a"], t["lokr_w2_b"])

    # -- tensors on disk ---------------------------------------------------------------------------
    @classmethod
    def canonical(cls, tensors, kernel=None):
        """Also: ``lokr_w2_b (r, in_r, *k)`` (lycoris' ``weight_gen``) flattened; a 1×1 conv's 2-D ``lokr_w2``
        given the kernel's unit dims."""
        out = super().canonical(tensors, kernel)
        if "lokr_w2_b" in out and "lokr_t2" not in out and out["lokr_w2_b"].dim() > 2:
            out["lokr_w2_b"] = out["lokr_w2_b"].flatten(1)
        if kernel and math.prod(kernel) == 1 and "lokr_w2" in out and out["lokr_w2"].dim() == 2:
            out["lokr_w2"] = out["lokr_w2"].reshape(*out["lokr_w2"].shape, *kernel)
        return out

    @classmethod
    def rank(cls, shapes: Mapping[str, Shape]) -> int | None:
        """The rank of ``alpha / r``: ``w2``'s when it is low-rank, else ``w1``'s; ``None`` when both are full."""
        for name in ("lokr_w2_b", "lokr_w1_b"):
            if name in shapes:
                return int(shapes[name][0])
        return None

    @classmethod
    def guess_weight_shape(cls, shapes: Mapping[str, Shape]) -> Shape:
        """``(out_l·out_r, in_l·in_r, *k)``; kernels show only in a full or CP ``w2`` (a flat ``lokr_w2_b``
        reads as a linear layer)."""
        s = shapes
        out_l, in_l = s["lokr_w1"] if "lokr_w1" in s else (s["lokr_w1_a"][0], s["lokr_w1_b"][1])
        if "lokr_w2" in s:
            out_r, in_r, *k = s["lokr_w2"]
        elif "lokr_t2" in s:
            (out_r, in_r), k = (s["lokr_w2_a"][1], s["lokr_w2_b"][1]), list(s["lokr_t2"][2:])
        else:
            out_r, in_r, k = s["lokr_w2_a"][0], s["lokr_w2_b"][1], []
        return (out_l * out_r, in_l * in_r, *k)

    @classmethod
    def infer_plan(cls, shapes: Mapping[str, Shape], weight_shape: Shape, r: int | None = None) -> LoKrPlan:
        return infer_lokr_plan(cls.factor_shapes(shapes), weight_shape, r)

    @classmethod
    def compose(cls, tensors: Mapping[str, torch.Tensor], plan: LoKrPlan) -> torch.Tensor:
        return lokr_delta(tensors, plan)

    @classmethod
    def matvec(cls, tensors, plan: LoKrPlan, v):
        """``kron(w1, w2) v`` by reshapes (:func:`lyco.ops.kron.kron_apply`, a conv kernel folded into ``w2``)."""
        w1 = lokr_w1(tensors, plan)
        if not plan.use_w2 and not plan.use_cp:
            return kron_apply(v.T, w1, None, tensors["lokr_w2_a"], tensors["lokr_w2_b"]).T
        return kron_apply(v.T, w1, lokr_w2(tensors, plan).reshape(plan.out_r, -1)).T

    @classmethod
    def take_rows(cls, tensors, plan: LoKrPlan, rows):
        """Exact when ``rows`` are whole blocks of ``out_r`` rows (:func:`lyco.ops.rows.kron_rows`): ``kron(w1, w2)
        [rows] = kron(w1[idx], w2)``, so ``lokr_w1`` (or ``lokr_w1_a``) keeps rows ``idx`` and ``w2`` is unchanged;
        ``None`` otherwise. Stacking several LoKr modules (:meth:`stack_rows`) is generally not a LoKr: ``None``."""
        idx = kron_rows(rows, plan.out_r)
        if idx is None:
            return None
        name = "lokr_w1" if plan.use_w1 else "lokr_w1_a"
        return {**tensors, name: tensors[name][idx]}

    @classmethod
    def fit_config(cls, plans, base_r):
        """``decompose_both`` (any factored ``w1``), ``use_effective_conv2d`` (any CP core) and one
        ``decompose_factor`` giving every split; a full–full module gets a rank under which PEFT's rules also
        make both factors full."""
        decompose_both = any(not p.use_w1 for p in plans.values())
        use_cp = any(p.use_cp for p in plans.values())
        plans = dict(plans)
        for name, p in plans.items():
            if p.both_full:
                need = max(_ceil_half(max(p.out_r, p.in_r)), _ceil_half(max(p.out_l, p.in_l)) if decompose_both else 1)
                plans[name] = dataclasses.replace(p, r=max(base_r, need))
        factor = _peft_factor(plans)
        f = -1 if factor is None else factor
        if factor is None:
            problems = ["no single decompose_factor gives every module's Kronecker split"]
        else:
            problems = cls.replan_problems(
                plans, lambda p: plan_lokr(p.out_features, p.in_features, p.kernel, p.r, f, decompose_both, use_cp)
            )
        return plans, {"decompose_both": decompose_both, "decompose_factor": f, "use_effective_conv2d": use_cp}, problems

    @classmethod
    def consumer_issues(cls, shapes):
        """ComfyUI skips a module with a CP core: ``torch.kron`` on the non-contiguous core product raises and the
        error is only logged (ComfyUI issue #11245, checked on its commit fe25114); it lifts ``w1`` for a 4-D full
        ``w2`` only, so a 3-D one (Conv1d) gives it another ΔW (run on fe25114)."""
        issues = []
        if "lokr_t2" in shapes:
            issues.append("ComfyUI leaves LoKr modules with a CP core (lokr_t2) unpatched (its issue #11245) — "
                          "consumer_safe=True (lyco convert --consumer-safe) writes the same ΔW without the core")  # fmt: skip
        if "lokr_w2" in shapes and len(shapes["lokr_w2"]) == 3:
            issues.append("ComfyUI takes kron(w1, lokr_w2) of a 3-D full lokr_w2 (a Conv1d) without lifting w1 to 3-D "
                          "and applies another ΔW — consumer_safe=True writes the same ΔW with lokr_w2 as the pair "
                          "(identity, lokr_w2 flattened)")  # fmt: skip
        return issues

    @classmethod
    def unranked_alpha(cls, shapes):
        """Both factors full: ``lokr_w2`` rows // ``lokr_w1`` rows (at least 1). lycoris-lora, kohya, AUTOMATIC1111,
        diffusers and ComfyUI's ``calculate_weight`` (fe25114) scale such a module by 1 whatever alpha says; a newer
        ComfyUI is reported to take ``alpha / (w2 rows // w1 rows)`` there (not in any reachable source), which this
        alpha also makes 1 (when w2 has fewer rows than w1 that rule divides by 0 whatever the file says)."""
        if "lokr_w1" in shapes and "lokr_w2" in shapes:
            return float(max(1, int(shapes["lokr_w2"][0]) // int(shapes["lokr_w1"][0])))
        return 1.0

    @classmethod
    def consumer_layout(cls, tensors):
        """A CP ``w2 = cp(t2, w2_a, w2_b)`` as the plain low-rank pair of the same rank: ``w2_a = lokr_w2_aᵀ (out_r,
        r)``, ``w2_b[i, (q, k)] = Σ_j t2[i, j, k] · lokr_w2_b[j, q]`` ``(r, in_r·∏k)`` — exact, ``r·in_r·∏k`` numbers
        instead of ``r·in_r + r²·∏k``. A 3-D full ``w2 (out_r, in_r, k)`` (Conv1d) as ``w2_a = I (out_r, out_r)``,
        ``w2_b = w2`` flattened ``(out_r, in_r·k)`` (a low-rank ``w1`` multiplied out): exact, of rank ``out_r``.
        """
        out = dict(tensors)
        if "lokr_t2" in out:
            t2, wa, wb = out.pop("lokr_t2"), out.pop("lokr_w2_a"), out.pop("lokr_w2_b")
            out["lokr_w2_a"] = wa.T.contiguous()
            out["lokr_w2_b"] = torch.einsum("ij...,jq->iq...", t2, wb).flatten(1).contiguous()
        if "lokr_w2" in out and out["lokr_w2"].dim() == 3:  # Conv1d full w2: the flat pair every reader applies
            w2 = out.pop("lokr_w2")
            if "lokr_w1_a" in out:  # one rank for the module: w2's
                out["lokr_w1"] = (out.pop("lokr_w1_a") @ out.pop("lokr_w1_b")).contiguous()
            out["lokr_w2_a"] = torch.eye(w2.shape[0], dtype=w2.dtype, device=w2.device)
            out["lokr_w2_b"] = w2.flatten(1).contiguous()
        return out

    @classmethod
    def network_args(cls, modules):
        """lycoris-lora's ``factor`` (when one gives every split), ``decompose_both``, ``full_matrix`` (every
        module full–full) and ``use_tucker``."""
        args: dict[str, str] = {}
        factor = _lycoris_factor(modules)
        if factor is not None:
            args["factor"] = str(factor)
        if any("lokr_w1_a" in shapes for shapes, _ in modules):
            args["decompose_both"] = "True"
        if all(cls.rank(shapes) is None for shapes, _ in modules):
            args["full_matrix"] = "True"
        if any("lokr_t2" in shapes for shapes, _ in modules):
            args["use_tucker"] = "True"
        return args

    @classmethod
    def extract(cls, delta: torch.Tensor, opts: FitOptions) -> dict[str, torch.Tensor]:
        """The nearest Kronecker product of ``delta`` (Van Loan–Pitsianis), then rank-``r`` SVD factors for the
        parts :func:`lyco.ops.factorize.plan_lokr` makes low-rank."""
        out_f, in_f, *kernel = delta.shape
        plan = plan_lokr(out_f, in_f, tuple(kernel), opts.rank, opts.factor, opts.decompose_both)
        return lokr_factors(delta, plan)

    @classmethod
    def resize(cls, tensors, plan: LoKrPlan, opts: FitOptions) -> dict[str, torch.Tensor]:
        """SVD of the low-rank products ``w1_a @ w1_b`` and ``w2_a @ w2_b`` (a CP ``w2`` is rebuilt and
        re-factored plainly); full factors stay full."""
        out: dict[str, torch.Tensor] = {}
        if plan.use_w1:
            out["lokr_w1"] = tensors["lokr_w1"]
        else:
            out["lokr_w1_a"], out["lokr_w1_b"] = svd_factors(lokr_w1(tensors, plan), opts.rank, pad=True)
        if plan.use_w2:
            out["lokr_w2"] = tensors["lokr_w2"]
        else:
            w2 = lokr_w2(tensors, plan).reshape(plan.out_r, -1)
            out["lokr_w2_a"], out["lokr_w2_b"] = svd_factors(w2, opts.rank, pad=True)
        return out


def _ceil_half(x: int) -> int:
    return (x + 1) // 2


def _peft_factor(plans: dict[str, LoKrPlan]) -> int | None:
    """A ``decompose_factor`` under which PEFT's ``factorization`` gives every module's split, or ``None``."""
    candidates = [-1, *sorted({d for p in plans.values() for d in (p.out_l, p.in_l, p.out_r, p.in_r)})]
    for f in candidates:
        if all(
            factorization(p.out_features, f) == (p.out_l, p.out_r) and factorization(p.in_features, f) == (p.in_l, p.in_r)
            for p in plans.values()
        ):
            return f
    return None


def _lycoris_factor(modules) -> int | None:
    """The ``factor`` argument of lycoris-lora that gives every module's split (its rule sorts the pair)."""
    splits = []
    for shapes, weight_shape in modules:
        out_l, in_l = shapes["lokr_w1"] if "lokr_w1" in shapes else (shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][1])
        splits.append((weight_shape[0], out_l, weight_shape[1], in_l))
    cands = [-1, *sorted({d for s in splits for d in (s[1], s[3], s[0] // s[1], s[2] // s[3])})]
    for f in cands:
        if all(min(factorization(o, f)) == ol and min(factorization(i, f)) == il for o, ol, i, il in splits):
            return f
    return None
