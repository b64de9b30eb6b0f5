"""Trainable copies of whole modules (``modules_to_save``), one per adapter name."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn


class ModulesToSaveWrapper(nn.Module):
    """Keeps ``original_module`` and a trainable deep copy per adapter in ``modules_to_save``.

    Forward runs the copy of the active adapter, or the original when none is active or adapters
    are disabled. Saved keys are the copy's keys (PEFT's layout).
    """

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters = False

    def add(self, adapter_name: str) -> None:
        clone = copy.deepcopy(self.original_module)
        clone.requires_grad_(True)
        self.modules_to_save[adapter_name] = clone

    def set_active(self, adapter_names: list[str]) -> None:
        self.active_adapter = next((n for n in adapter_names if n in self.modules_to_save), None)

    def get_base_layer(self) -> nn.Module:
        """The wrapped module (PEFT's wrapper protocol: file name resolution sees this module, not the copies)."""
        return self.original_module

    @property
    def current(self) -> nn.Module:
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self._modules["original_module"], name)
