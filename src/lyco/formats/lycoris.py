"""LyCORIS / kohya single-file adapters: ``<prefix><module path>.<param>`` keys in one safetensors file.

Per module: its method's tensors (LoHa ``hada_w1_a`` …, LoKr ``lokr_w1`` …, plain LoRA
``lora_down.weight`` …: each method declares its keys, :mod:`lyco.methods.schema`) and a 0-dim ``.alpha``;
file metadata ``ss_network_*`` (:mod:`lyco.formats.metadata`). Key conventions: :mod:`lyco.formats.keys`;
name resolution: :mod:`lyco.formats.names`. Every split, factor, full-matrix, decompose-both and CP choice is
read from the tensor shapes, never from metadata.

Layers of this module: :func:`parse_state_dict` (tensors → unresolved :class:`AdapterFile`, no model),
:func:`resolve_adapter_file` (against a model's module names), :func:`read_lycoris_file` /
:func:`write_lycoris_file` (files). Models load and save through :mod:`lyco.lycoris_files`.
"""

from __future__ import annotations

import json
import math
import os
import warnings

import torch
from torch import nn

from ..errors import FormatError
from ..methods.config import pattern_value
from ..methods.registry import file_keys
from .adapterfile import AdapterFile, ModuleAdapter
from .fused import Regrouped, fuse, fused_view, regroup_under
from .io import PICKLE_SUFFIXES, as_path, read_metadata, read_tensors, warn_nonfinite, write_tensors
from .keys import EXTRA_KEYS, UNSUPPORTED_KEYS, infer_component, match_convention, module_keys, split_key
from .metadata import SDXL, base_model_version, file_metadata
from .names import ModuleTable
from .sgm import sgm_names, unet_roots
from .textnames import clip_text_names


# -- reading ---------------------------------------------------------------------------------------
def _check_alpha(source: str, key: str, t: torch.Tensor) -> None:
    if t.dtype == torch.bool or t.is_complex() or t.numel() != 1:
        raise FormatError(f"{source}: key {key!r} must be a single real number, got {t.dtype} {tuple(t.shape)}")
    if not math.isfinite(float(t.reshape(()).double())):
        raise FormatError(f"{source}: key {key!r} is not finite ({float(t.reshape(()).double())})")


def _module(source: str, stem: str, params: dict[str, torch.Tensor]) -> ModuleAdapter:
    """One module's tensors (by file key) → :class:`ModuleAdapter` of its method (complete, consistent set;
    canonical layout)."""
    keys = file_keys()
    methods = {keys[k][0] for k in params if k in keys and keys[k][0].tensor_params()[keys[k][1]].identifies}
    if len(methods) != 1:
        algos = sorted(m.algo for m in methods)
        what = f"tensors of several algorithms {algos}" if methods else "an alpha but no weights"
        raise FormatError(f"{source}: module {stem!r} has {what}")
    method = methods.pop()
    by_key = method.file_names()  # its file keys, and its tensors' PEFT names (diffusers' own files)
    foreign = sorted(k for k in params if k not in by_key and k not in EXTRA_KEYS)
    if foreign:
        raise FormatError(f"{source}: module {stem!r} ({method.algo}) also has {foreign}, which {method.display()} has not")
    tensors = {by_key[k]: t for k, t in params.items() if k in by_key}
    if len(tensors) < sum(k in by_key for k in params):  # lora_down.weight and lora_A.weight both
        twice = sorted(k for k in params if k in by_key and sum(by_key[j] == by_key[k] for j in params if j in by_key) > 1)
        raise FormatError(f"{source}: module {stem!r} holds the same tensor under two names {twice}; keep one")
    method.check_module(set(tensors), f"{source}: module {stem!r}")
    alpha = float(params["alpha"].reshape(()).double()) if "alpha" in params else None
    if alpha == 0:  # kohya and lycoris-lora read a stored 0 as alpha = r; ComfyUI and AUTOMATIC1111 as scale 0
        warnings.warn(
            f"{source}: {stem}.alpha is 0, which consumers read differently (kohya, lycoris-lora: alpha = r, "
            "scale 1; ComfyUI, AUTOMATIC1111: scale 0); lyco reads it as alpha = r, as the trainers mean it",
            stacklevel=4,
        )
        alpha = None
    return ModuleAdapter(method.algo, method.canonical(tensors), alpha)


