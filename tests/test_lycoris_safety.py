"""Safety of the LyCORIS-file loader: no pickle by default, corrupt/truncated/mistyped/misshaped files give
lyco errors naming the file and key, saves are atomic, and fuzzed files never raise anything else."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import lyco
from lyco.formats import read_lycoris_file


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.conv = nn.Conv2d(4, 8, 3)


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def valid_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "lycoris_fc.lokr_w1": torch.randn(4, 4, generator=g),
        "lycoris_fc.lokr_w2_a": torch.randn(4, 2, generator=g),
        "lycoris_fc.lokr_w2_b": torch.randn(2, 4, generator=g),
        "lycoris_fc.alpha": torch.tensor(2.0),
        "lycoris_conv.lokr_w1": torch.randn(2, 2, generator=g),
        "lycoris_conv.lokr_w2_a": torch.randn(4, 2, generator=g),
        "lycoris_conv.lokr_w2_b": torch.randn(2, 18, generator=g),  # (r, in_r·3·3)
    }


def test_pickle_needs_allow_pickle(tmp_path):
    path = tmp_path / "a.safetensors"
    save_file({k: v for k, v in valid_tensors().items() if k.startswith("lycoris_fc")}, str(path))
    pt = tmp_path / "a.pt"
    torch.save({k: v for k, v in valid_tensors().items() if k.startswith("lycoris_fc")}, pt)
    with pytest.raises(lyco.FormatError, match="pickle files can run arbitrary code"):
        lyco.load_lycoris(net(), pt)
    with pytest.warns(UserWarning, match="loading a pickle file"):
        model = lyco.load_lycoris(net(), pt, allow_pickle=True)
    expected = lyco.load_lycoris(net(), path)
    x = torch.randn(2, 16)
    torch.testing.assert_close(model.model.fc(x), expected.model.fc(x))
    with pytest.raises(lyco.FormatError, match=r"\.safetensors only"):
        lyco.save_lycoris(model, tmp_path / "out.ckpt")


@pytest.mark.parametrize(
    ("change", "error", "pattern"),
    [
        ({"lycoris_fc.lokr_w1": torch.ones(4, 4, dtype=torch.int64)}, lyco.FormatError, "lycoris_fc.lokr_w1.*dtype"),
        ({"lycoris_fc.alpha": torch.ones(2)}, lyco.FormatError, "lycoris_fc.alpha.*single real number"),
        ({"lycoris_fc.alpha": torch.tensor(float("nan"))}, lyco.FormatError, "lycoris_fc.alpha.*not finite"),
        ({"lycoris_fc.lokr_w1": torch.ones(4, 4, 1)}, lyco.ShapeMismatchError, "lycoris_fc.lokr_w1.*needs 2"),
        ({"lycoris_fc.lokr_w1": torch.ones(0, 4)}, lyco.ShapeMismatchError, "lycoris_fc.lokr_w1.*non-empty"),
        ({"lycoris_fc.lokr_w1": torch.ones(3, 4)}, lyco.ShapeMismatchError, "module 'fc'.*do not fit.*16, 16"),
        ({"lycoris_conv.lokr_w2_b": torch.ones(2, 17)}, lyco.ShapeMismatchError, "module 'conv'"),
        ({"lycoris_fc.lokr_w2_a": None}, lyco.FormatError, "'lycoris_fc'.*lokr_w2_b.*without|missing"),
        ({"lycoris_fc.lokr_w2": torch.ones(4, 4)}, lyco.FormatError, "both 'lokr_w2' and 'lokr_w2_a'"),
        ({"lycoris_fc.lokr_w1_b": torch.ones(1, 4)}, lyco.FormatError, "'lokr_w1_b' without 'lokr_w1_a'"),
        ({"lycoris_fc.hada_w1_a": torch.ones(16, 2)}, lyco.FormatError, "several algorithms"),
        ({"lycoris_fc.bias": torch.ones(16)}, lyco.FormatError, r"lycoris_fc\.bias.*unknown tensor name"),
    ],
    ids=["int-dtype", "alpha-vector", "alpha-nan", "ndim", "empty", "split", "conv-shape", "incomplete",
         "w2-twice", "w1b-alone", "two-algos", "unknown-param"],
)  # fmt: skip
def test_bad_tensors_name_file_and_key(tmp_path, change, error, pattern):
    tensors = valid_tensors()
    for k, v in change.items():
        if v is None:
            del tensors[k]
        else:
            tensors[k] = v
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    base = net()
    before = copy.deepcopy(base.state_dict())
    with pytest.raises(error, match=pattern) as exc:
        lyco.load_lycoris(base, path)
    assert str(path) in str(exc.value)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert type(base.fc) is nn.Linear


def test_missing_truncated_and_garbage_files(tmp_path):
    with pytest.raises(lyco.FormatError, match="no such file"):
        lyco.load_lycoris(net(), tmp_path / "nope.safetensors")
    path = tmp_path / "a.safetensors"
    save_file(valid_tensors(), str(path))
    data = path.read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(lyco.FormatError, match=r"t\.safetensors"):
        lyco.load_lycoris(net(), tmp_path / "t.safetensors")
    (tmp_path / "g.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(lyco.FormatError, match=r"g\.safetensors"):
        read_lycoris_file(tmp_path / "g.safetensors")


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    save_file(valid_tensors(), str(path))
    model = lyco.load_lycoris(net(), path)
    old = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lyco.formats.io.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        lyco.save_lycoris(model, path)
    assert path.read_bytes() == old
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]  # no temp file left behind


# -- fuzz: truncations and byte flips of a valid file --------------------------------------------------
def _valid_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "v.safetensors"
        save_file(valid_tensors(), str(p), {"ss_network_module": "lycoris.kohya"})
        return p.read_bytes()


VALID = _valid_bytes()
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _load(data: bytes) -> None:
    """Read without and with a model, then load: only lyco errors may escape."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "f.safetensors"
        p.write_bytes(data)
        try:
            read_lycoris_file(p)
            lyco.load_lycoris(net(), p)
        except lyco.LycoError:
            pass


@FUZZ
@given(st.integers(min_value=0, max_value=len(VALID) - 1))
def test_fuzz_truncation(n):
    _load(VALID[:n])


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)), min_size=1, max_size=4))
def test_fuzz_byte_flips(flips):
    data = bytearray(VALID)
    for pos, xor in flips:
        data[pos] ^= xor
    _load(bytes(data))


@FUZZ
@given(st.integers(min_value=8, max_value=200), st.integers(0, 255))
def test_fuzz_header_bytes(pos, value):
    """Flips concentrated in the JSON header, where shapes, dtypes and offsets live."""
    data = bytearray(VALID)
    data[min(pos, len(data) - 1)] = value
    _load(bytes(data))
