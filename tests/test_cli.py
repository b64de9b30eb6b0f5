"""The ``lyco`` adapter-file commands, run in-process through ``lyco.cli.main`` on tiny models and files."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lyco
from lyco import cli, cli_output
from lyco.formats.dispatch import read_adapter
from lyco.ops.kron import make_kron
from lyco.ops.lowrank import relative_error, svd_tail_error
from lyco.tools.convert import compare_adapters

COMMANDS = ("inspect", "convert", "merge", "extract", "resize", "to-lora")


class Net(nn.Module):
    """Conv2d(4→8, k3) → flatten → Linear(8·3·3=72 → 24) → Linear(24 → 16); input (N, 4, 5, 5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3)
        self.fc1 = nn.Linear(72, 24)
        self.fc2 = nn.Linear(24, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(self.conv(x).relu().flatten(1)).relu())


X = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(1))
TARGETS = ["conv", "fc1", "fc2"]
CONFIGS = {
    "lokr": lambda: lyco.LoKrConfig(r=2, alpha=3, target_modules=TARGETS, init_weights=False),
    "lokr_full": lambda: lyco.LoKrConfig(r=16, alpha=4, target_modules=TARGETS, init_weights=False),
    "loha": lambda: lyco.LoHaConfig(r=2, alpha=5, target_modules=TARGETS, init_weights=False),
}


def base_net() -> Net:
    torch.manual_seed(0)
    return Net()


