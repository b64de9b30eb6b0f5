"""``Adapter``: one adapter's parameters on one layer, with its method's file schema and cost-model hooks.

A method is one file: subclass :class:`~lyco.methods.config.AdapterConfig` and :class:`Adapter`, implement
``create_parameters``, ``reset_parameters`` and :meth:`~lyco.methods.schema.MethodSchema.compose` (the one
``ΔW`` formula, also used for files; or override ``delta_weight``), declare the on-disk schema
(``params`` / ``param_names``, ``rank``, ``guess_weight_shape``…), optionally a factored path
(``factored_cost`` + ``factored_delta``), then decorate the class with
:func:`~lyco.methods.registry.register_method`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError, ShapeMismatchError
from ..ops.dora import dora_norm, gain_shape, row_sq
from ..ops.layerops import LayerSpec
from ..ops.paths import call_costs, choose_path, element_cost
from .config import AdapterConfig
from .schema import DORA, MethodSchema, ShapePlan

META = torch.device("meta")
SCALAR = "scalar"  # the parameter name of ``use_scalar`` (files never hold it)
_SHARED = (SCALAR, DORA.name)  # parameters every method may have, kept by Adapter itself


def as_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``t`` cast to ``dtype`` (``None``: unchanged); differentiable, so a cast parameter still gets its grad."""
    return t if dtype is None or t.dtype == dtype else t.to(dtype)


