"""Dense vs factored: pick the cheaper way to compute ``ΔW·x`` from a multiply-add count.

``LYCO_PATH=dense|factored|auto`` (environment, read per call) forces a path for every layer, so
both paths can always be tested and compared; ``auto`` (default) uses the cost model.
"""

from __future__ import annotations

import os

from ..errors import ConfigError

PATHS = ("auto", "dense", "factored")


def forced_path() -> str:
    """The path forced by ``LYCO_PATH`` (``"auto"`` when unset)."""
    path = os.environ.get("LYCO_PATH", "auto").strip().lower() or "auto"
    if path not in PATHS:
        raise ConfigError(f"LYCO_PATH={path!r} is not one of {PATHS}")
    return path


def choose_path(dense_cost: float, factored_cost: float, override: str | None = None) -> str:
    """``"dense"`` or ``"factored"``: ``override`` or ``LYCO_PATH`` if set, else the cheaper one.

    Costs are multiply-adds of one forward call, including building whatever the path builds
    (the dense ``ΔW``, or the small factor products); backward scales both by about the same factor.
    """
    path = override if override not in (None, "auto") else forced_path()
    if path != "auto":
        return path
    return "factored" if factored_cost < dense_cost else "dense"
