"""``AdaptedLayer``: the wrapper that replaces a targeted module, keeps it as ``base_layer`` and adds its
adapters' terms in the forward. Rank dropout, module dropout, scaling, merge/unmerge and safe merge live
here, once, for every method and layer type.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MergeError, StateError, UnsupportedLayerError
from .methods.adapter import Adapter
from .ops.layerops import SUPPORTED_LAYERS, apply_weight, from_canonical, layer_spec


class Term(NamedTuple):
    """One live adapter's part of a forward: ``scale · mask ⊙ ΔW·x`` computed in ``dtype``.

    ``scale``: the adapter's ``effective_scaling`` (``scaling``, times its ``scalar``), in training times its module-dropout 0/1 factor ``(1,)``;
    ``mask``: the rank-dropout keep-mask over output channels ``(out,)`` (training) or ``None``;
    ``x``: the adapter's own input when it differs from the layer's (input dropout in training), else ``None``;
    ``factored``: the path :meth:`Adapter.select_path` chose (else ``ΔW`` is built);
    ``gain``: DoRA's ``g = m / ‖W + s·ΔW‖`` (shaped like ``dora_scale``; in training ``1 + keep·(g − 1)`` for
    module dropout), the term then being ``g ⊙ (W + s·ΔW)·x − W·x``; ``None`` without DoRA and for a dense DoRA
    term whose norm needs ``ΔW`` (:meth:`Adapter.norm_needs_delta`): :func:`_dense_delta` builds ``ΔW`` once
    for both. ``keep``: module dropout's 0/1 factor ``(1,)`` in training (else ``None``).
    """

    adapter: Adapter
    dtype: torch.dtype
    scale: float | torch.Tensor
    mask: torch.Tensor | None
    x: torch.Tensor | None = None
    factored: bool = False
    gain: torch.Tensor | None = None
    keep: torch.Tensor | None = None


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


def _fusable_first(rest: list[Term], x: torch.Tensor) -> bool:
    """The first factored term can run inside the base matmul (:meth:`Adapter.fused_linear`): it computes in
    ``x``'s dtype on ``x`` itself, without a rank-dropout mask."""
    return bool(rest) and rest[0].dtype == x.dtype and rest[0].mask is None and rest[0].x is None


