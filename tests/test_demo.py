"""The offline digits demo (`lyco demo --quick`) and the `lyco` command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lyco import cli, demo
from lyco.demo import DemoResult, run_demo

for module in demo.DEMO_EXTRAS:
    pytest.importorskip(module)


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> DemoResult:
    return run_demo(tmp_path_factory.mktemp("demo_out"), quick=True, progress=False)


def test_three_methods_in_order(result: DemoResult) -> None:
    assert [m.method for m in result.methods] == ["Full fine-tune", "LoHa", "LoKr"]


def test_adapters_train_a_small_fraction_of_full(result: DemoResult) -> None:
    full, *adapters = result.methods
    assert full.trainable_params == full.full_params
    assert full.fraction_of_full == 1.0
    for m in adapters:
        assert 0 < m.trainable_params < 0.15 * full.trainable_params, m


def test_adaptation_learns_the_new_digits(result: DemoResult) -> None:
    assert result.pretrain_acc > 0.9  # 0–4 learnt in pretraining
    for m in result.methods:
        assert m.acc_after > m.acc_before, m
        assert m.acc_after > 0.8, m  # 5–9 never seen before: acc_before is ~0
        assert m.train_seconds > 0 and len(m.losses) > 0


def test_adapters_saved_in_peft_layout(result: DemoResult) -> None:
    for m in result.methods[1:]:
        assert m.adapter_dir is not None
        assert (m.adapter_dir / "adapter_config.json").is_file()
        assert (m.adapter_dir / "adapter_model.safetensors").stat().st_size > 0


def test_disable_reload_and_merge_checks_pass(result: DemoResult) -> None:
    assert [(c.method, c.check) for c in result.checks] == [
        (method, check)
        for method in ("LoHa", "LoKr")
        for check in ("disable_adapter = base", "save → from_pretrained", "merge_and_unload")
    ]
    assert result.checks_passed, result.checks
    assert all(c.tol < 1e-4 for c in result.checks)


def test_loss_plot_written(result: DemoResult) -> None:
    assert result.plot_path.parent == result.out_dir
    assert result.plot_path.read_bytes().startswith(b"\x89PNG")


def test_cli_prints_table_and_exits_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], result: DemoResult
) -> None:
    monkeypatch.setattr(demo, "run_demo", lambda *args, **kwargs: result)
    assert cli.main(["demo", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for text in (
        "Full fine-tune",
        "LoHa",
        "LoKr",
        "% of full",
        "merge_and_unload",
        str(result.plot_path.name),
    ):
        assert text in out


def test_cli_reports_missing_extras(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(demo, "missing_extras", lambda: ["rich"])
    assert cli.main(["demo"]) == 2
    assert "pip install 'lyco[demo]'" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"]])
def test_help_via_python_m_lyco(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "lyco", *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "usage: lyco" in proc.stdout
    assert "demo" in proc.stdout
