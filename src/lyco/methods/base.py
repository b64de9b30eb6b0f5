"""Shared adapter machinery: config base, one-adapter module, the wrapping layer, method registry.

A method is one file: subclass :class:`AdapterConfig` and :class:`Adapter`, implement
``create_parameters``, ``reset_parameters`` and ``delta_weight`` (optionally a factored path:
``factored_cost`` + ``factored_delta``), then decorate the adapter class with :func:`register_method`.
Rank dropout, module dropout, scaling, dtype casting, merge/unmerge and safe merge live here,
once, for every method and layer type.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, MergeError, ShapeMismatchError, StateError, UnsupportedLayerError
from ..ops.layerops import SUPPORTED_LAYERS, LayerSpec, apply_weight, from_canonical, layer_spec
from ..ops.paths import call_costs, choose_path, element_cost

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


def as_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` cast to ``dtype`` (``None``: unchanged); differentiable, so a cast parameter still gets its grad."""
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


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
    factored_conv: ClassVar[bool] = False  # the factored path also serves Conv1d/Conv2d (groups=1) layers
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
    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Unscaled ``ΔW`` with shape ``spec.weight_shape``, built in ``dtype`` (the parameters are cast
        first, so gradients still reach them in their own dtype); ``None``: the parameters' dtype."""

    def build_cost(self, device_type: str = "cpu") -> float:
        """Cost of building ``ΔW``: multiply-adds plus the elements of the ``ΔW``-sized tensors it writes
        (:func:`lyco.ops.paths.element_cost`); compared with :meth:`factored_cost` when that is not None."""
        return math.prod(self.spec.weight_shape) * (self.r + element_cost(device_type))

    def factored_cost(self, n_rows: int, device_type: str = "cpu") -> float | None:
        """Forward cost of ``factored_delta`` on ``n_rows`` rows of a linear-like layer (multiply-adds plus
        kernel-call overheads, see :mod:`lyco.ops.paths`), or ``None`` when the method has no factored path."""
        return None

    def factored_delta(
        self, x: torch.Tensor, scale: float | torch.Tensor = 1.0, conv: Callable[..., torch.Tensor] | None = None
    ) -> torch.Tensor:
        """``scale · ΔW · x`` for ``x (..., in)`` without building ``ΔW``, in ``x``'s dtype (when
        :meth:`factored_cost` is not None). ``scale``: a number or a ``(1,)`` tensor; fold it into a small
        factor rather than the output. Conv layers (methods with ``factored_conv``): ``x (N, in, *spatial)``
        and ``conv(input, weight)`` the base layer's convolution with another weight."""
        raise NotImplementedError

    def fused_linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float | torch.Tensor
    ) -> torch.Tensor | None:
        """``F.linear(x, weight, bias) + scale · ΔW · x`` as one step (a plain ``nn.Linear`` base, everything in
        ``x``'s dtype, no autocast), when the method can do better than two separate ones; ``None``: it cannot
        (the default), and the layer adds :meth:`factored_delta` to the base output instead."""
        return None

    def path_costs(
        self, n_rows: int, device_type: str = "cpu", *, grad: bool = False, fused: bool = False
    ) -> tuple[float, float] | None:
        """Cost ``(dense, factored)`` of one call on ``n_rows`` rows (see :func:`lyco.ops.paths.call_costs`), or
        ``None`` without a factored path."""
        factored = self.factored_cost(n_rows, device_type)
        if factored is None:
            return None
        size = math.prod(self.spec.weight_shape)
        build = self.build_cost(device_type) + (element_cost(device_type) * size if fused else 0)  # W + ΔW
        return call_costs(build, factored, n_rows * size, grad=grad, fused=fused)

    def select_path(self, n_rows: int, device_type: str, *, grad: bool = False, fused: bool = False) -> str:
        """``"dense"`` or ``"factored"`` for one call: conv layers and methods without a factored path are
        dense; otherwise ``self.path``, ``LYCO_PATH`` or the cheaper one."""
        if self.spec.kind == "conv" and not self.factored_conv:
            return "dense"
        costs = self.path_costs(n_rows, device_type, grad=grad, fused=fused)
        return "dense" if costs is None else choose_path(*costs, self.path)

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

    def _first_param(self) -> torch.Tensor:
        own = self._parameters
        return next(iter(own.values())) if own else next(self.parameters())

    @property
    def dtype(self) -> torch.dtype:
        return self._first_param().dtype

    @property
    def is_meta(self) -> bool:
        """Weights not materialised yet (created with ``low_cpu_mem_usage=True`` and not loaded)."""
        return any(p.is_meta for p in self.parameters())

    @property
    def requires_grad(self) -> bool:
        """Whether the (first) parameter is trainable: adapters are trained or frozen as a whole."""
        return self._first_param().requires_grad

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


