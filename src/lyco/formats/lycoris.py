"""LyCORIS / kohya single-file adapters: ``<prefix><module path>.<param>`` keys in one safetensors file.

Per module: the method's tensors (LoHa ``hada_w1_a`` …, optional CP cores ``hada_t1/t2``; LoKr
``lokr_w1`` or ``lokr_w1_a/b``, ``lokr_w2`` or ``lokr_w2_a/b``, optional ``lokr_t2``) and a 0-dim
``.alpha``; file metadata ``ss_network_module``, ``ss_network_dim``, ``ss_network_alpha``,
``ss_network_args`` (JSON: ``algo``, ``factor``, …). Key conventions: :mod:`lyco.formats.keys`; the
scale rule and alpha mapping: :mod:`lyco.formats.convert`. Every split, factor, full-matrix, decompose-both
and CP choice is read from the tensor shapes, never from metadata.

Layers of this module: :func:`parse_state_dict` (tensors → unresolved :class:`AdapterFile`, no model),
:func:`resolve_adapter_file` (against a model's module names), :func:`read_lycoris_file` /
:func:`write_lycoris_file` (files), :func:`load_lycoris` / :func:`load_lycoris_into` /
:func:`save_lycoris` (models).
"""

from __future__ import annotations

import math
import os
import warnings
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import FormatError, ShapeMismatchError
from .adapterfile import CP_CORES, AdapterFile, ModuleAdapter, core_from_peft, core_to_peft
from .convert import (
    adapter_file_from_model,
    add_adapter_file,
    check_shapes,
    merge_metadata,
    model_from_adapter_file,
    network_metadata,
)
from .io import PICKLE_SUFFIXES, read_tensors, write_tensors
from .keys import PARAM_ALGOS, ModuleIndex, infer_component, match_convention, module_keys, split_key

if TYPE_CHECKING:
    from ..model import LycoModel

# Tensor rank each parameter must have (``None``: at least 2, more for conv kernels).
_NDIM = {"hada_w1_a": 2, "hada_w1_b": 2, "hada_w2_a": 2, "hada_w2_b": 2, "lokr_w1": 2, "lokr_w1_a": 2,
         "lokr_w1_b": 2, "lokr_w2_a": 2}  # fmt: skip
_FILE_NAMES = {"lora_down.weight": "lora_down", "lora_up.weight": "lora_up"}  # file key → ModuleAdapter name
_KEY_NAMES = {v: k for k, v in _FILE_NAMES.items()}
_REQUIRED = {
    "loha": (("hada_w1_a",), ("hada_w1_b",), ("hada_w2_a",), ("hada_w2_b",)),
    "lokr": (("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a")),
    "lora": (("lora_down",), ("lora_up",)),
}
_PAIRS = {"lokr_w1_a": "lokr_w1_b", "lokr_w2_a": "lokr_w2_b", "hada_t1": "hada_t2", "lokr_t2": "lokr_w2_a",
          "lokr_w1_b": "lokr_w1_a", "lokr_w2_b": "lokr_w2_a", "hada_t2": "hada_t1"}  # fmt: skip
_EXCLUSIVE = (("lokr_w1", "lokr_w1_a"), ("lokr_w2", "lokr_w2_a"))


