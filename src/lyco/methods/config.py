"""``AdapterConfig``: the hyper-parameters every LyCORIS-family method shares, validated on creation."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypeVar

from ..errors import ConfigError

T = TypeVar("T")


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


def pattern_value(patterns: Mapping[str, T], name: str, default: T) -> T:
    """Value of the first key of ``patterns`` matching ``name``, else ``default`` (PEFT's rule for
    ``rank_pattern`` / ``alpha_pattern``: key ``K`` applies when ``re.match(rf"(.*\\.)?({K})$", name)``;
    the first matching key in the dict's order wins)."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default