def _keys_of(name: str, m: ModuleAdapter) -> list[str]:
    return [f"{name}.{tail}" for tail in m.key_tails()]


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
    with it belong to this adapter, the others are skipped with a warning listing them. Keys lyco knows
    but cannot use (``dora_scale``) are an error."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    dropped: list[tuple[str, str]] = []
    elsewhere: list[tuple[str, str]] = []
    conventions: list[str] = []
    keys = file_keys()
    for key, t in tensors.items():
        split = split_key(key)
        if split is None:
            dropped.append((key, "unknown tensor name: not a tensor of a registered method, nor alpha"))
            continue
        stem, param = split
        if param in UNSUPPORTED_KEYS:
            raise FormatError(f"{source}: key {key!r} is {UNSUPPORTED_KEYS[param]}")
        conv = match_convention(stem, prefix)
        if conv is None and prefix is None and PEFT_METADATA in (metadata or {}):
            conv = match_convention(stem, "")  # diffusers' save_lora_adapter: bare module paths and a PEFT header
        if conv is None and prefix is not None:
            elsewhere.append((key, f"prefix is not {prefix!r}"))
            continue
        if conv is None:
            dropped.append((key, "unknown key prefix"))
            continue
        if param in EXTRA_KEYS:
            _check_alpha(source, key, t)
        else:
            method, name = keys[param]
            method.tensor_params()[name].check(t, f"{source}: key {key!r}")
            warn_nonfinite(t, f"{source}: key {key!r}")
        groups.setdefault(stem, {})[param] = t
        conventions.append(conv.name)
    _drop(source, dropped, strict, "that lyco cannot use")
    _drop(source, elsewhere, False, "outside the requested prefix")
    modules = {stem: _module(source, stem, params) for stem, params in groups.items()}
    modules = _peft_scales(modules, metadata or {}, source)
    convention = "+".join(sorted(set(conventions))) or "unknown"
    return AdapterFile(modules, convention=convention, metadata=dict(metadata or {}), resolved=False)


PEFT_METADATA = "lora_adapter_metadata"  # diffusers' header: the PEFT config(s) of a file without .alpha keys


def _peft_scales(modules: dict[str, ModuleAdapter], metadata: dict[str, str], source: str) -> dict[str, ModuleAdapter]:
    """Modules without a stored alpha take PEFT's scale from diffusers' ``lora_adapter_metadata`` header (the PEFT
    config diffusers' ``save_lora_weights`` / ``save_lora_adapter`` write instead of ``.alpha`` keys; pipeline
    files prefix its fields with the component, ``transformer.r``): ``alpha / r`` (``alpha / √r`` with
    ``use_rslora``) by PEFT's ``rank_pattern`` / ``alpha_pattern`` rule, as alpha for ranked modules and folded
    into the tensors of a LoKr with both factors full (PEFT scales those too)."""
    raw = metadata.get(PEFT_METADATA)
    if not raw or all(m.alpha is not None for m in modules.values()):
        return modules
    try:
        data = json.loads(raw)
    except ValueError:
        warnings.warn(f"{source}: {PEFT_METADATA} is not JSON; modules without alpha get scale 1", stacklevel=3)
        return modules
    if not isinstance(data, dict):
        return modules
    configs: dict[str, dict] = {}  # "" or "transformer." → the PEFT config's fields
    for key, value in data.items():
        head, dot, name = str(key).rpartition(".")
        configs.setdefault(f"{head}." if dot else "", {})[name if dot else str(key)] = value
    longest_first = sorted(configs, key=len, reverse=True)
    out = dict(modules)
    for stem, m in modules.items():
        prefix = next((p for p in longest_first if stem.startswith(p)), None)
        if m.alpha is not None or prefix is None:
            continue
        cfg, path = configs[prefix], stem[len(prefix) :]
        r = pattern_value(cfg.get("rank_pattern") or {}, path, cfg.get("r", 8))
        alpha = pattern_value(cfg.get("alpha_pattern") or {}, path, cfg.get("alpha", cfg.get("lora_alpha", r)))
        try:
            scale = float(alpha) / (math.sqrt(float(r)) if cfg.get("use_rslora") else float(r))
        except (TypeError, ValueError, ZeroDivisionError):
            raise FormatError(f"{source}: {PEFT_METADATA} gives module {stem!r} r={r!r}, alpha={alpha!r}") from None
        if m.unranked:
            out[stem] = ModuleAdapter(m.algo, m.method.fold_scale(m.tensors, scale), None, m.weight_shape)
        else:
            out[stem] = ModuleAdapter(m.algo, m.tensors, scale * float(m.rank), m.weight_shape)
    return out


