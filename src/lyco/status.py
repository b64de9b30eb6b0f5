"""PEFT's ``get_layer_status`` / ``get_model_status`` for lyco models: what each adapted layer (and
``modules_to_save`` copy) holds, runs and trains, and the summary over the model — the same fields as PEFT's
``TunerLayerStatus`` / ``TunerModelStatus``, ``"irregular"`` where layers disagree. Works on a
:class:`~lyco.LycoModel` and on a module adapted in place (:func:`lyco.inject_adapter_in_model`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from torch import nn

from .errors import StateError
from .layer import AdaptedLayer
from .modules_to_save import ModulesToSaveWrapper

Irregular = Literal["irregular"]


@dataclass
class TunerLayerStatus:
    """One adapted layer (or ``modules_to_save`` wrapper): ``requires_grad`` / ``devices`` per adapter name."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None = None


@dataclass
class TunerModelStatus:
    """The layers' statuses summarised (``"irregular"``: the layers disagree — an inconsistent model)."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: bool | Irregular
    active_adapters: list[str] | Irregular
    merged_adapters: list[str] | Irregular
    requires_grad: dict[str, bool | Irregular]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | Irregular | None = None


def _agree(values: Iterable[bool | Irregular]) -> bool | Irregular:
    vals = list(values)
    if all(v is True for v in vals):
        return True
    if all(v is False for v in vals):
        return False
    return "irregular"


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The status of every adapted layer and ``modules_to_save`` wrapper of ``model``, in module order
    (:class:`StateError` when there is none)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, AdaptedLayer):
            adapters = dict(module.lyco_adapters.items())
            kind = f"lyco.AdaptedLayer({type(module.base_layer).__name__})"
            active, merged = list(module.active_adapters), list(module.merged_adapters)
        elif isinstance(module, ModulesToSaveWrapper):
            adapters = dict(module.modules_to_save.items())
            kind = f"lyco.ModulesToSaveWrapper({type(module.original_module).__name__})"
            active, merged = [module.active_adapter] if module.active_adapter is not None else [], []
        else:
            continue
        out.append(TunerLayerStatus(
            name=name, module_type=kind, enabled=not module.disable_adapters,
            active_adapters=[n for n in active if n in adapters], merged_adapters=merged,
            requires_grad={n: _agree(p.requires_grad for p in a.parameters()) for n, a in adapters.items()},
            available_adapters=sorted(adapters),
            devices={n: sorted({p.device.type for p in a.parameters()}) for n, a in adapters.items()},
        ))  # fmt: skip
    if not out:
        raise StateError(f"{type(model).__name__} has no adapter layers (get_model / inject_adapter_in_model first)")
    return out


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """:func:`get_layer_status` summarised, with the parameter counts and each adapter's method."""
    layers = get_layer_status(model)
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    is_hf = any(c.__name__ == "PreTrainedModel" for c in type(base).__mro__)
    configs = getattr(model, "peft_config", None) or {}
    params = list(model.parameters())
    enabled = {s.enabled for s in layers}
    actives = {tuple(s.active_adapters) for s in layers if "AdaptedLayer" in s.module_type}  # wrappers run one
    merged_all = sorted({n for s in layers for n in s.merged_adapters})
    merged_ok = all(not (set(s.available_adapters) - set(s.merged_adapters)) & set(merged_all) for s in layers)
    grads: dict[str, list[bool | Irregular]] = defaultdict(list)
    devices: dict[str, set[str]] = defaultdict(set)
    for s in layers:
        for n, v in s.requires_grad.items():
            grads[n].append(v)
        for n, d in s.devices.items():
            devices[n].update(d)
    return TunerModelStatus(
        base_model_type=type(base).__name__ if is_hf or base is not model else "other",  # PEFT's rule
        adapter_model_type=type(model).__name__ if base is not model else "None",
        peft_types={n: getattr(c, "peft_type", "") or "MIXED" for n, c in configs.items()},
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        total_params=sum(p.numel() for p in params),
        num_adapter_layers=len(layers),
        enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(actives.pop()) if len(actives) == 1 else [] if not actives else "irregular",
        merged_adapters=merged_all if merged_ok else "irregular",
        requires_grad={n: _agree(v) for n, v in grads.items()},
        available_adapters=sorted({n for s in layers for n in s.available_adapters}),
        devices={n: sorted(d) for n, d in devices.items()},
    )
