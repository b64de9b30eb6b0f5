"""The base weights as the tools see them: module paths and weight shapes, and adapter names matched to them.

A base is a safetensors state dict (a file, or a folder of ``*.safetensors`` shards) or a model
``config.json`` (transformers ``architectures`` / diffusers ``_class_name``, built on the meta device —
nothing is downloaded or allocated). Adapter module names are matched to the base's modules by the one
resolver :meth:`lyco.formats.names.ModuleTable.resolve` (the rules ``load_lycoris`` uses against a model);
ambiguity and misses are errors listing candidates.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import FormatError, ShapeMismatchError
from ..formats.adapterfile import AdapterFile, ModuleAdapter
from ..formats.names import WEIGHT, ModuleTable
from ..formats.stream import read_index


@dataclass(frozen=True)
class BaseIndex:
    """``weights``: module path → shape of its ``.weight`` as stored; ``files``: module path → the
    safetensors file holding it (empty for a config-built base)."""

    weights: dict[str, tuple[int, ...]]
    files: dict[str, Path]
    source: str
    model: Any = None  # the model a config.json built (on the meta device), for family-specific file layouts

    def table(self) -> ModuleTable:
        """The base's modules as a :class:`~lyco.formats.names.ModuleTable` (stored weight shapes)."""
        return ModuleTable(self.weights, source=self.source)


def index_base(path: str | os.PathLike) -> BaseIndex:
    """Module paths and weight shapes of a safetensors file, a folder of shards or a ``config.json``."""
    p = Path(path)
    if p.is_dir():
        shards = sorted(p.glob("*.safetensors"))
        if shards:
            return _index_files(shards, str(p))
        if (p / "config.json").is_file():
            return _index_config(p / "config.json")
        raise FormatError(f"{p}: no *.safetensors or config.json in this folder")
    if p.suffix == ".json":
        return _index_config(p)
    if p.is_file():
        return _index_files([p], str(p))
    raise FormatError(f"{p}: no such file or directory")


def _index_files(files: list[Path], source: str) -> BaseIndex:
    weights: dict[str, tuple[int, ...]] = {}
    where: dict[str, Path] = {}
    for f in files:
        specs, _ = read_index(f)
        for key, (_, shape) in specs.items():
            if key.endswith(WEIGHT):
                weights[key[: -len(WEIGHT)]] = shape
                where[key[: -len(WEIGHT)]] = f
    return BaseIndex(weights, where, source)


def _index_config(path: Path) -> BaseIndex:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: unreadable JSON ({exc})") from None
    try:
        with torch.device("meta"):
            if "_class_name" in cfg:  # diffusers
                import diffusers

                model = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
            else:
                import transformers

                config = transformers.AutoConfig.for_model(**cfg)
                archs = cfg.get("architectures") or []
                if archs and hasattr(transformers, archs[0]):
                    model = getattr(transformers, archs[0])(config)
                else:
                    model = transformers.AutoModel.from_config(config)
    except ImportError as exc:
        raise FormatError(f"{path}: building the model needs {exc.name} (pip install 'lyco[hf]')") from None
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise FormatError(f"{path}: cannot build a model from this config ({exc})") from None
    weights = {
        name[: -len(WEIGHT)]: tuple(t.shape) for name, t in model.state_dict().items() if name.endswith(WEIGHT)
    }
    return BaseIndex(weights, {}, str(path), model)


def resolve_names(names: Iterable[str], modules: Iterable[str], source: str = "base") -> dict[str, str]:
    """Map each adapter module name to one of ``modules`` (module paths of a base), by the one resolver.

    >>> resolve_names(["lora_unet_layers_0_q_proj", "fc"], ["model.layers.0.q_proj", "model.fc", "fc2"])
    {'lora_unet_layers_0_q_proj': 'model.layers.0.q_proj', 'fc': 'model.fc'}
    """
    return ModuleTable(dict.fromkeys(modules, ()), source=source).require(names)


def canonical_shape(m: ModuleAdapter, stored: tuple[int, ...], name: str) -> tuple[tuple[int, ...], bool]:
    """``(canonical weight shape, transposed)`` of a base weight stored as ``stored``: 2-D weights the
    adapter only fits transposed are taken as transformers ``Conv1D`` weights, stored ``(in, out)``."""
    if m.fits(stored):
        return stored, False
    if len(stored) == 2 and m.fits(stored[::-1]):
        return stored[::-1], True
    raise ShapeMismatchError(f"adapter module {name!r} ({m.algo}) does not fit the base weight {stored}")


def attach_base(af: AdapterFile, base: BaseIndex) -> tuple[AdapterFile, set[str]]:
    """``af`` with module names resolved to the base's paths and ``weight_shape`` set from the base;
    also the set of (renamed) modules whose base weight is stored transposed (transformers ``Conv1D``).

    A square 2-D weight fits both ways; it is taken as transposed only when every non-square 2-D weight
    the adapter touches is (a GPT-2-style model stores all its projections ``(in, out)``).
    """
    names = base.table().require(af.modules)
    modules: dict[str, ModuleAdapter] = {}
    flipped: set[str] = set()
    straight_2d = square = 0
    for old, new in names.items():
        m = af.modules[old]
        stored = base.weights[new]
        m = dataclasses.replace(m, tensors=m.method.canonical(m.tensors, tuple(stored[2:])))
        shape, is_flipped = canonical_shape(m, stored, old)
        modules[new] = dataclasses.replace(m, weight_shape=shape)
        if is_flipped:
            flipped.add(new)
        elif len(stored) == 2 and stored[0] == stored[1]:
            square += 1
        elif len(stored) == 2:
            straight_2d += 1
    if flipped and square and not straight_2d:
        flipped |= {n for n in modules if len(base.weights[n]) == 2 and base.weights[n][0] == base.weights[n][1]}
    return dataclasses.replace(af, modules=modules, resolved=True), flipped