def _dense_delta(
    terms: list[Term], weight: Callable[[torch.dtype], torch.Tensor]
) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    """``(ΔW, coeff, Δb)`` with ``coeff·ΔW = Σ scale·mask·ΔW_i`` over dense terms (canonical layout; a DoRA term
    adds ``g ⊙ (W + scale·mask·ΔW_i) − W``, ``weight(dtype)`` giving the canonical base ``W``) and ``Δb = Σ
    scale·mask·Δb_i`` (``None`` when no adapter changes the bias); a lone plain term with a number scale and no
    mask keeps its scale as ``coeff``, so the caller can fold it into ``torch.add(W, ΔW, alpha=coeff)`` instead
    of writing a scaled copy."""
    bias: torch.Tensor | None = None
    for term in terms:
        db = term.adapter.bias_delta(term.dtype)
        if db is not None:
            db = db * (term.scale if term.mask is None else term.mask * term.scale)
            bias = db if bias is None else bias + db
    lone = terms[0]
    if len(terms) == 1 and not isinstance(lone.scale, torch.Tensor) and lone.mask is None and not lone.adapter.weight_decompose:
        return lone.adapter.delta_weight(lone.dtype), lone.scale, bias
    total: torch.Tensor | None = None
    for term in terms:
        adapter = term.adapter
        delta = adapter.delta_weight(term.dtype)
        gain = term.gain
        if adapter.weight_decompose and gain is None:  # the norm from this ΔW (no second build)
            w = weight(term.dtype)
            gain = adapter.dora_gain(w, adapter.effective_scaling, delta=delta)
            gain = gain if term.keep is None else 1 + term.keep * (gain - 1)
        factor = term.scale if term.mask is None else term.mask * term.scale
        delta = delta * _along(factor, delta.dim(), 0)
        if gain is not None:
            w = weight(term.dtype)
            delta = gain * (w + delta) - w
        total = delta if total is None else total + delta.to(total.dtype)
    assert total is not None
    return total, 1.0, bias


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
        self._merge_groups: list[list[str]] = []  # the adapters of each merge() call (unmerge takes them back so)
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
        """``base_layer(x) + Σ scale · mask ⊙ ΔW·x`` over the live adapters: dense terms on the layer's input
        summed into one ``ΔW`` (added to the base weight when :meth:`can_fuse`), then the other terms —
        factored ones (the first may run inside the base matmul, :meth:`Adapter.fused_linear`) and those with
        an input of their own (dropout) — one by one."""
        names = self.live_adapters()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        base = self._modules["base_layer"]
        fuse = not args and not kwargs and self.can_fuse(x)
        dense, rest = self._terms(names, x, fuse)
        dora = [t for t in rest if t.gain is not None]
        if dora and (dense or len(rest) > 1 or dora[0].x is not None or not dora[0].factored):
            return self._dora_forward(x, dense, rest, args, kwargs)
        result = None
        if dense:
            result = self._dense_forward(x, dense, fuse, args, kwargs)
        elif fuse and self.spec.kind == "linear" and _fusable_first(rest, x):
            first = rest[0]
            result = first.adapter.fused_linear(x, base.weight, base.bias, first.scale)  # None: cannot fuse
            if result is not None:
                rest = rest[1:]
        if result is None:
            result = base(x, *args, **kwargs)
        in_place = self._plain_base() and not (dense and not fuse)  # the result is a fresh tensor only we hold
        conv = partial(base._conv_forward, bias=None) if rest and self.spec.kind == "conv" else None
        for term in rest:
            out = self._term_output(term, x, conv)
            result = result.add_(out.to(result.dtype)) if in_place else result + out.to(result.dtype)
        if dora:  # the one live term, DoRA on the output axis: g ⊙ (W·x + s·ΔW·x) + b
            result = self._gained(result, dora[0].gain)
        return result

    def _gained(self, out: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        """``g ⊙ (out − b) + b`` along the output channels (``gain`` shaped like an output-axis ``dora_scale``)."""
        g = _along(gain.reshape(-1).to(out.dtype), out.dim(), self.spec.channel_dim(out.dim()))
        bias = self._modules["base_layer"].bias
        if bias is None:
            return out * g
        b = _along(bias.to(out.dtype), out.dim(), self.spec.channel_dim(out.dim()))
        return torch.addcmul((1 - g) * b, out, g)  # one output-sized tensor written, not two

    def _dora_forward(self, x: torch.Tensor, dense: list[Term], rest: list[Term], args: tuple, kwargs: dict) -> torch.Tensor:
        """Several live terms with a factored (or own-input) DoRA one: the base output ``W·x + b`` is kept apart,
        each DoRA term adds ``(g − 1) ⊙ W·x' + g ⊙ s·ΔW·x'`` on its input ``x'``, the others their own terms."""
        base = self._modules["base_layer"]
        result = base(x, *args, **kwargs)
        bias = base.bias
        channel = self.spec.channel_dim(result.dim())
        wx = result if bias is None else result - _along(bias.to(result.dtype), result.dim(), channel)
        if dense:
            delta, coeff, db = _dense_delta(dense, self._canonical_weight)
            delta = delta if coeff == 1 else delta * coeff
            result = result + apply_weight(base, self.spec, x.to(delta.dtype), delta, db).to(result.dtype)
        conv = partial(base._conv_forward, bias=None) if self.spec.kind == "conv" else None
        for term in rest:
            out = self._term_output(term, x, conv)  # a dense DoRA term's is complete: (g ⊙ (W + s·ΔW) − W)·x'
            if term.gain is not None and term.factored:
                g = _along(term.gain.reshape(-1).to(out.dtype), out.dim(), channel)
                own = wx if term.x is None else apply_weight(base, self.spec, term.x, self._canonical_weight(term.x.dtype))
                out = (g - 1) * own.to(out.dtype) + g * out
            result = result + out.to(result.dtype)
        return result

    def _canonical_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight in canonical layout ``(out, in, *k)`` and ``dtype`` (differentiable casts only)."""
        return from_canonical(self.spec, self._modules["base_layer"].weight).to(dtype)

    def _terms(self, names: list[str], x: torch.Tensor, fuse: bool) -> tuple[list[Term], list[Term]]:
        """The live adapters' terms for input ``x``: dense ones on ``x`` (summed later), and the rest — factored
        (:meth:`Adapter.select_path`) or with an input of their own (input dropout in training)."""
        grad = torch.is_grad_enabled()
        n_rows = x.numel() // max(self.spec.in_features, 1)
        dense: list[Term] = []
        rest: list[Term] = []
        for name in names:
            adapter = self._materialised(name)
            dtype = self.resolve_compute_dtype(x, adapter)
            own = F.dropout(x, adapter.dropout, training=True) if self.training and adapter.dropout > 0 else None
            path = adapter.select_path(n_rows, x.device.type, grad=grad and adapter.requires_grad, fused=fuse)
            scale, mask, keep = self._factors(adapter, x.device, dtype)
            gain = None
            if adapter.weight_decompose:
                path = path if adapter.wd_on_out else "dense"  # an input-axis gain scales weight columns
                # dense with a norm that needs ΔW: _dense_delta takes it from the ΔW it builds anyway; else the norm
                # apart, without autograd (LoHa/LoKr: a no-grad ΔW, freed before the factored term runs)
                if path != "dense" or not adapter.norm_needs_delta():
                    gain = adapter.dora_gain(self._canonical_weight(dtype), adapter.effective_scaling)
                    gain = gain if keep is None else 1 + keep * (gain - 1)
            term = Term(adapter, dtype, scale, mask, own, path == "factored", gain, keep)
            (rest if term.factored or own is not None else dense).append(term)
        return dense, rest

    def _term_output(self, term: Term, x: torch.Tensor, conv: Any) -> torch.Tensor:
        """One term's ``scale · mask ⊙ ΔW·x`` on its own input: factored (DoRA's gain left to the caller), or its
        ``ΔW`` applied alone (DoRA: ``g ⊙ (W + s·ΔW) − W``)."""
        xin = (x if term.x is None else term.x).to(term.dtype)
        if term.factored:
            out = term.adapter.factored_delta(xin, term.scale, conv)
            if term.mask is not None:
                out = out * _along(term.mask, out.dim(), self.spec.channel_dim(out.dim()))
            return out
        delta, coeff, bias = _dense_delta([term._replace(x=None)], self._canonical_weight)
        delta = delta if coeff == 1 else delta * coeff
        return apply_weight(self._modules["base_layer"], self.spec, xin, delta, bias)

    def _dense_forward(
        self, x: torch.Tensor, terms: list[Term], fuse: bool, args: tuple, kwargs: dict
    ) -> torch.Tensor:
        """The base output plus the summed dense terms: ``F.linear(x, W + c·ΔW, b)`` (conv alike) when fused,
        else the base layer's own call plus ``c·ΔW·x``."""
        base = self._modules["base_layer"]
        delta, coeff, db = _dense_delta(terms, self._canonical_weight)
        if fuse:  # one matmul/conv with W + coeff·ΔW (and b + Δb)
            weight = torch.add(base.weight, delta.to(base.weight.dtype), alpha=coeff)
            bias = base.bias if db is None else base.bias + db.to(base.bias.dtype)
            return apply_weight(base, self.spec, x, weight, bias)
        result = base(x, *args, **kwargs)
        delta = delta if coeff == 1 else delta * coeff
        return result + apply_weight(base, self.spec, x.to(delta.dtype), delta, db).to(result.dtype)

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
    ) -> tuple[float | torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``(scale, mask, keep)`` of one adapter for this forward: ``scale`` is ``effective_scaling``, in training
        times the module-dropout 0/1 factor ``keep (1,)`` (else ``None``); ``mask`` the rank-dropout keep-mask
        ``(out,)`` (training) or None. The 0/1 factor is a tensor, not a Python branch: no host sync, no
        torch.compile graph break, and every parameter stays in the graph (DDP needs no find_unused_parameters)."""
        scale: float | torch.Tensor = adapter.effective_scaling
        if isinstance(scale, torch.Tensor):  # use_scalar: (1,) in the compute dtype (a (1,) fp32 would promote)
            scale = scale.to(dtype)
        mask = keep = None
        if self.training and adapter.rank_dropout > 0:
            mask = rank_dropout_mask(self.spec.out_features, adapter.rank_dropout, adapter.rank_dropout_scale, device, dtype)
        if self.training and adapter.module_dropout > 0:
            keep = (torch.rand(1, device=device) > adapter.module_dropout).to(dtype)
            scale = keep * scale
        return scale, mask, keep

    def _materialised(self, name: str) -> Adapter:
        adapter = self._modules["lyco_adapters"][name]
        if adapter.first_param().is_meta and not self._modules["base_layer"].weight.is_meta:
            raise StateError(
                f"adapter {name!r} on {type(self.base_layer).__name__} still has its weights on the meta device "
                "(low_cpu_mem_usage=True); load its weights before using it"
            )
        return adapter

    # -- weights -----------------------------------------------------------------------------
    def get_delta_weight(self, name: str) -> torch.Tensor:
        """Scaled ``ΔW`` of one adapter, laid out like the base layer's stored weight. No dropout. DoRA: what
        merging it adds, ``m ⊙ (W + s·ΔW) / ‖W + s·ΔW‖ − W``."""
        adapter = self._materialised(name)
        scale = adapter.effective_scaling
        delta = adapter.delta_weight() * scale
        if adapter.weight_decompose:  # the forward's gain (its norm a constant, as in training)
            w = self._canonical_weight(delta.dtype)
            delta = adapter.dora_gain(w, scale) * (w + delta) - w
        return from_canonical(self.spec, delta)

    def _merge_dtype(self) -> torch.dtype:
        """Merge precision: fp32, or the base weight's dtype when that is wider (fp64)."""
        return torch.float64 if self.base_layer.weight.dtype == torch.float64 else torch.float32

    def get_delta_bias(self, name: str) -> torch.Tensor | None:
        """Scaled bias delta ``(out,)`` of one adapter, or ``None`` when it changes the weight only."""
        adapter = self._materialised(name)
        db = adapter.bias_delta()
        return None if db is None else db * adapter.effective_scaling

    def _merge_delta(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scaled ``(ΔW, Δb)`` built in the merge precision, ``ΔW`` canonical."""
        adapter = self._materialised(name)
        dtype = self._merge_dtype()
        db = adapter.bias_delta(dtype)
        scale = adapter.effective_scaling
        scale = scale.detach().to(dtype) if isinstance(scale, torch.Tensor) else scale
        return adapter.delta_weight(dtype).detach() * scale, None if db is None else db.detach() * scale

    def _merged(
        self, names: list[str], sign: int = 1, gains: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The base weight and bias after merging ``names`` together (``sign=-1``: after taking back a group one
        :meth:`merge` wrote), in the merge precision, rounded to the tensor's dtype; the bias is ``None`` when no
        adapter changes it. Every adapter's delta is taken against the same current weight ``W₀``, as the
        unmerged forward does: ``W₀ + Σ ΔW_i`` with a DoRA adapter's ``ΔW_i = g_i ⊙ (W₀ + s·ΔW) − W₀`` (its gain
        recorded in ``gains``). Taking a group back solves that for ``W₀`` elementwise:
        ``W₀ = (W − Σ g_i·s·ΔW_i − Σ ΔW_j) / (1 + Σ (g_i − 1))`` with the gains the merge recorded."""
        base = self._modules["base_layer"]
        dt = self._merge_dtype()
        w = from_canonical(self.spec, base.weight.data).to(dt)
        bias = base.bias.data.to(dt) if base.bias is not None else None
        shift, gain_sum, bias_shift = torch.zeros((), dtype=dt), None, None
        for name in names:
            delta, db = self._merge_delta(name)
            adapter = self.lyco_adapters[name]
            if adapter.weight_decompose:
                if sign > 0:
                    scale = adapter.effective_scaling
                    gain = adapter.dora_gain(w, scale.detach() if isinstance(scale, torch.Tensor) else scale).detach()
                    if gains is not None:
                        gains[name] = gain
                else:
                    gain = adapter.merge_gain.to(dt)
                delta = gain * delta if sign < 0 else gain * (w + delta) - w
                gain_sum = gain - 1 if gain_sum is None else gain_sum + (gain - 1)
            shift = shift + delta
            if db is not None:
                bias_shift = db if bias_shift is None else bias_shift + db
        new = w + sign * shift
        if sign < 0 and gain_sum is not None:
            new = new / (1 + gain_sum)
        weight = from_canonical(self.spec, new).to(base.weight.dtype)
        if bias_shift is None:
            return weight, None
        return weight, (bias + sign * bias_shift).to(base.bias.dtype)

    def _write(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        base = self._modules["base_layer"]
        base.weight.data.copy_(weight)
        if bias is not None:
            base.bias.data.copy_(bias)

    def check_mergeable(self, module_name: str = "") -> None:
        """:class:`MergeError` unless lyco can write the base weight (and the bias, when an adapter changes it)
        exactly: a plain floating tensor (not a quantized or other tensor subclass, not on the meta device)."""
        base = self._modules["base_layer"]
        where = module_name or type(self.base_layer).__name__
        changes_bias = any(a.bias_delta() is not None for a in self._modules["lyco_adapters"].values())
        for what, t in (("weight", base.weight), ("bias", base.bias if changes_bias else None)):
            if t is not None and (type(t) not in _PLAIN or not t.dtype.is_floating_point or t.is_meta):
                kind = "on the meta device" if t.is_meta else f"a {type(t).__name__} of {t.dtype}"
                raise MergeError(
                    f"cannot merge into {where}: its {what} is {kind} (quantized or not a plain float tensor), which "
                    "lyco cannot write exactly; merge into an unquantized copy of the base model, or keep the "
                    "adapter unmerged (nothing was merged)"
                )

    def check_merge(self, adapter_names: list[str], module_name: str = "") -> None:
        """Raise :class:`MergeError` (nothing changed) if the weight cannot be written or merging
        ``adapter_names`` would write a non-finite value into it (all of them together, in the weight's dtype)."""
        self.check_mergeable(module_name)
        names = [n for n in adapter_names if n in self.lyco_adapters]
        with torch.no_grad():
            weight, bias = self._merged(names) if names else (None, None)
            if names and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
                raise MergeError(
                    f"merging adapter(s) {names} into {module_name or type(self.base_layer).__name__} gives NaN/Inf "
                    "weights; an adapter is broken or their sum overflows the weight's dtype (nothing was merged)"
                )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the given adapters (default: active ones) into the base weight (and bias)."""
        names = [n for n in (adapter_names if adapter_names is not None else self.active_adapters) if n in self.lyco_adapters]
        already = [n for n in names if n in self.merged_adapters]
        if already:
            raise MergeError(f"adapter(s) {already} are already merged; call unmerge() first")
        if safe_merge:
            self.check_merge(names)
        else:
            self.check_mergeable()
        gains: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            self._write(*self._merged(names, gains=gains))
        for name, gain in gains.items():  # DoRA: what unmerge divides by
            self.lyco_adapters[name].merge_gain = gain
        self.merged_adapters.extend(names)
        if names:
            self._merge_groups.append(list(names))

    def unmerge(self) -> None:
        """Take every merged adapter back out of the base weight (and bias), one :meth:`merge` call's group at a
        time, last first (DoRA ones with the gains their merge applied)."""
        with torch.no_grad():
            while self.merged_adapters:
                group = self._merge_groups.pop() if self._merge_groups else [self.merged_adapters[-1]]
                self._write(*self._merged(group, sign=-1))
                for name in group:
                    self.merged_adapters.remove(name)
                    self.lyco_adapters[name].merge_gain = None

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
