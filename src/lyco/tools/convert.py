"""``lyco convert``: PEFT directory ↔ LyCORIS/kohya file, and a check that every ``ΔW`` survived."""

from __future__ import annotations

from ..errors import FormatError
from ..formats.adapterfile import AdapterFile
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
        shape = src.modules[a].guess_weight_shape()
        worst = max(worst, relative_error(src.modules[a].delta_weight(shape), dst.modules[b].delta_weight(shape)))
    return worst, len(names)
