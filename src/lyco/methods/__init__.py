"""Adapter methods: one file per method, registered with :func:`register_method`."""

from .base import METHODS, AdaptedLayer, Adapter, AdapterConfig, register_method
from .loha import LoHaAdapter, LoHaConfig
from .lokr import LoKrAdapter, LoKrConfig

__all__ = [
    "METHODS", "AdaptedLayer", "Adapter", "AdapterConfig", "LoHaAdapter", "LoHaConfig", "LoKrAdapter",
    "LoKrConfig", "register_method",
]  # fmt: skip
