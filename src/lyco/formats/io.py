"""Safe file I/O shared by every format: safetensors by default, atomic writes, clear errors."""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import ArgumentError, FormatError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once: os.umask can only be read by setting it


def publish(tmp: str, path: Path) -> None:
    """Give the temp file normal permissions (mkstemp makes it 0600), then rename it into place."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)


def as_path(value: object, what: str = "path") -> Path:
    """``value`` as a :class:`~pathlib.Path` (:class:`ArgumentError` when it is not a ``str`` / path-like)."""
    if not isinstance(value, (str, os.PathLike)):
        raise ArgumentError(f"{what} must be a file or folder path, got {type(value).__name__}")
    return Path(value)


def read_tensors(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file (or a pickle file with ``allow_pickle=True``, with a warning)."""
    path = as_path(path)
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise FormatError(
                f"{path}: pickle files can run arbitrary code when loaded; convert it to .safetensors or pass "
                "allow_pickle=True if you trust its source"
            )
        warnings.warn(f"{path}: loading a pickle file (allow_pickle=True); only do this for trusted files", stacklevel=3)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for bad pickles
            raise FormatError(f"{path}: cannot read pickle file ({type(exc).__name__}: {exc})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise FormatError(f"{path}: expected a dict of tensors")
        return state
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FormatError(f"{path}: not a readable safetensors file ({exc})") from None


def _temp(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


def remove_stale_temps(folder: Path, names: list[str]) -> None:
    """Delete temp files an earlier, killed write of ``names`` left in ``folder`` (``.<name>.*.tmp``)."""
    for name in names:
        for stale in folder.glob(f".{name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()


def write_files(folder: str | os.PathLike, writers: dict[str, Callable[[str], None]]) -> None:
    """Write several files of ``folder`` as one step, as far as a file system allows: each ``writers[name]``
    fills a temp file beside its target; only when every one is complete are they renamed into place, in
    order (a failure before that leaves the folder as it was; the temps are removed). A process killed
    between two renames leaves some new and some old files: readers must detect that (PEFT folders carry
    their config in the weights' metadata). Temps of an earlier killed write are removed first."""
    folder = as_path(folder, "folder")
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(folder, list(writers))
    temps: dict[str, str] = {}
    try:
        for name, write in writers.items():
            temps[name] = _temp(folder / name)
            write(temps[name])
        for name, tmp in temps.items():
            publish(tmp, folder / name)
    except BaseException:
        for tmp in temps.values():
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


def tensor_writer(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Callable[[str], None]:
    """A writer for :func:`write_files`: ``tensors`` (detached, moved to the CPU) as safetensors."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return lambda tmp: save_file(tensors, tmp, metadata=metadata)


def text_writer(text: str) -> Callable[[str], None]:
    """A writer for :func:`write_files`: ``text`` as UTF-8."""
    return lambda tmp: Path(tmp).write_text(text, encoding="utf-8")


def write_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write a safetensors file atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    write_files(path.parent, {path.name: tensor_writer(tensors, metadata)})


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically."""
    path = Path(path)
    write_files(path.parent, {path.name: text_writer(text)})


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a safetensors file (empty for a pickle file)."""
    if str(path).endswith(PICKLE_SUFFIXES):
        return {}
    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FormatError(f"{path}: not a readable safetensors file ({exc})") from None


def warn_nonfinite(t: torch.Tensor, where: str) -> None:
    """Warn (naming ``where``) when a floating tensor read from a file holds NaN or Inf values."""
    if t.dtype.is_floating_point and t.numel() and not bool(torch.isfinite(t).all()):
        warnings.warn(f"{where} holds NaN/Inf values; outputs of this adapter will be NaN/Inf", stacklevel=3)
