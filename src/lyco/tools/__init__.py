"""The logic behind the adapter-file commands (``lyco inspect/convert/merge/extract/resize/to-lora``).

One module per command, pure functions on :class:`~lyco.formats.adapterfile.AdapterFile` objects,
tensors and safetensors files; nothing here prints. Long loops take an optional ``progress`` callable
with tqdm's signature (``progress(iterable, total=n, desc=text)``) that the CLI supplies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
Progress = Callable[..., Iterable[Any]]


@dataclass(frozen=True)
class ModuleResult:
    """One module processed by extract / resize / to-lora: ``error`` is ``‖ΔW − ΔŴ‖_F / ‖ΔW‖_F``."""

    name: str
    algo: str
    weight_shape: tuple[int, ...]
    rank: int | None
    error: float
    num_params: int
    note: str = ""


def track(items: Iterable[T], progress: Progress | None, total: int, desc: str) -> Iterator[T]:
    """``items`` wrapped by ``progress`` (when given)."""
    yield from (progress(items, total=total, desc=desc) if progress is not None else items)
