"""A format-neutral adapter file: per module, the algorithm, its tensors (on-disk names) and alpha.

Every reader (PEFT directory, LyCORIS/kohya safetensors) produces an :class:`AdapterFile`; every
writer consumes one; the CLI tools (inspect, convert, merge, extract, resize, to-lora) work on it.
Tensors use lyco's canonical layout (conv CP cores ``(r, r, *k)``, no trailing unit dims).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import FormatError
from ..ops.factorize import infer_loha_plan, infer_lokr_plan
from ..ops.hadamard import hada_delta_naive
from ..ops.kron import make_kron
from ..ops.tucker import cp_rebuild

ALGOS = ("loha", "lokr", "lora")
CP_CORES = ("hada_t1", "hada_t2", "lokr_t2")  # conv CP cores, (r, r, *k) in lyco


def core_to_peft(pname: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """PEFT's on-disk shape of a tensor: 1-D conv CP cores ``(r, r, k)`` gain a trailing unit dim."""
    return (*shape, 1) if pname in CP_CORES and len(shape) == 3 else tuple(shape)


def core_from_peft(pname: str, shape: tuple[int, ...], kernel_dims: int) -> tuple[int, ...]:
    """lyco's shape of a PEFT tensor for a layer with ``kernel_dims`` kernel dims (inverse of ``core_to_peft``)."""
    if pname in CP_CORES and kernel_dims == 1 and len(shape) == 4 and shape[-1] == 1:
        return tuple(shape[:-1])
    return tuple(shape)


@dataclass
class ModuleAdapter:
    """One module's adapter.

    ``algo``: ``"loha"``, ``"lokr"`` or ``"lora"`` (``lora_down (r, in·∏k)``, ``lora_up (out, r)``).
    ``tensors``: parameter name → tensor (``hada_w1_a``, ``lokr_w1``, ``lokr_t2``, ...).
    ``alpha``: the file's alpha (``None``: none stored, meaning alpha = r).
    ``weight_shape``: canonical base weight shape ``(out, in, *k)`` when known (from a model or inferred).
    """

    algo: str
    tensors: dict[str, torch.Tensor]
    alpha: float | None = None
    weight_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.algo not in ALGOS:
            raise FormatError(f"unknown adapter algorithm {self.algo!r} (known: {ALGOS})")

    @property
    def rank(self) -> int | None:
        """Rank of the factored parts (``None`` for a LoKr with both factors full)."""
        t = self.tensors
        if self.algo == "loha":
            return int(t["hada_w1_b"].shape[0])
        if self.algo == "lora":
            return int(t["lora_down"].shape[0])
        for name in ("lokr_w1_b", "lokr_w2_b"):
            if name in t:
                return int(t[name].shape[0])
        return None

    @property
    def full_lokr(self) -> bool:
        """A LoKr whose two factors are full matrices (scale is 1 whatever alpha says)."""
        return self.algo == "lokr" and self.rank is None

    def scale(self) -> float:
        """The one documented rule: ``alpha / r`` with ``r`` the rank of the factored parts.

        ``alpha`` missing (or 0, as lycoris-lora and kohya read it) means ``alpha = r`` → 1; a LoKr with
        both factors full has no rank and scale 1 whatever alpha says (lycoris-lora, kohya, ComfyUI).
        PEFT instead always applies ``alpha / r``; the PEFT reader/writer fold the difference into
        ``lokr_w1`` so that ``delta_weight()`` is the same in every format.
        """
        r = self.rank
        if r is None or not self.alpha:
            return 1.0
        return float(self.alpha) / r

    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def delta_weight(self, weight_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Scaled ``ΔW`` in canonical layout ``(out, in, *k)`` (fp32 math on the tensors' device)."""
        shape = tuple(weight_shape or self.weight_shape or ())
        if not shape:
            raise FormatError("delta_weight needs the base weight shape (out, in, *k)")
        t = {k: v.float() for k, v in self.tensors.items()}
        if self.algo == "lora":
            delta = t["lora_up"].flatten(1) @ t["lora_down"].flatten(1)
        elif self.algo == "loha":
            infer_loha_plan({k: tuple(v.shape) for k, v in t.items()}, shape)
            delta = hada_delta_naive(
                t["hada_w1_a"], t["hada_w1_b"], t["hada_w2_a"], t["hada_w2_b"], t.get("hada_t1"), t.get("hada_t2")
            )
        else:
            p = infer_lokr_plan({k: tuple(v.shape) for k, v in t.items()}, shape)
            w1 = t["lokr_w1"] if p.use_w1 else t["lokr_w1_a"] @ t["lokr_w1_b"]
            if p.use_w2:
                w2 = t["lokr_w2"]
            elif p.use_cp:
                w2 = cp_rebuild(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
            else:
                w2 = (t["lokr_w2_a"] @ t["lokr_w2_b"]).reshape(p.out_r, p.in_r, *p.kernel)
            delta = make_kron(w1, w2)
        if delta.numel() != math.prod(shape):
            raise FormatError(f"{self.algo} tensors give {delta.numel()} weights, the layer has {shape}")
        return delta.reshape(shape) * self.scale()


@dataclass
class AdapterFile:
    """A whole adapter: ``modules`` keyed by dotted module path (as in the model, e.g.
    ``down_blocks.0.attentions.0.proj_in``), plus what the file said about itself.

    ``convention``: where the keys came from (``"peft"``, ``"lycoris"``, ``"kohya"``, ``"onetrainer"``,
    ``"ai-toolkit"``, ``"diffusers"``, several joined by ``+``; ``"lyco"`` for one taken from a model);
    ``metadata``: safetensors metadata (``ss_*``); ``config``: a PEFT ``adapter_config.json`` object when
    there was one. ``resolved``: ``modules`` are keyed by module paths of a model; ``False`` for a single
    file read without a model, whose modules are then keyed by the file's own key stems, prefix included
    (``lora_unet_down_blocks_0_proj_in``) — underscore paths can only be turned into module paths against
    a real model (:mod:`lyco.formats.keys`).
    """

    modules: dict[str, ModuleAdapter]
    convention: str = "lycoris"
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict | None = None
    resolved: bool = True

    def algos(self) -> set[str]:
        return {m.algo for m in self.modules.values()}

    def num_params(self) -> int:
        return sum(m.num_params() for m in self.modules.values())
