"""Regression tests of the reliability defects (issue 12): each failed before the fix."""

from __future__ import annotations

import copy
import json
import math
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lyco
from conftest import X, assert_untouched, base_model, fingerprint
from lyco import cli
from lyco.formats import read_peft_adapter

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def saved(folder: Path, config=None) -> Path:
    config = config or lyco.LoKrConfig(r=2, alpha=2, target_modules=["fc", "conv2d"], init_weights=False)
    lyco.get_model(base_model(), config).save_pretrained(folder)
    return folder


def edit_tensors(folder: Path, fn) -> None:
    tensors = load_file(folder / WEIGHTS)
    fn(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS))


def edit_config(folder: Path, fn) -> None:
    data = json.loads((folder / CONFIG).read_text())
    fn(data)
    (folder / CONFIG).write_text(json.dumps(data))


def every_reader(folder: Path, base_file: Path, error, match: str, capsys) -> None:
    """from_pretrained, load_adapter, read_peft_adapter and lyco inspect/convert/merge all report ``error``."""
    base = base_model()
    before = fingerprint(base)
    with pytest.raises(error, match=match):
        lyco.LycoModel.from_pretrained(base, folder)
    assert_untouched(base, before)
    model = lyco.get_model(base_model(), lyco.LoHaConfig(r=2, target_modules=["fc"]))
    before = fingerprint(model)
    with pytest.raises(error, match=match):
        model.load_adapter(folder, "x")
    assert_untouched(model, before)
    with pytest.raises(error, match=match):
        read_peft_adapter(folder)
    for argv in (["inspect", str(folder)], ["convert", str(folder), str(folder.parent / "c.safetensors")],
                 ["merge", str(base_file), str(folder), str(folder.parent / "m.safetensors"), "--no-progress"]):  # fmt: skip
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.startswith(f"lyco {argv[0]}: error:"), err


@pytest.fixture
def base_file(tmp_path: Path) -> Path:
    path = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base_model().state_dict().items()}, str(path))
    return path


# -- 2. PEFT folder tensors are validated -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (lambda t: t.update({PREFIX + "fc.lokr_w1": torch.ones(4, 3, 1)}), lyco.ShapeMismatchError, r"lokr_w1.*\(4, 3, 1\)"),
        (lambda t: t.update({PREFIX + "fc.lokr_w1": torch.ones(0, 4)}), lyco.ShapeMismatchError, "non-empty"),
        (lambda t: t.update({PREFIX + "fc.lokr_w1": torch.tensor(1.0)}), lyco.ShapeMismatchError, r"\(\)"),
        (lambda t: t.pop(PREFIX + "fc.lokr_w2_b"), lyco.FormatError, "lokr_w2_b"),
        (lambda t: t.update({PREFIX + "fc.lokr_w1": torch.ones(4, 4, dtype=torch.int32)}), lyco.FormatError, "dtype"),
    ],
    ids=["3d-w1", "empty", "0-dim", "missing", "int"],
)  # fmt: skip
def test_bad_peft_tensors_are_lyco_errors_everywhere(tmp_path, base_file, capsys, edit, error, match):
    folder = saved(tmp_path / "a")
    edit_tensors(folder, edit)
    every_reader(folder, base_file, error, match, capsys)


def test_missing_loha_tensor(tmp_path, base_file, capsys):
    folder = saved(tmp_path / "a", lyco.LoHaConfig(r=2, target_modules=["fc"], init_weights=False))
    edit_tensors(folder, lambda t: t.pop(PREFIX + "fc.hada_w1_b"))
    every_reader(folder, base_file, lyco.FormatError, "hada_w1_b", capsys)


def test_nan_tensors_warn_naming_the_key(tmp_path):
    folder = saved(tmp_path / "a")
    edit_tensors(folder, lambda t: t[PREFIX + "fc.lokr_w1"].view(-1).__setitem__(0, float("nan")))
    with pytest.warns(UserWarning, match=r"fc\.lokr_w1.*NaN"):
        lyco.LycoModel.from_pretrained(base_model(), folder)


# -- 3. config decoding and field types ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b'{"peft_type": "LOKR", \xff\xfe}', "UnicodeDecodeError"),
        (b"[" * 100_000 + b"]" * 100_000, "RecursionError"),
    ],
    ids=["non-utf8", "deep"],
)
def test_undecodable_config(tmp_path, base_file, capsys, raw, match):
    folder = saved(tmp_path / "a")
    (folder / CONFIG).write_bytes(raw)
    every_reader(folder, base_file, lyco.FormatError, rf"{CONFIG}.*{match}", capsys)


