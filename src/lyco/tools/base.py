"""The base model as the tools see it: module paths and weight shapes, and matching adapter names to them.

A base is a safetensors state dict (a file, or a folder of ``*.safetensors`` shards) or a model
``config.json`` (transformers ``architectures`` / diffusers ``_class_name``, built on the meta device —
nothing is downloaded or allocated). Adapter module names are matched to the base's modules exactly,
then with dots read as underscores (kohya names), then as a unique dotted suffix (a base saved with an
extra prefix such as ``model.diffusion_model.``); ambiguity and misses are errors listing candidates.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FormatError, ShapeMismatchError
from ..formats.adapterfile import AdapterFile, ModuleAdapter
from ..formats.keys import match_convention, underscore
from ..formats.stream import read_index
from ..ops.factorize import infer_loha_plan, infer_lokr_plan

WEIGHT = ".weight"


@dataclass(frozen=True)
class BaseIndex:
    """``weights``: module path → shape of its ``.weight`` as stored; ``files``: module path → the
    safetensors file holding it (empty for a config-built base)."""

    weights: dict[str, tuple[int, ...]]
    files: dict[str, Path]
    source: str


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
    return BaseIndex(weights, {}, str(path))


def resolve_names(names: Iterable[str], modules: Iterable[str], source: str = "base") -> dict[str, str]:
    """Map each adapter module name to one base module path.

    Tried in order, for the name and then for the name without a known key prefix (``lora_unet_``,
    ``lycoris_``, ``transformer.``, …): equal; equal with dots read as underscores (kohya); a unique
    suffix at a path boundary (the base has an extra root such as ``model.diffusion_model.``).

    >>> resolve_names(["lora_unet_layers_0_q_proj", "fc"], ["model.layers.0.q_proj", "model.fc", "fc2"])
    {'lora_unet_layers_0_q_proj': 'model.layers.0.q_proj', 'fc': 'model.fc'}
    """
    modules = list(modules)
    exact = set(modules)
    under: dict[str, list[str]] = {}
    for m in modules:
        under.setdefault(underscore(m), []).append(m)

    def lookup(form: str) -> list[str]:
        if form in exact:
            return [form]
        u = underscore(form)
        if u in under:
            return under[u]
        dotted = [m for m in modules if m.endswith("." + form)]
        if dotted or "_" not in form:
            return dotted
        return [m for m in modules if underscore(m).endswith("_" + u)]

    out: dict[str, str] = {}
    missing: list[str] = []
    for name in names:
        cands = lookup(name)
        conv = match_convention(name)
        if not cands and conv is not None:
            cands = lookup(name[len(conv.prefix) :])
        if len(cands) > 1:
            raise FormatError(f"adapter module {name!r} matches several {source} modules: {sorted(cands)[:8]}")
        if not cands:
            missing.append(name)
        else:
            out[name] = cands[0]
    if missing:
        close = {
            n: [under[c][0] for c in difflib.get_close_matches(underscore(n), list(under), n=2)] for n in missing[:8]
        }
        raise FormatError(f"{len(missing)} adapter module(s) not found in {source} (closest): {close}")
    return out


def fits(m: ModuleAdapter, shape: tuple[int, ...]) -> bool:
    """Whether ``m``'s tensors compose to a canonical weight ``(out, in, *k)`` of ``shape``."""
    shapes = {k: tuple(v.shape) for k, v in m.tensors.items()}
    try:
        if m.algo == "loha":
            infer_loha_plan(shapes, shape)
        elif m.algo == "lokr":
            infer_lokr_plan(shapes, shape)
        else:
            down, up = shapes["lora_down"], shapes["lora_up"]
            return up[0] == shape[0] and math.prod(down[1:]) == math.prod(shape[1:]) and up[1] == down[0]
    except (ShapeMismatchError, KeyError):
        return False
    return True


def canonical_shape(m: ModuleAdapter, stored: tuple[int, ...], name: str) -> tuple[tuple[int, ...], bool]:
    """``(canonical weight shape, transposed)`` of a base weight stored as ``stored``: 2-D weights the
    adapter only fits transposed are taken as transformers ``Conv1D`` weights, stored ``(in, out)``."""
    if fits(m, stored):
        return stored, False
    if len(stored) == 2 and fits(m, stored[::-1]):
        return stored[::-1], True
    raise ShapeMismatchError(f"adapter module {name!r} ({m.algo}) does not fit the base weight {stored}")


def attach_base(af: AdapterFile, base: BaseIndex) -> tuple[AdapterFile, set[str]]:
    """``af`` with module names resolved to the base's paths and ``weight_shape`` set from the base;
    also the set of (renamed) modules whose base weight is stored transposed (transformers ``Conv1D``).

    A square 2-D weight fits both ways; it is taken as transposed only when every non-square 2-D weight
    the adapter touches is (a GPT-2-style model stores all its projections ``(in, out)``).
    """
    names = resolve_names(af.modules, base.weights, base.source)
    modules: dict[str, ModuleAdapter] = {}
    flipped: set[str] = set()
    straight_2d = square = 0
    for old, new in names.items():
        m = af.modules[old]
        stored = base.weights[new]
        shape, is_flipped = canonical_shape(m, stored, old)
        if new in modules:
            raise FormatError(f"two adapter modules resolve to the same base module {new!r}")
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

