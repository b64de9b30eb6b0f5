"""Which optional demo dependencies are installed (checked without importing them)."""

from __future__ import annotations

import importlib.util

# import name -> distribution name, as listed in ``[project.optional-dependencies] demo``
DEMO_EXTRAS: dict[str, str] = {
    "sklearn": "scikit-learn",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
    "rich": "rich",
}
INSTALL_HINT = "pip install 'lyco[demo]'"


def missing_extras() -> list[str]:
    """Distribution names of the demo extras that are not installed (empty when all are)."""
    return [dist for module, dist in DEMO_EXTRAS.items() if importlib.util.find_spec(module) is None]