def state_file(net: nn.Module, path: Path) -> Path:
    save_file({k: v.detach().contiguous() for k, v in net.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Base weights, and per config a PEFT directory and a LyCORIS file of a random adapter."""
    root = tmp_path_factory.mktemp("cli")
    out = {"base": state_file(base_net(), root / "base.safetensors")}
    for name, make in CONFIGS.items():
        model = lyco.get_model(base_net(), make())
        model.save_pretrained(root / f"{name}_peft")
        lyco.save_lycoris(model, root / f"{name}.safetensors")
        out[f"{name}_peft"], out[name] = root / f"{name}_peft", root / f"{name}.safetensors"
    return out


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path, rc: int = 0) -> str:
    code = cli.main([str(a) for a in argv] + ["--no-progress"] * (argv[0] in COMMANDS))
    captured = capsys.readouterr()
    assert code == rc, captured.out + captured.err
    return captured.out + captured.err


def test_help_via_python_m_lyco_lists_every_command() -> None:
    proc = subprocess.run([sys.executable, "-m", "lyco", "--help"], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    for command in (*COMMANDS, "demo"):
        assert command in proc.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_examples(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: lyco {command}" in out and "examples:" in out and f"lyco {command} " in out


# -- inspect ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lokr", "lokr_peft", "lokr_full", "loha_peft"])
def test_inspect_json(kind: str, files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    report = json.loads(run(capsys, "inspect", files[kind], "--json"))
    src = read_adapter(files[kind])
    assert report["format"] == ("PEFT directory" if kind.endswith("peft") else "LyCORIS/kohya safetensors file")
    assert report["convention"] == ("peft" if kind.endswith("peft") else "lycoris")
    assert report["algos"] == [kind.split("_")[0].replace("full", "")]
    assert len(report["modules"]) == 3 and report["num_params"] == src.num_params() > 0
    assert report["size_bytes"] > report["num_params"] * 4
    for m in report["modules"]:
        assert m["scale"] == pytest.approx(src.modules[m["name"]].scale())
    if kind == "lokr_full":  # both factors full: scale 1 whatever alpha says
        assert {m["rule"] for m in report["modules"]} == {"both LoKr factors full → scale 1 (alpha ignored)"}
    elif kind == "lokr":
        assert {m["scale"] for m in report["modules"] if m["rule"] == "alpha / r"} == {1.5}  # conv: w2 full
        assert report["metadata"]["ss_network_module"] == "lycoris.kohya"


def test_inspect_text_rich_and_plain(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = run(capsys, "inspect", files["lokr"])
    for text in ("LyCORIS/kohya safetensors file", "convention", "lycoris", "producer", "lycoris.kohya",
                 "alpha / r (2)", "both LoKr factors full → scale 1 (alpha ignored) (1)", "fc1", "ss_network_args", "size on disk"):  # fmt: skip
        assert text in out, text
    monkeypatch.setattr(cli_output, "has_rich", lambda: False)  # rich is optional
    plain = run(capsys, "inspect", files["loha_peft"], "--base", files["base"])
    assert "PEFT" in plain and "┃" not in plain
    assert re.search(r"conv\s+loha\s+8×4×3×3\s+2\s+5\s+2\.5", plain), plain


# -- convert ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("style", ["lycoris", "kohya", "diffusers"])
def test_convert_peft_to_file_and_back_keeps_every_delta(
    kind: str, style: str, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.safetensors"
    # bit-exact, except diffusers' own layout, whose scale lives in the tensors (no .alpha): float rounding only
    tol = 1e-6 if style == "diffusers" else 0.0
    said = run(capsys, "convert", files[f"{kind}_peft"], out, "--style", style)
    assert float(re.search(r"max relative ΔW difference (\S+)", said).group(1)) <= tol
    back = tmp_path / "back"
    run(capsys, "convert", out, back, "--to", "peft", "--base", files["base"])
    src, mid, dst = read_adapter(files[f"{kind}_peft"]), read_adapter(out), read_adapter(back)
    for a, b in ((src, mid), (src, dst)):
        diff, n = compare_adapters(a, b)
        assert n == 3 and diff <= tol
    # outputs, not just weights: the original PEFT dir and the round-tripped one give the same model
    want = lyco.LycoModel.from_pretrained(base_net(), files[f"{kind}_peft"])(X)
    got = lyco.LycoModel.from_pretrained(base_net(), back)(X)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (want - base_net()(X)).abs().max() > 1e-3  # the adapter really moves the output


def test_convert_file_to_peft_needs_the_base_for_underscore_names(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = run(capsys, "convert", files["lokr"], tmp_path / "dir", "--to", "peft", rc=1)
    assert "--base" in err and not (tmp_path / "dir").exists()


# -- merge ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lokr", "loha_peft", "lokr_full"])
def test_merge_matches_the_model_merge(
    kind: str, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "merged.safetensors"
    text = run(capsys, "merge", files["base"], files[kind], out)
    assert "merged 3 module(s)" in text and "copied 3 tensor(s)" in text
    adapter = files[kind]
    model = lyco.LycoModel.from_pretrained(base_net(), adapter) if adapter.is_dir() else lyco.load_lycoris(base_net(), adapter)
    want = model.merge_and_unload().state_dict()
    got = load_file(out)
    assert list(got) == list(load_file(files["base"]))
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-6, msg=key)
    half = tmp_path / "half.safetensors"
    run(capsys, "merge", files["base"], files[kind], half, "--scale", "0.5")
    base = load_file(files["base"])
    for key in ("conv.weight", "fc1.weight"):
        torch.testing.assert_close(load_file(half)[key] - base[key], 0.5 * (got[key] - base[key]), rtol=1e-5, atol=1e-6)


def test_merge_kohya_file_and_missing_module_error(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kohya = tmp_path / "k.safetensors"
    run(capsys, "convert", files["lokr_peft"], kohya, "--style", "kohya")
    assert any(k.startswith("lora_unet_fc1.") for k in load_file(kohya))
    run(capsys, "merge", files["base"], kohya, tmp_path / "m.safetensors")
    reference = tmp_path / "ref.safetensors"
    run(capsys, "merge", files["base"], files["lokr_peft"], reference)
    for key, value in load_file(reference).items():
        torch.testing.assert_close(load_file(tmp_path / "m.safetensors")[key], value, rtol=0, atol=0)
    small = tmp_path / "small.safetensors"
    save_file({"fc2.weight": torch.zeros(16, 24)}, small)
    err = run(capsys, "merge", small, kohya, tmp_path / "bad.safetensors", rc=1)
    assert "not found" in err and "lora_unet_fc1" in err and not (tmp_path / "bad.safetensors").exists()


# -- extract ----------------------------------------------------------------------------------------------
def tuned_net(deltas: dict[str, torch.Tensor]) -> Net:
    net = base_net()
    with torch.no_grad():
        for name, delta in deltas.items():
            net.get_submodule(name).weight += delta
    return net


def max_error(out: str) -> float:
    return float(re.search(r"max ([0-9.e+-]+) \(", out).group(1))


def test_extract_lokr_exact_kronecker(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = torch.Generator().manual_seed(3)
    deltas = {  # Conv2d 4→8 k3: (2, 2) ⊗ (4, 2, 3, 3); fc1 72→24: (4, 8) ⊗ (6, 9); fc2 24→16: (4, 4) ⊗ (4, 6)
        "conv": make_kron(torch.randn(2, 2, generator=g), torch.randn(4, 2, 3, 3, generator=g)),
        "fc1": make_kron(torch.randn(4, 8, generator=g), torch.randn(6, 9, generator=g)),
        "fc2": make_kron(torch.randn(4, 4, generator=g), torch.randn(4, 6, generator=g)),
    }
    tuned = tuned_net(deltas)
    tuned_path = state_file(tuned, tmp_path / "tuned.safetensors")
    out_dir = tmp_path / "extracted"
    text = run(capsys, "extract", files["base"], tuned_path, out_dir, "--algo", "lokr", "--rank", "8", "--to", "peft")
    assert all(name in text for name in deltas) and max_error(text) < 1e-5
    extracted = read_adapter(out_dir)
    for name, delta in deltas.items():
        assert relative_error(delta, extracted.modules[name].delta_weight(tuple(delta.shape))) < 1e-5
    # the base model + the extracted adapter is the fine-tuned model
    model = lyco.LycoModel.from_pretrained(base_net(), out_dir)
    torch.testing.assert_close(model(X), tuned(X), rtol=1e-4, atol=1e-5)


def test_extract_on_random_deltas_reports_errors_decreasing_with_rank(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    g = torch.Generator().manual_seed(4)
    delta = torch.randn(24, 72, generator=g)
    tuned_path = state_file(tuned_net({"fc1": delta}), tmp_path / "tuned.safetensors")
    errors: dict[str, list[float]] = {"lokr": [], "loha": []}
    for algo, ranks in (("lokr", (1, 2, 4)), ("loha", (1, 2, 4))):
        for r in ranks:
            out = tmp_path / f"{algo}{r}.safetensors"
            extra = ["--factor", "2"] if algo == "lokr" else ["--steps", "100"]
            text = run(capsys, "extract", files["base"], tuned_path, out, "--algo", algo, "--rank", r, *extra, "--plain")
            assert "fc1" in text and "conv" not in text  # only modules that changed
            printed = max_error(text)
            m = read_adapter(out).modules["lycoris_fc1"]
            assert printed == pytest.approx(relative_error(delta, m.delta_weight((24, 72))), rel=1e-3)
            errors[algo].append(printed)
    for algo, errs in errors.items():
        assert 1 > errs[0] > errs[1] > errs[2] > 0, (algo, errs)


def test_extract_lora_is_the_truncated_svd(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    g = torch.Generator().manual_seed(5)
    deltas = {"fc1": torch.randn(24, 2, generator=g) @ torch.randn(2, 72, generator=g),  # rank 2: exact at r=2
              "conv": torch.randn(8, 4, 3, 3, generator=g)}  # fmt: skip
    tuned_path = state_file(tuned_net(deltas), tmp_path / "tuned.safetensors")
    out = tmp_path / "lora.safetensors"
    text = run(capsys, "extract", files["base"], tuned_path, out, "--algo", "lora", "--rank", "2", "--plain")
    af = read_adapter(out)
    assert af.algos() == {"lora"} and af.modules["lycoris_conv"].tensors["lora_down"].shape == (2, 4, 3, 3)
    assert relative_error(deltas["fc1"], af.modules["lycoris_fc1"].delta_weight((24, 72))) < 1e-5
    conv_err = relative_error(deltas["conv"], af.modules["lycoris_conv"].delta_weight((8, 4, 3, 3)))
    assert conv_err == pytest.approx(svd_tail_error(deltas["conv"].flatten(1), 2), rel=1e-4)
    assert max_error(text) == pytest.approx(conv_err, rel=1e-3)


# -- resize / to-lora -------------------------------------------------------------------------------------
def test_resize_reports_error_and_keeps_scale(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src_model = lyco.get_model(base_net(), lyco.LoKrConfig(r=4, alpha=2, target_modules=TARGETS, init_weights=False, decompose_both=True))
    src = tmp_path / "r4.safetensors"
    lyco.save_lycoris(src_model, src)
    out = tmp_path / "r2.safetensors"
    text = run(capsys, "resize", src, out, "--rank", "2")
    assert "rank 4 → 2" in text and 0 < max_error(text) < 1
    before, after = read_adapter(src), read_adapter(out)
    for name, m in after.modules.items():
        if before.modules[name].full_lokr:  # conv: both factors full at r=4, nothing to resize
            assert "lokr_w2" in m.tensors and m.rank is None
            continue
        assert m.rank == 2 and m.scale() == pytest.approx(0.5)
        shape = before.modules[name].weight_shape or None
        err = relative_error(before.modules[name].delta_weight(shape or _shape(name)), m.delta_weight(shape or _shape(name)))
        assert err <= max_error(text) + 1e-6
    same = run(capsys, "resize", files["loha"], tmp_path / "same.safetensors", "--rank", "8")
    assert "unchanged" in same and max_error(same) == 0


def _shape(name: str) -> tuple[int, ...]:
    return {"lycoris_conv": (8, 4, 3, 3), "lycoris_fc1": (24, 72), "lycoris_fc2": (16, 24)}[name]


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_to_lora_writes_kohya_lora(kind: str, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lora.safetensors"
    text = run(capsys, "to-lora", files[kind], out, "--rank", "64", "--style", "kohya", "--base", files["base"])
    assert max_error(text) < 1e-5  # full rank: exact
    keys = load_file(out)
    assert keys["lora_unet_conv.lora_down.weight"].shape == (8, 4, 3, 3)
    assert keys["lora_unet_conv.lora_up.weight"].shape == (8, 8, 1, 1)
    assert keys["lora_unet_fc1.lora_up.weight"].shape == (24, 24) and keys["lora_unet_fc1.alpha"].item() == 24
    model = lyco.load_lycoris(base_net(), files[kind])
    merged = model.merge_and_unload().state_dict()
    run(capsys, "merge", files["base"], out, tmp_path / "m.safetensors")
    for key, value in load_file(tmp_path / "m.safetensors").items():  # LoRA merge = original adapter merge
        torch.testing.assert_close(value, merged[key], rtol=1e-4, atol=1e-5)
    low = run(capsys, "to-lora", files[kind], tmp_path / "low.safetensors", "--rank", "1")
    assert max_error(low) > 1e-3


def test_errors_are_reported_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = run(capsys, "inspect", tmp_path / "missing.safetensors", rc=1)
    assert "lyco inspect: error:" in err and "missing.safetensors" in err
    torch.save({"a": torch.zeros(1)}, tmp_path / "x.pt")
    assert "pickle" in run(capsys, "inspect", tmp_path / "x.pt", rc=1)
    with pytest.raises(SystemExit):
        cli.main(["resize", "a", "b", "--rank", "0"])
    assert "positive" in capsys.readouterr().err
