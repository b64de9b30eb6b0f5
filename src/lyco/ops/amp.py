"""Autocast helpers for custom autograd functions."""

from __future__ import annotations

import torch


def autocast_state(device_type: str) -> dict:
    """Keyword arguments of ``torch.autocast`` reproducing the current autocast state for ``device_type``
    (custom autograd backward passes run outside autocast and re-enter it with these)."""
    return {
        "device_type": device_type,
        "dtype": torch.get_autocast_dtype(device_type),
        "enabled": torch.is_autocast_enabled(device_type),
    }
