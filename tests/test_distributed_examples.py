"""The distributed scripts in ``examples/`` under ``torchrun --nproc-per-node 2`` on CPU (gloo)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"),
]


def torchrun(script: str, *args: str, timeout: float = 240) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(EXAMPLES / script), *args]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


def test_ddp_example(tmp_path):
    out = torchrun("ddp_train.py", "--steps", "5", "--out", str(tmp_path))
    assert "step 4:" in out and (tmp_path / "adapter_model.safetensors").is_file()


def test_fsdp2_example(tmp_path):
    out = torchrun("fsdp2_train.py", "--steps", "5", "--out", str(tmp_path))
    assert "refused, as expected" in out
    diff = float(out.split("max diff")[-1].split()[0])
    assert diff < 1e-5


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate not installed")
def test_accelerate_fsdp_example(tmp_path):
    out = torchrun("accelerate_fsdp.py", "--steps", "5", "--out", str(tmp_path))
    line = next(ln for ln in out.splitlines() if "merged (unsharded)" in ln)
    first, last = (float(v) for v in line.split("loss ")[1].split(";")[0].split(" -> "))
    assert last < first
    assert float(line.split("max diff")[-1]) < 1e-5
