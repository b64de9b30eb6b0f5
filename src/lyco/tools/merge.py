"""``lyco merge``: fold an adapter into a base safetensors state dict, one tensor at a time.

Memory: the base file is memory-mapped (``safetensors.safe_open``) and the output is written with
:class:`~lyco.formats.stream.StreamingWriter` (header first, then each tensor as it is produced), so
the process holds the adapter, one base tensor and that tensor's fp32 merge at a time — never a second
copy of the model (measured: a 1 GiB fp32 file of 64 MiB tensors peaks at 381 MiB of anonymous memory,
189 MiB of it Python + torch; load-merge-save peaks at 2.3 GiB). Pages of the mapped base file live in the OS page cache and can be evicted.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import FormatError
from ..formats.adapterfile import AdapterFile
from ..formats.names import BIAS, WEIGHT
from ..formats.stream import DTYPES, StreamingWriter, load_tensor, raw_bytes, read_header
from . import Progress, track
from .base_weights import BaseIndex, attach_base


@dataclass
class MergeReport:
    out_path: Path
    merged: list[str] = field(default_factory=list)  # module paths whose weight changed
    merged_bias: list[str] = field(default_factory=list)  # module paths whose bias changed (Full's diff_b)
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
    """Write ``out_path`` = the base state dict with ``W + scale · ΔW`` for every adapted module (DoRA:
    ``m ⊙ (W + scale·ΔW) / ‖W + scale·ΔW‖``) and ``b + scale · Δb`` where the method has a bias delta (Full's
    ``diff_b``).

    ``base_path``: a safetensors file, or a folder of shards (``model-0000x-of-0000n.safetensors``; the
    output is then a folder with the same shards, and the folder's ``*.json`` files — shard index,
    config — are copied). Adapter module names are resolved against the base's ``<module>.weight``
    keys (exact, kohya underscore form, or unique suffix); a module that matches nothing is an error
    (nothing written). Each merge runs in fp32 (fp64 for fp64 weights) and is cast back to the base tensor's
    dtype; every other tensor is copied byte for byte, whatever its dtype, and each file's metadata is kept.
    """
    base_path, out_path = Path(base_path), Path(out_path)
    if base_path.resolve() == out_path.resolve():
        raise FormatError(f"{out_path}: the output must not overwrite the base it streams from")
    shards = sorted(base_path.glob("*.safetensors")) if base_path.is_dir() else [base_path]
    if not shards:
        raise FormatError(f"{base_path}: no *.safetensors files in this folder")
    headers = {shard: read_header(shard) for shard in shards}
    entries = {k: e for hdr, _ in headers.values() for k, e in hdr.items()}
    weights = {k[: -len(WEIGHT)]: e.shape for k, e in entries.items() if k.endswith(WEIGHT)}
    adapter, transposed = attach_base(af, BaseIndex(weights, {}, str(base_path)))
    bias_deltas = {name: db for name, m in adapter.modules.items() if (db := m.delta_bias()) is not None}
    for name in adapter.modules:
        keys = [name + WEIGHT] + ([name + BIAS] if name in bias_deltas else [])
        if name in bias_deltas and name + BIAS not in entries:
            raise FormatError(
                f"{base_path}: the adapter changes the bias of {name!r} (diff_b), but the base has no {name + BIAS}; "
                "a state-dict merge cannot add a bias the model does not have (load the adapter on the model instead)"
            )
        for key in keys:
            dtype = DTYPES.get(entries[key].dtype)
            if dtype is None or not dtype.is_floating_point:
                raise FormatError(f"{base_path}: {key} is {entries[key].dtype}; lyco merges only into float tensors")
    report = MergeReport(out_path, transposed=sorted(transposed))
    stamp = json.dumps({"modules": len(adapter.modules), "scale": scale})
    for i, (shard, (hdr, metadata)) in enumerate(headers.items()):
        target = out_path / shard.name if base_path.is_dir() else out_path
        desc = f"merge {i + 1}/{len(shards)}" if len(shards) > 1 else "merge"
        specs = {k: (e.dtype, e.shape) for k, e in hdr.items()}
        sizes = {k: e.end - e.begin for k, e in hdr.items()}
        with StreamingWriter(target, specs, {**metadata, "lyco_merge": stamp}, sizes) as writer:
            for key in track(list(hdr), progress, len(hdr), desc):
                if key.endswith(BIAS) and key[: -len(BIAS)] in bias_deltas:
                    module = key[: -len(BIAS)]
                    bias = load_tensor(shard, key, hdr[key])
                    report.max_abs_delta = max(report.max_abs_delta, abs(scale) * float(bias_deltas[module].abs().max()))
                    writer.write(key, merged_weight(bias, bias_deltas[module], scale))
                    report.merged_bias.append(module)
                    continue
                module = key[: -len(WEIGHT)] if key.endswith(WEIGHT) else None
                if module not in adapter.modules:
                    writer.write_raw(key, raw_bytes(shard, hdr[key]))  # byte for byte, whatever the dtype
                    report.copied += 1
                    continue
                tensor = load_tensor(shard, key, hdr[key])
                canonical = tensor.T if module in transposed else tensor
                new = adapter.modules[module].merged_weight(canonical, scale)
                report.max_abs_delta = max(report.max_abs_delta, float((new - canonical.to(new.dtype)).abs().max()))
                writer.write(key, (new.T if module in transposed else new).to(tensor.dtype))
                report.merged.append(module)
                del tensor, canonical, new
    if base_path.is_dir():
        for extra in base_path.glob("*.json"):
            shutil.copy2(extra, out_path / extra.name)
    return report


def merged_weight(weight: torch.Tensor, delta: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``weight + scale · delta`` computed in fp32 (fp64 for an fp64 weight), returned in ``weight``'s dtype."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    return (weight.to(dtype) + scale * delta.to(dtype).reshape(weight.shape)).to(weight.dtype)