def resolve_adapter_file(
    af: AdapterFile,
    model: nn.Module | ModuleTable,
    prefix: str | None = None,
    strict: bool = True,
    source: str = "<adapter>",
) -> AdapterFile:
    """Key stems → module paths of ``model`` (a module tree — plain, or with lyco's or PEFT's wrappers — or a
    :class:`ModuleTable`), with weight shapes, canonical layouts and shape checks.

    Ambiguous underscore paths, two stems naming one module and tensors that do not fit their layer are
    always errors; stems matching no module are an error listing their keys and the closest module names
    (``strict=False``: a warning listing every dropped key). The model is never modified.
    """
    if af.resolved:
        return af
    table = model if isinstance(model, ModuleTable) else ModuleTable.from_module(model)
    res = table.resolve(af.modules, prefix=prefix, what=source)
    elsewhere = [(k, f"prefix is not {prefix!r}") for stem in res.outside for k in _keys_of(stem, af.modules[stem])]
    dropped = [(k, why) for stem, why in res.missing.items() for k in _keys_of(stem, af.modules[stem])]
    _drop(source, elsewhere, False, "outside the requested prefix")
    _drop(source, dropped, strict, "that match no module of the model")
    order = {n: i for i, n in enumerate(table.shapes)}
    modules: dict[str, ModuleAdapter] = {}
    for stem, name in sorted(res.found.items(), key=lambda kv: order[kv[1]]):  # model order
        m = af.modules[stem]
        modules[name] = ModuleAdapter(m.algo, m.method.canonical(m.tensors, table.kernel(name)), m.alpha, table.shapes[name])
    out = AdapterFile(modules, convention=af.convention, metadata=dict(af.metadata), config=af.config, resolved=True)
    out.check_shapes(source)
    return out


def read_lycoris_file(
    path: str | os.PathLike,
    model: nn.Module | ModuleTable | None = None,
    prefix: str | None = None,
    strict: bool = True,
    allow_pickle: bool = False,
) -> AdapterFile:
    """Read a LyCORIS/kohya/OneTrainer/ai-toolkit/diffusers-style single file into an :class:`AdapterFile`.

    Without ``model``, modules are keyed by the file's key stems (``resolved=False``); with it, by the
    module paths of ``model`` they resolve to, with shapes checked. ``convention`` says which key
    convention(s) the file used. Pickle files (``.pt``, ``.bin``, ``.ckpt``) need ``allow_pickle=True``.
    """
    source = str(as_path(path))
    tensors, metadata = read_tensors(path, allow_pickle=allow_pickle), read_metadata(path)
    af = parse_state_dict(tensors, metadata, source, prefix=prefix, strict=strict)
    if model is not None:
        af = resolve_adapter_file(af, model, prefix=prefix, strict=strict, source=source)
    return af


