"""File formats: pure state-dict ↔ state-dict conversions plus reading/writing files.

Every reader gives an :class:`~lyco.formats.adapterfile.AdapterFile`, every writer takes one:
PEFT folders (:func:`read_peft_adapter` / :func:`write_peft_adapter`) and LyCORIS/kohya single files
(:func:`read_lycoris_file` / :func:`write_lycoris_file`); models load and save through
:func:`load_lycoris` / :func:`save_lycoris` (and ``LycoModel.from_pretrained`` / ``save_pretrained``).
"""

from .adapterfile import AdapterFile, ModuleAdapter
from .keys import CONVENTIONS, STYLES
from .lycoris import (
    load_lycoris,
    load_lycoris_into,
    parse_state_dict,
    read_lycoris_file,
    resolve_adapter_file,
    save_lycoris,
    write_lycoris_file,
)
from .peft import read_peft_adapter, write_peft_adapter

__all__ = [
    "CONVENTIONS", "STYLES", "AdapterFile", "ModuleAdapter", "load_lycoris", "load_lycoris_into", "parse_state_dict",
    "read_lycoris_file", "read_peft_adapter", "resolve_adapter_file", "save_lycoris", "write_lycoris_file",
    "write_peft_adapter",
]  # fmt: skip
