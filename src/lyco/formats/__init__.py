"""File formats: adapter files ↔ :class:`~lyco.formats.adapterfile.AdapterFile`, and nothing else.

Every reader gives an :class:`AdapterFile`, every writer takes one: PEFT folders
(:func:`read_peft_adapter` / :func:`write_peft_adapter`) and LyCORIS/kohya single files
(:func:`read_lycoris_file` / :func:`write_lycoris_file`); :func:`read_adapter` / :func:`write_adapter` pick
by path. This package imports only :mod:`lyco.errors`, :mod:`lyco.ops` and :mod:`lyco.methods`; models load
and save through ``LycoModel.from_pretrained`` / ``save_pretrained`` and :func:`lyco.load_lycoris` /
:func:`lyco.save_lycoris`.
"""

from .adapterfile import AdapterFile, ModuleAdapter
from .dispatch import read_adapter, write_adapter
from .keys import CONVENTIONS, STYLES
from .lycoris import parse_state_dict, read_lycoris_file, resolve_adapter_file, write_lycoris_file
from .names import ModuleTable
from .peft import read_peft_adapter, write_peft_adapter

__all__ = [
    "CONVENTIONS", "STYLES", "AdapterFile", "ModuleAdapter", "ModuleTable", "parse_state_dict", "read_adapter",
    "read_lycoris_file", "read_peft_adapter", "resolve_adapter_file", "write_adapter", "write_lycoris_file",
    "write_peft_adapter",
]  # fmt: skip
