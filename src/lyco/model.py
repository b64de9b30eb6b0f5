"""``LycoModel``: inject adapters into any ``nn.Module`` and manage them (PEFT-like API).

Injection replaces each targeted module by an :class:`AdaptedLayer` that keeps the original as
``base_layer``; ``unload`` / ``merge_and_unload`` put the original module objects back. Every
operation validates first and modifies the model only once nothing can fail any more.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .errors import (
    AdapterNameError,
    ArgumentError,
    ConfigError,
    MergeError,
    ShapeMismatchError,
    UnsupportedLayerError,
)
from .layer import AdaptedLayer
from .methods.adapter import META
from .methods.config import AdapterConfig, MixedConfig, config_parts, pattern_value
from .methods.registry import adapter_class_for
from .model_io import AdapterIO, as_module, names_arg
from .modules_to_save import ModulesToSaveWrapper
from .ops.layerops import SUPPORTED_LAYERS, from_canonical, layer_spec
from .sharding import check_not_sharded_for_adapters, check_unsharded
from .status import TunerLayerStatus, TunerModelStatus, get_layer_status, get_model_status
from .targeting import assign_targets, bypassed, check_modules_to_save, default_target_modules
from .tree import (
    adapted_layers,
    saved_modules,
    wrapper_internals,
)

_HALF = (torch.float16, torch.bfloat16)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _adapter_dtype(weight: torch.Tensor, autocast_adapter_dtype: bool) -> torch.dtype:
    if not weight.dtype.is_floating_point:
        return torch.float32
    if autocast_adapter_dtype and weight.dtype in _HALF:
        return torch.float32
    return weight.dtype


def _check_compute_dtype(value: Any) -> str | torch.dtype:
    if value in ("input", "adapter") or (isinstance(value, torch.dtype) and value.is_floating_point):
        return value
    raise ConfigError(f"compute_dtype must be 'input', 'adapter' or a floating torch.dtype, got {value!r}")


class LycoModel(AdapterIO):
    """A model with LyCORIS-family adapters. ``forward`` (and unknown attributes) go to the wrapped model.

    Args:
        model: the base module; adapted in place (wrapped layers replace targeted modules).
        config: a method config (:class:`~lyco.LoRAConfig`, :class:`~lyco.LoKrConfig`…, or a custom method's), or a
            :class:`~lyco.MixedConfig` (different methods on different modules).
        adapter_name: name of the first adapter.
        low_cpu_mem_usage: create adapter weights on the ``meta`` device (no allocation, no init);
            they are materialised when a state dict is loaded with ``assign``.
        autocast_adapter_dtype: keep adapter weights in fp32 when the base weights are fp16/bf16.
        compute_dtype: dtype of the adapter maths — ``"input"`` (default: the layer input's, so a bf16
            model computes its adapters in bf16 from fp32 master weights), ``"adapter"`` (PEFT's rule: the
            adapter weights' dtype) or a floating ``torch.dtype``. See :meth:`set_compute_dtype`.
    """

    def __init__(
        self,
        model: nn.Module,
        config: AdapterConfig | MixedConfig,
        adapter_name: str = "default",
        *,
        low_cpu_mem_usage: bool = False,
        autocast_adapter_dtype: bool = True,
        plans: Mapping[str, Any] | None = None,
        compute_dtype: str | torch.dtype = "input",
    ) -> None:
        super().__init__()
        self.compute_dtype = _check_compute_dtype(compute_dtype)
        self.model = as_module(model, "LycoModel")
        self.peft_config: dict[str, AdapterConfig | MixedConfig] = {}
        self._active: list[str] = []
        self._frozen: set[str] = set()
        self._layers_disabled = False  # disable_adapter_layers(): base output until enable_adapter_layers()
        self._base_requires_grad: list[tuple[nn.Parameter, bool]] = []
        self.autocast_adapter_dtype = autocast_adapter_dtype
        self.add_adapter(adapter_name, config, low_cpu_mem_usage=low_cpu_mem_usage, plans=plans)
        self.set_adapter(adapter_name)
        # `inspect.signature(model.forward)` shows the base model's arguments: transformers' Trainer keeps
        # only the batch keys named there. The call itself still runs LycoModel.forward.
        if callable(getattr(model, "forward", None)):
            self.forward = functools.update_wrapper(functools.partial(type(self).forward, self), model.forward)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self._modules["model"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def get_base_model(self) -> nn.Module:
        """The wrapped model (adapted in place; ``unload()`` returns it without adapters)."""
        return self.model

    # -- iteration ---------------------------------------------------------------------------
    def adapted_layers(self) -> Iterator[tuple[str, AdaptedLayer]]:
        """``(module name, AdaptedLayer)`` for every wrapped layer."""
        return adapted_layers(self.model)

    def saved_modules(self) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
        """``(module name, ModulesToSaveWrapper)`` for every ``modules_to_save`` wrapper."""
        return saved_modules(self.model)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        if not self._active:
            raise AdapterNameError("the model has no active adapter (every adapter was deleted); add_adapter() one")
        return self._active[0]

    # -- adding / removing -------------------------------------------------------------------
    def add_adapter(
        self,
        adapter_name: str,
        config: AdapterConfig | MixedConfig,
        *,
        low_cpu_mem_usage: bool = False,
        plans: Mapping[str, Any] | None = None,
    ) -> None:
        """Add a new (inactive unless first) adapter; validates everything before touching the model.

        ``plans``: per module name, a shape plan (``LoKrPlan`` / ``LoHaPlan``, e.g. inferred from a file's
        tensors) used instead of planning from ``config``; its ``r`` overrides ``rank_pattern`` when the plan is
        ``ranked`` (not a LoKr with both factors full: then ``r`` / ``rank_pattern`` give ``alpha / r``).
        """
        if not isinstance(adapter_name, str) or not adapter_name or any(c in adapter_name for c in "./\\\0"):
            raise AdapterNameError(
                f"adapter name must be a non-empty string without '.', '/' or '\\' (it names a sub-folder of saved "
                f"adapters), got {adapter_name!r}"
            )
        for part in config_parts(config):
            adapter_class_for(part)  # every method registered
        if plans is not None and not isinstance(plans, Mapping):
            raise ArgumentError(f"plans must map module names to shape plans, got {type(plans).__name__}")
        check_not_sharded_for_adapters(self)
        if adapter_name in self.peft_config:
            raise AdapterNameError(
                f"an adapter named {adapter_name!r} already exists (adapters: {list(self.peft_config)}); "
                "pick another name or delete_adapter() it first"
            )
        config = copy.deepcopy(config)
        for part in config_parts(config):
            if part.target_modules is None:
                part.target_modules = default_target_modules(self.model)
        skip = wrapper_internals(self.model)
        modules = dict(self.model.named_modules())
        created = []
        for name, part in assign_targets(self.model, config, skip).items():
            adapter_cls = adapter_class_for(part)
            module = modules[name]
            if isinstance(module, ModulesToSaveWrapper):
                raise UnsupportedLayerError(f"module {name!r} is in modules_to_save and cannot also get an adapter")
            base = module.base_layer if isinstance(module, AdaptedLayer) else module
            if (why := bypassed(self.model, name)) is not None:
                raise UnsupportedLayerError(f"module {name!r} cannot get an adapter: {why}. Remove it from target_modules.")
            spec = layer_spec(base)
            if spec is None or not adapter_cls.supports(spec):
                raise UnsupportedLayerError(
                    f"module {name!r} of type {type(base).__name__} cannot get a {part.peft_type} adapter; "
                    f"supported layers: {SUPPORTED_LAYERS}. Narrow target_modules or add it to exclude_modules."
                )
            weight = base.weight
            device = META if low_cpu_mem_usage else weight.device
            plan = (plans or {}).get(name)
            r = plan.r if plan is not None and getattr(plan, "ranked", True) else pattern_value(part.rank_pattern, name, part.r)
            alpha = pattern_value(part.alpha_pattern, name, part.alpha)
            try:
                adapter = adapter_cls(
                    spec, r, alpha, part, device=device, dtype=_adapter_dtype(weight, self.autocast_adapter_dtype),
                    plan=plan,
                )
            except (ShapeMismatchError, ConfigError) as exc:  # name the module (nothing is modified yet)
                raise type(exc)(f"module {name!r}: {exc}") from None
            if adapter.weight_decompose and not adapter.is_meta and not weight.is_meta:
                adapter.init_dora(from_canonical(spec, weight))
            created.append((name, module, adapter))
        to_save = check_modules_to_save(self.model, config.modules_to_save, skip)
        clash = sorted(set(to_save) & {n for n, _, _ in created})
        if clash:
            raise UnsupportedLayerError(f"modules {clash} are both adapter targets and modules_to_save")
        # ---- nothing below can fail: commit ----
        if not self.peft_config:
            self._base_requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
            for p in self.model.parameters():
                p.requires_grad_(False)
        for name, module, adapter in created:
            layer = module if isinstance(module, AdaptedLayer) else AdaptedLayer(module, name)
            layer.compute_dtype = self.compute_dtype
            layer.lyco_adapters[adapter_name] = adapter
            layer.active_adapters = list(self._active)
            layer.disable_adapters = self._layers_disabled
            if layer is not module:
                set_submodule(self.model, name, layer)
        for name in to_save:
            wrapper = modules[name]
            if not isinstance(wrapper, ModulesToSaveWrapper):
                wrapper = ModulesToSaveWrapper(wrapper)
                set_submodule(self.model, name, wrapper)
            wrapper.add(adapter_name)
            wrapper.set_active(self._active)
            wrapper.disable_adapters = self._layers_disabled
        self.peft_config[adapter_name] = config
        self._update_trainable()

    def require_adapters(self, names: list[str]) -> None:
        """:class:`AdapterNameError` unless every name in ``names`` is an adapter of this model."""
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise AdapterNameError(f"unknown adapter(s) {unknown}; available: {list(self.peft_config)}")

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Activate one adapter or a list (their deltas add up); others stay loaded but inactive."""
        names = names_arg(adapter_name, "set_adapter")
        self.require_adapters(names)
        if not names:
            raise AdapterNameError("set_adapter needs at least one adapter name")
        self._active = names
        for _, layer in self.adapted_layers():
            layer.active_adapters = list(names)
        for _, wrapper in self.saved_modules():
            wrapper.set_active(names)
        self._update_trainable()

    def _update_trainable(self) -> None:
        train = set() if self._layers_disabled else {n for n in self._active if n not in self._frozen}
        for _, layer in self.adapted_layers():
            for name, adapter in layer.lyco_adapters.items():
                adapter.requires_grad_(name in train)
        for _, wrapper in self.saved_modules():
            for name, clone in wrapper.modules_to_save.items():
                clone.requires_grad_(name in train)

    def set_trainable(self, adapter_name: str, trainable: bool = True) -> None:
        """Mark an adapter trainable (when active) or frozen (inference mode)."""
        self.require_adapters([adapter_name])
        (self._frozen.discard if trainable else self._frozen.add)(adapter_name)
        self._update_trainable()

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        """PEFT's ``set_requires_grad``: turn gradients of the given adapters' weights (and ``modules_to_save``
        copies) on or off, active or not. ``set_adapter`` later recomputes them (active and not frozen), as in
        PEFT; for active adapters the choice is kept (:meth:`set_trainable`)."""
        names = names_arg(adapter_names, "set_requires_grad")
        self.require_adapters(names)
        if not isinstance(requires_grad, bool):
            raise ArgumentError(f"set_requires_grad takes requires_grad=True or False, got {requires_grad!r}")
        for name in names:
            (self._frozen.discard if requires_grad else self._frozen.add)(name)
        for _, layer in self.adapted_layers():
            for name in names:
                if name in layer.lyco_adapters:
                    layer.lyco_adapters[name].requires_grad_(requires_grad)
        for _, wrapper in self.saved_modules():
            for name in names:
                if name in wrapper.modules_to_save:
                    wrapper.modules_to_save[name].requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an unmerged adapter; layers left without adapters are unwrapped. Deleting an active adapter
        leaves the other active ones active or, when none is left, activates the first remaining adapter by name
        (with a warning) — PEFT's rule; deleting the last adapter leaves the base model (frozen, as PEFT)."""
        self.require_adapters([adapter_name])
        merged = [n for n, layer in self.adapted_layers() if adapter_name in layer.merged_adapters]
        if merged:
            raise AdapterNameError(f"adapter {adapter_name!r} is merged in {merged[:3]}...; unmerge_adapter() first")
        active = [n for n in self._active if n != adapter_name]
        if adapter_name in self._active and not active:
            remaining = sorted(n for n in self.peft_config if n != adapter_name)
            if remaining:
                warnings.warn(
                    f"adapter {adapter_name!r} was active and is deleted; the active adapter is now {remaining[0]!r}",
                    stacklevel=2,
                )
                active = remaining[:1]
        for name, layer in list(self.adapted_layers()):
            if adapter_name in layer.lyco_adapters:
                del layer.lyco_adapters[adapter_name]
                if not len(layer.lyco_adapters):
                    set_submodule(self.model, name, layer.base_layer)
        for name, wrapper in list(self.saved_modules()):
            if adapter_name in wrapper.modules_to_save:
                del wrapper.modules_to_save[adapter_name]
                if not len(wrapper.modules_to_save):
                    set_submodule(self.model, name, wrapper.original_module)
        del self.peft_config[adapter_name]
        self._frozen.discard(adapter_name)
        if active != self._active:
            if active:
                self.set_adapter(active)
            else:
                self._active = []

    # -- enable / disable ----------------------------------------------------------------------
    def disable_adapter_layers(self) -> None:
        """PEFT's ``disable_adapter_layers``: from now on the model computes its base output and no adapter weight
        requires grad, until :meth:`enable_adapter_layers`. Merged adapters are unmerged first (with a warning; PEFT's
        forward does the same)."""
        layers = [layer for _, layer in self.adapted_layers()]
        if any(layer.merged for layer in layers):
            warnings.warn("disable_adapter_layers() unmerges the merged adapters", stacklevel=2)
            for layer in layers:
                layer.unmerge()
        self._set_layers_disabled(True)

    def enable_adapter_layers(self) -> None:
        """PEFT's ``enable_adapter_layers``: the active adapters run again and are trainable as before."""
        self._set_layers_disabled(False)

    def _set_layers_disabled(self, disabled: bool) -> None:
        self._layers_disabled = disabled
        for _, m in [*self.adapted_layers(), *self.saved_modules()]:
            m.disable_adapters = disabled
        self._update_trainable()

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context in which the model computes its base output. Merged adapters are unmerged on
        entry (with a warning) and merged again on exit; layers disabled by :meth:`disable_adapter_layers`
        stay disabled after it (PEFT re-enables them)."""
        layers = list(self.adapted_layers())
        remerge = {name: list(layer.merged_adapters) for name, layer in layers if layer.merged}
        if remerge:
            warnings.warn("disable_adapter() unmerges merged adapters and merges them again on exit", stacklevel=3)
            for _, layer in layers:
                layer.unmerge()
        wrappers = [w for _, w in self.saved_modules()]
        for m in [layer for _, layer in layers] + wrappers:
            m.disable_adapters = True
        try:
            yield
        finally:
            for m in [layer for _, layer in layers] + wrappers:
                m.disable_adapters = self._layers_disabled
            for name, layer in layers:
                if name in remerge:
                    layer.merge(adapter_names=remerge[name])

    # -- merge ---------------------------------------------------------------------------------
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Add adapters (default: active) into the base weights. ``safe_merge`` checks every layer for
        NaN/Inf first and raises :class:`MergeError` with the model unchanged."""
        names = list(self._active) if adapter_names is None else names_arg(adapter_names, "merge_adapter")
        self.require_adapters(names)
        check_unsharded(self, "merge adapters into")
        layers = list(self.adapted_layers())
        already = sorted({n for _, layer in layers for n in layer.merged_adapters if n in names})
        if already:
            raise MergeError(f"adapter(s) {already} are already merged; call unmerge_adapter() first")
        for name, layer in layers:  # every layer checked before any is changed
            if safe_merge:
                layer.check_merge(names, name)
            else:
                layer.check_mergeable(name)
        for _, layer in layers:
            layer.merge(adapter_names=names)

    def unmerge_adapter(self) -> None:
        """Subtract all merged adapters from the base weights."""
        layers = [layer for _, layer in self.adapted_layers() if layer.merged]
        if layers:
            check_unsharded(self, "unmerge adapters from")
        if not layers:
            warnings.warn("no adapter is merged; nothing to unmerge", stacklevel=2)
        for layer in layers:
            layer.unmerge()

    def _unload(self, merge: bool) -> nn.Module:
        """Put the original modules back (``modules_to_save``: trained copy if ``merge``) and restore the
        base parameters' ``requires_grad`` flags as they were before the first adapter."""
        for name, layer in list(self.adapted_layers()):
            set_submodule(self.model, name, layer.base_layer)
        for name, wrapper in list(self.saved_modules()):
            set_submodule(self.model, name, wrapper.current if merge else wrapper.original_module)
        self.peft_config.clear()
        self._active = []
        self._layers_disabled = False
        for p, flag in self._base_requires_grad:
            p.requires_grad_(flag)
        self._base_requires_grad = []
        return self.model

    def merge_and_unload(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Merge adapters (default: active; those already merged stay) and return the plain base model."""
        names = list(self._active) if adapter_names is None else names_arg(adapter_names, "merge_and_unload")
        self.require_adapters(names)
        check_unsharded(self, "merge_and_unload")
        todo = [n for n in names if not any(n in layer.merged_adapters for _, layer in self.adapted_layers())]
        if todo:
            self.merge_adapter(todo, safe_merge=safe_merge)
        return self._unload(merge=True)

    def unload(self) -> nn.Module:
        """Remove every adapter without merging (merged ones are unmerged first); returns the base model."""
        for _, layer in self.adapted_layers():
            layer.unmerge()
        return self._unload(merge=False)

    def set_compute_dtype(self, compute_dtype: str | torch.dtype) -> None:
        """Dtype of the adapter maths on every layer: ``"input"`` — the layer input's dtype (bf16 stays bf16;
        fp32 master weights are cast for the maths and get fp32 gradients), ``"adapter"`` — the adapter
        weights' dtype (PEFT: the input is cast to it and the delta back), or a floating ``torch.dtype``."""
        self.compute_dtype = _check_compute_dtype(compute_dtype)
        for _, layer in self.adapted_layers():
            layer.compute_dtype = self.compute_dtype

    # -- scale ---------------------------------------------------------------------------------
    def set_scale(self, adapter: str, scale: float) -> None:
        """``scaling = scale · alpha / r`` on every layer of ``adapter`` (takes effect for unmerged use)."""
        self.require_adapters(names_arg(adapter, "set_scale"))
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ConfigError(f"set_scale needs a finite number, got {scale!r}")
        layers = [layer for _, layer in self.adapted_layers()]
        for layer in layers:
            layer.check_scalable([adapter])
        for layer in layers:
            layer.set_scale(adapter, scale)

    # -- status (PEFT's) ---------------------------------------------------------------------------
    def get_layer_status(self) -> list[TunerLayerStatus]:
        """Per adapted layer and ``modules_to_save`` wrapper: enabled, active/merged/available adapters,
        ``requires_grad`` and devices per adapter (:func:`lyco.get_layer_status`)."""
        return get_layer_status(self)

    def get_model_status(self) -> TunerModelStatus:
        """The layers' statuses summarised, ``"irregular"`` where they disagree (:func:`lyco.get_model_status`)."""
        return get_model_status(self)

    # -- accounting ------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, total)`` parameter counts (total includes the base model and all adapters)."""
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            if p.requires_grad:
                trainable += p.numel()
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Print ``trainable params: T || all params: A || trainable%: P`` (PEFT's format)."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / max(total, 1):.4f}")

def get_model(
    model: nn.Module,
    config: AdapterConfig | MixedConfig,
    adapter_name: str = "default",
    *,
    low_cpu_mem_usage: bool = False,
    autocast_adapter_dtype: bool = True,
    plans: Mapping[str, Any] | None = None,
    compute_dtype: str | torch.dtype = "input",
) -> LycoModel:
    """Inject the adapter described by ``config`` into ``model`` and return the :class:`LycoModel`.

    Only adapter parameters (and ``modules_to_save`` copies) are trainable afterwards. ``plans``: per
    module, a shape plan to use instead of planning from ``config`` (see :meth:`LycoModel.add_adapter`).

    >>> import torch, lyco
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> m = lyco.get_model(net, lyco.LoHaConfig(r=2, target_modules=["0"]))
    >>> m.get_nb_trainable_parameters()[0]  # 2 branches × (16·2 + 2·16)
    128
    """
    return LycoModel(
        model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage,
        autocast_adapter_dtype=autocast_adapter_dtype, plans=plans, compute_dtype=compute_dtype,
    )  # fmt: skip
