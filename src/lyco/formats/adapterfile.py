"""A format-neutral adapter file: per module, the method, its tensors (on-disk names) and alpha.

Every reader (PEFT directory, LyCORIS/kohya safetensors) produces an :class:`AdapterFile`; every
writer consumes one; the CLI tools (inspect, convert, merge, extract, resize, to-lora) work on it.
Tensors use lyco's canonical layout (conv CP cores ``(r, r, *k)``, no trailing unit dims). What a
module's tensors mean — rank, layer shape, plan, ``ΔW`` — is its method's
(:class:`~lyco.methods.schema.MethodSchema`, found by ``algo`` in the registry).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import FormatError, ShapeMismatchError
from ..methods.registry import method_for_algo
from ..methods.schema import DORA, MethodSchema, Shape, check_dense
from ..ops.dora import dora_weight, gain_shape


@dataclass
class ModuleAdapter:
    """One module's adapter.

    ``algo``: the method's name in files (``"loha"``, ``"lokr"``, ``"lora"`` or a registered custom one).
    ``tensors``: tensor name → tensor (``hada_w1_a``, ``lokr_w1``, ``lora_down``, ...).
    ``alpha``: the module's alpha (``None``: none stored, meaning alpha = r; ``0``: scale 0, as PEFT reads it —
    the LyCORIS reader turns a stored 0, which kohya and lycoris-lora read as r, into ``None``).
    ``weight_shape``: canonical base weight shape ``(out, in, *k)`` when known (from a model or inferred).
    """

    algo: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None
    weight_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        method_for_algo(self.algo)  # FormatError for an unknown algorithm

    @property
    def method(self) -> type[MethodSchema]:
        return method_for_algo(self.algo)

    def shapes(self) -> dict[str, Shape]:
        return {k: tuple(v.shape) for k, v in self.tensors.items()}

    @property
    def rank(self) -> int | None:
        """Rank of the factored parts (``None`` when the tensors have none, e.g. a LoKr with both factors full)."""
        return self.method.rank(self.shapes())

    @property
    def unranked(self) -> bool:
        """No factored rank: files scale the module by 1 whatever alpha says."""
        return self.rank is None

    full_lokr = unranked  # the LoKr name for it: both factors full

    def scale(self) -> float:
        """The one documented rule: ``alpha / r`` with ``r`` the rank of the factored parts.

        ``alpha`` missing (``None``) means ``alpha = r`` → 1; ``0`` gives 0; a module without a rank (a LoKr
        with both factors full) has scale 1 whatever alpha says (lycoris-lora, kohya, ComfyUI). PEFT instead
        always applies ``alpha / r``; the PEFT reader and every writer fold the difference into the tensors
        so that ``delta_weight()`` is the same in every format.
        """
        r = self.rank
        if r is None or self.alpha is None:
            return 1.0
        return float(self.alpha) / r

    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def guess_weight_shape(self) -> Shape:
        """``weight_shape``, else the layer shape the method reads off the tensors (a conv kernel that the
        tensors keep flattened — LoHa, low-rank LoKr — reads as a linear layer; ``ΔW`` is the same)."""
        if self.weight_shape is not None:
            return tuple(self.weight_shape)
        return tuple(self.method.guess_weight_shape(self.shapes()))

    def plan(self, weight_shape: Shape | None = None, r: int | None = None) -> Any:
        """The method's shape plan of the tensors for a layer weight (default: :meth:`guess_weight_shape`);
        :class:`ShapeMismatchError` when they do not fit."""
        return self.method.infer_plan(self.shapes(), tuple(weight_shape or self.guess_weight_shape()), r)

    def fits(self, weight_shape: Shape) -> bool:
        """Whether the tensors compose to a layer weight of ``weight_shape``."""
        try:
            self.plan(weight_shape)
        except (ShapeMismatchError, KeyError):
            return False
        return True

    def delta_weight(self, weight_shape: Shape | None = None) -> torch.Tensor:
        """Scaled ``ΔW`` of the factors in canonical layout ``(out, in, *k)`` (fp32 maths on the tensors' device),
        by the same formula as the method's adapter (:meth:`~lyco.methods.schema.MethodSchema.compose`); a DoRA
        module's merge also needs the base weight (:meth:`merged_weight`). Unless a model or base gave
        ``weight_shape``, its size is bounded (:func:`~lyco.methods.schema.check_dense`)."""
        shape = tuple(weight_shape or self.guess_weight_shape())
        if self.weight_shape is None:
            check_dense(shape, self.tensors, f"{self.algo} module")
        plan = self.plan(shape)
        with torch.no_grad():
            delta = self.method.compose({k: v.float() for k, v in self.tensors.items()}, plan)
        if delta.numel() != math.prod(shape):
            raise FormatError(f"{self.algo} tensors give {delta.numel()} weights, the layer has {shape}")
        return delta.reshape(shape) * self.scale()

    def key_tails(self) -> list[str]:
        """The key tails a LyCORIS/kohya file holds for this module (``lora_down.weight``, ``dora_scale``, ``alpha``
        when one is stored)."""
        params = self.method.tensor_params()
        return [params[p].file_key for p in self.tensors] + (["alpha"] if self.alpha is not None else [])

    @property
    def dora(self) -> torch.Tensor | None:
        """DoRA's magnitude ``dora_scale`` (canonical ``(out, 1, …)`` or ``(1, in, …)``), or ``None``."""
        return self.tensors.get(DORA.name)

    def dora_on_out(self, weight_shape: Shape | None = None) -> bool:
        """Whether the DoRA norm runs per output row (else per input column), read off ``dora_scale``'s shape."""
        shape = tuple(weight_shape or self.guess_weight_shape())
        got = tuple(self.tensors[DORA.name].shape)
        if got not in (gain_shape(shape, True), gain_shape(shape, False)):
            raise ShapeMismatchError(f"{self.algo} module: dora_scale {got} fits neither axis of a layer weight {shape}")
        return got == gain_shape(shape, True)

    def merged_weight(self, weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """The base ``weight`` (canonical ``(out, in, *k)``) with this module merged, in fp32 (fp64 for an fp64
        weight): ``W + scale·ΔW``, or with DoRA ``m ⊙ (W + scale·ΔW) / ‖W + scale·ΔW‖`` (the scale inside the
        norm, as lyco's and PEFT's ``set_scale``)."""
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        w = weight.to(dtype)
        delta = self.delta_weight(tuple(weight.shape)).to(dtype) * scale
        if self.dora is None:
            return w + delta
        return dora_weight(w, delta, self.dora.to(dtype), self.dora_on_out(tuple(weight.shape)))

    def delta_bias(self) -> torch.Tensor | None:
        """Scaled bias delta ``(out,)`` in fp32, or ``None`` for a method that changes weights only
        (:meth:`~lyco.methods.schema.MethodSchema.compose_bias`)."""
        with torch.no_grad():
            db = self.method.compose_bias({k: v.float() for k, v in self.tensors.items()})
        return None if db is None else db * self.scale()

    def matvec(self, v: torch.Tensor, weight_shape: Shape | None = None) -> torch.Tensor:
        """Scaled ``ΔW v`` for ``v (in·∏k, n)`` → ``(out, n)`` without building ``ΔW`` where the method has a
        factored product (fp32 maths)."""
        plan = self.plan(tuple(weight_shape or self.guess_weight_shape()))
        with torch.no_grad():
            out = self.method.matvec({k: t.float() for k, t in self.tensors.items()}, plan, v.float())
        return out * self.scale()

    def in_consumer_layout(self) -> ModuleAdapter:
        """The same module in tensors every checked consumer applies (the method's ``consumer_layout``); the layer
        shape is read off the tensors before (a CP core tells a conv kernel that flat factors do not), and where the
        layout has another rank, the alpha gives the same scale."""
        shape = self.weight_shape or self.guess_weight_shape()
        out = ModuleAdapter(self.algo, self.method.consumer_layout(self.tensors), self.alpha, tuple(shape))
        if out.rank != self.rank and out.rank is not None:  # a layout of another rank: the alpha of the same scale
            out = ModuleAdapter(self.algo, out.tensors, self.scale() * out.rank, tuple(shape))
        return out

    def with_scale_folded(self, factor: float, alpha: float) -> ModuleAdapter:
        """A copy whose tensors carry ``factor`` (e.g. PEFT's ``alpha / r`` for a module files scale by 1) and
        whose stored alpha is ``alpha``."""
        tensors = self.method.fold_scale(self.tensors, factor)
        return ModuleAdapter(self.algo, tensors, alpha, self.weight_shape)


@dataclass
class AdapterFile:
    """A whole adapter: ``modules`` keyed by dotted module path (as in the model, e.g.
    ``down_blocks.0.attentions.0.proj_in``), plus what the file said about itself.

    ``convention``: where the keys came from (``"peft"``, ``"lycoris"``, ``"kohya"``, ``"onetrainer"``,
    ``"ai-toolkit"``, ``"diffusers"``, several joined by ``+``; ``"lyco"`` for one taken from a model);
    ``metadata``: safetensors metadata (``ss_*``) as its producer declared it (a reader: the file's; a
    tool: its own) — a writer keeps these values and computes only the ``ss_network_*`` keys missing
    (:mod:`lyco.formats.metadata`); ``config``: a PEFT ``adapter_config.json`` object when there was one.
    ``resolved``: ``modules`` are keyed by module paths of a model; ``False`` for a single file read
    without a model, whose modules are then keyed by the file's own key stems, prefix included
    (``lora_unet_down_blocks_0_proj_in``) — underscore paths can only be turned into module paths against
    real module names (:mod:`lyco.formats.names`).
    """

    modules: dict[str, ModuleAdapter]
    convention: str = "lycoris"
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict | None = None
    resolved: bool = True

    def in_consumer_layout(self) -> AdapterFile:
        """The same adapter with every module in a layout the checked consumers apply as lyco does."""
        return dataclasses.replace(self, modules={n: m.in_consumer_layout() for n, m in self.modules.items()})

    def renamed(self, names: dict[str, str]) -> AdapterFile:
        """The same adapter with modules renamed by ``names`` (module → the name to write; others unchanged)."""
        return dataclasses.replace(self, modules={names.get(n, n): m for n, m in self.modules.items()})

    def algos(self) -> set[str]:
        return {m.algo for m in self.modules.values()}

    def num_params(self) -> int:
        return sum(m.num_params() for m in self.modules.values())

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor keyed ``<module>.<name>`` (the keys :mod:`lyco.tree` loads into a model)."""
        return {f"{name}.{p}": t for name, m in self.modules.items() for p, t in m.tensors.items()}

    def check_shapes(self, source: str) -> None:
        """:class:`ShapeMismatchError` naming ``source`` and the module where tensors do not fit their layer."""
        for name, m in self.modules.items():
            if m.weight_shape is None:
                continue
            try:
                m.plan(m.weight_shape)
            except ShapeMismatchError as exc:
                raise ShapeMismatchError(f"{source}: module {name!r}: {exc}") from None
