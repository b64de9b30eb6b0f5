"""Read or write any adapter file by its kind: a directory is a PEFT adapter, a file is a LyCORIS/kohya one.

>>> target_format("out_dir"), target_format("out.safetensors"), target_format("x", to="peft")
('peft', 'lycoris', 'peft')
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ArgumentError, FormatError
from .adapterfile import AdapterFile
from .io import as_path
from .keys import STYLES
from .lycoris import read_lycoris_file, write_lycoris_file
from .peft import read_peft_adapter, write_peft_adapter

FORMATS = ("peft", "lycoris")
FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def source_format(path: str | os.PathLike) -> str:
    """``"peft"`` for a directory, ``"lycoris"`` for a file; :class:`FormatError` when ``path`` is missing."""
    p = as_path(path)
    if p.is_dir():
        return "peft"
    if p.is_file():
        return "lycoris"
    raise FormatError(f"{p}: no such file or directory")


def target_format(path: str | os.PathLike, to: str | None = None) -> str:
    """The format to write: ``to`` if given, else ``"lycoris"`` for a file name with a weights suffix
    (``.safetensors``), ``"peft"`` otherwise (a directory)."""
    if to is not None:
        if to not in FORMATS:
            raise FormatError(f"unknown output format {to!r} (known: {', '.join(FORMATS)})")
        return to
    return "lycoris" if as_path(path).suffix in FILE_SUFFIXES else "peft"


def read_adapter(path: str | os.PathLike, allow_pickle: bool = False) -> AdapterFile:
    """Read a PEFT adapter directory or a LyCORIS/kohya file into an :class:`AdapterFile`.

    Pickle files (``.pt``, ``.bin``, ``.ckpt``, also inside a PEFT directory) are refused unless
    ``allow_pickle=True``.
    """
    if source_format(path) == "peft":
        return read_peft_adapter(path, allow_pickle=allow_pickle)
    return read_lycoris_file(path, allow_pickle=allow_pickle)


def write_adapter(
    af: AdapterFile,
    path: str | os.PathLike,
    to: str | None = None,
    style: str | None = None,
    prefix: str | None = None,
    metadata: dict[str, str] | None = None,
    fold_scale: bool = False,
) -> Path:
    """Write ``af`` as a PEFT directory (``to="peft"``) or a LyCORIS/kohya file (``to="lycoris"``).

    ``to=None`` chooses from ``path`` (:func:`target_format`). ``style`` (key convention of a LyCORIS
    file: ``lycoris`` — the default —, ``kohya``, ``peft``, ``diffusers``), ``prefix`` and ``metadata``
    (on top of the file's own and the recomputed ``ss_network_*``) and ``fold_scale`` (no ``.alpha`` keys, the scale
    in the tensors) only apply to files. Scale: the writers map alpha/r so that every module's ``delta_weight()`` is unchanged.
    Returns the path written.
    """
    if not isinstance(af, AdapterFile):
        raise ArgumentError(f"write_adapter writes an AdapterFile, got {type(af).__name__}")
    fmt = target_format(path, to)
    if fmt == "peft":
        if style not in (None, "peft") or prefix is not None:
            raise FormatError("a key style or prefix only applies to LyCORIS files, not PEFT directories")
        write_peft_adapter(af, path)
        return Path(path)
    if style is not None and style not in STYLES:
        raise FormatError(f"unknown key style {style!r} (known: {', '.join(STYLES)})")
    write_lycoris_file(af, path, style=style or "lycoris", prefix=prefix, metadata=metadata, fold_scale=fold_scale)
    return Path(path)
