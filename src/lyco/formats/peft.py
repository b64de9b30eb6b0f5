"""PEFT adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module path>.<param>`` (adapter name removed), e.g.
``base_model.model.layers.0.q_proj.hada_w1_a``; ``modules_to_save`` copies are stored under the
wrapped module's path. The adapter ``default`` goes to the folder itself, others to sub-folders.
PEFT stores 1-D conv CP cores as ``(r, r, k, 1)``; lyco uses ``(r, r, k)`` and converts here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError, FormatError, ShapeMismatchError
from ..methods.base import METHODS, AdapterConfig
from ..targeting import pattern_value
from .adapterfile import AdapterFile, ModuleAdapter, core_from_peft, core_to_peft
from .io import read_tensors, write_tensors, write_text

if TYPE_CHECKING:
    from ..model import LycoModel

PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
# PeftConfig fields that are not adapter hyper-parameters.
PEFT_META_FIELDS = {
    "peft_type", "base_model_name_or_path", "revision", "task_type", "inference_mode", "auto_mapping", "peft_version",
}  # fmt: skip


def adapter_state_dict(model: LycoModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """PEFT-keyed tensors of one adapter (adapter layers and modules_to_save copies)."""
    out: dict[str, torch.Tensor] = {}
    for lname, layer in model.adapted_layers():
        if adapter_name in layer.lyco_adapters:
            for pname, p in layer.lyco_adapters[adapter_name].named_parameters():
                out[f"{PREFIX}{lname}.{pname}"] = p.detach().reshape(core_to_peft(pname, p.shape))
    for wname, wrapper in model._wrappers():
        if adapter_name in wrapper.modules_to_save:
            for k, v in wrapper.modules_to_save[adapter_name].state_dict().items():
                out[f"{PREFIX}{wname}.{k}"] = v.detach()
    return out


def config_to_json(config: AdapterConfig, base_model: nn.Module | None) -> dict[str, Any]:
    """The JSON object PEFT writes for this config."""
    data = config.to_dict()
    hf_config = getattr(base_model, "config", None)
    data.update(
        base_model_name_or_path=getattr(hf_config, "_name_or_path", None) or None,
        revision=None,
        task_type=None,
        inference_mode=True,
    )
    if isinstance(data.get("target_modules"), (set, frozenset)):
        data["target_modules"] = sorted(data["target_modules"])
    for key, value in getattr(config, "unknown_fields", {}).items():
        data.setdefault(key, value)  # fields of a newer PEFT, kept from the folder this config was read from
    return dict(sorted(data.items()))


def config_from_json(data: dict[str, Any], source: str) -> AdapterConfig:
    """Build a lyco config from PEFT JSON. Unknown (newer PEFT) fields are reported, not used, and kept
    in ``config.unknown_fields`` so that saving the adapter writes them back."""
    peft_type = data.get("peft_type")
    if peft_type not in METHODS:
        raise FormatError(f"{source}: peft_type {peft_type!r} is not supported (lyco reads {sorted(METHODS)})")
    config_cls = METHODS[peft_type].config_cls
    known = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(k for k in data if k not in known and k not in PEFT_META_FIELDS)
    if unknown:
        warnings.warn(
            f"{source}: config fields lyco does not know (from a newer PEFT?) are kept but not used: {unknown}",
            stacklevel=4,
        )
    kwargs = {k: v for k, v in data.items() if k in known}
    try:
        config = config_cls(**kwargs)
    except (ConfigError, TypeError) as exc:
        raise FormatError(f"{source}: invalid adapter config ({exc})") from None
    config.unknown_fields = {k: data[k] for k in unknown}
    return config


def adapter_dir(save_directory: str | os.PathLike, adapter_name: str) -> Path:
    root = Path(save_directory)
    return root if adapter_name == "default" else root / adapter_name


def save_peft_dir(model: LycoModel, adapter_name: str, save_directory: str | os.PathLike) -> Path:
    """Write one adapter in PEFT's layout; returns the folder written."""
    folder = adapter_dir(save_directory, adapter_name)
    tensors = adapter_state_dict(model, adapter_name)
    if any(t.device.type == "meta" for t in tensors.values()):
        raise FormatError(f"adapter {adapter_name!r} has weights on the meta device; load or initialise them first")
    write_tensors(folder / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    payload = config_to_json(model.peft_config[adapter_name], model.model)
    write_text(folder / CONFIG_NAME, json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return folder


def read_peft_dir(
    model_id: str | os.PathLike, allow_pickle: bool = False, subfolder: str | None = None
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Config and tensors of a PEFT adapter folder."""
    folder = Path(model_id) / subfolder if subfolder else Path(model_id)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise FormatError(f"{folder}: no {CONFIG_NAME} (not a PEFT adapter folder)")
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"{cfg_path}: unreadable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{cfg_path}: expected a JSON object")
    config = config_from_json(data, str(cfg_path))
    weights = folder / WEIGHTS_NAME
    if not weights.is_file() and (folder / PICKLE_WEIGHTS_NAME).is_file():
        weights = folder / PICKLE_WEIGHTS_NAME
    return config, read_tensors(weights, allow_pickle=allow_pickle)


def assign_adapter_weights(
    model: LycoModel, adapter_name: str, tensors: dict[str, torch.Tensor], source: str
) -> None:
    """Put PEFT-keyed ``tensors`` into adapter ``adapter_name`` (replacing meta/initial weights).

    Every expected key must be present with the right shape and a float dtype, and every key must
    be used; otherwise :class:`FormatError` names the file and key (nothing is assigned).
    """
    plan: list[tuple[nn.Module, str, torch.Tensor, torch.device, torch.dtype]] = []
    used: set[str] = set()
    for lname, layer in model.adapted_layers():
        if adapter_name not in layer.lyco_adapters:
            continue
        adapter = layer.lyco_adapters[adapter_name]
        device = layer.base_layer.weight.device
        for pname, p in adapter.named_parameters():
            key = f"{PREFIX}{lname}.{pname}"
            if key not in tensors:
                raise FormatError(f"{source}: missing key {key!r}")
            t = tensors[key]
            t = t.reshape(core_from_peft(pname, t.shape, len(layer.spec.kernel)))
            if not t.dtype.is_floating_point:
                raise FormatError(f"{source}: key {key!r} has dtype {t.dtype}, expected a float tensor")
            if tuple(t.shape) != tuple(p.shape):
                raise ShapeMismatchError(
                    f"{source}: key {key!r} has shape {tuple(t.shape)}, module {lname!r} needs {tuple(p.shape)}"
                )
            plan.append((adapter, pname, t, device, p.dtype))
            used.add(key)
    for wname, wrapper in model._wrappers():
        if adapter_name not in wrapper.modules_to_save:
            continue
        clone = wrapper.modules_to_save[adapter_name]
        for k, v in clone.state_dict().items():
            key = f"{PREFIX}{wname}.{k}"
            if key not in tensors:
                raise FormatError(f"{source}: missing key {key!r} (modules_to_save)")
            if tuple(tensors[key].shape) != tuple(v.shape):
                raise ShapeMismatchError(f"{source}: key {key!r} has shape {tuple(tensors[key].shape)}, needs {tuple(v.shape)}")
            used.add(key)
    unused = sorted(set(tensors) - used)
    if unused:
        raise FormatError(f"{source}: {len(unused)} key(s) match no adapted module: {unused[:8]}")
    for adapter, pname, t, device, dtype in plan:
        old = getattr(adapter, pname)
        setattr(adapter, pname, nn.Parameter(t.to(device=device, dtype=dtype), requires_grad=old.requires_grad))
    for wname, wrapper in model._wrappers():
        if adapter_name in wrapper.modules_to_save:
            clone = wrapper.modules_to_save[adapter_name]
            sd = {k: tensors[f"{PREFIX}{wname}.{k}"] for k in clone.state_dict()}
            clone.load_state_dict(sd)


def infer_plans(root: nn.Module, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Shape plans per module from PEFT-keyed ``tensors`` (so loading never recomputes a factorization:
    a folder whose split differs from what ``config`` would plan still loads exactly). Modules whose
    tensors describe no valid plan get none (the config's plan, then a precise key error on assign)."""
    from ..methods.base import adapter_class_for
    from ..ops.layerops import layer_spec
    from ..targeting import pattern_value

    adapter_cls = adapter_class_for(config)
    grouped: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, t in tensors.items():
        path, _, pname = key.rpartition(".")
        if pname in adapter_cls.param_names and path.startswith(PREFIX):
            grouped.setdefault(path[len(PREFIX):], {})[pname] = tuple(t.shape)
    modules = dict(root.named_modules())
    plans: dict[str, Any] = {}
    for name, shapes in grouped.items():
        module = modules.get(name)
        spec = layer_spec(getattr(module, "base_layer", module)) if module is not None else None
        if spec is None:
            continue  # unknown module: assign_adapter_weights reports the unused keys
        shapes = {p: core_from_peft(p, s, len(spec.kernel)) for p, s in shapes.items()}
        try:
            plan = adapter_cls.infer_plan(shapes, spec.weight_shape, pattern_value(config.rank_pattern, name, config.r))
        except ShapeMismatchError:
            # Incomplete or inconsistent tensors: plan from the config and let assign_adapter_weights name
            # the missing / mis-shaped key.
            continue
        if plan is not None:
            plans[name] = plan
    return plans


def load_peft_dir(
    model: LycoModel,
    model_id: str | os.PathLike,
    adapter_name: str,
    is_trainable: bool = False,
    allow_pickle: bool = False,
    subfolder: str | None = None,
) -> None:
    """Add the adapter stored in a PEFT folder to an existing :class:`LycoModel` (all-or-nothing)."""
    config, tensors = read_peft_dir(model_id, allow_pickle=allow_pickle, subfolder=subfolder)
    plans = infer_plans(model.model, config, tensors)
    model.add_adapter(adapter_name, config, low_cpu_mem_usage=True, plans=plans)
    try:
        assign_adapter_weights(model, adapter_name, tensors, str(model_id))
    except BaseException:
        model.delete_adapter(adapter_name)
        raise
    model.set_trainable(adapter_name, is_trainable)
    if not is_trainable:
        model.eval()


def model_from_peft_dir(
    cls: type[LycoModel],
    model: nn.Module,
    model_id: str | os.PathLike,
    adapter_name: str = "default",
    is_trainable: bool = False,
    allow_pickle: bool = False,
    subfolder: str | None = None,
    **kwargs: Any,
) -> LycoModel:
    """Wrap ``model`` with the adapter of a PEFT folder; on any error the model is restored."""
    config, tensors = read_peft_dir(model_id, allow_pickle=allow_pickle, subfolder=subfolder)
    plans = infer_plans(model, config, tensors)
    lyco_model = cls(model, config, adapter_name, low_cpu_mem_usage=True, plans=plans, **kwargs)
    try:
        assign_adapter_weights(lyco_model, adapter_name, tensors, str(model_id))
    except BaseException:
        lyco_model.unload()
        raise
    lyco_model.set_trainable(adapter_name, is_trainable)
    if not is_trainable:
        lyco_model.eval()
    return lyco_model


# -- AdapterFile readers/writers (format conversion without a LycoModel) ------------------------------
def read_peft_adapter(
    model_id: str | os.PathLike,
    allow_pickle: bool = False,
    subfolder: str | None = None,
    model: nn.Module | None = None,
) -> AdapterFile:
    """A PEFT LoHa/LoKr adapter folder as an :class:`AdapterFile` (``convention="peft"``, ``config``: the
    JSON object). Per module ``alpha`` and ``r`` come from ``alpha``/``r`` and the patterns; a LoKr with
    both factors full has ``alpha / r`` (which PEFT applies) folded into ``lokr_w1`` and ``alpha = r``, so
    ``delta_weight()`` equals PEFT's ΔW (the AdapterFile rule gives such modules scale 1).

    With ``model`` (the base module) weight shapes are taken from its layers and 1-D conv CP cores are
    converted from PEFT's ``(r, r, k, 1)`` to ``(r, r, k)``; without it shapes are read off the tensors.
    ``modules_to_save`` copies cannot be represented and are a :class:`FormatError`.
    """
    from .convert import ALGO_OF_PEFT_TYPE, fold_full_lokr
    from .keys import ModuleIndex

    config, tensors = read_peft_dir(model_id, allow_pickle=allow_pickle, subfolder=subfolder)
    source = str(Path(model_id) / subfolder if subfolder else model_id)
    algo = ALGO_OF_PEFT_TYPE[config.peft_type]
    params = sorted(METHODS[config.peft_type].param_names, key=len, reverse=True)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    extra = []
    for key, t in tensors.items():
        pname = next((p for p in params if key.endswith("." + p)), None)
        if pname is None or not key.startswith(PREFIX):
            extra.append(key)
            continue
        if not t.dtype.is_floating_point:
            raise FormatError(f"{source}: key {key!r} has dtype {t.dtype}, expected a float tensor")
        groups.setdefault(key[len(PREFIX) : -len(pname) - 1], {})[pname] = t
    if extra:
        raise FormatError(
            f"{source}: {len(extra)} key(s) are not {algo} adapter weights (modules_to_save copies cannot be "
            f"represented outside a PEFT folder): {extra[:8]}"
        )
    specs = ModuleIndex(model).specs if model is not None else {}
    modules: dict[str, ModuleAdapter] = {}
    for name, ts in groups.items():
        spec = specs.get(name)
        if model is not None and spec is None:
            raise FormatError(f"{source}: module {name!r} is not an adaptable layer of the given model")
        if spec is not None:
            ts = {p: t.reshape(core_from_peft(p, t.shape, len(spec.kernel))) for p, t in ts.items()}
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = float(pattern_value(config.alpha_pattern, name, config.alpha))
        module = ModuleAdapter(algo, ts, alpha, tuple(spec.weight_shape) if spec is not None else None)
        if module.full_lokr:
            module = ModuleAdapter(algo, fold_full_lokr(ts, alpha, r), float(r), module.weight_shape)
        modules[name] = module
    af = AdapterFile(modules, convention="peft", config=config_to_json(config, None))
    from .convert import check_shapes

    check_shapes(af, source)
    return af


def write_peft_adapter(
    af: AdapterFile, save_directory: str | os.PathLike, base_model: nn.Module | None = None
) -> Path:
    """Write an :class:`AdapterFile` as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    The config (``r``/``alpha`` + ``rank_pattern``/``alpha_pattern`` per module, ``decompose_factor``,
    ``decompose_both``, ``use_effective_conv2d``) is fitted to the tensor shapes so that PEFT plans the
    same shapes and computes the same ΔW (full–full LoKr modules: ``alpha = r``); an adapter PEFT's
    planning rules cannot describe is a :class:`FormatError` naming the modules. ``base_model`` resolves
    an unresolved file's underscore paths and gives conv kernel sizes (without it, shapes are read off
    the tensors, which treats flattened conv factors as linear layers).
    """
    from .convert import fit_config, guess_weight_shape
    from .keys import module_keys
    from .lycoris import resolve_adapter_file

    if not af.resolved and base_model is not None:
        af = resolve_adapter_file(af, base_model)
    names = {n: n for n in af.modules} if af.resolved else module_keys(list(af.modules), "peft", "", resolved=False)
    shapes = {n: guess_weight_shape(m) for n, m in af.modules.items()}
    if base_model is not None:
        from .keys import ModuleIndex

        specs = ModuleIndex(base_model).specs
        shapes.update({n: tuple(specs[names[n]].weight_shape) for n in af.modules if names[n] in specs})
    fit = fit_config(af, shapes)
    if fit.problems:
        raise FormatError(
            "PEFT's config cannot describe these adapter shapes (PEFT plans shapes from one decompose_factor/"
            "decompose_both/use_effective_conv2d"
            + ("" if base_model is not None else "; pass base_model= if conv layers are involved")
            + "):\n  " + "\n  ".join(fit.problems)
        )
    fit.config.target_modules = [names[n] for n in fit.config.target_modules]  # type: ignore[union-attr]
    fit.config.rank_pattern = {names.get(k, k): v for k, v in fit.config.rank_pattern.items()}
    fit.config.alpha_pattern = {names.get(k, k): v for k, v in fit.config.alpha_pattern.items()}
    tensors: dict[str, torch.Tensor] = {}
    for name, m in af.modules.items():
        for p, t in m.tensors.items():
            tensors[f"{PREFIX}{names[name]}.{p}"] = t.reshape(core_to_peft(p, t.shape))
    folder = Path(save_directory)
    write_tensors(folder / WEIGHTS_NAME, tensors, metadata={"format": "pt"})
    payload = config_to_json(fit.config, base_model)
    write_text(folder / CONFIG_NAME, json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return folder
