"""Fused ↔ split projections: adapters of a model with split layers (diffusers) as adapters of the same model with
fused ones (the original checkpoint, which kohya sd-scripts trains on: BFL's Flux.1 — :data:`FLUX1` — and Flux.2
— :data:`FLUX2` —, Stability's MMDiT of SD3 / SD3.5 — :data:`SD3`), and back.

A :class:`FusedTable` is data: per fused module (a path template, ``{i}`` for a block index), the ordered
:class:`Part` s of split modules whose output rows it stacks — a whole module, or the ``k``-th of ``n`` equal row
chunks of one (Flux's ``final_layer.adaLN_modulation.1`` is ``norm_out.linear`` with its two halves swapped: BFL
orders them shift, scale; diffusers scale, shift). Row counts come from the model's own weight shapes
(:func:`resolve`), never from the table. A fusion may hold only in the blocks that have (``only_with``) or lack
(``only_without``) some split module: SD3's last joint block, whose context stream stops after its attention
(no ``attn.to_add_out``), has a two-chunk context adaLN with swapped halves. An unconditional one-part module
that keeps its rows in order is a pure rename (:func:`fused_name` / :func:`split_name`).

:func:`fuse` and :func:`split` rebuild every module with exactly the same ``ΔW`` rows through the methods' hooks
(:meth:`~lyco.methods.schema.MethodSchema.take_rows` / :meth:`~lyco.methods.schema.MethodSchema.stack_rows`).
Where a method's structure cannot hold the result (stacked LoKr, a LoKr slice not aligned to ``w2``'s rows, mixed
methods, an input-axis DoRA cut or stacked), the module is written by the method that holds any ``ΔW``
(:meth:`~lyco.methods.schema.MethodSchema.dense_tensors`: Full's ``diff`` / ``diff_b``) — exact, never an
approximation — and a note says which module and why. DoRA: the norm of an output-axis ``dora_scale`` is per
row, so its rows are taken and stacked with ``ΔW``'s; an input-axis one survives only a permutation of all rows,
otherwise the dense fallback needs the base weights (``base``) to write the exact merged difference.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..errors import FormatError, ShapeMismatchError
from ..methods.registry import all_methods
from ..methods.schema import DORA, MethodSchema, RowPart, Shape
from ..ops.rows import is_identity, is_permutation
from .adapterfile import AdapterFile, ModuleAdapter
from .keys import model_components
from .names import ModuleTable

__all__ = [
    "FLUX1", "FLUX2", "SD3", "ZIMAGE", "FusedLayout", "FusedTable", "FusedView", "Fusion", "Group", "Part", "Regrouped",
    "Segment", "fuse", "fused_name", "fused_side", "fused_view", "regroup_under", "resolve", "split", "split_name",
]  # fmt: skip


@dataclass(frozen=True)
class Part:
    """Rows of one split module inside a fused one: ``path`` (split side, ``{i}`` for the block index) and
    ``chunk = (k, n)``, the ``k``-th of ``n`` equal row chunks of that module (``(0, 1)``: all of it)."""

    path: str
    chunk: tuple[int, int] = (0, 1)


@dataclass(frozen=True)
class Fusion:
    """One fused module (``fused``: its path template) and the parts its output rows stack, in order; with
    ``only_with`` / ``only_without`` (split-side path templates) only in the blocks whose model has / lacks that
    module (a table gives each such module two fusions, one of each)."""

    fused: str
    parts: tuple[Part, ...]
    only_with: str | None = None
    only_without: str | None = None


@dataclass(frozen=True)
class FusedTable:
    """A model family's fused ↔ split module map (``name`` for messages); validated once."""

    name: str
    fusions: tuple[Fusion, ...]

    def __post_init__(self) -> None:
        for f in self.fusions:
            chunks: dict[str, list[tuple[int, int]]] = {}
            for p in f.parts:
                chunks.setdefault(p.path, []).append(p.chunk)
            for path, cs in chunks.items():
                if sorted(k for k, _ in cs) != list(range(cs[0][1])) or len({n for _, n in cs}) != 1:
                    raise FormatError(f"{self.name} table: {f.fused} must take every row chunk of {path} once, got {cs}")


