"""PEFT's functional trio on plain modules: :func:`inject_adapter_in_model`, :func:`get_peft_model_state_dict`,
:func:`set_peft_model_state_dict` — for code that adapts a model in place instead of wrapping it (diffusers'
``load_lora_adapter`` and apps built like it call exactly these).

The adapted model is the module itself (no :class:`~lyco.LycoModel` around it); its configs are kept, as in
PEFT, in ``model.peft_config`` (``{adapter name: config}``). State dicts use PEFT's key names and layouts without
``base_model.model.`` (PEFT's for a plain module: ``<module path>.lora_A.weight``, ``<module path>.lokr_w1``);
given a :class:`~lyco.LycoModel`, they are its ``save_pretrained`` tensors (with the prefix). Deviation: loading is
strict — a key that matches nothing, or a missing or mis-shaped tensor, is an error naming it, with the model
unchanged (PEFT warns and loads the rest); the returned ``missing_keys`` / ``unexpected_keys`` are empty.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from .errors import AdapterNameError, ArgumentError, FormatError
from .formats.names import ModuleTable
from .formats.peft import config_from_json, from_peft_tensors, peft_key, peft_tensors
from .methods.config import AdapterConfig, MixedConfig
from .methods.registry import all_methods
from .model import LycoModel
from .model_io import adapter_state_dict, as_module
from .tree import adapted_layers, adapter_tensors, load_adapter_tensors

__all__ = ["LoadResult", "get_peft_model_state_dict", "inject_adapter_in_model", "set_peft_model_state_dict"]


class LoadResult(NamedTuple):
    """What :func:`set_peft_model_state_dict` returns (``load_state_dict``'s fields; always empty: loading is strict)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _lyco_config(config: Any) -> AdapterConfig | MixedConfig:
    """A lyco config as it is; a PEFT config (``peft.LoKrConfig``…) through its JSON, as if read from a folder."""
    if isinstance(config, (AdapterConfig, MixedConfig)):
        return config
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        raise ArgumentError(f"a lyco or PEFT adapter config is needed, got {type(config).__name__}")
    data = {k: (v.value if hasattr(v, "value") else v) for k, v in to_dict().items()}  # PeftType enums → str
    data = {k: sorted(v) if isinstance(v, (set, frozenset)) else v for k, v in data.items()}
    return config_from_json(data, f"{type(config).__name__} object")


def inject_adapter_in_model(
    peft_config: Any,
    model: nn.Module,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Adapt ``model`` in place with the adapter ``peft_config`` describes (a lyco config or a PEFT one) and return
    it. ``state_dict``: target exactly the modules its keys name (values unused; PEFT's rule). The new adapter is
    active on its layers; ``low_cpu_mem_usage``: weights on the meta device until :func:`set_peft_model_state_dict`."""
    model = as_module(model, "inject_adapter_in_model")
    if isinstance(model, LycoModel):
        raise ArgumentError("inject_adapter_in_model adapts a plain module; use add_adapter() on a LycoModel")
    config = _lyco_config(peft_config)
    if any(adapter_name in layer.lyco_adapters for _, layer in adapted_layers(model)):
        raise AdapterNameError(f"the model already has an adapter named {adapter_name!r}; pick another name")
    if state_dict is not None:
        if isinstance(config, MixedConfig):
            raise ArgumentError("state_dict= cannot pick the targets of a MixedConfig (each part has its own)")
        config = copy.deepcopy(config)
        config.target_modules = sorted({_module_path(k) for k in state_dict})
        config.exclude_modules = config.layers_to_transform = config.layers_pattern = None
    lyco_model = LycoModel(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
    configs = dict(getattr(model, "peft_config", None) or {})
    configs[adapter_name] = lyco_model.peft_config[adapter_name]
    model.peft_config = configs  # type: ignore[assignment]  # PEFT keeps them here too
    return model


def _module_path(key: str) -> str:
    """The module a PEFT state-dict key belongs to: the key minus the longest PEFT tensor name of any registered
    method (``a.b.lora_A.weight`` → ``a.b``; ``a.b.lokr_w1`` → ``a.b``)."""
    key = peft_key(key, inverse=True) or key
    names = sorted({p.peft_name for m in all_methods() for p in m.tensor_params().values()}, key=len, reverse=True)
    for name in names:
        if key.endswith("." + name):
            return key[: -len(name) - 1]
    raise FormatError(f"state_dict key {key!r} names no adapter tensor of a registered method")


def _config(model: nn.Module, adapter_name: str) -> AdapterConfig | MixedConfig:
    configs = getattr(model, "peft_config", None) or {}
    if adapter_name not in configs:
        raise AdapterNameError(f"no adapter named {adapter_name!r} (adapters: {list(configs)})")
    return configs[adapter_name]


def get_peft_model_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor] | None = None, adapter_name: str = "default", **_: Any
) -> dict[str, torch.Tensor]:
    """One adapter's tensors in PEFT's keys and layouts: for a :class:`~lyco.LycoModel`, what ``save_pretrained``
    writes; for an injected module, keyed ``<module path>.<PEFT name>`` (PEFT's keys for such a module). The
    ``state_dict`` argument (PEFT: take the values from it) is not supported."""
    if state_dict is not None:
        raise ArgumentError("get_peft_model_state_dict(state_dict=...) is not supported; the values come from the model")
    if isinstance(model, LycoModel):
        return adapter_state_dict(model, adapter_name)
    tensors = peft_tensors(_config(model, adapter_name), adapter_tensors(model, adapter_name), f"adapter {adapter_name!r}")
    return {peft_key(k, inverse=True) or k: v for k, v in tensors.items()}


def set_peft_model_state_dict(
    model: nn.Module,
    peft_model_state_dict: Mapping[str, torch.Tensor],
    adapter_name: str = "default",
    ignore_mismatched_sizes: bool = False,
    low_cpu_mem_usage: bool = False,
) -> LoadResult:
    """Load PEFT-layout tensors (keys with or without ``base_model.model.``) into an injected adapter (or a
    :class:`~lyco.LycoModel`'s), all or nothing: every key, shape and dtype is checked first, meta weights are
    replaced, real ones copied into in place. ``ignore_mismatched_sizes`` must stay ``False`` (lyco never loads a
    tensor of another shape); ``low_cpu_mem_usage`` is accepted (loading never copies twice)."""
    if ignore_mismatched_sizes:
        raise ArgumentError("ignore_mismatched_sizes=True is not supported: a tensor of another shape is an error")
    root = model.model if isinstance(model, LycoModel) else as_module(model, "set_peft_model_state_dict")
    config = _config(model, adapter_name)  # a LycoModel keeps its configs in peft_config too
    stripped = {(peft_key(k, inverse=True) or k): t for k, t in peft_model_state_dict.items()}
    tensors = from_peft_tensors(config, stripped, ModuleTable.from_module(root), "state dict")  # type: ignore[arg-type]
    load_adapter_tensors(root, {adapter_name: tensors}, "state dict")
    return LoadResult([], [])