_FUSABLE = (nn.Linear, nn.Conv1d, nn.Conv2d)
_PLAIN = (nn.Parameter, torch.Tensor)
_FULL_PRECISION = (torch.float32, torch.float64)


# torch's registries of global module hooks (dicts filled in place by ``register_module_*_hook``).
_GLOBAL_HOOKS = tuple(
    getattr(torch.nn.modules.module, n, {})
    for n in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks")
)


def _global_hooks() -> bool:
    """Whether any global module hook is registered (fusing would bypass the base layer's ``__call__``)."""
    return any(_GLOBAL_HOOKS)


def _along(factor: float | torch.Tensor, ndim: int, dim: int) -> float | torch.Tensor:
    """A per-channel factor ``(c,)`` (or ``(1,)``) viewed to broadcast along ``dim`` of an ``ndim``-dim tensor."""
    if not isinstance(factor, torch.Tensor):
        return factor
    shape = [1] * ndim
    shape[dim] = -1
    return factor.view(shape)


def _combine(entries: list[tuple[torch.Tensor, float | torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, float]:
    """``(ΔW, alpha)`` with ``alpha·ΔW = Σ scale·mask·ΔW_i`` for canonical deltas, their scales (a number or a
    ``(1,)`` tensor) and rank-dropout masks (``(out,)`` or None); a lone number stays an ``alpha``, so the
    caller can fold it into ``torch.add(W, ΔW, alpha=)`` instead of writing a scaled copy."""
    if len(entries) == 1 and not isinstance(entries[0][1], torch.Tensor) and entries[0][2] is None:
        return entries[0][0], entries[0][1]
    total: torch.Tensor | None = None
    for delta, scale, mask in entries:
        factor = scale if mask is None else mask * scale
        delta = delta * _along(factor, delta.dim(), 0)
        total = delta if total is None else total + delta.to(total.dtype)
    assert total is not None
    return total, 1.0


class AdaptedLayer(nn.Module):
    """Wraps a base layer (kept as ``base_layer``) and holds its adapters by name.

    ``forward(x) = base_layer(x) + Σ_active scaling_a · mask · ΔW_a·x`` for non-merged adapters, each by
    its cheaper path (dense ``ΔW`` or factored). Dense deltas are summed and, when :meth:`can_fuse`,
    added to the base weight for a single matmul/conv.

    ``compute_dtype``: the dtype of the adapter maths — ``"input"`` (default: the input's dtype, so a bf16
    model computes adapters in bf16 while fp32 master parameters get fp32 gradients), ``"adapter"``
    (PEFT's rule: the input is cast to the adapter's dtype and the delta back), or a ``torch.dtype``.
    ``fuse_dense``: allow the fused forwards (default True): dense deltas added to the base weight, and a
    factored adapter's :meth:`Adapter.fused_linear` running the base matmul in its own autograd node.
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
        self.compute_dtype: str | torch.dtype = "input"
        self.fuse_dense = True

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
        names = self.live_adapters()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        fuse = not args and not kwargs and self.can_fuse(x)
        grad = torch.is_grad_enabled()
        n_rows = x.numel() // max(self.spec.in_features, 1)
        dense: list[tuple[torch.Tensor, float | torch.Tensor, torch.Tensor | None]] = []
        factored: list[tuple[Adapter, torch.dtype, float | torch.Tensor, torch.Tensor | None]] = []
        for name in names:
            adapter = self._materialised(name)
            dtype = self.resolve_compute_dtype(x, adapter)
            scale, mask = self._factors(adapter, x.device, dtype)
            path = adapter.select_path(n_rows, x.device.type, grad=grad and adapter.requires_grad, fused=fuse)
            if path == "factored" and self.spec.kind == "conv" and self._modules["base_layer"].groups != 1:
                path = "dense"
            if path == "factored":
                factored.append((adapter, dtype, scale, mask))
            else:
                dense.append((adapter.delta_weight(dtype), scale, mask))
        base = self._modules["base_layer"]
        result = None
        if dense:
            delta, alpha = _combine(dense)
            if fuse:  # one matmul/conv with W + alpha·ΔW
                weight = base.weight
                result = apply_weight(base, self.spec, x, torch.add(weight, delta.to(weight.dtype), alpha=alpha), base.bias)
            else:
                result = base(x, *args, **kwargs)
                delta = delta if alpha == 1 else delta * alpha
                result = result + apply_weight(base, self.spec, x.to(delta.dtype), delta).to(result.dtype)
        elif fuse and self.spec.kind == "linear" and factored[0][1] == x.dtype and factored[0][3] is None:
            adapter, _, scale, _ = factored[0]
            result = adapter.fused_linear(x, base.weight, base.bias, scale)  # base + adapter in one node, or None
            if result is not None:
                factored = factored[1:]
        if result is None:
            result = base(x, *args, **kwargs)
        in_place = self._plain_base() and not (dense and not fuse)  # the result is a fresh tensor only we hold
        conv = partial(base._conv_forward, bias=None) if factored and self.spec.kind == "conv" else None
        for adapter, dtype, scale, mask in factored:
            out = adapter.factored_delta(x.to(dtype), scale, conv)
            if mask is not None:
                out = out * _along(mask, out.dim(), self.spec.channel_dim(out.dim()))
            result = result.add_(out.to(result.dtype)) if in_place else result + out.to(result.dtype)
        return result

    def live_adapters(self) -> list[str]:
        """Active adapters this layer has that are not merged (empty when adapters are disabled)."""
        if self.disable_adapters:
            return []
        own, merged = self._modules["lyco_adapters"], self.merged_adapters
        return [n for n in self.active_adapters if n not in merged and n in own]

    def resolve_compute_dtype(self, x: torch.Tensor, adapter: Adapter) -> torch.dtype:
        """The dtype the adapter's maths runs in for input ``x`` (see :attr:`compute_dtype`)."""
        mode = self.compute_dtype
        if mode == "input":
            return x.dtype
        return adapter.dtype if mode == "adapter" else mode

    def can_fuse(self, x: torch.Tensor) -> bool:
        """Whether dense deltas can be added to the base weight for this call and applied by one matmul/conv
        (``F.linear(x, W + ΔW, b)``) instead of a second one: the base layer is a plain ``nn.Linear``/``Conv1d``/
        ``Conv2d`` whose forward nothing hooks, its weight a plain fp32/fp64 tensor in ``x``'s dtype and
        autocast is off (a low-precision ``W + ΔW`` would round away small deltas)."""
        if not self.fuse_dense or not self._plain_base():
            return False
        weight = self._modules["base_layer"]._parameters["weight"]
        if type(weight) not in _PLAIN or weight.dtype not in _FULL_PRECISION or x.dtype != weight.dtype:
            return False
        return not torch.is_autocast_enabled(x.device.type)

    def _plain_base(self) -> bool:
        """The base layer is exactly ``nn.Linear``/``Conv1d``/``Conv2d`` (no subclass with its own forward) and
        no module hook can see its call: its output is a fresh tensor nothing else holds."""
        base = self._modules["base_layer"]
        if type(base) not in _FUSABLE:
            return False
        if base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks:
            return False
        return not _global_hooks()

    def _factors(
        self, adapter: Adapter, device: torch.device, dtype: torch.dtype
    ) -> tuple[float | torch.Tensor, torch.Tensor | None]:
        """``(scale, mask)`` of one adapter for this forward: ``scale`` is ``scaling``, in training times the
        module-dropout 0/1 factor ``(1,)``; ``mask`` the rank-dropout keep-mask ``(out,)`` (training) or None.
        The 0/1 factor is a tensor, not a Python branch: no host sync, no torch.compile graph break, and
        every parameter stays in the graph (DDP needs no find_unused_parameters)."""
        scale: float | torch.Tensor = adapter.scaling
        mask = None
        if self.training and adapter.rank_dropout > 0:
            mask = rank_dropout_mask(self.spec.out_features, adapter.rank_dropout, adapter.rank_dropout_scale, device, dtype)
        if self.training and adapter.module_dropout > 0:
            scale = (torch.rand(1, device=device) > adapter.module_dropout).to(dtype) * scale
        return scale, mask

    def _materialised(self, name: str) -> Adapter:
        adapter = self._modules["lyco_adapters"][name]
        if adapter._first_param().is_meta and not self._modules["base_layer"].weight.is_meta:
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

    def _delta_fp32(self, name: str) -> torch.Tensor:
        """Scaled ``ΔW`` built in fp32 (merge precision), laid out like the base weight."""
        adapter = self._materialised(name)
        return from_canonical(self.spec, adapter.delta_weight(torch.float32).detach() * adapter.scaling)

    def _merged_weight(self, name: str) -> torch.Tensor:
        weight = self.base_layer.weight
        return (weight.data.float() + self._delta_fp32(name)).to(weight.dtype)

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
                weight.data.copy_((weight.data.float() - self._delta_fp32(name)).to(weight.dtype))

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
