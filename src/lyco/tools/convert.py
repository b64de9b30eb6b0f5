"""``lyco convert``: PEFT directory ↔ LyCORIS/kohya file, and a check that every ``ΔW`` survived."""

from __future__ import annotations

import math

import torch

from ..errors import FormatError
from ..formats.adapterfile import AdapterFile, ModuleAdapter
from ..formats.keys import match_convention
from ..formats.names import ModuleTable
from ..ops.lowrank import relative_error
from .base_weights import BaseIndex, attach_base


def prepare(af: AdapterFile, base: BaseIndex | None = None, to: str | None = None) -> AdapterFile:
    """``af`` with module names resolved against ``base`` and base weight shapes filled in (when given).

    Without a base, names read from a single file stay the file's key stems: underscore paths (kohya,
    lycoris, OneTrainer) cannot become the dotted module paths a PEFT directory needs, so ``to="peft"``
    then requires ``base``.
    """
    if base is not None:
        return attach_base(af, base)[0]
    if to == "peft" and not af.resolved:
        flat = [n for n in af.modules if (c := match_convention(n)) is None or not c.dotted]
        if flat:
            raise FormatError(
                f"{len(flat)} module(s) have underscore paths (e.g. {flat[0]!r}); a PEFT directory needs the dotted "
                "module names: pass --base MODEL_OR_CONFIG (the base weights or config.json) to resolve them"
            )
    return af


def compare_adapters(src: AdapterFile, dst: AdapterFile) -> tuple[float, int]:
    """``(max over modules of ‖ΔW_src − ΔW_dst‖/‖ΔW_src‖, modules compared)``; ``dst``'s module names are
    resolved against ``src``'s by the one resolver (conventions spell paths differently)."""
    table = ModuleTable(dict.fromkeys(src.modules, ()), source="the source adapter")
    names = table.require(dst.modules, what="converted")
    lost = sorted(set(src.modules) - set(names.values()))
    if lost:
        raise FormatError(f"the converted adapter lacks modules of the source: {lost[:8]}")
    worst = 0.0
    for b, a in names.items():
        worst = max(worst, module_difference(src.modules[a], dst.modules[b]))
    return worst, len(names)


PROBES = 16
EXACT_LIMIT = 1 << 22  # ΔW elements up to which the comparison builds both ΔW exactly (16 MiB in fp32)


def module_difference(a: ModuleAdapter, b: ModuleAdapter) -> float:
    """``‖ΔW_a − ΔW_b‖ / ‖ΔW_a‖``: exact for layers up to ``EXACT_LIMIT`` weights; above it estimated on
    ``PROBES`` seeded Gaussian vectors through each method's factored product (``ΔW`` is never built, so a
    small file that names a huge layer costs memory in proportion to the file)."""
    shape = a.guess_weight_shape()
    if math.prod(shape) <= EXACT_LIMIT:
        return relative_error(a.delta_weight(shape), b.delta_weight(shape))
    probes = torch.randn(math.prod(shape[1:]), PROBES, generator=torch.Generator().manual_seed(0))
    return relative_error(a.matvec(probes, shape), b.matvec(probes, shape))
