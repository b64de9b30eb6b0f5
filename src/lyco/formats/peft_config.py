"""From an :class:`AdapterFile` to the config (and per-module shape plans) a lyco model or a PEFT folder needs.

**Scale.** An ``AdapterFile`` follows one rule (:meth:`ModuleAdapter.scale`): ``alpha / r`` with ``r`` the
rank of the factored parts, ``alpha`` missing or 0 → ``alpha = r``, a module without a rank (LoKr with both
factors full) → 1. lyco adapters and PEFT use ``scaling = alpha / r`` always, with ``r`` from the config.
So every module gets its own ``r`` (the tensors' rank) and ``alpha`` (``rank_pattern`` / ``alpha_pattern``
where modules differ); modules without a rank get ``alpha = r``. The other direction (model or PEFT folder
→ file) folds ``alpha / r`` into the tensors of such modules and writes ``alpha = r``.

**Shapes** always come from the tensors (the method's ``infer_plan``), never from a factorization or
metadata. A config can only describe shapes its method's planning rules reproduce; the method's
``fit_config`` hook chooses the options (e.g. LoKr's one ``decompose_factor``) and lists the modules it
cannot describe (a lyco model loads them anyway, through per-module plans).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..errors import FormatError, ShapeMismatchError
from ..methods.config import AdapterConfig, pattern_value
from ..methods.registry import METHODS
from ..methods.schema import DORA, MethodSchema
from ..ops.dora import gain_shape
from .adapterfile import AdapterFile
from .metadata import effective_alpha


@dataclass
class ConfigFit:
    """A config describing an :class:`AdapterFile`: ``plans`` per module (what the tensors are) and
    ``problems`` (modules whose shapes this config's planning rules would not reproduce, so PEFT could
    not load them; empty when PEFT can)."""

    config: AdapterConfig
    plans: dict[str, Any]
    ranks: dict[str, int]
    alphas: dict[str, float]
    problems: list[str]


def adapter_method(af: AdapterFile) -> type[MethodSchema]:
    """The one method every module of ``af`` uses, when lyco models can hold it (else :class:`FormatError`)."""
    methods = {m.method for m in af.modules.values()}
    if len(methods) != 1:
        raise FormatError(
            f"the adapter holds several algorithms {sorted(af.algos())}; a lyco adapter uses one method "
            f"(lyco models can hold {sorted(m.algo for m in METHODS.values())})"
        )
    method = methods.pop()
    if method not in METHODS.values():
        raise FormatError(
            f"the adapter holds {method.display()} modules ({method.algo}); lyco models cannot hold them yet "
            f"(they can hold {', '.join(m.display() for m in METHODS.values())})"
        )
    return method


def _patterns(values: dict[str, float], default: float) -> dict[str, float]:
    """Per-module pattern (exact names, longest first: PEFT's first-match rule then picks each module's own
    key); keys are regex-escaped only where a plain name would match another module."""
    names = sorted((n for n in values if values[n] != default), key=len, reverse=True)
    plain = {n: values[n] for n in names}
    if all(pattern_value(plain, n, default) == v for n, v in values.items()):
        return plain
    return {re.escape(n): values[n] for n in names}


def _dora_options(af: AdapterFile, weight_shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """``weight_decompose`` / ``wd_on_out`` when the modules carry DoRA magnitudes (all of them, on one axis:
    a lyco adapter's DoRA is one setting)."""
    axes: dict[str, bool] = {}
    for name, m in af.modules.items():
        if DORA.name not in m.tensors:
            continue
        got, shape = tuple(m.tensors[DORA.name].shape), tuple(weight_shapes[name])
        axis = [on for on in (True, False) if got == gain_shape(shape, on)]
        if not axis:
            raise ShapeMismatchError(
                f"module {name!r}: dora_scale {got} fits neither axis of a layer weight {shape} "
                f"({gain_shape(shape, True)} or {gain_shape(shape, False)})"
            )
        axes[name] = axis[0]
    if not axes:
        return {}
    plain = sorted(set(af.modules) - set(axes))
    if plain or len(set(axes.values())) > 1:
        what = f"DoRA and plain modules ({plain[:4]})" if plain else "DoRA on the output axis and on the input axis"
        raise FormatError(f"the adapter mixes {what}; a lyco adapter applies DoRA to all its modules on one axis")
    return {"weight_decompose": True, "wd_on_out": next(iter(axes.values()))}


def fit_config(af: AdapterFile, weight_shapes: dict[str, tuple[int, ...]], default_r: int | None = None) -> ConfigFit:
    """Plans, per-module ranks/alphas and a config of the file's method (``target_modules`` = the module
    names) for ``af``; ``weight_shapes``: per module name, the layer's canonical weight shape.

    Raises :class:`FormatError` for files mixing methods or holding a method lyco models cannot hold, and
    :class:`ShapeMismatchError` when tensors do not fit their layer.
    """
    method = adapter_method(af)
    plans: dict[str, Any] = {}
    for name, m in af.modules.items():
        try:
            plans[name] = m.plan(weight_shapes[name])
        except ShapeMismatchError as exc:
            raise ShapeMismatchError(f"module {name!r}: {exc}") from None
    factored = Counter(m.rank for m in af.modules.values() if m.rank is not None)
    base_r = factored.most_common(1)[0][0] if factored else (default_r or 1)
    plans, options, problems = method.fit_config(plans, base_r)
    options.update(_dora_options(af, weight_shapes))
    ranks = {name: p.r for name, p in plans.items()}
    alphas = {name: effective_alpha(af.modules[name].rank, af.modules[name].alpha, ranks[name]) for name in plans}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = method.config_cls(
        r=r, alpha=alpha, target_modules=list(plans), rank_pattern=_patterns(ranks, r),  # type: ignore[arg-type]
        alpha_pattern=_patterns(alphas, alpha), **options,
    )  # fmt: skip
    return ConfigFit(config, plans, ranks, alphas, problems)