BAD_FIELDS = [("rank_pattern", "abc"), ("alpha", math.inf), ("alpha", 10**400), ("layers_pattern", 5),
              ("r", "8"), ("use_effective_conv2d", "yes"), ("decompose_both", 1),
              ("alpha_pattern", {"fc": "x"}), ("rank_pattern", {"(": 2}), ("layers_to_transform", 2.5),
              ("target_modules", [1, 2]), ("rank_dropout", 10**400)]  # fmt: skip


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS, ids=[f"{f}={v!r}"[:30] for f, v in BAD_FIELDS])
def test_bad_config_fields_name_field_and_file(tmp_path, field, value):
    with pytest.raises(lyco.ConfigError, match=field):
        lyco.LoKrConfig(**{field: value})
    folder = saved(tmp_path / "a")
    text = json.dumps({**json.loads((folder / CONFIG).read_text()), field: "__V__"})
    raw = "1e400" if value == math.inf else repr(value) if isinstance(value, int) else json.dumps(value)
    (folder / CONFIG).write_text(text.replace('"__V__"', raw))
    with pytest.raises(lyco.FormatError, match=rf"{CONFIG}.*{field}"):
        lyco.LycoModel.from_pretrained(base_model(), folder)


def test_peft_type_of_the_wrong_type(tmp_path):
    folder = saved(tmp_path / "a")
    edit_config(folder, lambda d: d.update(peft_type=["LOKR"]))
    with pytest.raises(lyco.FormatError, match=r"peft_type \['LOKR'\] is not supported"):
        lyco.LycoModel.from_pretrained(base_model(), folder)


def test_target_error_from_a_folder_names_it(tmp_path):
    folder = saved(tmp_path / "a")
    edit_config(folder, lambda d: d.update(target_modules=["nope"]))
    edit_tensors(folder, lambda t: None)  # rewritten without lyco's metadata, as PEFT writes it: no torn check
    with pytest.raises(lyco.TargetError, match=rf"{folder}.*nope"):
        lyco.LycoModel.from_pretrained(base_model(), folder)


