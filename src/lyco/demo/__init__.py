"""Offline demo: adapt a small digits CNN from classes 0–4 to 5–9 with LoHa, LoKr and full fine-tuning.

Run it with ``lyco demo``. It needs the ``demo`` extras (scikit-learn, matplotlib, tqdm, rich):
``pip install 'lyco[demo]'``. Heavy imports happen inside the functions that need them, so this
package imports without the extras; :func:`run_demo` raises :class:`ImportError` when they are missing.
"""

from __future__ import annotations

from .digits import CheckResult, DemoResult, MethodResult, run_demo
from .extras import DEMO_EXTRAS, INSTALL_HINT, missing_extras

__all__ = [
    "DEMO_EXTRAS",
    "INSTALL_HINT",
    "CheckResult",
    "DemoResult",
    "MethodResult",
    "missing_extras",
    "run_demo",
]
