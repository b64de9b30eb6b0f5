"""Streaming safetensors: write a file one tensor at a time, read a file's index without loading it.

``safetensors.torch.save_file`` needs every tensor in memory at once. A safetensors file is an 8-byte
little-endian header length, a JSON header (name → dtype, shape, byte offsets) and the raw tensor
bytes in offset order; when dtypes and shapes are known up front (they are for a merge: the output has
the base's) the header can be written first and each tensor appended as it is produced, so peak
memory is one tensor. The file is written to a temp file and renamed into place (atomic). Tensors a
merge does not change are copied as raw bytes (:func:`raw_bytes`), whatever their dtype — also dtypes
torch cannot hold (``F4``, ``F6_*``, future ones).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FormatError
from .io import publish

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip  (dtypes lyco computes with; other ones are copied as bytes)
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header

TensorSpec = tuple[str, tuple[int, ...]]  # (safetensors dtype name, shape)


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: dtype name, shape, and its bytes ``[begin, end)`` in the file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def read_header(path: str | os.PathLike) -> tuple[dict[str, Entry], dict[str, str]]:
    """Every tensor of a safetensors file (in byte order, with absolute file offsets) and its metadata,
    read from the header alone (no tensor is loaded, any dtype name is accepted)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > min(MAX_HEADER, size - 8):
                raise ValueError(f"header length {length} does not fit the file ({size} bytes)")
            header = json.loads(fh.read(length))
    except (OSError, struct.error, ValueError, RecursionError) as exc:
        raise FormatError(f"{path}: not a readable safetensors file ({exc})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: not a readable safetensors file (the header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + length
    entries: dict[str, Entry] = {}
    for name, info in header.items():
        try:
            begin, end = (int(o) for o in info["data_offsets"])
            entry = Entry(str(info["dtype"]), tuple(int(d) for d in info["shape"]), start + begin, start + end)
        except (KeyError, TypeError, ValueError) as exc:
            raise FormatError(f"{path}: tensor {name!r} has a malformed header entry ({exc})") from None
        if not start <= entry.begin <= entry.end <= size:
            raise FormatError(f"{path}: tensor {name!r} lies outside the file (offsets {begin}..{end})")
        entries[name] = entry
    if not isinstance(metadata, dict):
        raise FormatError(f"{path}: not a readable safetensors file (__metadata__ is not an object)")
    ordered = dict(sorted(entries.items(), key=lambda kv: kv[1].begin))
    return ordered, {str(k): str(v) for k, v in metadata.items()}


def read_index(path: str | os.PathLike) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """``{name: (dtype name, shape)}`` in file order and the metadata of a safetensors file, without
    loading any tensor."""
    entries, metadata = read_header(path)
    return {name: (e.dtype, e.shape) for name, e in entries.items()}, metadata


def raw_bytes(path: str | os.PathLike, entry: Entry, chunk: int = 1 << 24) -> Iterator[bytes]:
    """The bytes of one tensor of a safetensors file, in chunks of at most ``chunk`` bytes."""
    try:
        with open(path, "rb") as fh:
            fh.seek(entry.begin)
            left = entry.end - entry.begin
            while left:
                data = fh.read(min(chunk, left))
                if not data:
                    raise OSError(f"file ends {left} bytes early")
                left -= len(data)
                yield data
    except OSError as exc:
        raise FormatError(f"{path}: cannot read tensor bytes ({exc})") from None


def load_tensor(path: str | os.PathLike, name: str, entry: Entry) -> torch.Tensor:
    """One tensor of a safetensors file, read from its bytes (so that tensors of dtypes ``safetensors``
    itself does not know elsewhere in the file do not matter); its dtype must be one of ``DTYPES``."""
    dtype = DTYPES.get(entry.dtype)
    if dtype is None:
        raise FormatError(f"{path}: tensor {name!r} has dtype {entry.dtype}, which lyco cannot compute with")
    data = bytearray().join(raw_bytes(path, entry))
    if len(data) != math.prod(entry.shape) * dtype.itemsize:
        raise FormatError(f"{path}: tensor {name!r} has {len(data)} bytes for {entry.dtype} {entry.shape}")
    if not data:
        return torch.empty(entry.shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(entry.shape)  # safetensors is little-endian, as torch here


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
        self,
        path: str | os.PathLike,
        specs: dict[str, TensorSpec],
        metadata: dict[str, str] | None = None,
        sizes: dict[str, int] | None = None,
    ) -> None:
        self.path = Path(path)
        self.specs = dict(specs)
        self._order = list(self.specs)
        self._next = 0
        header: dict[str, object] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self.sizes: dict[str, int] = {}
        for name, (dtype, shape) in self.specs.items():
            if sizes is not None and name in sizes:
                nbytes = sizes[name]
            elif dtype in DTYPES:
                nbytes = math.prod(shape) * DTYPES[dtype].itemsize
            else:
                raise FormatError(f"{self.path}: tensor {name!r} has dtype {dtype}, whose size lyco does not know")
            self.sizes[name] = nbytes
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

    def _expect(self, name: str) -> None:
        if self._fh is None:
            raise RuntimeError("StreamingWriter.write outside its `with` block")
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise FormatError(f"{self.path}: tensor {name!r} written out of order (expected {expected})")

    def write_raw(self, name: str, chunks: Iterable[bytes]) -> None:
        """Append the next tensor as raw bytes (a tensor copied through unchanged, any dtype)."""
        self._expect(name)
        written = 0
        for data in chunks:
            self._fh.write(data)
            written += len(data)
        if written != self.sizes[name]:
            raise FormatError(f"{self.path}: tensor {name!r} has {written} bytes, the header says {self.sizes[name]}")
        self._next += 1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; its name, dtype and shape must be the next entry of ``specs``."""
        self._expect(name)
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
