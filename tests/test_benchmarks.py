"""benchmarks/gpu_step.py: smoke run on CPU with tiny sizes, clean skip without CUDA (no timing asserted)."""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--layers", "1", "--hidden", "64", "--intermediate", "128", "--tokens", "32",
        "--vocab", "50", "--warmup", "1", "--rounds", "1"]  # fmt: skip

pytest.importorskip("transformers")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def gpu_step() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("gpu_step", ROOT / "benchmarks" / "gpu_step.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_step"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("gpu_step", None)


def measured(out: str, label: str) -> bool:
    """A table row ``label  <ms>  <ratio>×  ...`` (measured, not skipped)."""
    return re.search(rf"^{re.escape(label)}\s+[\d.]+\s+[\d.]+×", out, re.MULTILINE) is not None


def test_gpu_step_smoke_on_cpu(gpu_step: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_step.main([*TINY, "--dtype", "float32", "--profile"]) == 0
    out = capsys.readouterr().out
    for label in ["frozen", "lyco LoHa", "lyco LoKr", "PEFT LoHa", "PEFT LoKr", "PEFT LoRA r16"]:
        assert measured(out, label), f"no measured row {label!r} in:\n{out}"
    for label in ["lycoris LoHa", "lycoris LoKr"]:  # measured when installed, else a skipped row
        assert measured(out, label) or re.search(
            rf"^{label}\s+skipped: lycoris-lora not installed", out, re.M
        )
    assert "lyco vs PEFT" in out and "sanity" in out
    assert "lyco LoHa fp32" not in out  # fp32 base: one lyco row per method (adapters are fp32 either way)
    assert "== profile: lyco-loha" in out and "== profile: lyco-lokr" in out
    assert "Self CPU" in out


def test_gpu_step_bf16_rows_only_filter_and_lycoris_missing(
    gpu_step: ModuleType, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "lycoris", None)  # `import lycoris` raises ImportError
    assert gpu_step.main([*TINY, "--dtype", "bfloat16", "--only", "lyco,lycoris", "--methods", "loha"]) == 0
    out = capsys.readouterr().out
    for label in ["frozen", "lyco LoHa", "lyco LoHa bf16"]:
        assert measured(out, label), f"no measured row {label!r} in:\n{out}"
    assert re.search(r"^lycoris LoHa\s+skipped: lycoris-lora not installed", out, re.MULTILINE), out
    assert not re.search(r"^(PEFT|lyco LoKr|lycoris LoKr)", out, re.MULTILINE), out


def test_gpu_step_skips_cleanly_without_cuda(
    gpu_step: ModuleType, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_step.main([]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA device" in out[0] and "skipping" in out[0]


def test_gpu_step_cuda_table_shows_targets(gpu_step: ModuleType) -> None:
    """The CUDA table (rendered from made-up numbers, no GPU needed): peak columns and target marks."""
    row = gpu_step.Row
    rows = [row("frozen", "frozen", "frozen", None, None), row("lyco-loha", "lyco LoHa", "lyco", "loha", None),
            row("lyco-lokr", "lyco LoKr", "lyco", "lokr", None), row("peft-loha", "PEFT LoHa", "peft", "loha", None),
            row("lycoris-loha", "lycoris LoHa", "lycoris", "loha", None, skip="lycoris-lora not installed")]  # fmt: skip
    gib = 2**30
    res = {
        "median_s": {"frozen": 0.100, "lyco-loha": 0.110, "lyco-lokr": 0.130, "peft-loha": 0.220},
        "memory": {
            n: {"peak_bytes": b * gib}
            for n, b in {"frozen": 4.0, "lyco-loha": 4.2, "lyco-lokr": 4.8, "peft-loha": 6.0}.items()
        },
        "mem_key": "peak_bytes",
        "trainable_params": {"frozen": 0, "lyco-loha": 10, "lyco-lokr": 5, "peft-loha": 10},
        "sanity_rel_change": {"lyco-loha": 0.1, "lyco-lokr": 0.1, "peft-loha": 0.1},
    }
    out = gpu_step.render(rows, res, torch.device("cuda"))
    lines = {line.split("  ")[0].strip(): line for line in out.splitlines()}
    assert "target t≤1.15×" in out and "target m≤1.1×" in out and "4.00 GiB" in out
    # lyco LoHa: 1.10× time, 1.05× memory, PEFT 2× slower; lyco LoKr: 1.30× time, 1.20× memory
    assert lines["lyco LoHa"].split()[-3:] == ["2.00×", "ok", "ok"]
    assert lines["lyco LoKr"].split()[-2:] == ["MISS", "MISS"]
    assert "skipped: lycoris-lora not installed" in lines["lycoris LoHa"]