# -- writing ---------------------------------------------------------------------------------------
def lycoris_state_dict(
    af: AdapterFile,
    style: str = "lycoris",
    prefix: str | None = None,
    component: str | None = None,
    text_encoders: dict[str, str] | None = None,
    fold_scale: bool = False,
) -> dict[str, torch.Tensor]:
    """The tensors of ``af`` under ``style``'s keys, each module with a 0-dim float32 ``.alpha`` unless its
    method stores none (Full) or the file is in diffusers' own layout (style ``diffusers`` with its component
    prefixes) or the original checkpoint's (style ``original``): diffusers' loaders of those layouts take alpha = r
    and PEFT's tensor names (``lora_A.weight``), so the scale is folded into the tensors (``r`` where none is stored; a module without rank gets its method's ``unranked_alpha``, read as scale 1 by every reader). A stored alpha
    is never 0 (kohya and lycoris-lora read 0 as r, ComfyUI and AUTOMATIC1111 as 0): a module of scale 0 is
    written with its tensors scaled by 0 and ``alpha = r``, which every reader applies alike. ``fold_scale``: every
    module with its scale folded into the tensors and no ``.alpha`` (every reader scales such a module by 1;
    AUTOMATIC1111's SD3 loader takes no other file)."""
    names = list(af.modules)
    comp = component if component is not None else infer_component(None, names)
    stems = module_keys(names, style, prefix=prefix, resolved=af.resolved, component=comp, text_encoders=text_encoders)
    # diffusers' own layout (its component prefixes) and the original checkpoint's (ai-toolkit's, ComfyUI's native
    # keys): PEFT's tensor names, the scale folded, no .alpha, as diffusers' loaders of those layouts want them
    peft_names = (style == "diffusers" and prefix is None) or style == "original"
    baked = peft_names or fold_scale
    out: dict[str, torch.Tensor] = {}
    for name, m in af.modules.items():
        stem = stems[name]
        if m.alpha == 0 and m.rank is not None:  # scale 0: never store 0, which consumers read differently
            m = m.with_scale_folded(0.0, float(m.rank))
        if baked:  # diffusers' own layout has no .alpha (its loaders take alpha = r): the scale is in the tensors
            m = m.with_scale_folded(m.scale(), None)  # type: ignore[arg-type]
        params = m.method.tensor_params()
        tensors = m.method.peft_layout(m.tensors) if style == "peft" else m.tensors  # PEFT's Conv1d core layout
        for p, t in tensors.items():
            # diffusers' own layout names a method's tensors as PEFT does (lora_A.weight: diffusers' loaders read
            # no lora_down there); DoRA's magnitude stays dora_scale (the layout ComfyUI reads)
            key = params[p].peft_name if peft_names and params[p].identifies else params[p].file_key
            out[f"{stem}.{key}"] = t.detach()
        if m.method.stores_alpha and not baked:
            # a module without rank: every reader scales it by 1; its method picks the alpha no reader misreads
            alpha = m.method.unranked_alpha(m.shapes()) if m.rank is None else m.alpha if m.alpha is not None else float(m.rank)
            out[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def write_lycoris_file(
    af: AdapterFile,
    path: str | os.PathLike,
    style: str = "lycoris",
    prefix: str | None = None,
    metadata: dict[str, str] | None = None,
    component: str | None = None,
    text_encoders: dict[str, str] | None = None,
    fold_scale: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Write ``af`` as one safetensors file, atomically (temp file + rename); returns the tensors and header written
    (:func:`parse_state_dict` reads them as a reader of the file would, without reading it back).

    ``style``: ``lycoris`` (``lycoris_<path with _>``, lycoris-lora's wrapper), ``kohya`` (``lora_unet_`` /
    ``lora_te_`` …, by ``component`` or pipeline-level names; ``text_encoders``: the kohya slots of the model's text
    encoders, :func:`lyco.formats.keys.kohya_text_encoders`), ``peft`` (``base_model.model.<path>``), ``diffusers``
    (``transformer.`` / ``unet.`` / ``text_encoder.`` + dotted path) or ``original`` (``diffusion_model.`` + the
    dotted path: the original checkpoint's names once :func:`style_layout` has renamed the modules; ComfyUI's native
    keys, ai-toolkit's layout). ``prefix`` overrides the style's prefix; ``fold_scale``: no ``.alpha`` keys, the
    scale in the tensors (:func:`lycoris_state_dict`). Metadata: :func:`lyco.formats.metadata.file_metadata` (the adapter's own values,
    the missing ``ss_network_*`` computed, then ``metadata``).
    """
    if str(as_path(path)).endswith(PICKLE_SUFFIXES):
        raise FormatError(f"{path}: lyco writes LyCORIS files as .safetensors only")
    if not af.modules:
        raise FormatError(f"{path}: the adapter has no modules to write")
    tensors = lycoris_state_dict(af, style=style, prefix=prefix, component=component, text_encoders=text_encoders,
                                 fold_scale=fold_scale)  # fmt: skip
    header = file_metadata(af, metadata)
    write_tensors(path, tensors, header)
    return tensors, header


def style_layout(af: AdapterFile, model: nn.Module, style: str, base: dict[str, torch.Tensor] | None = None) -> Regrouped:
    """``af`` (keyed by ``model``'s module paths) in the module layout ``style`` writes for ``model``'s family.

    ``kohya``: what sd-scripts writes — SDXL's original SGM names (:mod:`lyco.formats.sgm`; SD1/SD2 keep diffusers'
    names, as sd-scripts does), the fused original layouts of Flux.1, Flux.2, SD3 and Z-Image
    (:func:`lyco.formats.fused.fuse`; a pipeline-like container's transformer under ``transformer.``), CLIP text
    models with ``text_model.`` (:mod:`lyco.formats.textnames`). ``original``: the original checkpoint's own names
    (ComfyUI's native ``diffusion_model.`` keys, ai-toolkit's and diffusers' BFL layout) — SGM/LDM names for every
    diffusers UNet, the same fused layouts. Other styles and models: unchanged. ``base``: the base weights an
    input-axis DoRA cut needs. The notes name the modules written as Full deltas."""
    if style not in ("kohya", "original"):
        return Regrouped(af, [])
    names = [name for name, _ in model.named_modules()]
    if style == "kohya":  # a transformers-5 CLIP text model: the names with text_model. that every SD-family file has
        af = af.renamed(clip_text_names(names))
    if (style == "kohya" and base_model_version(model) == SDXL) or (style == "original" and unet_roots(names)):
        return Regrouped(af.renamed(sgm_names(names)), [])
    view = fused_view(model)
    if view is None:
        return Regrouped(af, [])
    shapes = ModuleTable.from_module(view.transformer)
    inner_base = {n[len(view.at) :]: t for n, t in (base or {}).items() if n.startswith(view.at)}
    return regroup_under(af, view.at, lambda part: fuse(part, shapes, view.table, base=inner_base))
