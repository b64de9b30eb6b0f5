"""``lyco convert``: PEFT directory ↔ LyCORIS/kohya file, and a check that every ``ΔW`` survived."""

from __future__ import annotations

from ..errors import FormatError
from ..formats.adapterfile import AdapterFile
from ..formats.keys import match_convention, underscore
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


def _plain_path(name: str) -> str:
    """A module name without a known key prefix, dots as underscores (how every convention can be compared)."""
    conv = match_convention(name)
    return underscore(name[len(conv.prefix) :] if conv is not None else name)


def compare_adapters(src: AdapterFile, dst: AdapterFile) -> tuple[float, int]:
    """``(max over modules of ‖ΔW_src − ΔW_dst‖/‖ΔW_src‖, modules compared)``; module names are compared
    without their key prefix and with dots as underscores (conventions spell paths differently)."""
    a_names = {_plain_path(n): n for n in src.modules}
    b_names = {_plain_path(n): n for n in dst.modules}
    if a_names.keys() != b_names.keys() or len(a_names) != len(src.modules):
        lost = sorted(set(a_names) ^ set(b_names))[:8]
        raise FormatError(f"the converted adapter's modules differ from the source's: {lost}")
    worst = 0.0
    for key, a in a_names.items():
        shape = src.modules[a].guess_weight_shape()
        delta = dst.modules[b_names[key]].delta_weight(shape)
        worst = max(worst, relative_error(src.modules[a].delta_weight(shape), delta))
    return worst, len(a_names)
