"""``AdapterConfig``: the hyper-parameters every LyCORIS-family method shares, validated on creation."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from ..errors import ConfigError

T = TypeVar("T")


def _as_str_list(value: Any, name: str) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return sorted(set(value)) if isinstance(value, (set, frozenset)) else list(dict.fromkeys(value))
    raise ConfigError(f"{name} must be a string (regex) or a list of module names, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: float) -> bool:
    """Finite as a float (an int too large for one is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _pattern(value: Any, name: str, what: str, valid: Any) -> dict[str, Any]:
    """A ``rank_pattern`` / ``alpha_pattern``: a dict of regex keys to valid values (``None``: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a dict of module-name patterns to values, got {value!r}")
    for key, val in value.items():
        if not isinstance(key, str):
            raise ConfigError(f"{name} keys must be strings (module-name patterns), got {key!r}")
        _check_regex(key, name)
        if not valid(val):
            raise ConfigError(f"{name}[{key!r}] must be {what}, got {val!r}")
    return dict(value)


def _check_regex(pattern: str, name: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, OverflowError, RecursionError) as exc:
        raise ConfigError(f"{name}: {pattern!r} is not a valid regular expression ({exc})") from None


@dataclass
class AdapterConfig:
    """Fields shared by every LyCORIS-family method; names and defaults equal PEFT's.

    ``target_modules``: list → a module matches when its name equals an entry or ends with
    ``"." + entry``; str → regex that must match the full module name; ``"all-linear"`` → every
    Linear/Conv1D except the output head. ``rank_pattern`` / ``alpha_pattern``: see
    :func:`lyco.targeting.pattern_value` (first matching key wins, PEFT's rule). ``dropout``: plain dropout
    on the adapter's input in training (PEFT's ``lora_dropout``; LyCORIS's ``dropout``).

    How a config meets PEFT's ``adapter_config.json``: ``peft_aliases`` maps a PEFT field name that differs
    from lyco's to lyco's field (an alias field of the config, e.g. LoRA's ``lora_alpha`` → ``alpha``);
    ``lyco_only`` fields PEFT does not have are written only when they differ from their default (so PEFT
    reads lyco's folders without warnings); ``peft_fixed`` lists PEFT fields lyco reads only at the values
    given (features lyco does not have: any other value is an error); ``peft_lacks`` the lyco-only fields
    PEFT cannot reproduce (saving such a folder warns).
    """

    peft_type: ClassVar[str] = ""
    init_choices: ClassVar[tuple[object, ...]] = (True, False)
    peft_aliases: ClassVar[dict[str, str]] = {}
    lyco_only: ClassVar[frozenset[str]] = frozenset({"dropout"})
    peft_fixed: ClassVar[dict[str, tuple[Any, ...]]] = {}
    peft_lacks: ClassVar[frozenset[str]] = frozenset()  # lyco-only fields whose non-default value PEFT cannot compute
    peft_ignored: ClassVar[frozenset[str]] = frozenset()  # PEFT fields that act only through a peft_fixed one

    def peft_gaps(self) -> list[str]:
        """The ``peft_lacks`` fields set away from their default: PEFT loads a folder of this config with other
        shapes or outputs than lyco (lyco loads it exactly; LyCORIS files carry it to other tools)."""
        defaults = {f.name: _default(f) for f in fields(self)}
        return sorted(n for n in self.peft_lacks if getattr(self, n) != defaults[n])

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
    dropout: float = 0.0

    def __post_init__(self) -> None:
        name = type(self).__name__
        self._resolve_aliases()
        if not _is_int(self.r) or self.r <= 0:
            raise ConfigError(f"{name}.r must be a positive integer, got {self.r!r}")
        if not _is_number(self.alpha) or not _finite(self.alpha):
            raise ConfigError(f"{name}.alpha must be a finite number, got {self.alpha!r}")
        for fname in ("rank_dropout", "module_dropout"):
            p = getattr(self, fname)
            if not _is_number(p) or not 0.0 <= p <= 1.0:
                raise ConfigError(f"{name}.{fname} must be a probability in [0, 1], got {p!r}")
        if not _is_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{name}.dropout must be a probability in [0, 1), got {self.dropout!r}")
        for f in fields(self):  # every bool field of every method's config
            if f.type in ("bool", bool) and not isinstance(getattr(self, f.name), bool):
                raise ConfigError(f"{name}.{f.name} must be True or False, got {getattr(self, f.name)!r}")
        if not any(self.init_weights is c or (isinstance(c, str) and self.init_weights == c) for c in self.init_choices):
            raise ConfigError(f"{name}.init_weights must be one of {self.init_choices}, got {self.init_weights!r}")
        self.target_modules = _as_str_list(self.target_modules, f"{name}.target_modules")
        self.exclude_modules = _as_str_list(self.exclude_modules, f"{name}.exclude_modules")
        for fname in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, fname), str):
                _check_regex(getattr(self, fname), f"{name}.{fname}")
        self.layers_pattern = _as_str_list(self.layers_pattern, f"{name}.layers_pattern")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ConfigError(f"{name}.layers_pattern is only used with layers_to_transform; set both or neither")
        if self.layers_to_transform is not None:
            if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
                raise ConfigError(f"{name}.layers_to_transform cannot be used when target_modules is a regex string")
            ltt = self.layers_to_transform
            items = [ltt] if _is_int(ltt) else list(ltt) if isinstance(ltt, (list, tuple)) else [ltt]
            if any(not _is_int(i) or i < 0 for i in items):
                raise ConfigError(f"{name}.layers_to_transform must be non-negative layer indices, got {ltt!r}")
            self.layers_to_transform = ltt if _is_int(ltt) else items
        self.rank_pattern = _pattern(self.rank_pattern, f"{name}.rank_pattern", "a positive integer",
                                     lambda v: _is_int(v) and v > 0)  # fmt: skip
        self.alpha_pattern = _pattern(self.alpha_pattern, f"{name}.alpha_pattern", "a finite number",
                                      lambda v: _is_number(v) and _finite(v))  # fmt: skip
        if self.modules_to_save is not None:
            mts = _as_str_list(self.modules_to_save, f"{name}.modules_to_save")
            self.modules_to_save = [mts] if isinstance(mts, str) else mts

    def _resolve_aliases(self) -> None:
        """Copy each PEFT-named alias field given into lyco's field (both given and different: an error),
        then the result back into the alias, so the two always agree."""
        defaults = {f.name: _default(f) for f in fields(self)}
        for alias, target in self.peft_aliases.items():
            value = getattr(self, alias)
            if value is not None and value != getattr(self, target):
                if getattr(self, target) != defaults[target]:
                    raise ConfigError(
                        f"{type(self).__name__}: {alias}={value!r} and {target}={getattr(self, target)!r} name the "
                        "same setting; give one of them"
                    )
                setattr(self, target, value)
            setattr(self, alias, getattr(self, target))

    def to_dict(self) -> dict[str, Any]:
        """Field values by PEFT name (plus ``peft_type``), JSON-ready: aliases under PEFT's name, lyco-only
        fields only when they differ from their default."""
        peft_name = {target: alias for alias, target in self.peft_aliases.items()}
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in self.peft_aliases or (f.name in self.lyco_only and value == _default(f)):
                continue
            out[peft_name.get(f.name, f.name)] = value
        out["peft_type"] = self.peft_type
        return out


@dataclass
class LowRankConfig(AdapterConfig):
    """Options LyCORIS gives every low-rank method (LoRA/LoCon, LoHa, LoKr).

    ``use_rslora``: rank-stabilised scale ``alpha / √r`` (LyCORIS's ``rs_lora``; files store ``alpha·√r``,
    so every reader's ``alpha / r`` gives the same scale). ``use_scalar``: a trainable scalar multiplies
    ``ΔW`` (LyCORIS's ``use_scalar``): with ``init_weights=True`` it starts at 0 and every factor at random
    (a zero delta that trains every factor from the first step); ``False`` starts it at 1. Files and
    folders never hold it: it is folded into the first factor on save, and a loaded adapter's scalar is 1.
    ``weight_decompose``: DoRA — ``W' = m ⊙ (W + s·ΔW) / ‖W + s·ΔW‖`` with a trainable magnitude ``m`` (files:
    ``dora_scale``; PEFT's LoRA ``use_dora``, ``lora_magnitude_vector``) initialised from the base weight, the
    norm per output row (``wd_on_out=True``, PEFT's only choice) or per input column (``False``), treated as a
    constant in the backward pass (PEFT, the DoRA paper §4.3).
    """

    lyco_only: ClassVar[frozenset[str]] = AdapterConfig.lyco_only | {"use_rslora", "use_scalar", "weight_decompose",
                                                                     "wd_on_out"}
    peft_lacks: ClassVar[frozenset[str]] = frozenset({"weight_decompose"})  # PEFT has DoRA on LoRA only

    use_rslora: bool = False
    use_scalar: bool = False
    weight_decompose: bool = False
    wd_on_out: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.use_scalar and not isinstance(self.init_weights, bool):
            raise ConfigError(
                f"{type(self).__name__}.use_scalar starts the factors at random and the scalar at 0 (init_weights="
                f"True) or 1 (False); init_weights={self.init_weights!r} cannot be combined with it"
            )


def _default(f: Any) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


def pattern_value(patterns: Mapping[str, T], name: str, default: T) -> T:
    """Value of the first key of ``patterns`` matching ``name``, else ``default`` (PEFT's rule for
    ``rank_pattern`` / ``alpha_pattern``: key ``K`` applies when ``re.match(rf"(.*\\.)?({K})$", name)``;
    the first matching key in the dict's order wins)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


@dataclass
class MixedConfig:
    """One adapter with different methods (or options) on different modules, as LyCORIS presets with per-module
    algorithms write them (``name_algo_map`` / ``module_algo_map``).

    ``parts``: configs of registered methods; each selects its own modules (``target_modules``,
    ``exclude_modules``, ``layers_to_transform``) with its own hyper-parameters, and a module selected by two
    parts is a :class:`TargetError` when the adapter is added. ``modules_to_save`` belongs to the whole adapter
    (the parts' own must be unset). A PEFT folder holds one method per adapter: such adapters are saved as
    LyCORIS/kohya files (:func:`lyco.save_lycoris`).

    >>> MixedConfig([LowRankConfig(target_modules=["q"]), AdapterConfig(target_modules=["fc"])]).targets()
    [['q'], ['fc']]
    """

    parts: list[AdapterConfig]
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        parts = self.parts
        if not isinstance(parts, (list, tuple)) or not parts:
            raise ConfigError(f"MixedConfig.parts must be a non-empty list of method configs, got {parts!r}")
        for i, part in enumerate(parts):
            if isinstance(part, MixedConfig) or not isinstance(part, AdapterConfig):
                raise ConfigError(f"MixedConfig.parts[{i}] must be a method config (LoRAConfig, LoKrConfig…), got {part!r}")
            if part.modules_to_save:
                raise ConfigError(
                    f"MixedConfig.parts[{i}].modules_to_save is set; give modules_to_save to the MixedConfig itself"
                )
        self.parts = list(parts)
        if self.modules_to_save is not None:
            mts = _as_str_list(self.modules_to_save, "MixedConfig.modules_to_save")
            self.modules_to_save = [mts] if isinstance(mts, str) else mts

    def targets(self) -> list[list[str] | str | None]:
        """Each part's ``target_modules``."""
        return [p.target_modules for p in self.parts]

    def to_dict(self) -> dict[str, Any]:
        """``{"parts": [each part's to_dict()], "modules_to_save": …}`` (JSON-ready)."""
        return {"parts": [p.to_dict() for p in self.parts], "modules_to_save": self.modules_to_save}


def config_parts(config: AdapterConfig | MixedConfig) -> list[AdapterConfig]:
    """The method configs of an adapter: a :class:`MixedConfig`'s parts, else ``[config]``."""
    return list(config.parts) if isinstance(config, MixedConfig) else [config]
