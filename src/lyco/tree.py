"""Adapter tensors ↔ any ``nn.Module`` tree: find the wrappers, collect an adapter's tensors, load them back
(everything checked first, then all assigned), and infer shape plans from them.

Keys are ``<module path>.<param>``: an adapted layer's path and its adapter's parameter name
(``layers.0.q_proj.lokr_w1``), or a ``modules_to_save`` wrapper's path and a key of the adapter's copy
(``classifier.weight``), tensors in lyco's canonical layouts. File formats add their own prefixes and
layouts (:mod:`lyco.formats`); :class:`~lyco.LycoModel` calls down into these functions (the idea of
PEFT's ``get_peft_model_state_dict`` / ``set_peft_model_state_dict``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .errors import FormatError, ShapeMismatchError, TargetError
from .layer import AdaptedLayer
from .methods.config import AdapterConfig, MixedConfig, pattern_value
from .methods.registry import adapter_class_for
from .modules_to_save import ModulesToSaveWrapper
from .ops.layerops import layer_spec
from .targeting import assign_targets


def adapted_layers(root: nn.Module) -> Iterator[tuple[str, AdaptedLayer]]:
    """``(module name, AdaptedLayer)`` for every wrapped layer under ``root``."""
    for name, module in root.named_modules():
        if isinstance(module, AdaptedLayer):
            yield name, module


def saved_modules(root: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    """``(module name, ModulesToSaveWrapper)`` for every ``modules_to_save`` wrapper under ``root``."""
    for name, module in root.named_modules():
        if isinstance(module, ModulesToSaveWrapper):
            yield name, module


def wrapper_internals(root: nn.Module) -> set[str]:
    """Names of the wrappers' own children (never adapter targets themselves)."""
    names: set[str] = set()
    for n, module in root.named_modules():
        if isinstance(module, AdaptedLayer):
            names |= {f"{n}.base_layer", f"{n}.lyco_adapters"}
        elif isinstance(module, ModulesToSaveWrapper):
            names |= {f"{n}.original_module", f"{n}.modules_to_save"}
    return names


def adapter_tensors(root: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """Every tensor of one adapter (layer adapters and ``modules_to_save`` copies), detached."""
    out: dict[str, torch.Tensor] = {}
    for lname, layer in adapted_layers(root):
        if adapter_name in layer.lyco_adapters:
            for pname, t in layer.lyco_adapters[adapter_name].file_tensors().items():
                out[f"{lname}.{pname}"] = t
    for wname, wrapper in saved_modules(root):
        if adapter_name in wrapper.modules_to_save:
            for k, v in wrapper.modules_to_save[adapter_name].state_dict().items():
                out[f"{wname}.{k}"] = v.detach()
    return out


def load_adapter_tensors(
    root: nn.Module,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    source: str,
    show: Callable[[str], str | None] = str,
) -> None:
    """Put ``tensors[adapter name][key]`` into the adapters of ``root``, all or nothing.

    Every key an adapter has must be present with the same shape and a float dtype, and every given key
    must be used; otherwise :class:`FormatError` / :class:`ShapeMismatchError` names ``source`` and the key
    (``show(key)``: how the file spells it) and nothing is changed. Weights still on the meta device
    (``low_cpu_mem_usage=True``) are replaced by the loaded ones on the base layer's device; others are
    copied into in place (parameter objects, and an optimizer's references to them, stay the same).
    """
    assign: list[tuple[nn.Module, str, torch.Tensor, torch.device]] = []
    states: list[tuple[nn.Module, dict[str, torch.Tensor]]] = []
    for adapter_name, given in tensors.items():
        used: set[str] = set()
        for lname, layer in adapted_layers(root):
            if adapter_name not in layer.lyco_adapters:
                continue
            adapter = layer.lyco_adapters[adapter_name]
            for pname, p in adapter.file_params().items():
                key = f"{lname}.{pname}"
                t = _checked(given, key, tuple(p.shape), source, show, f"module {lname!r}")
                assign.append((adapter, pname, t, layer.base_layer.weight.device))
                used.add(key)
        for wname, wrapper in saved_modules(root):
            if adapter_name not in wrapper.modules_to_save:
                continue
            clone = wrapper.modules_to_save[adapter_name]
            state = {}
            for k, v in clone.state_dict().items():
                key = f"{wname}.{k}"
                state[k] = _checked(given, key, tuple(v.shape), source, show, "modules_to_save", floats=False)
                used.add(key)
            states.append((clone, state))
        unused = sorted(set(given) - used)
        if unused:
            shown = [show(k) for k in unused[:8]]
            raise FormatError(f"{source}: {len(unused)} key(s) match no adapted module of adapter {adapter_name!r}: {shown}")
    with torch.no_grad():
        for adapter, pname, t, device in assign:
            old = getattr(adapter, pname)
            if old.is_meta:
                setattr(adapter, pname, nn.Parameter(t.to(device=device, dtype=old.dtype), requires_grad=old.requires_grad))
            else:
                old.copy_(t)
        for adapter in {id(a): a for a, _, _, _ in assign}.values():
            adapter.loaded()
    for clone, state in states:
        clone.load_state_dict(state)


def _checked(
    given: Mapping[str, torch.Tensor],
    key: str,
    shape: tuple[int, ...],
    source: str,
    show: Callable[[str], str | None],
    what: str,
    floats: bool = True,
) -> torch.Tensor:
    if key not in given:
        raise FormatError(f"{source}: missing key {show(key)!r} ({what})")
    t = given[key]
    if floats and not t.dtype.is_floating_point:
        raise FormatError(f"{source}: key {show(key)!r} has dtype {t.dtype}, expected a float tensor")
    if tuple(t.shape) != shape:
        raise ShapeMismatchError(f"{source}: key {show(key)!r} has shape {tuple(t.shape)}, {what} needs {shape}")
    return t


def infer_plans(root: nn.Module, config: AdapterConfig | MixedConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Shape plans per module from ``tensors`` (so loading never recomputes a factorization: a folder whose
    split differs from what ``config`` would plan still loads exactly). Modules whose tensors describe no
    valid plan get none (the config's plan, then a precise key error from :func:`load_adapter_tensors`)."""
    try:
        owners = assign_targets(root, config, wrapper_internals(root))
    except TargetError:
        return {}  # adding the adapter reports the targeting error (named after the source)
    grouped: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, t in tensors.items():
        path, _, pname = key.rpartition(".")
        if path in owners and pname in adapter_class_for(owners[path]).tensor_params():
            grouped.setdefault(path, {})[pname] = tuple(t.shape)
    modules = dict(root.named_modules())
    plans: dict[str, Any] = {}
    for name, shapes in grouped.items():
        part, module = owners[name], modules[name]
        spec = layer_spec(module.get_base_layer() if isinstance(module, AdaptedLayer) else module)
        if spec is None:
            continue  # not an adaptable layer: adding the adapter reports it
        try:
            plan = adapter_class_for(part).infer_plan(shapes, spec.weight_shape, pattern_value(part.rank_pattern, name, part.r))
        except ShapeMismatchError:
            continue  # incomplete or inconsistent tensors: the key check names the missing / mis-shaped one
        if plan is not None:
            plans[name] = plan
    return plans
