"""A method's tensors on disk, declared next to its Adapter and read by ``formats/`` and ``tools/``.

A method (an :class:`~lyco.methods.adapter.Adapter` subclass, or a file-only :class:`MethodSchema` such as
plain LoRA) says which tensors it owns (:class:`Param`: name, dims, CP core, LyCORIS key), which are
required / paired / mutually exclusive, and how rank, layer weight shape, shape plan and ``ΔW`` are read
back from a dict of tensors keyed by name. Every file path (read, write, inspect, convert, merge, extract,
resize, to-lora) goes through these hooks, so a new method needs no edit outside its own file.

Tensors are in lyco's canonical layout (conv CP cores ``(r, r, *k)``, no trailing unit dims); ``shapes``
arguments map the same names to shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

from ..errors import FormatError, ShapeMismatchError

Shape = tuple[int, ...]
Tensors = Mapping[str, torch.Tensor]


# A dense ΔW that files alone (no model or base weights vouching for the layer) make lyco build is bounded:
# at most this many elements, or DENSE_RATIO × the module's own tensor elements when that is more.
DENSE_FLOOR = 1 << 26  # 256 MiB in fp32
DENSE_RATIO = 64


def check_dense(shape: Shape, tensors: Tensors, what: str) -> None:
    """:class:`FormatError` when building a dense ``(out, in, *k)`` weight of ``shape`` from ``tensors`` would
    exceed the budget above (a small file implying a huge layer)."""
    size, own = math.prod(shape), sum(t.numel() for t in tensors.values())
    if size > max(DENSE_FLOOR, DENSE_RATIO * own):
        raise FormatError(
            f"{what}: its ΔW {tuple(shape)} would take {size * 4 / 2**30:.1f} GiB in fp32, built from "
            f"{own * 4 / 2**20:.2f} MiB of tensors; lyco builds that only for a layer a base model vouches for "
            "(pass the base: --base, or model=)"
        )


@dataclass(frozen=True)
class Param:
    """One tensor a method owns.

    ``name``: the Adapter's parameter name, which is also the key suffix in PEFT folders and LyCORIS files
    unless ``key`` names another LyCORIS/kohya suffix (``lora_down.weight``) or ``peft_key`` another PEFT one
    (``lora_A.weight``). ``ndim``: exact number of
    dims, or ``None`` for at least ``min_ndim`` (conv kernels add dims). ``core``: a conv CP core
    ``(r, r, *k)`` (PEFT stores 1-D ones as ``(r, r, k, 1)``). ``identifies``: the key alone tells a file
    module's method (shared extras would set it False).
    """

    name: str
    ndim: int | None = None
    min_ndim: int = 1
    core: bool = False
    key: str | None = None
    identifies: bool = True
    peft_key: str | None = None

    @property
    def file_key(self) -> str:
        return self.key or self.name

    @property
    def peft_name(self) -> str:
        return self.peft_key or self.name

    def check(self, t: torch.Tensor, where: str) -> None:
        """:class:`FormatError` for a non-float tensor, :class:`ShapeMismatchError` for wrong or empty dims."""
        if not t.dtype.is_floating_point:
            raise FormatError(f"{where} has dtype {t.dtype}, expected a float tensor")
        low = self.min_ndim if self.ndim is None else self.ndim
        if (self.ndim is not None and t.dim() != self.ndim) or t.dim() < low or 0 in t.shape:
            want = f"{self.ndim}" if self.ndim is not None else f"at least {low}"
            raise ShapeMismatchError(f"{where} has shape {tuple(t.shape)}; {self.name} needs {want} non-empty dims")


# DoRA's magnitude, shared by every method that supports it (``MethodSchema.supports_dora``): LyCORIS/kohya
# ``dora_scale`` (canonical ``(out, 1, …)`` or ``(1, in, …)``), PEFT ``lora_magnitude_vector`` (``(out,)``,
# conv ``(1, out, 1, …)``). It does not identify a method (LoRA, LoHa and LoKr files all carry it).
DORA = Param("dora_scale", min_ndim=1, identifies=False, peft_key="lora_magnitude_vector")


@dataclass(frozen=True)
class ShapePlan:
    """The plan of a method without a shape plan of its own: the layer's canonical weight shape and the rank
    (``ranked``: read off the tensors; otherwise the ``r`` it was inferred with).

    Every plan has ``weight_shape``, ``r`` and ``ranked``: a model gives an adapter built from a plan the
    plan's ``r`` when ``ranked``, else the config's (``rank_pattern``)."""

    weight_shape: Shape
    r: int
    ranked: bool = True


class RowPart(NamedTuple):
    """One block of rows in a row stack (:meth:`MethodSchema.stack_rows`): a module's ``tensors`` (without
    ``dora_scale``; ``None``: ``weight_shape[0]`` zero rows), its shape ``plan`` (``None`` with no tensors), the
    ``scale`` its ``ΔW`` carries in the stack, and its layer weight shape ``(rows, in, *k)``."""

    tensors: Tensors | None
    plan: Any
    scale: float
    weight_shape: Shape


@dataclass(frozen=True)
class FitOptions:
    """How ``extract`` / ``resize`` build factors: the ``rank``; LoKr's split ``factor`` and
    ``decompose_both``; ``steps`` / ``seed`` of a fitted method (LoHa)."""

    rank: int
    factor: int = -1
    decompose_both: bool = False
    steps: int = 300
    seed: int = 0


class MethodSchema:
    """On-disk description of a method; every hook is a classmethod with a documented default.

    Required: ``param_names`` (or ``params``), :meth:`compose`; for file tooling also :meth:`rank` (when the
    tensors have one) and :meth:`guess_weight_shape`. ``algo`` is the method's name in files and in
    ``ss_network_args`` (default: the config's ``peft_type`` in lower case); ``title`` its human name.
    """

    algo: ClassVar[str] = ""
    lycoris_algos: ClassVar[tuple[str, ...]] = ()  # other names of the method in LyCORIS's ``algo`` (LoRA: locon)
    title: ClassVar[str] = ""
    param_names: ClassVar[tuple[str, ...]] = ()
    params: ClassVar[tuple[Param, ...]] = ()
    required: ClassVar[tuple[tuple[str, ...], ...] | None] = None  # groups: one of each must exist (None: all)
    pairs: ClassVar[tuple[tuple[str, str], ...]] = ()  # (a, b): a needs b
    exclusive: ClassVar[tuple[tuple[str, str], ...]] = ()  # never both
    unranked: ClassVar[str] = "no factored rank"  # what a module without rank is (files scale it by 1)
    stores_alpha: ClassVar[bool] = True  # files carry a 0-dim ``.alpha`` per module (False: never, e.g. Full)
    supports_dora: ClassVar[bool] = False  # modules may carry DoRA's ``dora_scale`` (:data:`DORA`)
    # the architectures (lyco.formats.consumers: "sd1", "flux2" …) whose diffusers loaders read the method's files
    # (``load_lora_weights``, diffusers 0.42.1); None: every one. Elsewhere diffusers refuses the whole file.
    diffusers_reads: ClassVar[frozenset[str] | None] = frozenset()
    sd_scripts_reads: ClassVar[bool] = False  # kohya sd-scripts' own networks (networks/lora*.py) load its files

    # -- declared tensors -------------------------------------------------------------------------
    @classmethod
    def tensor_params(cls) -> dict[str, Param]:
        """Name → :class:`Param` for every tensor the method owns (``params``, else ``param_names``)."""
        declared = cls.params or tuple(Param(n) for n in cls.param_names)
        return {p.name: p for p in (*declared, *((DORA,) if cls.supports_dora else ()))}

    @classmethod
    def file_names(cls) -> dict[str, str]:
        """Key tail in files → tensor name: each tensor's LyCORIS/kohya key (``lora_down.weight``), and for the
        tensors that identify the method its PEFT name too (``lora_A.weight``: diffusers' own single files).
        DoRA's magnitude is ``dora_scale`` only (PEFT's ``lora_magnitude_vector`` has another layout)."""
        own = cls.tensor_params().values()
        return {p.file_key: p.name for p in own} | {p.peft_name: p.name for p in own if p.identifies and p.peft_name != p.file_key}

    @classmethod
    def factor_shapes(cls, shapes: Mapping[str, Shape]) -> dict[str, Shape]:
        """``shapes`` without the shared extras (DoRA's magnitude): what a shape plan is inferred from."""
        return {k: tuple(v) for k, v in shapes.items() if k != DORA.name}

    @classmethod
    def display(cls) -> str:
        return cls.title or cls.algo

    @classmethod
    def check_module(cls, names: set[str], where: str) -> None:
        """:class:`FormatError` unless ``names`` is a complete, consistent set of this method's tensors."""
        own = cls.tensor_params()
        unknown = sorted(names - own.keys())
        if unknown:
            raise FormatError(f"{where} ({cls.algo}) has tensors {unknown} that are not {cls.display()} tensors")
        groups = cls.required if cls.required is not None else tuple((n,) for n in own)
        for options in groups:
            if not any(o in names for o in options):
                raise FormatError(f"{where} ({cls.algo}) is missing {' or '.join(map(repr, options))}")
        for a, b in cls.pairs:
            if a in names and b not in names:
                raise FormatError(f"{where} has {a!r} without {b!r}")
        for a, b in cls.exclusive:
            if a in names and b in names:
                raise FormatError(f"{where} has both {a!r} and {b!r}")

    # -- layouts ----------------------------------------------------------------------------------
    @classmethod
    def canonical(cls, tensors: Tensors, kernel: Shape | None = None) -> dict[str, torch.Tensor]:
        """``tensors`` in lyco's canonical layout. Without ``kernel`` only layout fixes that need no layer;
        with the layer's kernel also PEFT's 1-D conv cores ``(r, r, k, 1)`` → ``(r, r, k)``."""
        params = cls.tensor_params()
        out = dict(tensors)
        if kernel is not None and len(kernel) == 1:
            for name, t in tensors.items():
                if name in params and params[name].core and t.dim() == 4 and t.shape[-1] == 1:
                    out[name] = t.reshape(t.shape[:-1])
        return out

    @classmethod
    def peft_layout(cls, tensors: Tensors) -> dict[str, torch.Tensor]:
        """``tensors`` as PEFT stores them: 1-D conv CP cores ``(r, r, k)`` gain a trailing unit dim; an output-axis
        DoRA magnitude ``(out, 1)`` is PEFT's ``(out,)``, ``(out, 1, 1…)`` its ``(1, out, 1…)`` (an input-axis
        one, which PEFT has not, stays as it is)."""
        params = cls.tensor_params()
        out = {
            n: t.reshape(*t.shape, 1) if n in params and params[n].core and t.dim() == 3 else t for n, t in tensors.items()
        }
        m = out.get(DORA.name)
        if m is not None and m.dim() >= 2 and m.shape[1] == 1 and (m.dim() == 2 or m.shape[0] > 1):
            out[DORA.name] = m.reshape(-1) if m.dim() == 2 else m.transpose(0, 1)
        return out

    @classmethod
    def from_peft_layout(cls, tensors: Tensors) -> dict[str, torch.Tensor]:
        """The inverse of :meth:`peft_layout` for PEFT's own layouts that differ from lyco's beyond conv cores
        (read by the PEFT reader before :meth:`canonical`): the magnitude ``(out,)`` → ``(out, 1)``,
        ``(1, out, 1…)`` → ``(out, 1, 1…)`` (PEFT's DoRA is always on the output axis)."""
        out = dict(tensors)
        m = out.get(DORA.name)
        if m is not None and m.dim() == 1:
            out[DORA.name] = m.reshape(-1, 1)
        elif m is not None and m.dim() >= 3 and m.shape[0] == 1:
            out[DORA.name] = m.transpose(0, 1)
        return out

    # -- shapes, plan, ΔW -------------------------------------------------------------------------
    @classmethod
    def rank(cls, shapes: Mapping[str, Shape]) -> int | None:
        """The rank ``r`` of ``alpha / r`` read off the tensors; ``None``: no rank (files then scale by 1,
        whatever alpha says). Default: ``None``."""
        return None

    @classmethod
    def guess_weight_shape(cls, shapes: Mapping[str, Shape]) -> Shape:
        """The layer weight ``(out, in, *k)`` the tensors describe when no model or base gives it."""
        raise FormatError(f"{cls.display()} modules need a base model to tell their layer's shape (pass --base)")

    @classmethod
    def infer_plan(cls, shapes: Mapping[str, Shape], weight_shape: Shape, r: int | None = None) -> Any:
        """The shape plan of tensors ``shapes`` for a layer weight ``weight_shape`` (``r``: the rank to use when
        the tensors carry none). :class:`ShapeMismatchError` when they do not fit. Default: a
        :class:`ShapePlan` once :meth:`compose` of the shapes (on the meta device) has the layer's size;
        ``None`` (plan from the config) for a method without :meth:`compose`."""
        if not cls.implements("compose"):
            return None
        meta = {n: torch.empty(s, device="meta") for n, s in cls.factor_shapes(shapes).items()}
        try:
            size = cls.compose(meta, None).numel()
        except (RuntimeError, KeyError, ValueError, IndexError) as exc:
            raise ShapeMismatchError(f"{cls.display()} tensors {dict(shapes)} do not compose ({exc})") from None
        if size != math.prod(weight_shape):
            raise ShapeMismatchError(
                f"{cls.display()} tensors {dict(shapes)} give {size} weights, the layer has {tuple(weight_shape)}"
            )
        rank = cls.rank(shapes)
        return ShapePlan(tuple(weight_shape), rank if rank is not None else (r or 1), rank is not None)

    @classmethod
    def compose(cls, tensors: Tensors, plan: Any) -> torch.Tensor:
        """Unscaled ``ΔW`` from ``tensors`` (its own size; callers reshape it to the weight shape). The one
        formula: the Adapter's ``delta_weight`` calls it with its parameters, files with their tensors."""
        raise FormatError(f"{cls.display()}: the method defines no compose(tensors, plan); ΔW cannot be read from files")

    @classmethod
    def compose_bias(cls, tensors: Tensors) -> torch.Tensor | None:
        """Unscaled bias delta ``(out,)`` from ``tensors``, or ``None`` (default: methods change weights only)."""
        return None

    @classmethod
    def matvec(cls, tensors: Tensors, plan: Any, v: torch.Tensor) -> torch.Tensor:
        """``ΔW v`` (unscaled) for ``v (in·∏k, n)`` with ``ΔW`` as an ``(out, in·∏k)`` matrix → ``(out, n)``;
        methods with a factored product override it so that checks on large layers never build ``ΔW``.
        Default: the dense ``ΔW`` (:meth:`compose`)."""
        return cls.compose(tensors, plan).reshape(-1, v.shape[0]) @ v

    @classmethod
    def fold_scale(cls, tensors: Tensors, factor: float) -> dict[str, torch.Tensor]:
        """Tensors whose ``ΔW`` is ``factor`` times this one's. Default: the first declared tensor present is
        scaled (``ΔW`` is linear in each factor of a product)."""
        out = dict(tensors)
        if factor != 1:
            first = next(n for n in cls.tensor_params() if n in out)
            out[first] = out[first] * factor
        return out

    # -- output rows (fused ↔ split projections) --------------------------------------------------
    @classmethod
    def take_rows(cls, tensors: Tensors, plan: Any, rows: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Tensors of this method, with the same rank, whose unscaled ``ΔW`` is ``ΔW[rows]`` — ``rows``: 1-D int64
        indices into the layer's output rows, in the order wanted (a slice, a permutation) — or ``None`` where the
        method's structure cannot hold exactly those rows. ``tensors`` come without ``dora_scale`` (the caller
        takes its rows). Default: ``None`` (the caller then writes a dense ``ΔW``)."""
        return None

    @classmethod
    def stack_rows(cls, parts: Sequence[RowPart]) -> tuple[dict[str, torch.Tensor], float] | None:
        """``(tensors, scale)`` of this method whose unscaled ``ΔW`` times ``scale`` is exactly the row stack
        ``[scale_1·ΔW_1; scale_2·ΔW_2; …]`` of ``parts`` (:class:`RowPart`, all of this method; a part without
        tensors is zero rows), or ``None`` where the method cannot. Default: ``None``."""
        return None

    @classmethod
    def dense_tensors(cls, delta: torch.Tensor, bias_delta: torch.Tensor | None) -> dict[str, torch.Tensor] | None:
        """Tensors of this method holding exactly ``ΔW = delta (out, in, *k)`` and the bias delta ``(out,)`` (or
        ``None``) at scale 1 — what a lossless fallback is written as — or ``None``: the method cannot (default)."""
        return None

    # -- configs and metadata ---------------------------------------------------------------------
    @staticmethod
    def replan_problems(plans: Mapping[str, Any], replan: Callable[[Any], Any]) -> list[str]:
        """For :meth:`fit_config`: the modules whose plan differs from ``replan(plan)`` (what the config's planning
        rules give for that module), one line each naming both shapes."""
        problems = []
        for name, p in plans.items():
            planned = replan(p)
            if planned != p:
                problems.append(f"{name}: PEFT would plan {planned.param_shapes()}, the tensors are {p.param_shapes()}")
        return problems

    @classmethod
    def fit_config(cls, plans: dict[str, Any], base_r: int) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        """``(plans, config options, problems)``: config fields (beyond r/alpha/patterns) under which the
        method's own planning reproduces ``plans`` (per module; a plan without rank may get one), and the
        modules it would plan differently. Default: nothing to choose, no problems."""
        return plans, {}, []

    @classmethod
    def network_args(cls, modules: list[tuple[Mapping[str, Shape], Shape]]) -> dict[str, str]:
        """Method-specific ``ss_network_args`` (strings, as kohya writes them) for ``(shapes, weight shape)``
        of each module of this method in a file. Default: none."""
        return {}

    @classmethod
    def unranked_alpha(cls, shapes: Mapping[str, Shape]) -> float:
        """The ``.alpha`` a file stores for a module without rank (:attr:`unranked`; every checked reader scales it
        by 1 whatever alpha says): one that a reader dividing alpha by some size of these ``shapes`` also reads as
        scale 1. Default: 1."""
        return 1.0

    @classmethod
    def consumer_issues(cls, shapes: Mapping[str, Shape]) -> list[str]:
        """Known defects of the tools that apply adapter files (ComfyUI, AUTOMATIC1111…) that a module with these
        tensor ``shapes`` runs into: one sentence each, naming the consumer and what it does. Default: none."""
        return []

    @classmethod
    def consumer_layout(cls, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The same ``ΔW`` and rank in tensors that avoid :meth:`consumer_issues` (canonical layouts). Default:
        the tensors as they are."""
        return dict(tensors)

    # -- tools -----------------------------------------------------------------------------------
    @classmethod
    def extract(cls, delta: torch.Tensor, opts: FitOptions) -> dict[str, torch.Tensor]:
        """Unscaled tensors (scale 1: alpha = their rank) approximating ``delta (out, in, *k)``."""
        raise FormatError(f"{cls.display()} adapters cannot be extracted from weight differences")

    @classmethod
    def extract_bias(cls, bias_delta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors carrying a bias difference ``(out,)`` next to :meth:`extract`'s (default: none, the method
        changes weights only; ``lyco extract`` then ignores bias differences)."""
        return {}

    @classmethod
    def resize(cls, tensors: Tensors, plan: Any, opts: FitOptions) -> dict[str, torch.Tensor]:
        """Tensors at rank ``opts.rank`` (below the current one) with about the same unscaled ``ΔW``."""
        raise FormatError(f"{cls.display()} adapters cannot be resized")

    @classmethod
    def implements(cls, hook: str) -> bool:
        """Whether the method overrides ``hook`` (e.g. ``"extract"``) instead of inheriting the default."""
        return getattr(cls, hook).__func__ is not getattr(MethodSchema, hook).__func__
