"""``lyco merge``: fold an adapter into a base safetensors state dict, one tensor at a time.

Memory: the base file is memory-mapped (``safetensors.safe_open``) and the output is written with
:class:`~lyco.formats.stream.StreamingWriter` (header first, then each tensor as it is produced), so
the process holds the adapter, one base tensor and that tensor's fp32 merge at a time — never a second
copy of the model. Pages of the mapped base file live in the OS page cache and can be evicted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import FormatError
from ..formats.adapterfile import AdapterFile
from ..formats.stream import DTYPES, StreamingWriter, iter_tensors, read_index
from . import Progress, track
from .base import WEIGHT, BaseIndex, attach_base


@dataclass
class MergeReport:
    out_path: Path
    merged: list[str] = field(default_factory=list)  # module paths whose weight changed
    copied: int = 0  # tensors copied through unchanged
    transposed: list[str] = field(default_factory=list)  # weights stored (in, out) (transformers Conv1D)
    max_abs_delta: float = 0.0


def merge_file(
    base_path: str | os.PathLike,
    af: AdapterFile,
    out_path: str | os.PathLike,
    scale: float = 1.0,
    progress: Progress | None = None,
) -> MergeReport:
    """Write ``out_path`` = the base state dict with ``W + scale · ΔW`` for every adapted module.

    Adapter module names are resolved against the base's ``<module>.weight`` keys (exact, kohya
    underscore form, or unique suffix); a module that matches nothing is an error (nothing written).
    Each merge runs in fp32 and is cast back to the base tensor's dtype; all other tensors and the
    base's metadata are copied through.
    """
    base_path, out_path = Path(base_path), Path(out_path)
    if base_path.resolve() == out_path.resolve():
        raise FormatError(f"{out_path}: the output must not overwrite the base file it streams from")
    specs, metadata = read_index(base_path)
    weights = {k[: -len(WEIGHT)]: shape for k, (_, shape) in specs.items() if k.endswith(WEIGHT)}
    adapter, transposed = attach_base(af, BaseIndex(weights, {}, str(base_path)))
    for name in adapter.modules:
        dtype = DTYPES[specs[name + WEIGHT][0]]
        if not dtype.is_floating_point:
            raise FormatError(f"{base_path}: {name + WEIGHT} is {dtype}; lyco merges only into float weights")
    report = MergeReport(out_path, transposed=sorted(transposed))
    metadata = {**metadata, "lyco_merge": json.dumps({"modules": len(adapter.modules), "scale": scale})}
    with StreamingWriter(out_path, specs, metadata) as writer:
        for key, tensor in track(iter_tensors(base_path, list(specs)), progress, len(specs), "merge"):
            module = key[: -len(WEIGHT)] if key.endswith(WEIGHT) else None
            if module in adapter.modules:
                delta = adapter.modules[module].delta_weight()
                if module in transposed:
                    delta = delta.T
                report.max_abs_delta = max(report.max_abs_delta, abs(scale) * float(delta.abs().max()))
                tensor = merged_weight(tensor, delta, scale)
                report.merged.append(module)
            else:
                report.copied += 1
            writer.write(key, tensor)
            del tensor
    return report


def merged_weight(weight: torch.Tensor, delta: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``weight + scale · delta`` computed in fp32, returned in ``weight``'s dtype."""
    return (weight.float() + scale * delta.float().reshape(weight.shape)).to(weight.dtype)
