"""Streaming safetensors: write a file one tensor at a time, read a file's index without loading it.

``safetensors.torch.save_file`` needs every tensor in memory at once. A safetensors file is an 8-byte
little-endian header length, a JSON header (name → dtype, shape, byte offsets) and the raw tensor
bytes in offset order; when dtypes and shapes are known up front (they are for a merge: the output has
the base's) the header can be written first and each tensor appended as it is produced, so peak
memory is one tensor. The file is written to a temp file and renamed into place (atomic).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import FormatError
from .io import publish

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

TensorSpec = tuple[str, tuple[int, ...]]  # (safetensors dtype name, shape)


def read_index(path: str | os.PathLike) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """``{name: (dtype name, shape)}`` in file order and the metadata of a safetensors file, without
    loading any tensor."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            specs = {}
            for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                sl = fh.get_slice(name)
                specs[name] = (sl.get_dtype(), tuple(sl.get_shape()))
            return specs, dict(fh.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise FormatError(f"{path}: not a readable safetensors file ({exc})") from None


def iter_tensors(path: str | os.PathLike, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` one at a time from a safetensors file (memory-mapped; each tensor is
    read when yielded and can be freed before the next)."""
    try:
        with safe_open(str(path), framework="pt") as fh:
            for name in names if names is not None else list(fh.keys()):
                yield name, fh.get_tensor(name)
    except (SafetensorError, OSError) as exc:
        raise FormatError(f"{path}: not a readable safetensors file ({exc})") from None


class StreamingWriter:
    """Write a safetensors file tensor by tensor, in the order of ``specs``.

    >>> import tempfile, pathlib
    >>> from safetensors.torch import load_file
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "x.safetensors"
    >>> with StreamingWriter(path, {"a": ("F32", (2,)), "b": ("I64", ())}) as w:
    ...     w.write("a", torch.ones(2)); w.write("b", torch.tensor(3))
    >>> sorted(load_file(path).items(), key=lambda kv: kv[0])
    [('a', tensor([1., 1.])), ('b', tensor(3))]
    """

    def __init__(
        self, path: str | os.PathLike, specs: dict[str, TensorSpec], metadata: dict[str, str] | None = None
    ) -> None:
        self.path = Path(path)
        self.specs = dict(specs)
        self._order = list(self.specs)
        self._next = 0
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        for name, (dtype, shape) in self.specs.items():
            if dtype not in DTYPES:
                raise FormatError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            nbytes = math.prod(shape) * DTYPES[dtype].itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._header = struct.pack("<Q", len(raw)) + raw
        self._fh = None
        self._tmp: str | None = None

    def __enter__(self) -> StreamingWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        self._fh = os.fdopen(fd, "wb")
        self._fh.write(self._header)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; its name, dtype and shape must be the next entry of ``specs``."""
        if self._fh is None:
            raise RuntimeError("StreamingWriter.write outside its `with` block")
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise FormatError(f"{self.path}: tensor {name!r} written out of order (expected {expected})")
        dtype, shape = self.specs[name]
        if DTYPE_NAMES.get(tensor.dtype) != dtype or tuple(tensor.shape) != shape:
            raise FormatError(
                f"{self.path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, the header says {dtype} {shape}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._fh.write(memoryview(data.numpy()))  # no extra copy of the bytes
        self._next += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        assert self._fh is not None and self._tmp is not None
        self._fh.close()
        try:
            if exc_type is None and self._next != len(self._order):
                missing = self._order[self._next :]
                raise FormatError(f"{self.path}: {len(missing)} tensor(s) never written, first {missing[0]!r}")
            if exc_type is None:
                publish(self._tmp, self.path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