# -- reading ---------------------------------------------------------------------------------------
def read_safetensors(path: str | os.PathLike, allow_pickle: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an adapter file (pickle formats only with ``allow_pickle=True``)."""
    tensors = read_tensors(path, allow_pickle=allow_pickle)
    if str(path).endswith(PICKLE_SUFFIXES):
        return tensors, {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FormatError(f"{path}: not a readable safetensors file ({exc})") from None
    return tensors, metadata


def _check_tensor(source: str, key: str, param: str, t: torch.Tensor) -> None:
    if param == "alpha":
        if t.dtype == torch.bool or t.is_complex() or t.numel() != 1:
            raise FormatError(f"{source}: key {key!r} must be a single real number, got {t.dtype} {tuple(t.shape)}")
        if not math.isfinite(float(t.reshape(()).double())):
            raise FormatError(f"{source}: key {key!r} is not finite ({float(t.reshape(()).double())})")
        return
    if not t.dtype.is_floating_point:
        raise FormatError(f"{source}: key {key!r} has dtype {t.dtype}, expected a float tensor")
    want = _NDIM.get(param)
    low = 3 if param in CP_CORES else 2
    if (want is not None and t.dim() != want) or t.dim() < low or 0 in t.shape:
        shape = f"{want}" if want is not None else f"at least {low}"
        raise ShapeMismatchError(f"{source}: key {key!r} has shape {tuple(t.shape)}; {param} needs {shape} non-empty dims")


def _module(source: str, stem: str, params: dict[str, torch.Tensor]) -> ModuleAdapter:
    """One module's tensors → :class:`ModuleAdapter` (complete, consistent set; canonical layout)."""
    algos = {PARAM_ALGOS[p] for p in params} - {None}
    if len(algos) != 1:
        what = f"tensors of several algorithms {sorted(algos)}" if algos else "an alpha but no weights"
        raise FormatError(f"{source}: module {stem!r} has {what}")
    algo = algos.pop()
    tensors = {_FILE_NAMES.get(p, p): t for p, t in params.items() if p != "alpha"}
    for options in _REQUIRED[algo]:
        if not any(o in tensors for o in options):
            raise FormatError(f"{source}: module {stem!r} ({algo}) is missing {' or '.join(map(repr, options))}")
    for a, b in _PAIRS.items():
        if a in tensors and b not in tensors:
            raise FormatError(f"{source}: module {stem!r} has {a!r} without {b!r}")
    for a, b in _EXCLUSIVE:
        if a in tensors and b in tensors:
            raise FormatError(f"{source}: module {stem!r} has both {a!r} and {b!r}")
    if "lokr_w2_b" in tensors and "lokr_t2" not in tensors and tensors["lokr_w2_b"].dim() > 2:
        tensors["lokr_w2_b"] = tensors["lokr_w2_b"].flatten(1)  # (r, in_r, *k) as lycoris' weight_gen makes it
    alpha = float(params["alpha"].reshape(()).double()) if "alpha" in params else None
    return ModuleAdapter(algo, tensors, alpha)


def _keys_of(name: str, m: ModuleAdapter) -> list[str]:
    keys = [f"{name}.{_KEY_NAMES.get(p, p)}" for p in m.tensors]
    return keys + ([f"{name}.alpha"] if m.alpha is not None else [])


def _drop(source: str, dropped: list[tuple[str, str]], strict: bool, what: str) -> None:
    if not dropped:
        return
    if strict:
        listed = "\n  ".join(f"{k}  ({why})" for k, why in dropped[:50])
        more = f"\n  ... and {len(dropped) - 50} more" if len(dropped) > 50 else ""
        raise FormatError(
            f"{source}: {len(dropped)} key(s) {what}:\n  {listed}{more}\n"
            "Pass prefix=... to pick the keys meant for this model, or strict=False to load the rest."
        )
    warnings.warn(
        f"{source}: strict=False: dropped {len(dropped)} key(s) {what}: " + "; ".join(f"{k} ({w})" for k, w in dropped),
        stacklevel=4,
    )


def parse_state_dict(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
    source: str = "<state dict>",
    prefix: str | None = None,
    strict: bool = True,
) -> AdapterFile:
    """Group the keys of a LyCORIS/kohya state dict by module (no model needed): an unresolved
    :class:`AdapterFile` keyed by the file's key stems. Keys with an unknown prefix or parameter name are
    an error listing them (``strict=False``: warned about and dropped); ``prefix``: only keys starting
    with it belong to this adapter, the others are skipped with a warning listing them. ``dora_scale``
    keys are an error (DoRA is not supported yet)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    dropped: list[tuple[str, str]] = []
    elsewhere: list[tuple[str, str]] = []
    conventions: list[str] = []
    for key, t in tensors.items():
        split = split_key(key)
        if split is None:
            dropped.append((key, "unknown tensor name: not a LoHa/LoKr/LoRA parameter or alpha"))
            continue
        stem, param = split
        if param == "dora_scale":
            raise FormatError(f"{source}: key {key!r} is a DoRA 'dora_scale': DoRA is not supported yet")
        conv = match_convention(stem, prefix)
        if conv is None and prefix is not None:
            elsewhere.append((key, f"prefix is not {prefix!r}"))
            continue
        if conv is None:
            dropped.append((key, "unknown key prefix"))
            continue
        _check_tensor(source, key, param, t)
        groups.setdefault(stem, {})[param] = t
        conventions.append(conv.name)
    _drop(source, dropped, strict, "that lyco cannot use")
    _drop(source, elsewhere, False, "outside the requested prefix")
    modules = {stem: _module(source, stem, params) for stem, params in groups.items()}
    convention = "+".join(sorted(set(conventions))) or "unknown"
    return AdapterFile(modules, convention=convention, metadata=dict(metadata or {}), resolved=False)


def _canonical(m: ModuleAdapter, kernel: tuple[int, ...]) -> ModuleAdapter:
    """Layouts that need the layer: PEFT's Conv1d cores ``(r, r, k, 1)``, 1×1-conv ``lokr_w2 (o, i)``."""
    t = {p: v.reshape(core_from_peft(p, v.shape, len(kernel))) for p, v in m.tensors.items()}
    if "lokr_w2" in t and kernel and math.prod(kernel) == 1 and t["lokr_w2"].dim() == 2:
        t["lokr_w2"] = t["lokr_w2"].reshape(*t["lokr_w2"].shape, *kernel)
    return ModuleAdapter(m.algo, t, m.alpha, m.weight_shape)


def resolve_adapter_file(
    af: AdapterFile, model: nn.Module, prefix: str | None = None, strict: bool = True, source: str = "<adapter>"
) -> AdapterFile:
    """Key stems → module paths of ``model`` (a plain module or a LycoModel's ``.model``), with weight
    shapes, canonical layouts and shape checks.

    Ambiguous underscore paths, two stems naming one module and tensors that do not fit their layer are
    always errors; stems matching no module are an error listing their keys and the closest module names
    (``strict=False``: a warning listing every dropped key). The model is never modified.
    """
    from ..model import LycoModel

    if af.resolved:
        return af
    index = ModuleIndex(model.model if isinstance(model, LycoModel) else model)
    modules: dict[str, ModuleAdapter] = {}
    origin: dict[str, str] = {}
    dropped: list[tuple[str, str]] = []
    elsewhere: list[tuple[str, str]] = []
    for stem, m in af.modules.items():
        conv = match_convention(stem, prefix)
        if conv is None:  # only when ``prefix`` differs from the one used to parse
            elsewhere.extend((k, f"prefix is not {prefix!r}") for k in _keys_of(stem, m))
            continue
        path = stem[len(conv.prefix) :]
        found = index.candidates(conv, path)
        if len(found) > 1:
            raise FormatError(
                f"{source}: {stem!r} ({conv.name} convention) is ambiguous: it can name modules {found}; "
                "rename one of them or pass a model whose names are unambiguous"
            )
        if not found:
            hint = index.describe_missing(conv, path)
            dropped.extend((k, f"no module {path!r}; {hint}") for k in _keys_of(stem, m))
            continue
        name = found[0]
        if name in modules:
            raise FormatError(f"{source}: keys {origin[name]!r} and {stem!r} both name module {name!r}; pass prefix=...")
        spec = index.specs[name]
        modules[name] = _canonical(m, spec.kernel)
        modules[name].weight_shape = tuple(spec.weight_shape)
        origin[name] = stem
    _drop(source, elsewhere, False, "outside the requested prefix")
    _drop(source, dropped, strict, "that match no module of the model")
    order = {n: i for i, n in enumerate(index.specs)}
    modules = dict(sorted(modules.items(), key=lambda kv: order[kv[0]]))  # model order
    out = AdapterFile(modules, convention=af.convention, metadata=dict(af.metadata), config=af.config, resolved=True)
    check_shapes(out, source)
    return out


def read_lycoris_file(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    prefix: str | None = None,
    strict: bool = True,
    allow_pickle: bool = False,
) -> AdapterFile:
    """Read a LyCORIS/kohya/OneTrainer/ai-toolkit/diffusers-style single file into an :class:`AdapterFile`.

    Without ``model``, modules are keyed by the file's key stems (``resolved=False``); with it, by the
    module paths of ``model`` they resolve to, with shapes checked. ``convention`` says which key
    convention(s) the file used. Pickle files (``.pt``, ``.bin``, ``.ckpt``) need ``allow_pickle=True``.
    """
    source = str(path)
    tensors, metadata = read_safetensors(path, allow_pickle=allow_pickle)
    af = parse_state_dict(tensors, metadata, source, prefix=prefix, strict=strict)
    if model is not None:
        af = resolve_adapter_file(af, model, prefix=prefix, strict=strict, source=source)
    return af


# -- writing ---------------------------------------------------------------------------------------
def lycoris_state_dict(
    af: AdapterFile, style: str = "lycoris", prefix: str | None = None, component: str | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of ``af`` under ``style``'s keys, each module with a 0-dim float32 ``.alpha``
    (``r`` where none is stored; a full–full LoKr without alpha gets 1, which no reader uses)."""
    names = list(af.modules)
    comp = component if component is not None else infer_component(None, names)
    stems = module_keys(names, style, prefix=prefix, resolved=af.resolved, component=comp)
    out: dict[str, torch.Tensor] = {}
    for name, m in af.modules.items():
        stem = stems[name]
        for p, t in m.tensors.items():
            if style == "peft":
                t = t.reshape(core_to_peft(p, t.shape))  # PEFT's Conv1d core layout
            out[f"{stem}.{_KEY_NAMES.get(p, p)}"] = t.detach()
        alpha = m.alpha if m.alpha is not None else float(m.rank or 1)
        out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def write_lycoris_file(
    af: AdapterFile,
    path: str | os.PathLike,
    style: str = "lycoris",
    prefix: str | None = None,
    metadata: dict[str, str] | None = None,
    component: str | None = None,
) -> None:
    """Write ``af`` as one safetensors file, atomically (temp file + rename).

    ``style``: ``lycoris`` (``lycoris_<path with _>``, lycoris-lora's wrapper), ``kohya`` (``lora_unet_`` /
    ``lora_te_`` …, by ``component`` or pipeline-level names), ``peft`` (``base_model.model.<path>``) or
    ``diffusers`` (``transformer.`` / ``unet.`` / ``text_encoder.`` + dotted path). ``prefix`` overrides
    the style's prefix. Metadata: the source file's, kohya's ``ss_network_*`` recomputed, then ``metadata``.
    """
    if str(path).endswith(PICKLE_SUFFIXES):
        raise FormatError(f"{path}: lyco writes LyCORIS files as .safetensors only")
    if not af.modules:
        raise FormatError(f"{path}: the adapter has no modules to write")
    tensors = lycoris_state_dict(af, style=style, prefix=prefix, component=component)
    write_tensors(path, tensors, merge_metadata(af.metadata, network_metadata(af), metadata))


# -- models ----------------------------------------------------------------------------------------
def save_lycoris(
    model: LycoModel,
    path: str | os.PathLike,
    adapter_name: str = "default",
    prefix: str | None = None,
    metadata: dict[str, str] | None = None,
    style: str = "lycoris",
) -> None:
    """Save one adapter of ``model`` as a LyCORIS/kohya file (see :func:`write_lycoris_file` for ``style``).

    A LoKr module with both factors full and ``alpha ≠ r`` is written with ``alpha / r`` folded into
    ``lokr_w1`` (files apply scale 1 there), so every reader computes the same output.
    """
    af = adapter_file_from_model(model, adapter_name)
    component = infer_component(model.model, list(af.modules))
    write_lycoris_file(af, path, style=style, prefix=prefix, metadata=metadata, component=component)


def load_lycoris(
    base_module: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    prefix: str | None = None,
    strict: bool = True,
    allow_pickle: bool = False,
    is_trainable: bool = False,
) -> LycoModel:
    """Wrap ``base_module`` with the adapter stored in a LyCORIS/kohya file (any key convention of
    :mod:`lyco.formats.keys`). On any error the module is left untouched.

    ``prefix``: use only keys starting with it (e.g. ``"lora_te1_"``), resolved against ``base_module``.
    ``strict=False``: keys matching no module are dropped with a warning listing them. A
    :class:`LycoModel` given as ``base_module`` gets the adapter added (:func:`load_lycoris_into`).
    """
    from ..model import LycoModel

    if isinstance(base_module, LycoModel):
        load_lycoris_into(base_module, path, adapter_name, prefix, strict, allow_pickle, is_trainable)
        return base_module
    af = read_lycoris_file(path, model=base_module, prefix=prefix, strict=strict, allow_pickle=allow_pickle)
    _check_nonempty(af, path)
    return model_from_adapter_file(base_module, af, adapter_name, is_trainable=is_trainable, source=str(path))


def load_lycoris_into(
    model: LycoModel,
    path: str | os.PathLike,
    adapter_name: str = "default",
    prefix: str | None = None,
    strict: bool = True,
    allow_pickle: bool = False,
    is_trainable: bool = False,
) -> None:
    """Add the adapter stored in a LyCORIS/kohya file to an existing :class:`LycoModel` (all or nothing)."""
    af = read_lycoris_file(path, model=model.model, prefix=prefix, strict=strict, allow_pickle=allow_pickle)
    _check_nonempty(af, path)
    add_adapter_file(model, af, adapter_name, is_trainable=is_trainable, source=str(path))


def _check_nonempty(af: AdapterFile, path: str | os.PathLike) -> None:
    if not af.modules:
        raise FormatError(f"{path}: no module of the file matches the model")