# -- 4. CLI write errors end in one line ------------------------------------------------------------------
def test_cli_write_errors_are_one_line(tmp_path, capsys):
    folder = saved(tmp_path / "a")
    (tmp_path / "f").write_text("a file")
    (tmp_path / "d.safetensors").mkdir()
    for out in (tmp_path / "f" / "out.safetensors", tmp_path / "d.safetensors", Path("/proc/lyco/out.safetensors")):
        assert cli.main(["convert", str(folder), str(out)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("lyco convert: error:") and "Traceback" not in err, err
    with pytest.raises(OSError):
        cli.main(["--debug", "convert", str(folder), str(tmp_path / "f" / "out.safetensors")])


def test_cli_unexpected_errors_are_reported_as_bugs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("lyco.tools.describe.describe", lambda *a, **k: 1 / 0)
    folder = saved(tmp_path / "a")
    assert cli.main(["inspect", str(folder)]) == cli.EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "ZeroDivisionError" in err and "--debug" in err and "Traceback" not in err


# -- 5. merge copies tensors of any dtype byte for byte ---------------------------------------------------------
def _add_raw_tensors(path: Path, extra: dict[str, tuple[str, list[int], bytes]]) -> None:
    """Append tensors with dtypes torch may lack (F4, C64…) by rewriting the safetensors header by hand."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    for name, (dtype, shape, payload) in extra.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(payload)]}
        data += payload
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def test_merge_copies_any_dtype_byte_for_byte(tmp_path):
    model = lyco.get_model(base_model(), lyco.LoKrConfig(r=2, target_modules=["fc"], init_weights=False))
    adapter = tmp_path / "a.safetensors"
    lyco.save_lycoris(model, adapter)
    base = tmp_path / "base.safetensors"
    tensors = {k: v.contiguous() for k, v in base_model().state_dict().items()}
    tensors |= {"u32": torch.arange(6).to(torch.uint32), "u16": torch.arange(4).to(torch.uint16),
                "c64": torch.randn(3, dtype=torch.complex64), "f8": torch.randn(5).to(torch.float8_e4m3fn),
                "u64": torch.arange(2).to(torch.uint64)}  # fmt: skip
    save_file(tensors, str(base))
    _add_raw_tensors(base, {"f4": ("F4", [4], b"\x12\x34"), "future": ("X99", [3], b"abc")})
    out = tmp_path / "merged.safetensors"
    assert cli.main(["merge", str(base), str(adapter), str(out), "--no-progress"]) == 0
    from lyco.formats.stream import load_tensor, raw_bytes, read_header

    src, _ = read_header(base)
    dst, meta = read_header(out)
    assert list(src) == list(dst) and "lyco_merge" in meta
    for name, entry in src.items():
        same = b"".join(raw_bytes(base, entry)) == b"".join(raw_bytes(out, dst[name]))
        assert same == (name != "fc.weight"), name
    merged = load_tensor(out, "fc.weight", dst["fc.weight"])  # safetensors itself refuses the X99 file
    torch.testing.assert_close(merged, model.merge_and_unload().fc.weight.detach(), atol=1e-6, rtol=0)


# -- 6. safe_merge sees what several adapters write together ---------------------------------------------------
def test_safe_merge_checks_the_sum_of_adapters():
    config = lyco.LoKrConfig(r=2, alpha=2, target_modules=["fc"], init_weights=False)  # scale 1
    model = lyco.get_model(base_model(), config)
    model.add_adapter("b", config)
    layer = model.model.fc
    part = math.sqrt(0.3 * torch.finfo(torch.float32).max)
    with torch.no_grad():
        for name in ("default", "b"):
            a = layer.lyco_adapters[name]
            a.lokr_w1.fill_(1.0)
            a.lokr_w2_a.fill_(part)
            a.lokr_w2_b.fill_(part)  # every ΔW entry 2 · 0.3 · max: finite alone, inf together
    for name in ("default", "b"):
        assert torch.isfinite(layer.base_layer.weight + layer.get_delta_weight(name)).all()
    before = fingerprint(model)
    with pytest.raises(lyco.MergeError, match="NaN/Inf"):
        model.merge_adapter(["default", "b"], safe_merge=True)
    assert_untouched(model, before)


def test_safe_merge_sees_fp16_overflow():
    net = base_model().half()
    model = lyco.get_model(net, lyco.LoHaConfig(r=2, target_modules=["fc"], init_weights=False))
    a = model.model.fc.lyco_adapters["default"]
    with torch.no_grad():  # ΔW entries (2·300·300)·(2·1·1)·scale 4 ≈ 1.4e6: fine in fp32, above fp16's 65504
        for t, v in ((a.hada_w1_a, 300.0), (a.hada_w1_b, 300.0), (a.hada_w2_a, 1.0), (a.hada_w2_b, 1.0)):
            t.fill_(v)
    with pytest.raises(lyco.MergeError):
        model.merge_adapter(safe_merge=True)


# -- 7. adapters the forward would ignore are refused ---------------------------------------------------------------
class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.enc = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
        self.proj = nn.Linear(16, 16)

    def forward(self, x):
        return self.proj(self.enc(self.mha(x, x, x)[0]))


@pytest.mark.parametrize("target", ["mha.out_proj", "enc.linear1", "enc.self_attn.out_proj"])
def test_layers_their_parent_bypasses_are_refused(target):
    torch.manual_seed(0)
    base = Attn()
    before = fingerprint(base)
    with pytest.raises(lyco.UnsupportedLayerError, match=r"reads .*weight directly"):
        lyco.get_model(base, lyco.LoHaConfig(target_modules=[target]))
    assert_untouched(base, before)


def test_all_linear_skips_bypassed_layers_and_every_adapter_runs():
    torch.manual_seed(0)
    model = lyco.get_model(Attn().eval(), lyco.LoKrConfig(r=2, target_modules="all-linear", init_weights=False))
    assert sorted(n for n, _ in model.adapted_layers()) == ["proj"]
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        unmerged = model(x)
        model.merge_adapter()
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)


# -- 8. quantized bases: merge refuses, training works ---------------------------------------------------------------
def test_quantized_base_refuses_merge_and_still_trains():
    quanto = pytest.importorskip("optimum.quanto")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    quanto.quantize(net, weights=quanto.qint8)
    quanto.freeze(net)
    model = lyco.get_model(net, lyco.LoKrConfig(r=2, target_modules=["0", "2"], init_weights=False))
    x = torch.randn(4, 16)
    model(x).square().mean().backward()
    assert model.model[0].lyco_adapters["default"].lokr_w1.grad is not None
    weight = model.model[0].base_layer.weight.dequantize().clone()
    for call in (model.merge_adapter, model.merge_and_unload, lambda: model.merge_adapter(safe_merge=True)):
        with pytest.raises(lyco.MergeError, match="quantized"):
            call()
    assert torch.equal(model.model[0].base_layer.weight.dequantize(), weight)
    assert not any(layer.merged for _, layer in model.adapted_layers())


def test_meta_and_integer_weights_refuse_merge():
    model = lyco.get_model(base_model(), lyco.LoKrConfig(r=2, target_modules=["fc"], init_weights=False))
    layer = model.model.fc
    layer.base_layer.weight = nn.Parameter(torch.ones(16, 32, dtype=torch.int32), requires_grad=False)
    with pytest.raises(lyco.MergeError, match="int32"):
        model.merge_adapter()


# -- 9. convert verifies without building huge ΔW ---------------------------------------------------------------------
def test_convert_a_small_file_naming_a_huge_layer(tmp_path):
    """(65536, 1) LoHa factors: a 1 MiB file whose dense ΔW would take 16 GiB. Run with 3 GiB of address space."""
    n = 65536
    g = torch.Generator().manual_seed(0)
    tensors = {f"lycoris_x.{k}": torch.randn(*s, generator=g) for k, s in
               (("hada_w1_a", (n, 1)), ("hada_w1_b", (1, n)), ("hada_w2_a", (n, 1)), ("hada_w2_b", (1, n)))}  # fmt: skip
    src = tmp_path / "huge.safetensors"
    save_file(tensors, str(src))
    code = f"import sys; from lyco.cli import main; sys.exit(main(['convert', {str(src)!r}, {str(tmp_path / 'o.safetensors')!r}]))"
    limit = 3 << 30

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=cap, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "max relative ΔW difference 0.0e+00" in done.stdout


# -- 10. alpha 0 means the same in every format --------------------------------------------------------------------------
def test_alpha_zero_round_trips(tmp_path, base_file, capsys):
    model = lyco.get_model(base_model(), lyco.LoKrConfig(r=2, alpha=0, target_modules=["fc"], init_weights=False))
    torch.testing.assert_close(run(model), run(base_model()), atol=0, rtol=0)  # scale 0
    lyco.save_lycoris(model, tmp_path / "a.safetensors")
    assert float(load_file(tmp_path / "a.safetensors")["lycoris_fc.alpha"]) == 2.0  # 0 is never written
    torch.testing.assert_close(run(lyco.load_lycoris(base_model(), tmp_path / "a.safetensors")), run(model), atol=0, rtol=0)
    model.save_pretrained(tmp_path / "peft")
    af = read_peft_adapter(tmp_path / "peft")
    assert af.modules["fc"].scale() == 0.0
    assert cli.main(["inspect", str(tmp_path / "peft"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["modules"][0]["scale"] == 0.0
    out = tmp_path / "m.safetensors"
    assert cli.main(["merge", str(base_file), str(tmp_path / "peft"), str(out), "--no-progress"]) == 0
    assert torch.equal(load_file(out)["fc.weight"], load_file(base_file)["fc.weight"])
    assert cli.main(["convert", str(tmp_path / "peft"), str(tmp_path / "c.safetensors")]) == 0
    torch.testing.assert_close(run(lyco.load_lycoris(base_model(), tmp_path / "c.safetensors")), run(model), atol=0, rtol=0)


def test_stored_alpha_zero_in_a_lycoris_file_warns(tmp_path):
    g = torch.Generator().manual_seed(0)
    save_file({"lycoris_fc.lokr_w1": torch.randn(4, 8, generator=g), "lycoris_fc.lokr_w2_a": torch.randn(4, 1, generator=g),
               "lycoris_fc.lokr_w2_b": torch.randn(1, 4, generator=g), "lycoris_fc.alpha": torch.tensor(0.0)},
              str(tmp_path / "z.safetensors"))  # fmt: skip
    with pytest.warns(UserWarning, match="ComfyUI, AUTOMATIC1111: scale 0"):
        model = lyco.load_lycoris(base_model(), tmp_path / "z.safetensors")
    assert model.model.fc.scaling["default"] == 1.0


# -- 11. fp64 bases merge in fp64 -------------------------------------------------------------------------------------------
def test_float64_merge_unmerge_is_exact_to_fp64():
    net = base_model().double()
    model = lyco.get_model(net, lyco.LoHaConfig(r=2, target_modules=["fc", "conv2d"], init_weights=False))
    weight = model.model.fc.base_layer.weight.detach().clone()
    out = model(X.double()).detach()
    model.merge_adapter()
    torch.testing.assert_close(model(X.double()), out, atol=1e-12, rtol=0)
    model.unmerge_adapter()
    assert (model.model.fc.base_layer.weight - weight).abs().max() < 1e-15


# -- 12. smaller ones ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["/tmp/evil", "a/b", "..", "a\\b"])
def test_adapter_names_cannot_be_paths(tmp_path, name):
    model = lyco.get_model(base_model(), lyco.LoKrConfig(r=2, target_modules=["fc"]))
    with pytest.raises(lyco.AdapterNameError, match="sub-folder"):
        model.add_adapter(name, lyco.LoKrConfig(r=2, target_modules=["fc"]))
    assert list(model.peft_config) == ["default"]


def test_copy_of_the_model_is_unaffected_by_failed_loads(tmp_path):
    model = lyco.get_model(base_model(), lyco.LoKrConfig(r=2, target_modules=["fc"], init_weights=False))
    other = copy.deepcopy(model)
    folder = saved(tmp_path / "a")
    edit_tensors(folder, lambda t: t.update({PREFIX + "fc.lokr_w1": torch.ones(4, 3, 1)}))
    with pytest.raises(lyco.ShapeMismatchError):
        model.load_adapter(folder, "x")
    torch.testing.assert_close(run(model), run(other), atol=0, rtol=0)
