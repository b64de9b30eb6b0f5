"""The method registry: what ``formats/`` and ``tools/`` ask instead of testing algorithm names.

``METHODS`` maps a config's ``peft_type`` to its :class:`~lyco.methods.adapter.Adapter` class (methods a
model can hold); file-only methods (a :class:`~lyco.methods.schema.MethodSchema` without an adapter, e.g.
plain LoRA files lyco reads for inspect / merge / to-lora) are kept apart. Both are looked up by ``algo``
and by the key suffixes of their tensors.
"""

from __future__ import annotations

from typing import TypeVar

from ..errors import ArgumentError, ConfigError, FormatError
from .adapter import Adapter
from .config import AdapterConfig
from .schema import MethodSchema

METHODS: dict[str, type[Adapter]] = {}  # peft_type → adapter class
FILE_METHODS: dict[str, type[MethodSchema]] = {}  # algo → file-only schema

M = TypeVar("M", bound=type[MethodSchema])


def all_methods() -> list[type[MethodSchema]]:
    """Every registered method, adapter methods first (registration order)."""
    return [*METHODS.values(), *FILE_METHODS.values()]


def register_method(cls: M) -> M:
    """Class decorator: make a method known to models (an ``Adapter`` subclass, usable with
    :func:`lyco.get_model` through its ``config_cls``) and to every file reader, writer and tool.

    A :class:`MethodSchema` that is not an ``Adapter`` registers a file-only method. Algorithm names and the
    key suffixes of identifying tensors must be unique across methods (:class:`ConfigError`).
    """
    if not isinstance(cls, type) or not issubclass(cls, MethodSchema):
        raise ArgumentError(f"register_method takes an Adapter subclass (or a MethodSchema), got {cls!r}")
    if issubclass(cls, Adapter):
        cfg = cls.config_cls
        if not cfg.peft_type:
            raise ConfigError(f"{cfg.__name__}.peft_type must be set to register {cls.__name__}")
    if not cls.algo:
        raise ConfigError(f"{cls.__name__}.algo must be set to register it")
    replaced = METHODS.get(cls.config_cls.peft_type) if issubclass(cls, Adapter) else FILE_METHODS.get(cls.algo)
    keys = _identifying_keys(cls)
    for other in all_methods():
        if other is replaced or issubclass(cls, other) or issubclass(other, cls):
            continue  # a subclass may reuse its parent's tensors (files then read as the parent's method)
        if other.algo == cls.algo or keys & _identifying_keys(other):
            raise ConfigError(
                f"{cls.__name__} (algo {cls.algo!r}, keys {sorted(keys)}) clashes with registered method "
                f"{other.__name__} (algo {other.algo!r}); rename its algo or tensors"
            )
    if issubclass(cls, Adapter):
        METHODS[cls.config_cls.peft_type] = cls
    else:
        FILE_METHODS[cls.algo] = cls
    return cls


def _identifying_keys(method: type[MethodSchema]) -> set[str]:
    return {p.file_key for p in method.tensor_params().values() if p.identifies}


def adapter_class_for(config: AdapterConfig) -> type[Adapter]:
    """The registered adapter class for a config instance."""
    for adapter_cls in METHODS.values():
        if type(config) is adapter_cls.config_cls:
            return adapter_cls
    for adapter_cls in METHODS.values():
        if isinstance(config, adapter_cls.config_cls):
            return adapter_cls
    raise ConfigError(f"no adapter method is registered for {type(config).__name__}; use @register_method")


def method_for_peft_type(peft_type: object, source: str) -> type[Adapter]:
    """The adapter class of a PEFT ``peft_type`` (:class:`FormatError` naming ``source`` when unknown)."""
    if not isinstance(peft_type, str) or peft_type not in METHODS:
        raise FormatError(f"{source}: peft_type {peft_type!r} is not supported (lyco reads {sorted(METHODS)})")
    return METHODS[peft_type]


def method_for_algo(algo: str) -> type[MethodSchema]:
    """The method named ``algo`` in files (:class:`FormatError` when none is registered)."""
    for method in all_methods():
        if method.algo == algo:
            return method
    raise FormatError(f"unknown adapter algorithm {algo!r} (known: {sorted(m.algo for m in all_methods())})")


def method_for_lycoris_algo(algo: str) -> type[Adapter] | None:
    """The trainable method LyCORIS's ``algo`` names (its ``algo`` or one of its ``lycoris_algos``), or ``None``."""
    name = algo.lower()
    return next((m for m in METHODS.values() if name == m.algo or name in m.lycoris_algos), None)


def file_keys() -> dict[str, tuple[type[MethodSchema], str]]:
    """Key tail in files → ``(method, tensor name)`` for every registered method's tensors
    (:meth:`~lyco.methods.schema.MethodSchema.file_names`: LyCORIS/kohya keys and PEFT's names)."""
    return {key: (m, name) for m in reversed(all_methods()) for key, name in m.file_names().items()}

