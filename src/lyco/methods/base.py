"""Shared adapter machinery: config base, one-adapter module, the wrapping layer, method registry.

A method is one file: subclass :class:`AdapterConfig` and :class:`Adapter`, implement
``create_parameters``, ``reset_parameters`` and ``delta_weight`` (optionally a faster
``forward_delta``), then decorate the adapter class with :func:`register_method`.
Rank dropout, module dropout, scaling, dtype casting, merge/unmerge and safe merge live here,
once, for every method and layer type.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, MergeError, ShapeMismatchError, StateError, UnsupportedLayerError
from ..ops.layerops import SUPPORTED_LAYERS, LayerSpec, apply_weight, from_canonical, layer_spec
from ..ops.paths import choose_path

META = torch.device("meta")


def _as_str_list(value: Any, name: str) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return sorted(set(value)) if isinstance(value, (set, frozenset)) else list(dict.fromkeys(value))
    raise ConfigError(f"{name} must be a string (regex) or a list of module names, got {value!r}")


def _check_regex(pattern: str, name: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"{name}: {pattern!r} is not a valid regular expression ({exc})") from None


@dataclass
class AdapterConfig:
    """Fields shared by every LyCORIS-family method; names and defaults equal PEFT's.

    ``target_modules``: list → a module matches when its name equals an entry or ends with
    ``"." + entry``; str → regex that must match the full module name; ``"all-linear"`` → every
    Linear/Conv1D except the output head. ``rank_pattern`` / ``alpha_pattern``: see
    :func:`lyco.targeting.pattern_value` (first matching key wins, PEFT's rule).
    """

    peft_type: ClassVar[str] = ""
    init_choices: ClassVar[tuple[object, ...]] = (True, False)

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        name = type(self).__name__
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ConfigError(f"{name}.r must be a positive integer, got {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha):
            raise ConfigError(f"{name}.alpha must be a finite number, got {self.alpha!r}")
        for fname in ("rank_dropout", "module_dropout"):
            p = getattr(self, fname)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                raise ConfigError(f"{name}.{fname} must be a probability in [0, 1], got {p!r}")
        if not any(self.init_weights is c or (isinstance(c, str) and self.init_weights == c) for c in self.init_choices):
            raise ConfigError(f"{name}.init_weights must be one of {self.init_choices}, got {self.init_weights!r}")
        self.target_modules = _as_str_list(self.target_modules, f"{name}.target_modules")
        self.exclude_modules = _as_str_list(self.exclude_modules, f"{name}.exclude_modules")
        for fname in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, fname), str):
                _check_regex(getattr(self, fname), f"{name}.{fname}")
        if isinstance(self.layers_pattern, (list, tuple)):
            self.layers_pattern = list(self.layers_pattern)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(f"{name}.layers_pattern is only used with layers_to_transform; set both or neither")
        if self.layers_to_transform is not None:
            if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
                raise ConfigError(f"{name}.layers_to_transform cannot be used when target_modules is a regex string")
            ltt = self.layers_to_transform
            items = [ltt] if isinstance(ltt, int) else list(ltt)
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items):
                raise ConfigError(f"{name}.layers_to_transform must be non-negative layer indices, got {ltt!r}")
            self.layers_to_transform = ltt if isinstance(ltt, int) else items
        for key, val in dict(self.rank_pattern or {}).items():
            _check_regex(key, f"{name}.rank_pattern")
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ConfigError(f"{name}.rank_pattern[{key!r}] must be a positive integer, got {val!r}")
        for key, val in dict(self.alpha_pattern or {}).items():
            _check_regex(key, f"{name}.alpha_pattern")
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not math.isfinite(val):
                raise ConfigError(f"{name}.alpha_pattern[{key!r}] must be a finite number, got {val!r}")
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        if self.modules_to_save is not None:
            mts = _as_str_list(self.modules_to_save, f"{name}.modules_to_save")
            self.modules_to_save = [mts] if isinstance(mts, str) else mts

    def to_dict(self) -> dict[str, Any]:
        """Field values by PEFT name (plus ``peft_type``), JSON-ready."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["peft_type"] = self.peft_type
        return out


def rank_dropout_mask(
    n: int, p: float, rescale: bool, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Keep-mask ``(n,)`` over output rows, each dropped with probability ``p``.

    With ``rescale`` the kept rows are divided by the kept fraction; if every row is dropped the
    mask is all zeros (never ``0 / 0``, PEFT's NaN).
    """
    keep = (torch.rand(n, device=device) > p).to(dtype)
    if rescale:
        keep = keep / keep.mean().clamp_min(1.0 / n)
    return keep


class Adapter(nn.Module, ABC):
    """One adapter's parameters on one layer. Parameter attribute names are the on-disk names.

    Holds ``r``, ``alpha``, ``scaling = alpha / r``, ``rank_dropout``, ``rank_dropout_scale`` and
    ``module_dropout``. ``delta_weight()`` is the *unscaled* ``ΔW`` in canonical layout
    ``(out, in, *kernel)``; the wrapping layer applies ``scaling`` exactly once.
    """

    config_cls: ClassVar[type[AdapterConfig]]
    param_names: ClassVar[tuple[str, ...]] = ()
    rank_dropout_scale_default: ClassVar[bool] = True
    path: str | None = None  # "dense" / "factored" forces this adapter's path; None: LYCO_PATH or cost model

    def __init__(
        self,
        spec: LayerSpec,
        r: int,
        alpha: float,
        config: AdapterConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        plan: Any = None,
    ) -> None:
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ConfigError(f"{type(self).__name__}: rank r must be a positive integer, got {r!r}")
        if plan is not None and tuple(plan.weight_shape) != spec.weight_shape:
            raise ShapeMismatchError(
                f"{type(self).__name__}: plan for weight {tuple(plan.weight_shape)} given for a layer of {spec.weight_shape}"
            )
        self.spec = spec
        self.plan = plan
        self.r = r
        self.alpha = float(alpha)
        self.scaling = self.default_scaling()
        self.rank_dropout = float(config.rank_dropout)
        self.module_dropout = float(config.module_dropout)
        self.rank_dropout_scale = bool(getattr(config, "rank_dropout_scale", self.rank_dropout_scale_default))
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.create_parameters(config, device=device, dtype=dtype if device == META else torch.float32)
        if device != META:
            with torch.no_grad():
                self.reset_parameters(config.init_weights)
            if dtype is not None:
                self.to(dtype)

    # -- to implement per method -------------------------------------------------------------
    @abstractmethod
    def create_parameters(self, config: AdapterConfig, *, device: torch.device, dtype: torch.dtype | None) -> None:
        """Register the parameters for ``self.spec`` (use :meth:`add_param`). ``self.plan`` is a shape plan
        given by the caller (e.g. inferred from a file), or ``None``: then compute it from ``config``."""

    @abstractmethod
    def reset_parameters(self, init_weights: bool | str) -> None:
        """(Re)initialise parameters; ``True`` must give a zero delta."""

    @abstractmethod
    def delta_weight(self) -> torch.Tensor:
        """Unscaled ``ΔW`` with shape ``spec.weight_shape``."""

    def path_costs(self, n_rows: int, device_type: str = "cpu") -> tuple[float, float] | None:
        """Cost ``(dense, factored)`` of one call on ``n_rows`` rows of a linear-like layer, or ``None`` when
        the method has no factored path (see :mod:`lyco.ops.paths`)."""
        return None

    def factored_delta(self, x: torch.Tensor) -> torch.Tensor:
        """Unscaled ``ΔW · x`` for ``x (..., in)`` without building ``ΔW`` (when ``path_costs`` is not None)."""
        raise NotImplementedError

    def forward_delta(self, x: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """Unscaled ``ΔW · x`` the way ``base_layer`` applies its weight: factored for linear-like layers when
        cheaper (or forced by ``LYCO_PATH`` / ``self.path``), else dense."""
        if self.spec.kind != "conv":
            costs = self.path_costs(x.numel() // max(self.spec.in_features, 1), x.device.type)
            if costs is not None and choose_path(*costs, self.path) == "factored":
                return self.factored_delta(x)
        return apply_weight(base_layer, self.spec, x, self.delta_weight().to(x.dtype))

    @classmethod
    def infer_plan(cls, shapes: dict[str, tuple[int, ...]], weight_shape: tuple[int, ...], r: int) -> Any:
        """The shape plan that ``shapes`` (on-disk name → shape, canonical layout) describe for a layer of
        ``weight_shape``, or ``None`` when the method plans from its config only. Raises
        :class:`~lyco.ShapeMismatchError` when the tensors do not fit."""
        return None

    @classmethod
    def supports(cls, spec: LayerSpec) -> bool:
        """Whether this method can adapt a layer of this kind (default: all supported kinds)."""
        return True

    # -- helpers -------------------------------------------------------------------------------
    def default_scaling(self) -> float:
        return self.alpha / self.r

    def add_param(self, name: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype | None) -> None:
        setattr(self, name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def is_meta(self) -> bool:
        """Weights not materialised yet (created with ``low_cpu_mem_usage=True`` and not loaded)."""
        return any(p.is_meta for p in self.parameters())

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"


METHODS: dict[str, type[Adapter]] = {}


def register_method(adapter_cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: make ``adapter_cls.config_cls`` usable with :func:`lyco.get_model`."""
    cfg = adapter_cls.config_cls
    if not cfg.peft_type:
        raise ConfigError(f"{cfg.__name__}.peft_type must be set to register {adapter_cls.__name__}")
    METHODS[cfg.peft_type] = adapter_cls
    return adapter_cls


def adapter_class_for(config: AdapterConfig) -> type[Adapter]:
    """The registered adapter class for a config instance."""
    for adapter_cls in METHODS.values():
        if type(config) is adapter_cls.config_cls:
            return adapter_cls
    for adapter_cls in METHODS.values():
        if isinstance(config, adapter_cls.config_cls):
            return adapter_cls
    raise ConfigError(f"no adapter method is registered for {type(config).__name__}; use @register_method")


class AdaptedLayer(nn.Module):
    """Wraps a base layer (kept as ``base_layer``) and holds its adapters by name.

    ``forward(x) = base_layer(x) + Σ_active scaling_a · mask · ΔW_a·x`` for non-merged adapters.
    """

    def __init__(self, base_layer: nn.Module, module_name: str = "") -> None:
        super().__init__()
        spec = layer_spec(base_layer)
        if spec is None:
            raise UnsupportedLayerError(
                f"module {module_name!r} of type {type(base_layer).__name__} cannot be adapted; "
                f"supported layers: {SUPPORTED_LAYERS}. Remove it from target_modules."
            )
        self.base_layer = base_layer
        self.spec = spec
        self.lyco_adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.cast_input_dtype_enabled = True

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self._modules["base_layer"], name)

    # -- per-adapter views (PEFT-style dict access) ---------------------------------------------
    def _view(self, attr: str) -> dict[str, Any]:
        return {n: getattr(a, attr) for n, a in self.lyco_adapters.items()}

    r = property(lambda self: self._view("r"))
    alpha = property(lambda self: self._view("alpha"))
    scaling = property(lambda self: self._view("scaling"))
    rank_dropout = property(lambda self: self._view("rank_dropout"))
    rank_dropout_scale = property(lambda self: self._view("rank_dropout_scale"))
    module_dropout = property(lambda self: self._view("module_dropout"))

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name in self.merged_adapters or name not in self.lyco_adapters:
                continue
            delta = self.delta_activations(name, x)
            p = self.lyco_adapters[name].module_dropout
            if self.training and p > 0:
                # A 0/1 tensor factor instead of a Python branch: no host sync, no torch.compile graph
                # break, and every parameter stays in the graph (DDP needs no find_unused_parameters).
                delta = delta * (torch.rand(1, device=delta.device) > p)
            result = result + delta.to(result.dtype)
        return result

    def delta_activations(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``scaling · mask · ΔW·x`` of one adapter (mask: rank dropout, training only)."""
        adapter = self._materialised(name)
        if self.cast_input_dtype_enabled:
            x = x.to(adapter.dtype)
        out = adapter.forward_delta(x, self.base_layer)
        if self.training and adapter.rank_dropout > 0:
            mask = rank_dropout_mask(
                self.spec.out_features, adapter.rank_dropout, adapter.rank_dropout_scale, out.device, out.dtype
            )
            shape = [1] * out.dim()
            shape[self.spec.channel_dim(out.dim())] = -1
            return out * (mask * adapter.scaling).view(shape)
        return out * adapter.scaling

    def _materialised(self, name: str) -> Adapter:
        adapter = self.lyco_adapters[name]
        if adapter.is_meta and not self.base_layer.weight.is_meta:
            raise StateError(
                f"adapter {name!r} on {type(self.base_layer).__name__} still has its weights on the meta device "
                "(low_cpu_mem_usage=True); load its weights before using it"
            )
        return adapter

    # -- weights -----------------------------------------------------------------------------
    def get_delta_weight(self, name: str) -> torch.Tensor:
        """Scaled ``ΔW`` of one adapter, laid out like the base layer's stored weight. No dropout."""
        adapter = self._materialised(name)
        return from_canonical(self.spec, adapter.delta_weight() * adapter.scaling)

    def _merged_weight(self, name: str) -> torch.Tensor:
        weight = self.base_layer.weight
        return (weight.data.float() + self.get_delta_weight(name).detach().float()).to(weight.dtype)

    def check_merge(self, adapter_names: list[str], module_name: str = "") -> None:
        """Raise :class:`MergeError` if merging would put a non-finite value in the weight (no change)."""
        with torch.no_grad():
            for name in adapter_names:
                if name in self.lyco_adapters and not torch.isfinite(self._merged_weight(name)).all():
                    raise MergeError(
                        f"merging adapter {name!r} into {module_name or type(self.base_layer).__name__} gives "
                        "NaN/Inf weights; the adapter is broken (nothing was merged)"
                    )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the given adapters (default: active ones) into the base weight."""
        names = [n for n in (adapter_names if adapter_names is not None else self.active_adapters) if n in self.lyco_adapters]
        already = [n for n in names if n in self.merged_adapters]
        if already:
            raise MergeError(f"adapter(s) {already} are already merged; call unmerge() first")
        if safe_merge:
            self.check_merge(names)
        with torch.no_grad():
            for name in names:
                self.base_layer.weight.data.copy_(self._merged_weight(name))
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter from the base weight, last merged first."""
        weight = self.base_layer.weight
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                delta = self.get_delta_weight(name).detach().float()
                weight.data.copy_((weight.data.float() - delta).to(weight.dtype))

    # -- scale -------------------------------------------------------------------------------
    def check_scalable(self, names: list[str]) -> None:
        """Changing the scale of a merged adapter would make unmerge subtract the wrong delta."""
        merged = [n for n in names if n in self.merged_adapters]
        if merged:
            raise MergeError(f"adapter(s) {merged} are merged; unmerge before changing their scale")

    def set_scale(self, adapter: str, scale: float) -> None:
        """``scaling = scale · alpha / r`` for one adapter."""
        self.check_scalable([adapter])
        if adapter in self.lyco_adapters:
            a = self.lyco_adapters[adapter]
            a.scaling = scale * a.default_scaling()

    def scale_layer(self, scale: float) -> None:
        """Multiply the scaling of every active adapter by ``scale``."""
        self.check_scalable(self.active_adapters)
        for name in self.active_adapters:
            if name in self.lyco_adapters:
                self.lyco_adapters[name].scaling *= scale

    def unscale_layer(self, scale: float | None = None) -> None:
        """Divide active scalings by ``scale``, or reset them to ``alpha / r`` when ``scale`` is None."""
        self.check_scalable(self.active_adapters)
        for name in self.active_adapters:
            if name in self.lyco_adapters:
                a = self.lyco_adapters[name]
                a.scaling = a.default_scaling() if scale is None else a.scaling / scale

    def extra_repr(self) -> str:
        return f"active={self.active_adapters}, merged={self.merged_adapters}"
