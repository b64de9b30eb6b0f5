"""One exception hierarchy for lyco.

Every error derives from :class:`LycoError`. Errors about bad values also derive from
:class:`ValueError` so code written
against PEFT's ``except ValueError`` keeps working.
"""

from __future__ import annotations


class LycoError(Exception):
    """Base class of every error raised by lyco."""


class ConfigError(LycoError, ValueError):
    """An adapter config holds an invalid value (e.g. ``r <= 0``, conflicting options)."""


class ArgumentError(LycoError, TypeError):
    """A public function got an argument of the wrong kind (not a module, not a path, not a name...)."""


class TargetError(LycoError, ValueError):
    """Target selection failed: no module matched, or a pattern names nothing in the model."""


class UnsupportedLayerError(TargetError, TypeError):
    """A targeted module has a type no method can wrap (message names module and type)."""


class AdapterNameError(LycoError, ValueError):
    """An adapter name is unknown, already taken, or cannot be deleted in the current state."""


class MergeError(LycoError, ValueError):
    """Merging or unmerging is impossible (already merged, non-finite weights in safe merge, ...)."""


class StateError(LycoError, RuntimeError):
    """The operation is impossible in the current state (e.g. adapter weights still on ``meta``)."""


class FormatError(LycoError, ValueError):
    """An adapter file or directory cannot be read or written (message names file and key)."""


class ShapeMismatchError(FormatError):
    """A tensor in an adapter file does not have the shape the target layer needs."""


__all__ = [
    "AdapterNameError",
    "ArgumentError",
    "ConfigError",
    "FormatError",
    "LycoError",
    "MergeError",
    "ShapeMismatchError",
    "StateError",
    "TargetError",
    "UnsupportedLayerError",
]