class Adapter(nn.Module, MethodSchema, ABC):
    """One adapter's parameters on one layer. Parameter attribute names are the on-disk names.

    Holds ``r``, ``alpha``, ``scaling`` (``alpha / r``, see :meth:`config_scaling`), ``rank_dropout``,
    ``rank_dropout_scale``, ``module_dropout`` and ``dropout`` (on the input). ``delta_weight()`` is the *unscaled* ``ΔW`` in canonical layout
    ``(out, in, *kernel)``; the wrapping layer applies ``scaling`` exactly once. ``plan``: the method's
    shape plan (given, e.g. inferred from a file, or made by ``create_parameters``;
    :class:`~lyco.methods.schema.ShapePlan` for methods without one).
    """

    config_cls: ClassVar[type[AdapterConfig]]
    rank_dropout_scale_default: ClassVar[bool] = True
    factored_conv: ClassVar[bool] = False  # the factored path also serves Conv1d/Conv2d (groups=1) layers
    path: str | None = None  # "dense" / "factored" forces this adapter's path; None: LYCO_PATH or cost model
    _sq_cache: tuple | None = None  # DoRA: (the base weight's key, ‖W_i‖²) — see base_row_sq

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        config = cls.__dict__.get("config_cls")
        if "algo" not in cls.__dict__ and config is not None and config.peft_type:
            cls.algo = config.peft_type.lower()

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
        self._costs: dict[tuple, tuple[float, float] | None] = {}  # path_costs per call shape (plans are frozen)
        self.r = r
        self.alpha = float(alpha)
        self.base_scaling = self.config_scaling(config, r, self.alpha)
        self.scaling = self.base_scaling
        self.rank_dropout = float(config.rank_dropout)
        self.module_dropout = float(config.module_dropout)
        self.dropout = float(config.dropout)
        self.rank_dropout_scale = bool(getattr(config, "rank_dropout_scale", self.rank_dropout_scale_default))
        self.use_scalar = bool(getattr(config, "use_scalar", False))
        self.weight_decompose = bool(getattr(config, "weight_decompose", False))
        self.wd_on_out = bool(getattr(config, "wd_on_out", True))
        if self.weight_decompose and not self.supports_dora:
            raise ConfigError(f"{type(self).__name__}: weight_decompose (DoRA) is not available for this method")
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.create_parameters(config, device=device, dtype=dtype if device == META else torch.float32)
        if self.plan is None:
            self.plan = ShapePlan(spec.weight_shape, r)
        # after the method's own parameters, so first_param() stays the method's
        pdtype = dtype if device == META else torch.float32
        if self.use_scalar:
            self.scalar = nn.Parameter(torch.empty(1, device=device, dtype=pdtype))
        self.merge_gain: torch.Tensor | None = None  # DoRA: the gain the layer's merge applied (unmerge divides)
        if self.weight_decompose:  # set from the base weight by init_dora(), or loaded from a file
            self.dora_scale = nn.Parameter(torch.ones(gain_shape(spec.weight_shape, self.wd_on_out), device=device, dtype=pdtype))
        if device != META:
            with torch.no_grad():
                # use_scalar: every factor random, the scalar 0 (zero delta) or 1 (init_weights=False)
                self.reset_parameters(False if self.use_scalar else config.init_weights)
                if self.use_scalar:
                    self.scalar.fill_(0.0 if config.init_weights else 1.0)
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

    def delta_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Unscaled ``ΔW`` with shape ``spec.weight_shape``, built in ``dtype`` (the parameters are cast
        first, so gradients still reach them in their own dtype); ``None``: the parameters' dtype.
        Default: :meth:`compose` of the parameters, the formula files use too."""
        return self.compose(self.tensors(dtype), self.plan).reshape(self.spec.weight_shape)

    def bias_delta(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """Unscaled bias delta ``(out,)`` in ``dtype``, or ``None`` (:meth:`compose_bias` of the parameters)."""
        return self.compose_bias(self.tensors(dtype))

    def tensors(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The method's own factors by on-disk name, cast to ``dtype`` (differentiably): not the shared
        ``scalar`` and ``dora_scale``."""
        return {name: as_dtype(p, dtype) for name, p in self._parameters.items() if p is not None and name not in _SHARED}

    def file_params(self) -> dict[str, nn.Parameter]:
        """Every parameter files hold, by name: the factors and DoRA's ``dora_scale`` (not the ``scalar``)."""
        return {name: p for name, p in self._parameters.items() if p is not None and name != SCALAR}

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as files hold them (detached): the factors with the ``scalar`` folded in
        (:meth:`fold_scale`; files never hold it), and ``dora_scale``."""
        tensors = {k: t.detach() for k, t in self.tensors().items()}
        if self.use_scalar:
            tensors = self.fold_scale(tensors, float(self.scalar.detach()))
        if self.weight_decompose:
            tensors[DORA.name] = self.dora_scale.detach()
        return tensors

    # -- DoRA -----------------------------------------------------------------------------------------
    def weight_norm(
        self, weight: torch.Tensor, scale: float | torch.Tensor, delta: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``‖W + scale·ΔW‖ + ε`` along DoRA's axis (shape of ``dora_scale``), no gradient, for a canonical base
        ``weight`` in the compute dtype (``delta``: the unscaled ``ΔW`` when the caller built it). Default: from
        ``W + scale·ΔW``, one weight-sized tensor besides ``ΔW``; methods with a cheaper identity override it
        (and :meth:`norm_needs_delta`)."""
        with torch.no_grad():
            d = self.delta_weight(weight.dtype) if delta is None else delta.detach()
            total = torch.add(weight, d, alpha=scale) if not isinstance(scale, torch.Tensor) else weight + d * scale
            return dora_norm(total, self.wd_on_out)

    def base_row_sq(self, weight: torch.Tensor, flat: torch.Tensor) -> torch.Tensor | None:
        """``‖W_i‖²`` of a frozen base parameter, kept while it is unchanged (same parameter, storage, dtype and
        version: a merge, ``copy_`` or ``.data`` swap invalidates it); ``None`` (compute it) for a weight that
        trains, a per-call cast (not the parameter itself), or under torch.compile."""
        if not isinstance(weight, nn.Parameter) or weight.requires_grad or torch.compiler.is_compiling():
            return None
        key = (id(weight), weight.data_ptr(), weight._version, weight.dtype, weight.device, flat.dtype)
        if self._sq_cache is not None and self._sq_cache[0] == key:
            return self._sq_cache[1]
        sq = row_sq(flat)
        self._sq_cache = (key, sq)
        return sq

    def norm_needs_delta(self) -> bool:
        """Whether :meth:`weight_norm` builds ``ΔW`` (a dense DoRA term then takes its norm from its own build)."""
        return True

    def init_dora(self, weight: torch.Tensor) -> None:
        """``dora_scale = ‖W + s·ΔW‖`` for the canonical base ``weight`` (PEFT's rule: the adapted layer starts
        equal to its plain-LoRA form; with the zero init that is ``‖W‖``)."""
        with torch.no_grad():
            w = weight.detach().to(torch.float32)
            scale = self.effective_scaling  # with use_scalar, the scalar's start value (0: m = ‖W‖)
            scale = scale.detach().float() if isinstance(scale, torch.Tensor) else scale
            self.dora_scale.copy_(self.weight_norm(w, scale).to(self.dora_scale.dtype))

    def dora_gain(
        self, weight: torch.Tensor, scale: float | torch.Tensor, delta: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``g = m / ‖W + scale·ΔW‖`` shaped like ``dora_scale``, in ``weight``'s dtype (``delta``: ``ΔW`` when
        already built); the norm is a constant for autograd (gradients reach ``m``, and ``ΔW`` through the term
        it multiplies)."""
        return as_dtype(self.dora_scale, weight.dtype) / self.weight_norm(weight, scale, delta)

    def loaded(self) -> None:
        """Called after file tensors were put into the parameters: a ``scalar`` becomes 1 (files fold it in)."""
        if self.use_scalar:
            with torch.no_grad():
                if self.scalar.is_meta:
                    self.scalar = nn.Parameter(
                        torch.ones(1, device=self.first_param().device, dtype=self.scalar.dtype),
                        requires_grad=self.scalar.requires_grad,
                    )
                else:
                    self.scalar.fill_(1.0)

    @property
    def effective_scaling(self) -> float | torch.Tensor:
        """``scaling``, times the trainable ``scalar`` ``(1,)`` with ``use_scalar``: what ``ΔW`` is multiplied by."""
        return self.scaling * self.scalar if self.use_scalar else self.scaling

    # -- forward paths and their costs ----------------------------------------------------------
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
        """``"dense"`` or ``"factored"`` for one call — the only place the path is decided. Dense: conv layers
        of methods without a factored conv path, grouped convs, methods without a factored path; otherwise
        ``self.path``, ``LYCO_PATH`` or the cheaper one by the cost model."""
        if self.spec.kind == "conv" and (not self.factored_conv or self.spec.groups != 1):
            return "dense"
        key, memo = (n_rows, device_type, grad, fused), not torch.compiler.is_compiling()  # compiled: no dict guards
        if memo and key in self._costs:  # a decode loop asks the same question for every token (~10 µs per layer)
            costs = self._costs[key]
        else:
            costs = self.path_costs(n_rows, device_type, grad=grad, fused=fused)
            if memo:
                if len(self._costs) >= 64:  # varying sequence lengths: keep the memo small
                    self._costs.clear()
                self._costs[key] = costs
        return "dense" if costs is None else choose_path(*costs, self.path)

    @classmethod
    def supports(cls, spec: LayerSpec) -> bool:
        """Whether this method can adapt a layer of this kind (default: all supported kinds)."""
        return True

    @classmethod
    def config_scaling(cls, config: AdapterConfig, r: int, alpha: float) -> float:
        """The scale ``config`` gives an adapter of rank ``r`` and this alpha: ``alpha / r``, or ``alpha / √r``
        with ``use_rslora`` (rank-stabilised; methods with other rules override it)."""
        return alpha / (math.sqrt(r) if getattr(config, "use_rslora", False) else r)

    @classmethod
    def peft_scaling(cls, config: AdapterConfig, r: int, alpha: float) -> float:
        """The scale PEFT gives the same config: ``alpha / r`` (PEFT's LoHa/LoKr have neither ``use_rslora`` nor
        ``full_matrix``). Where it differs from :meth:`config_scaling`, PEFT folders carry the ratio in the
        tensors (:mod:`lyco.formats.peft`), so PEFT computes lyco's ``ΔW``."""
        return alpha / r

    # -- LyCORIS-style configuration (create_lycoris, kohya network_args) --------------------------
    # LyCORIS's module keyword → this method's config field; options a method's config lacks are ignored, as
    # LyCORIS's modules ignore the options of other methods (e.g. ``factor`` on a LoCon).
    lycoris_fields: ClassVar[dict[str, str]] = {
        "dropout": "dropout", "rank_dropout": "rank_dropout", "module_dropout": "module_dropout",
        "use_scalar": "use_scalar", "rs_lora": "use_rslora", "weight_decompose": "weight_decompose",
        "wd_on_out": "wd_on_out", "rank_dropout_scale": "rank_dropout_scale", "use_tucker": "use_effective_conv2d",
    }  # fmt: skip
    lycoris_init: ClassVar[bool | str] = True  # ``init_weights`` of a LyCORIS-style config (a zero delta)
    plus_params: ClassVar[tuple[str, ...]] = ()  # LoRA+: the factors that train at ``lr · loraplus ratio``

    @classmethod
    def lycoris_config(
        cls, spec: LayerSpec, r: int, alpha: float, options: Mapping[str, Any]
    ) -> tuple[AdapterConfig, Any]:
        """``(config, plan)`` of this method that give layer ``spec`` what LyCORIS's module of the method would be,
        for rank ``r``, ``alpha`` (already LyCORIS's: 0 / None mean ``r``) and LyCORIS's module options; ``plan``: a
        shape plan where LyCORIS plans otherwise than the config would, else ``None``. Default: the
        :attr:`lycoris_fields` the config has, with :attr:`lycoris_init`, and no plan."""
        names = {f.name for f in fields(cls.config_cls)}
        kwargs = {field: options[opt] for opt, field in cls.lycoris_fields.items() if opt in options and field in names}
        init = True if kwargs.get("use_scalar") else cls.lycoris_init  # use_scalar: random factors, scalar 0
        return cls.config_cls(r=r, alpha=alpha, init_weights=init, **kwargs), None

    # -- helpers -------------------------------------------------------------------------------
    def default_scaling(self) -> float:
        """The config's scale (``set_scale`` multiplies it; ``unscale_layer()`` returns to it)."""
        return self.base_scaling

    def add_param(self, name: str, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype | None) -> None:
        setattr(self, name, nn.Parameter(torch.empty(shape, device=device, dtype=dtype)))

    def first_param(self) -> torch.Tensor:
        """The adapter's first parameter (adapters are created, moved, trained and frozen as a whole)."""
        own = self._parameters
        return next(iter(own.values())) if own else next(self.parameters())

    @property
    def dtype(self) -> torch.dtype:
        return self.first_param().dtype

    @property
    def is_meta(self) -> bool:
        """Weights not materialised yet (created with ``low_cpu_mem_usage=True`` and not loaded)."""
        return any(p.is_meta for p in self.parameters())

    @property
    def requires_grad(self) -> bool:
        """Whether the (first) parameter is trainable: adapters are trained or frozen as a whole."""
        return self.first_param().requires_grad

    def extra_repr(self) -> str:
        scalar = f", scalar={float(self.scalar.detach()):g}" if self.use_scalar and not self.scalar.is_meta else ""
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}{scalar}"
