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
from ..methods.config import AdapterConfig, MixedConfig, pattern_value
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

    config: AdapterConfig | MixedConfig
    plans: dict[str, Any]
    ranks: dict[str, int]
    alphas: dict[str, float]
    problems: list[str]


def _holdable(method: type[MethodSchema]) -> type[MethodSchema]:
    """``method`` when lyco models can hold it (else :class:`FormatError`)."""
    if method not in METHODS.values():
        raise FormatError(
            f"the adapter holds {method.display()} modules ({method.algo}); lyco models cannot hold them yet "
            f"(they can hold {', '.join(m.display() for m in METHODS.values())})"
        )
    return method


def _patterns(values: dict[str, float], default: float) -> dict[str, float]:
    r"""Per-module pattern (exact names, longest first: PEFT's first-match rule then picks each module's own
    key); where a plain name would also match another module (a dot in it, or a name that is a dotted suffix of
    another's, e.g. Flux's ``proj_out`` and ``single_transformer_blocks.0.proj_out``) every key is the escaped
    name anchored at the start (``^proj_out``: PEFT's ``(.*\.)?(key)$`` then matches that module only)."""
    names = sorted((n for n in values if values[n] != default), key=len, reverse=True)
    plain = {n: values[n] for n in names}
    if all(pattern_value(plain, n, default) == v for n, v in values.items()):
        return plain
    return {"^" + re.escape(n): values[n] for n in names}


def _dora_axis(name: str, af: AdapterFile, shape: tuple[int, ...]) -> bool | None:
    """The DoRA axis of module ``name`` (``True``: output rows, ``False``: input columns), ``None`` without DoRA."""
    m = af.modules[name]
    if DORA.name not in m.tensors:
        return None
    got = tuple(m.tensors[DORA.name].shape)
    axis = [on for on in (True, False) if got == gain_shape(shape, on)]
    if not axis:
        raise ShapeMismatchError(
            f"module {name!r}: dora_scale {got} fits neither axis of a layer weight {shape} "
            f"({gain_shape(shape, True)} or {gain_shape(shape, False)})"
        )
    return axis[0]


def _fit_part(
    af: AdapterFile, method: type[MethodSchema], names: list[str], plans: dict[str, Any], dora: bool | None, default_r: int | None
) -> ConfigFit:
    """The config of one method (and DoRA setting) over ``names``."""
    factored = Counter(af.modules[n].rank for n in names if af.modules[n].rank is not None)
    base_r = factored.most_common(1)[0][0] if factored else (default_r or 1)
    plans, options, problems = method.fit_config({n: plans[n] for n in names}, base_r)
    if dora is not None:
        options.update(weight_decompose=True, wd_on_out=dora)
    ranks = {name: p.r for name, p in plans.items()}
    alphas = {name: effective_alpha(af.modules[name].rank, af.modules[name].alpha, ranks[name]) for name in plans}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config = method.config_cls(
        r=r, alpha=alpha, target_modules=list(plans), rank_pattern=_patterns(ranks, r),  # type: ignore[arg-type]
        alpha_pattern=_patterns(alphas, alpha), **options,
    )  # fmt: skip
    return ConfigFit(config, plans, ranks, alphas, problems)


def fit_config(af: AdapterFile, weight_shapes: dict[str, tuple[int, ...]], default_r: int | None = None) -> ConfigFit:
    """Plans, per-module ranks/alphas and a config of the file's method (``target_modules`` = the module
    names) for ``af``; ``weight_shapes``: per module name, the layer's canonical weight shape.

    A file whose modules use several methods (or DoRA on some modules, or on both axes) gets a
    :class:`~lyco.methods.config.MixedConfig` with one part per method and setting. Raises :class:`FormatError`
    for a method lyco models cannot hold and :class:`ShapeMismatchError` when tensors do not fit their layer.
    """
    plans: dict[str, Any] = {}
    groups: dict[tuple[type[MethodSchema], bool | None], list[str]] = {}
    for name, m in af.modules.items():
        method = _holdable(m.method)
        try:
            plans[name] = m.plan(weight_shapes[name])
        except ShapeMismatchError as exc:
            raise ShapeMismatchError(f"module {name!r}: {exc}") from None
        groups.setdefault((method, _dora_axis(name, af, tuple(weight_shapes[name]))), []).append(name)
    fits = [_fit_part(af, method, names, plans, dora, default_r) for (method, dora), names in groups.items()]
    if len(fits) == 1:
        return fits[0]
    return ConfigFit(
        MixedConfig([f.config for f in fits]),  # type: ignore[misc]
        {n: p for f in fits for n, p in f.plans.items()},
        {n: r for f in fits for n, r in f.ranks.items()},
        {n: a for f in fits for n, a in f.alphas.items()},
        [p for f in fits for p in f.problems],
    )
