"""Adapter methods: one file per method (its config, adapter and on-disk schema), registered with
:func:`register_method`.

- ``config.py``: :class:`AdapterConfig`, the shared hyper-parameters; :class:`MixedConfig`, several methods in one adapter;
- ``schema.py``: :class:`MethodSchema` / :class:`Param`, how a method's tensors look on disk;
- ``adapter.py``: :class:`Adapter`, one adapter on one layer (cost-model hooks included);
- ``registry.py``: :func:`register_method` and the lookups ``formats/`` and ``tools/`` use;
- ``lora.py``, ``loha.py``, ``lokr.py``, ``full.py``: the methods.
"""

from .adapter import Adapter
from .config import AdapterConfig, MixedConfig
from .full import FullAdapter, FullConfig
from .loha import LoHaAdapter, LoHaConfig
from .lokr import LoKrAdapter, LoKrConfig
from .lora import LoRAAdapter, LoRAConfig
from .registry import METHODS, register_method
from .schema import FitOptions, MethodSchema, Param, ShapePlan

__all__ = [
    "METHODS", "Adapter", "AdapterConfig", "FitOptions", "FullAdapter", "FullConfig", "LoHaAdapter", "LoHaConfig", "LoKrAdapter", "LoKrConfig",
    "LoRAAdapter", "LoRAConfig", "MethodSchema", "MixedConfig", "Param", "ShapePlan", "register_method",
]  # fmt: skip