def _whole(fused: str, *paths: str) -> Fusion:
    return Fusion(fused, tuple(Part(p) for p in paths))


def _double(bfl: str, *diffusers: str) -> Fusion:
    return _whole(f"double_blocks.{{i}}.{bfl}", *(f"transformer_blocks.{{i}}.{d}" for d in diffusers))


def _single(bfl: str, *diffusers: str) -> Fusion:
    return _whole(f"single_blocks.{{i}}.{bfl}", *(f"single_transformer_blocks.{{i}}.{d}" for d in diffusers))


# Flux.1 (diffusers FluxTransformer2DModel ↔ BFL / kohya), as diffusers' converters map it
# (lora_conversion_utils._convert_kohya_flux_lora_to_diffusers, single_file_utils.convert_flux_transformer_…).
FLUX1 = FusedTable("Flux.1", (
    _double("img_attn.qkv", "attn.to_q", "attn.to_k", "attn.to_v"),
    _double("txt_attn.qkv", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    _double("img_attn.proj", "attn.to_out.0"),
    _double("txt_attn.proj", "attn.to_add_out"),
    _double("img_mlp.0", "ff.net.0.proj"),
    _double("img_mlp.2", "ff.net.2"),
    _double("txt_mlp.0", "ff_context.net.0.proj"),
    _double("txt_mlp.2", "ff_context.net.2"),
    _double("img_mod.lin", "norm1.linear"),
    _double("txt_mod.lin", "norm1_context.linear"),
    _single("linear1", "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    _single("linear2", "proj_out"),
    _single("modulation.lin", "norm.linear"),
    _whole("img_in", "x_embedder"),
    _whole("txt_in", "context_embedder"),
    _whole("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    _whole("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    _whole("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    _whole("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    _whole("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    _whole("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    Fusion("final_layer.adaLN_modulation.1", (Part("norm_out.linear", (1, 2)), Part("norm_out.linear", (0, 2)))),
    _whole("final_layer.linear", "proj_out"),
))  # fmt: skip


def _joint(mmdit: str, *diffusers: str) -> Fusion:
    return _whole(f"joint_blocks.{{i}}.{mmdit}", *(f"transformer_blocks.{{i}}.{d}" for d in diffusers))


# SD3's last joint block (diffusers' context_pre_only) ends its context stream at the attention: no attn.to_add_out
# nor ff_context, and its context adaLN (AdaLayerNormContinuous: scale, shift) has 2 chunks, MMDiT's shift, scale.
_CONTEXT_OUT = "transformer_blocks.{i}.attn.to_add_out"
_CONTEXT_MOD = "transformer_blocks.{i}.norm1_context.linear"

# SD3 / SD3.5 (diffusers SD3Transformer2DModel ↔ Stability's MMDiT, which kohya sd-scripts trains and names
# lora_unet_<path>), as diffusers' converter maps it (single_file_utils.convert_sd3_transformer_checkpoint_to_…);
# attn2: SD3.5's dual attention blocks. The qk-norms (ln_q / ln_k ↔ norm_q / norm_k …) hold no Linear.
SD3 = FusedTable("SD3", (
    _joint("x_block.attn.qkv", "attn.to_q", "attn.to_k", "attn.to_v"),
    _joint("context_block.attn.qkv", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    _joint("x_block.attn.proj", "attn.to_out.0"),
    _joint("context_block.attn.proj", "attn.to_add_out"),
    _joint("x_block.attn2.qkv", "attn2.to_q", "attn2.to_k", "attn2.to_v"),
    _joint("x_block.attn2.proj", "attn2.to_out.0"),
    _joint("x_block.mlp.fc1", "ff.net.0.proj"),
    _joint("x_block.mlp.fc2", "ff.net.2"),
    _joint("context_block.mlp.fc1", "ff_context.net.0.proj"),
    _joint("context_block.mlp.fc2", "ff_context.net.2"),
    _joint("x_block.adaLN_modulation.1", "norm1.linear"),
    Fusion("joint_blocks.{i}.context_block.adaLN_modulation.1", (Part(_CONTEXT_MOD),), only_with=_CONTEXT_OUT),
    Fusion("joint_blocks.{i}.context_block.adaLN_modulation.1", (Part(_CONTEXT_MOD, (1, 2)), Part(_CONTEXT_MOD, (0, 2))),
           only_without=_CONTEXT_OUT),
    _whole("x_embedder.proj", "pos_embed.proj"),
    _whole("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    _whole("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    _whole("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    _whole("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    _whole("context_embedder", "context_embedder"),
    Fusion("final_layer.adaLN_modulation.1", (Part("norm_out.linear", (1, 2)), Part("norm_out.linear", (0, 2)))),
    _whole("final_layer.linear", "proj_out"),
))  # fmt: skip


# Flux.2's double blocks as diffusers builds them (separate to_q / to_k / to_v …), or after the model's
# fuse_qkv_projections(), which adds to_qkv / to_added_qkv (the BFL rows in BFL order) and leaves the separate
# projections in place, unused: such a block maps the fused ones by name and holds no adapter of the separate ones.
_QKV = "transformer_blocks.{i}.attn.to_qkv"
_ADDED_QKV = "transformer_blocks.{i}.attn.to_added_qkv"


def _qkv(bfl: str, fused: str, *separate: str) -> tuple[Fusion, Fusion]:
    parts = tuple(Part(f"transformer_blocks.{{i}}.attn.{s}") for s in separate)
    at = f"double_blocks.{{i}}.{bfl}"
    return Fusion(at, parts, only_without=fused), Fusion(at, (Part(fused),), only_with=fused)


# Flux.2 (diffusers Flux2Transformer2DModel ↔ BFL's checkpoints), as diffusers' converter maps it
# (single_file_utils.convert_flux2_transformer_checkpoint_to_diffusers; its BFL adapter converters in
# lora_conversion_utils agree but for the final adaLN, which they rename without the swap, or drop). The modulations are
# shared by all blocks (outside them, no per-block norm1.linear); ff / ff_context.linear_in (SwiGLU: gate rows,
# then up) and the single blocks' to_qkv_mlp_proj (q, k, v, MLP gate, MLP up: BFL's linear1) are one Linear on
# both sides, so everything but the double blocks' q, k, v and the final adaLN (shift, scale → scale, shift) is
# a rename. Bias-free throughout; the qk-norms (query_norm / key_norm .scale ↔ norm_q / norm_k …) hold no Linear.
FLUX2 = FusedTable("Flux.2", (
    *_qkv("img_attn.qkv", _QKV, "to_q", "to_k", "to_v"),
    *_qkv("txt_attn.qkv", _ADDED_QKV, "add_q_proj", "add_k_proj", "add_v_proj"),
    _double("img_attn.proj", "attn.to_out.0"),
    _double("txt_attn.proj", "attn.to_add_out"),
    _double("img_mlp.0", "ff.linear_in"),
    _double("img_mlp.2", "ff.linear_out"),
    _double("txt_mlp.0", "ff_context.linear_in"),
    _double("txt_mlp.2", "ff_context.linear_out"),
    _single("linear1", "attn.to_qkv_mlp_proj"),
    _single("linear2", "attn.to_out"),
    _whole("double_stream_modulation_img.lin", "double_stream_modulation_img.linear"),
    _whole("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear"),
    _whole("single_stream_modulation.lin", "single_stream_modulation.linear"),
    _whole("img_in", "x_embedder"),
    _whole("txt_in", "context_embedder"),
    _whole("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
    _whole("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
    _whole("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1"),
    _whole("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2"),
    Fusion("final_layer.adaLN_modulation.1", (Part("norm_out.linear", (1, 2)), Part("norm_out.linear", (0, 2)))),
    _whole("final_layer.linear", "proj_out"),
))  # fmt: skip


def _zimage_block(family: str) -> tuple[Fusion, ...]:
    """One Z-Image block family (``layers``, ``noise_refiner``, ``context_refiner``): its fused ``attention.qkv``
    (q, k, v rows, as ComfyUI's ``z_image_to_diffusers`` slices it) and the renamed output; the rest keeps its names."""
    at = f"{family}.{{i}}"
    keep = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0")
    return (
        _whole(f"{at}.attention.qkv", *(f"{at}.attention.{p}" for p in ("to_q", "to_k", "to_v"))),
        _whole(f"{at}.attention.out", f"{at}.attention.to_out.0"),
        *(_whole(f"{at}.{k}", f"{at}.{k}") for k in keep),
    )


# Z-Image (diffusers ZImageTransformer2DModel ↔ its original NextDiT checkpoint: ComfyUI's native names, which it also
# maps as lora_unet_<path>), as diffusers' converter maps it (single_file_utils.convert_z_image_transformer_…); the
# context refiner has no adaLN (its blocks lack the module, so the fusion matches nothing there).
ZIMAGE = FusedTable("Z-Image", (
    *_zimage_block("layers"), *_zimage_block("noise_refiner"), *_zimage_block("context_refiner"),
    _whole("x_embedder", "all_x_embedder.2-1"),
    _whole("final_layer.linear", "all_final_layer.2-1.linear"),
    _whole("final_layer.adaLN_modulation.1", "all_final_layer.2-1.adaLN_modulation.1"),
    _whole("cap_embedder.1", "cap_embedder.1"),
    _whole("t_embedder.mlp.0", "t_embedder.mlp.0"),
    _whole("t_embedder.mlp.2", "t_embedder.mlp.2"),
))  # fmt: skip


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)"))


def _renames(table: FusedTable) -> list[tuple[str, str]]:
    """``(split template, fused template)`` of the unconditional one-part modules that keep their rows in order."""
    return [
        (f.parts[0].path, f.fused)
        for f in table.fusions
        if len(f.parts) == 1 and f.parts[0].chunk == (0, 1) and f.only_with is None and f.only_without is None
    ]


def _rename(path: str, pairs: list[tuple[str, str]]) -> str | None:
    for src, dst in pairs:
        m = _pattern(src).fullmatch(path)
        if m:
            return dst.format(**m.groupdict())
    return None


def fused_name(path: str, table: FusedTable = FLUX1) -> str | None:
    """The fused-side path of a split-side module that maps 1:1 with its rows in order
    (``transformer_blocks.3.attn.to_out.0`` → ``double_blocks.3.img_attn.proj``); ``None`` for any other (a part
    of a fused module, one whose rows move or whose mapping depends on the block: use :func:`fuse`)."""
    return _rename(path, _renames(table))


def split_name(path: str, table: FusedTable = FLUX1) -> str | None:
    """The inverse of :func:`fused_name` (``double_blocks.3.img_attn.proj`` → ``transformer_blocks.3.attn.to_out.0``)."""
    return _rename(path, [(b, a) for a, b in _renames(table)])


@dataclass(frozen=True)
class Segment:
    """Rows ``[start, stop)`` of split module ``path``."""

    path: str
    start: int
    stop: int


@dataclass(frozen=True)
class Group:
    """One fused module of a resolved layout: ``segments`` in fused row order and every split module's weight
    shape ``(out, in, *k)``."""

    fused: str
    segments: tuple[Segment, ...]
    shapes: Mapping[str, Shape]

    @property
    def paths(self) -> list[str]:
        """The split modules, in order of first appearance."""
        return list(dict.fromkeys(s.path for s in self.segments))

    @property
    def fused_shape(self) -> Shape:
        first = self.shapes[self.segments[0].path]
        return (sum(s.stop - s.start for s in self.segments), *first[1:])

    def rows_in_fused(self, path: str) -> torch.Tensor:
        """Where ``path``'s rows ``0 … out-1`` live in the fused module: 1-D int64 ``(out,)``."""
        idx = torch.empty(self.shapes[path][0], dtype=torch.long)
        offset = 0
        for s in self.segments:
            if s.path == path:
                idx[s.start : s.stop] = torch.arange(offset, offset + s.stop - s.start)
            offset += s.stop - s.start
        return idx


@dataclass(frozen=True)
class FusedLayout:
    """A :class:`FusedTable` resolved against one model's module shapes (:func:`resolve`)."""

    table: FusedTable
    groups: tuple[Group, ...]

    def by_fused(self) -> dict[str, Group]:
        return {g.fused: g for g in self.groups}

    def by_split(self) -> dict[str, Group]:
        return {p: g for g in self.groups for p in g.paths}


def resolve(table: FusedTable, shapes: ModuleTable | Mapping[str, Shape]) -> FusedLayout:
    """The layout of ``table`` on a model whose split-side modules have weight ``shapes`` (module path → ``(out,
    in, *k)``, e.g. ``ModuleTable.from_module(model)``). Fusions whose modules the model lacks, or whose
    ``only_with`` / ``only_without`` condition fails, are left out; :class:`ShapeMismatchError` when a fused
    module's parts disagree on the input shape or a chunk does not divide its module's rows, :class:`FormatError`
    when the table maps a module twice on this model."""
    shapes = shapes.shapes if isinstance(shapes, ModuleTable) else shapes
    groups: list[Group] = []
    for f in table.fusions:
        first = _pattern(f.parts[0].path)
        indices = sorted({m.groupdict().get("i") for p in shapes if (m := first.fullmatch(p))}, key=lambda i: int(i or 0))
        for i in indices:
            fill = {"i": i} if i is not None else {}
            if f.only_with is not None and f.only_with.format(**fill) not in shapes:
                continue
            if f.only_without is not None and f.only_without.format(**fill) in shapes:
                continue
            segments, own = [], {}
            for part in f.parts:
                path = part.path.format(**fill)
                if path not in shapes:
                    raise ShapeMismatchError(f"{table.name}: the model has {first.pattern} but not {path} of {f.fused}")
                shape = tuple(shapes[path])
                k, n = part.chunk
                if shape[0] % n:
                    raise ShapeMismatchError(f"{table.name}: {path} has {shape[0]} rows, not {n} equal chunks")
                rows = shape[0] // n
                segments.append(Segment(path, k * rows, (k + 1) * rows))
                own[path] = shape
            fused = f.fused.format(**fill)
            if len({s[1:] for s in own.values()}) > 1:
                raise ShapeMismatchError(f"{table.name}: the parts of {fused} have different inputs: {own}")
            groups.append(Group(fused, tuple(segments), own))
    fused_seen: set[str] = set()
    split_seen: dict[str, str] = {}
    for g in groups:
        if g.fused in fused_seen:
            raise FormatError(f"{table.name} table: two fusions make {g.fused} on this model")
        fused_seen.add(g.fused)
        for path in g.paths:
            if path in split_seen:
                raise FormatError(f"{table.name} table: {path} is in both {split_seen[path]} and {g.fused}")
            split_seen[path] = g.fused
    return FusedLayout(table, tuple(groups))


class Regrouped(NamedTuple):
    """What :func:`fuse` / :func:`split` return: the new adapter and one note per module written dense (why)."""

    adapter: AdapterFile
    notes: list[str]


class _Run(NamedTuple):
    """Rows ``rows`` (1-D int64) of source module ``name`` (``module`` ``None``: not adapted, zero rows) whose
    layer weight is ``shape``; ``base``: that layer's weight when given."""

    name: str
    module: ModuleAdapter | None
    shape: Shape
    rows: torch.Tensor
    base: torch.Tensor | None


def fuse(
    af: AdapterFile,
    shapes: ModuleTable | Mapping[str, Shape],
    table: FusedTable = FLUX1,
    base: Mapping[str, torch.Tensor] | None = None,
) -> Regrouped:
    """``af`` keyed by split-side module paths (diffusers) → keyed by fused-side paths (BFL): each fused module's
    ``ΔW`` rows are exactly its parts' (scaled) ``ΔW`` rows, a part not in ``af`` zero. ``shapes``: the split-side
    model's weight shapes (:func:`resolve`); ``base``: split-side weights ``(out, in, *k)`` by module path, needed
    only where an input-axis DoRA module cannot stay DoRA. :class:`FormatError` for a module the table lacks."""
    layout = resolve(table, shapes)
    groups = layout.by_split()
    _check_modules(af, groups, table, "split-side (diffusers)")
    out: dict[str, ModuleAdapter] = {}
    notes: list[str] = []
    for name in af.modules:
        g = groups[name]
        if g.fused in out:
            continue
        runs: list[_Run] = []
        for s in g.segments:
            rows = torch.arange(s.start, s.stop)
            if runs and runs[-1].name == s.path:  # consecutive chunks of one module: one run (a permutation)
                runs[-1] = runs[-1]._replace(rows=torch.cat([runs[-1].rows, rows]))
            else:
                m = _vouched(af.modules.get(s.path), g.shapes[s.path])
                runs.append(_Run(s.path, m, g.shapes[s.path], rows, (base or {}).get(s.path)))
        out[g.fused] = _assemble(runs, g.fused_shape, g.fused, notes)
    return Regrouped(dataclasses.replace(af, modules=out), notes)


def split(
    af: AdapterFile,
    shapes: ModuleTable | Mapping[str, Shape],
    table: FusedTable = FLUX1,
    base: Mapping[str, torch.Tensor] | None = None,
) -> Regrouped:
    """The reverse of :func:`fuse`: ``af`` keyed by fused-side paths (BFL) → keyed by the split-side modules of
    ``shapes`` (the diffusers model's weight shapes), each module's ``ΔW`` exactly its rows of the fused one.
    ``base``: fused-side weights by module path, needed only where an input-axis DoRA module is cut."""
    layout = resolve(table, shapes)
    groups = layout.by_fused()
    _check_modules(af, groups, table, "fused-side")
    out: dict[str, ModuleAdapter] = {}
    notes: list[str] = []
    for name, m in af.modules.items():
        g = groups[name]
        for path in g.paths:
            run = _Run(name, _vouched(m, g.fused_shape), g.fused_shape, g.rows_in_fused(path), (base or {}).get(name))
            out[path] = _assemble([run], g.shapes[path], path, notes)
    return Regrouped(dataclasses.replace(af, modules=out), notes)


def _check_modules(af: AdapterFile, groups: Mapping[str, Group], table: FusedTable, side: str) -> None:
    if not af.resolved:
        raise FormatError("fused ↔ split needs an adapter keyed by module paths; read the file with its model")
    unknown = [n for n in af.modules if n not in groups]
    if unknown:
        raise FormatError(
            f"{len(unknown)} module(s) ({', '.join(unknown[:3])}{', …' if len(unknown) > 3 else ''}) are not {side} "
            f"modules of {table.name} on this model (e.g. {', '.join(list(groups)[:2])}); drop them from the adapter "
            "or add them to the table"
        )
    for name, m in af.modules.items():
        own = groups[name].shapes.get(name, groups[name].fused_shape)
        if m.weight_shape is not None and tuple(m.weight_shape) != tuple(own):
            raise ShapeMismatchError(f"module {name!r}: the adapter says weight {tuple(m.weight_shape)}, the model {own}")


# -- building one module from runs of rows -------------------------------------------------------------------
def _vouched(m: ModuleAdapter | None, shape: Shape) -> ModuleAdapter | None:
    """``m`` with the model's weight shape (the model vouches for the layer: no dense-size bound)."""
    return m if m is None or m.weight_shape is not None else dataclasses.replace(m, weight_shape=tuple(shape))


def _core(m: ModuleAdapter) -> dict[str, torch.Tensor]:
    return {k: v for k, v in m.tensors.items() if k != DORA.name}


def _with_scale(method: type[MethodSchema], tensors: dict, scale: float, shape: Shape, like: ModuleAdapter) -> ModuleAdapter:
    """A module of ``tensors`` whose file scale is ``scale`` (``alpha = scale·r``; folded in without a rank); the
    source's alpha is kept when its scale and rank are unchanged."""
    rank = method.rank({k: tuple(v.shape) for k, v in tensors.items() if k != DORA.name})
    if rank is None:
        return ModuleAdapter(method.algo, method.fold_scale(tensors, scale), None, shape)
    alpha = like.alpha if rank == like.rank and scale == like.scale() else scale * rank
    return ModuleAdapter(method.algo, tensors, alpha, shape)


def _take(run: _Run) -> tuple[ModuleAdapter | None, str]:
    """``run``'s rows of its module in the same method, or ``(None, why not)``."""
    m, n = run.module, run.shape[0]
    assert m is not None
    if is_identity(run.rows, n):
        return m, ""
    dora = m.dora
    if dora is not None and not m.dora_on_out(run.shape) and not is_permutation(run.rows, n):
        return None, f"{run.name} has an input-axis DoRA, whose column norms change when its rows are cut"
    tensors = m.method.take_rows(_core(m), m.plan(run.shape), run.rows)
    if tensors is None:
        return None, f"{m.method.display()} cannot hold rows {_span(run.rows)} of {run.name} exactly"
    if dora is not None:
        tensors[DORA.name] = dora[run.rows] if m.dora_on_out(run.shape) else dora
    shape = (run.rows.numel(), *run.shape[1:])
    return _with_scale(m.method, tensors, m.scale(), shape, m), ""


def _stack(pieces: list[ModuleAdapter | None], runs: list[_Run]) -> tuple[ModuleAdapter | None, str]:
    present = [p for p in pieces if p is not None]
    method = present[0].method
    if any(p.algo != method.algo for p in present):
        return None, f"its parts are of different methods ({', '.join(sorted({p.algo for p in present}))})"
    shapes = [(r.rows.numel(), *r.shape[1:]) for r in runs]
    doras = [None if p is None else p.dora for p in pieces]
    if any(d is not None for d in doras):
        if any(d is None for d in doras):
            return None, "some of its parts carry DoRA (dora_scale) and others do not"
        inner = [r.name for p, r, s in zip(pieces, runs, shapes, strict=True) if not p.dora_on_out(s)]
        if inner:
            return None, f"{inner[0]} has an input-axis DoRA, whose column norms a stack with other rows changes"
    parts = [
        RowPart(None, None, 0.0, s) if p is None else RowPart(_core(p), p.plan(s), p.scale(), s)
        for p, s in zip(pieces, shapes, strict=True)
    ]
    stacked = method.stack_rows(parts)
    if stacked is None:
        return None, f"stacked {method.display()} modules are not a {method.display()}"
    tensors, scale = stacked
    if doras[0] is not None:
        tensors[DORA.name] = torch.cat(doras)
    total = (sum(s[0] for s in shapes), *shapes[0][1:])
    return _with_scale(method, tensors, scale, total, present[0]), ""


def _assemble(runs: list[_Run], shape: Shape, target: str, notes: list[str]) -> ModuleAdapter:
    """The module of ``target`` (weight ``shape``) whose ``ΔW`` stacks the runs' rows: in the source method where
    its hooks allow, else dense (noted in ``notes``)."""
    pieces, why = [], ""
    for run in runs:
        piece, why = _take(run) if run.module is not None else (None, "")
        if run.module is not None and piece is None:
            break
        pieces.append(piece)
    else:
        if len(runs) == 1:
            return pieces[0]
        result, why = _stack(pieces, runs)
        if result is not None:
            return result
    return _dense(runs, shape, target, why, notes)


def _dense(runs: list[_Run], shape: Shape, target: str, why: str, notes: list[str]) -> ModuleAdapter:
    method = next((m for m in all_methods() if m.implements("dense_tensors")), None)
    if method is None:
        raise FormatError(f"{target}: {why}, and no registered method holds a dense ΔW")
    deltas, biases = [], []
    for run in runs:
        rows_shape = (run.rows.numel(), *run.shape[1:])
        if run.module is None:
            deltas.append(torch.zeros(rows_shape))
            biases.append(None)
            continue
        deltas.append(_effective_delta(run, target, why)[run.rows])
        bias = run.module.delta_bias()
        biases.append(None if bias is None else bias[run.rows])
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([torch.zeros(d.shape[0]) if b is None else b for b, d in zip(biases, deltas, strict=True)])
    tensors = method.dense_tensors(torch.cat(deltas), bias)
    assert tensors is not None
    kinds = ", ".join(sorted({r.module.method.display() for r in runs if r.module is not None}))
    dora = any(r.module is not None and r.module.dora is not None for r in runs)
    what = "merged difference (DoRA folded in: exact at multiplier 1)" if dora else "ΔW"
    notes.append(f"{target}: {why}; written as {method.display()} (the exact {what} of the {kinds} rows)")
    return ModuleAdapter(method.algo, tensors, None, tuple(shape))


def _effective_delta(run: _Run, target: str, why: str) -> torch.Tensor:
    """The scaled ``ΔW`` of the run's whole module; with DoRA the merged difference, which needs the base weight."""
    m = run.module
    assert m is not None
    if m.dora is None:
        return m.delta_weight(run.shape)
    if run.base is None:
        raise FormatError(
            f"{target}: {why}; {run.name} carries DoRA's magnitude (dora_scale), so its exact dense form is the merged "
            f"difference, which needs the base weight: pass base={{{run.name!r}: weight {tuple(run.shape)}}}"
        )
    w = run.base.reshape(run.shape).float()
    return m.merged_weight(w) - w


def _span(rows: torch.Tensor) -> str:
    lo, hi = int(rows.min()), int(rows.max()) + 1
    return f"{lo}:{hi}" if hi - lo == rows.numel() and is_identity(rows - lo, rows.numel()) else f"({rows.numel()} rows)"



# The fused layout of each model family whose original checkpoints (and kohya sd-scripts) fuse projections.
TABLES: dict[str, FusedTable] = {
    "FluxTransformer2DModel": FLUX1, "SD3Transformer2DModel": SD3, "Flux2Transformer2DModel": FLUX2,
    "ZImageTransformer2DModel": ZIMAGE,
}  # fmt: skip


def table_for(model: object) -> FusedTable | None:
    """The :class:`FusedTable` of ``model``'s family (the model, or its ``transformer``), ``None`` for the others.
    Chosen by the model's class: the tables partly match each other's models."""
    return next((TABLES[type(m).__name__] for m in model_components(model) if type(m).__name__ in TABLES), None)


class FusedView(NamedTuple):
    """Where a model's split transformer of a family with a fused original layout lives: ``at`` (``""``: the model is
    that transformer; ``"transformer."``: a pipeline-like container holds it), the transformer, its table."""

    at: str
    transformer: nn.Module
    table: FusedTable


def fused_view(model: nn.Module) -> FusedView | None:
    """The :class:`FusedView` of ``model`` (a Flux.1, Flux.2, SD3 or Z-Image transformer, or a container holding one
    as ``transformer``); ``None`` for the other models."""
    table = table_for(model)
    if table is None:
        return None
    if type(model).__name__ in TABLES:
        return FusedView("", model, table)
    inner = getattr(model, "transformer", None)
    return FusedView("transformer.", inner, table) if isinstance(inner, nn.Module) else None


def regroup_under(af: AdapterFile, at: str, regroup: Callable[[AdapterFile], Regrouped]) -> Regrouped:
    """``regroup`` (a :func:`fuse` or :func:`split`) applied to the modules of ``af`` under the prefix ``at`` (given
    without it, put back after); the other modules (a container's text encoders) as they are."""
    inside = {n[len(at) :]: m for n, m in af.modules.items() if n.startswith(at)}
    regrouped = regroup(dataclasses.replace(af, modules=inside))
    outside = {n: m for n, m in af.modules.items() if not n.startswith(at)}
    modules = {**outside, **{at + n: m for n, m in regrouped.adapter.modules.items()}}
    return Regrouped(dataclasses.replace(af, modules=modules), regrouped.notes)


def fused_side(table: ModuleTable, fused: FusedTable = FLUX1) -> ModuleTable | None:
    """The fused-side names of a split model (BFL's ``double_blocks.0.img_attn.qkv`` … of a diffusers Flux.1) as a
    :class:`ModuleTable` with the fused weight shapes, or ``None`` when ``fused`` covers none of its modules."""
    try:
        layout = resolve(fused, table)
    except ShapeMismatchError:
        return None
    if not layout.groups:
        return None
    return ModuleTable({g.fused: g.fused_shape for g in layout.groups}, source=f"{table.source} ({fused.name} names)")
