"""LyCORIS / kohya single files ↔ :class:`~lyco.LycoModel`: :func:`save_lycoris`, :func:`load_lycoris`,
:func:`load_lycoris_into`.

Files are read and written by :mod:`lyco.formats.lycoris` (through an :class:`AdapterFile`); this module
only turns a model's adapter into one (:func:`adapter_file`) and builds adapters from one, with shape plans
from the tensors (:func:`lyco.formats.peft_config.fit_config`) and the model's one rollback
(:meth:`LycoModel.from_adapter_tensors` / :meth:`LycoModel.load_adapter_tensors`).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable

import torch
from torch import nn

from .errors import ArgumentError, FormatError
from .formats.adapterfile import AdapterFile, ModuleAdapter
from .formats.consumers import consumer_warnings, default_style, diffusion_model
from .formats.fused import fused_side, fused_view, regroup_under, split
from .formats.keys import infer_component, kohya_text_encoders
from .formats.lycoris import (
    parse_state_dict,
    read_lycoris_file,
    resolve_adapter_file,
    style_layout,
    write_lycoris_file,
)
from .formats.metadata import base_model_metadata
from .formats.names import ModuleTable
from .formats.peft_config import ConfigFit, fit_config
from .layer import AdaptedLayer
from .methods.config import config_parts
from .model import LycoModel
from .ops.layerops import from_canonical, layer_spec
from .targeting import find_targets
from .tree import wrapper_internals


def adapter_file(model: LycoModel, adapter_name: str = "default") -> AdapterFile:
    """One adapter of ``model`` as an :class:`AdapterFile` (module paths, canonical tensors). A module
    without a rank in files (LoKr with both factors full), which the model scales by ``alpha / r``, has
    that factor folded into its tensors and ``alpha = r`` (files scale it by 1)."""
    if not isinstance(model, LycoModel):
        raise ArgumentError(f"a LycoModel's adapter is saved, got {type(model).__name__} (wrap it with lyco.get_model)")
    if adapter_name not in model.peft_config:
        raise FormatError(f"no adapter named {adapter_name!r} (adapters: {list(model.peft_config)})")
    config = model.peft_config[adapter_name]
    if config.modules_to_save:
        raise FormatError(
            f"adapter {adapter_name!r} has modules_to_save, which a LyCORIS file cannot hold; use save_pretrained"
        )
    return layers_file(model.adapted_layers(), adapter_name)


def layers_file(layers: Iterable[tuple[str, AdaptedLayer]], adapter_name: str = "default") -> AdapterFile:
    """The adapter ``adapter_name`` of ``(module path, AdaptedLayer)`` pairs as an :class:`AdapterFile` (see
    :func:`adapter_file`; layers without that adapter are skipped)."""
    modules: dict[str, ModuleAdapter] = {}
    for lname, layer in layers:
        if adapter_name not in layer.lyco_adapters:
            continue
        adapter = layer.lyco_adapters[adapter_name]
        if adapter.is_meta:
            raise FormatError(f"adapter {adapter_name!r} on {lname!r} has weights on the meta device; load them first")
        tensors = adapter.file_tensors()
        alpha = adapter.base_scaling * adapter.r  # files scale by alpha / r (e.g. rank-stabilised LoRA: alpha·√r)
        module = ModuleAdapter(adapter.algo, tensors, alpha, tuple(layer.spec.weight_shape))
        if module.unranked:  # files scale such a module by 1
            module = module.with_scale_folded(adapter.base_scaling, float(adapter.r))
        modules[lname] = module
    return AdapterFile(modules, convention="lyco")


def save_lycoris(
    model: LycoModel,
    path: str | os.PathLike,
    adapter_name: str = "default",
    prefix: str | None = None,
    metadata: dict[str, str] | None = None,
    style: str | None = None,
    consumer_safe: bool = False,
    fold_scale: bool = False,
) -> None:
    """Save one adapter of ``model`` as a LyCORIS/kohya file (see :func:`lyco.formats.write_lycoris_file`
    for ``style``). Default style: what the model family's consumers read (:func:`lyco.formats.consumers.default_style`:
    ``kohya`` for diffusers models — ComfyUI, AUTOMATIC1111/Forge, sd-scripts, diffusers all map it; SDXL UNets get
    kohya's original SGM names, Flux.1 / Flux.2 / SD3 its fused original layouts — else ``lycoris``).

    A LoKr module with both factors full and ``alpha ≠ r`` is written with ``alpha / r`` folded into
    ``lokr_w1`` (files apply scale 1 there), so every reader computes the same output. For a diffusers
    SD1/SD2/SDXL UNet or Flux.1 transformer the header says which (kohya's ``ss_base_model_version`` and
    ``ss_v2``: AUTOMATIC1111 lists a file for a checkpoint of that family by them); ``metadata`` overrides.
    For diffusers models a ``UserWarning`` names what a known consumer would not apply as lyco does
    (:func:`lyco.formats.consumers.consumer_warnings`: style ``lycoris`` in AUTOMATIC1111, output-axis DoRA in
    ComfyUI, Forge and AUTOMATIC1111, LoKr CP cores in ComfyUI, and what the file's own report finds a consumer of
    its layout dropping, e.g. diffusers' kohya Flux converter and its top-level modules). ``consumer_safe=True``
    writes every module in a layout those consumers apply, where one exists with the same ΔW (a LoKr CP core becomes
    a plain low-rank ``w2``); the file then reloads as that layout. ``fold_scale=True``: the scale folded into the
    tensors and no ``.alpha`` keys — the one file AUTOMATIC1111's SD3 loader takes (a LoRA), which ComfyUI, Forge
    and diffusers read as well but kohya sd-scripts' Flux / SD3 loaders and lycoris-lora refuse.
    """
    af = adapter_file(model, adapter_name)
    style = default_style(model.model) if style is None else style
    if consumer_safe:  # the same ΔW in layouts that no checked consumer mishandles
        af = af.in_consumer_layout()
    component = infer_component(model.model, list(af.modules))
    if style in ("kohya", "original"):  # the family's original names / fused layouts (SDXL: SGM; Flux.1, Flux.2, SD3)
        af, notes = style_layout(af, model.model, style, base=_base_weights(model.model, af))
        if notes:
            warnings.warn(f"{path}: the original fused layout holds these modules as Full deltas (exact):\n  "
                          + "\n  ".join(notes), stacklevel=2)  # fmt: skip
    metadata = {**base_model_metadata(model.model), **(metadata or {})}  # the user's values win
    tensors, header = write_lycoris_file(af, path, style=style, prefix=prefix, metadata=metadata, component=component,
                                         text_encoders=kohya_text_encoders(model.model), fold_scale=fold_scale)  # fmt: skip
    if not diffusion_model(model.model):
        return
    as_read = parse_state_dict(dict(sorted(tensors.items())), header, source=str(path), prefix=prefix)  # key order: safetensors'
    if shortfalls := consumer_warnings(af, style, as_read):
        warnings.warn(f"{path}: written; known consumer shortfalls:\n  " + "\n  ".join(shortfalls), stacklevel=2)


def fit_file(root: nn.Module, af: AdapterFile, skip: set[str]) -> ConfigFit:
    """The config and plans that rebuild ``af`` on ``root``; ``target_modules`` selects exactly its modules
    (a regex when the list's suffix rule would also pick other modules)."""
    fit = fit_config(af, {n: tuple(m.weight_shape) for n, m in af.modules.items()})  # type: ignore[arg-type]
    for config in config_parts(fit.config):
        names = list(config.target_modules)  # type: ignore[arg-type]
        if set(find_targets(root, config, skip)) != set(names):
            config.target_modules = "(?:" + "|".join(re.escape(n) for n in names) + ")"
    return fit


def _base_weights(root: nn.Module, af: AdapterFile) -> dict[str, torch.Tensor]:
    """The canonical base weights of ``af``'s layers in ``root`` (an input-axis DoRA cut needs them)."""
    out = {}
    for name in af.modules:
        module = root.get_submodule(name)
        layer = module.base_layer if isinstance(module, AdaptedLayer) else module
        spec = layer_spec(layer)
        if spec is not None:
            out[name] = from_canonical(spec, layer.weight.detach())  # a transpose (Conv1D) or nothing: its own inverse
    return out


def _read(path: str | os.PathLike, root: nn.Module, prefix: str | None, strict: bool, allow_pickle: bool) -> AdapterFile:
    table = ModuleTable.from_module(root)
    view = fused_view(root)
    inner = None if view is None else table if view.at == "" else ModuleTable.from_module(view.transformer)
    side = fused_side(inner, view.table) if view is not None and inner is not None else None
    if view is None or inner is None or side is None:
        af = read_lycoris_file(path, model=table, prefix=prefix, strict=strict, allow_pickle=allow_pickle)
    else:  # a split model (diffusers Flux, SD3…): a file in the original fused layout (kohya names) is split onto it
        at = view.at
        others = {n: t for n, t in table.others.items() if not n.startswith(at)}
        fused = ModuleTable({**{n: s for n, s in table.shapes.items() if not n.startswith(at)},
                             **{at + n: s for n, s in side.shapes.items()}}, others, source=side.source)  # fmt: skip
        raw = read_lycoris_file(path, prefix=prefix, strict=strict, allow_pickle=allow_pickle)
        as_split, as_fused = table.resolve(raw.modules, prefix), fused.resolve(raw.modules, prefix)
        if len(as_fused.found) > len(as_split.found):
            whole = resolve_adapter_file(raw, fused, prefix, strict, str(path))
            af, notes = regroup_under(whole, at, lambda part: split(part, inner, view.table))
            if notes:
                warnings.warn(f"{path}: split onto the model as Full deltas (exact):\n  " + "\n  ".join(notes),
                              stacklevel=3)  # fmt: skip
        else:
            af = resolve_adapter_file(raw, table, prefix, strict, str(path))
    if not af.modules:
        raise FormatError(f"{path}: no module of the file matches the model")
    return af


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
    if isinstance(base_module, LycoModel):
        load_lycoris_into(base_module, path, adapter_name, prefix, strict, allow_pickle, is_trainable)
        return base_module
    af = _read(path, base_module, prefix, strict, allow_pickle)
    fit = fit_file(base_module, af, set())
    return LycoModel.from_adapter_tensors(
        base_module, fit.config, af.tensors(), adapter_name, plans=fit.plans, is_trainable=is_trainable, source=str(path)
    )


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
    if not isinstance(model, LycoModel):
        raise ArgumentError(f"load_lycoris_into adds to a LycoModel, got {type(model).__name__} (use load_lycoris)")
    af = _read(path, model.model, prefix, strict, allow_pickle)
    fit = fit_file(model.model, af, wrapper_internals(model.model))
    model.load_adapter_tensors(
        adapter_name, fit.config, af.tensors(), plans=fit.plans, is_trainable=is_trainable, source=str(path)
    )
