"""One resolver for module names: a model and its weights file give the same answer, whoever asks
(``load_lycoris``, ``lyco merge``, ``lyco convert --base``, ``lyco inspect --base``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lyco
from lyco import cli
from lyco.formats import ModuleTable, read_lycoris_file
from test_lycoris_keys import CONVENTIONS, TE, lokr_tensors, pipeline, tree, write

TOL = 1e-5


def state_file(model: nn.Module, path: Path) -> Path:
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize(("name", "factory", "stems", "convention"), CONVENTIONS, ids=[c[0] for c in CONVENTIONS])
def test_model_and_weights_file_resolve_alike(name, factory, stems, convention):
    model = factory()
    by_model = ModuleTable.from_module(model).require(stems)
    by_weights = ModuleTable.from_weights({k: tuple(v.shape) for k, v in model.state_dict().items()}, "base").require(stems)
    assert by_model == by_weights == stems


def test_wrapped_model_resolves_like_the_plain_one():
    plain = pipeline()
    wrapped = lyco.get_model(copy.deepcopy(plain), lyco.LoKrConfig(r=1, target_modules=["fc1", "q_proj"]))
    stems = {f"lora_te2_{p.replace('.', '_')}": f"text_encoder_2.{p}" for p in TE}
    assert ModuleTable.from_module(wrapped).require(stems) == ModuleTable.from_module(plain).require(stems) == stems
    assert ModuleTable.from_module(wrapped).shapes == ModuleTable.from_module(plain).shapes  # wrappers = their base


def test_suffix_rule_for_a_base_with_an_extra_root():
    """A file trained on the inner model resolves against the outer one (e.g. LlamaModel → LlamaForCausalLM)."""
    inner = tree("TinyCLIPTextModel", TE)
    outer = nn.Module()
    outer.model = inner
    stems = {f"lycoris_{p.replace('.', '_')}": f"model.{p}" for p in TE}
    assert ModuleTable.from_module(outer).require(stems) == stems


@pytest.fixture
def sdxl_te(tmp_path: Path) -> tuple[nn.Module, Path, Path, lyco.LycoModel]:
    """An SDXL-like pipeline (two text encoders with the same inner names), a kohya file with ``lora_te1_`` /
    ``lora_te2_`` keys into both, and the pipeline's weights file."""
    base = pipeline()
    modules = {f"lora_te{i}_{p.replace('.', '_')}": lokr_tensors(10 * i + j) for i in (1, 2) for j, p in enumerate(TE)}
    adapter = tmp_path / "sdxl_te.safetensors"
    write(adapter, modules)
    model = lyco.load_lycoris(copy.deepcopy(base), adapter)
    assert sorted(n for n, _ in model.adapted_layers()) == sorted(f"text_encoder{s}.{p}" for s in ("", "_2") for p in TE)
    return base, adapter, state_file(base, tmp_path / "base.safetensors"), model


def run_te(model: nn.Module, which: str) -> torch.Tensor:
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    layer = model.get_submodule(f"{which}.text_model.encoder.layers.0")
    with torch.no_grad():
        return layer.mlp.fc1(layer.self_attn.q_proj(x))


def test_sdxl_te1_te2_merges_like_the_model(sdxl_te, tmp_path, capsys):
    base, adapter, base_file, model = sdxl_te
    out = tmp_path / "merged.safetensors"
    assert cli.main(["merge", str(base_file), str(adapter), str(out), "--no-progress"]) == 0
    assert "merged 4 module(s)" in capsys.readouterr().out
    merged = copy.deepcopy(base)
    merged.load_state_dict(load_file(out))
    reference = copy.deepcopy(model).merge_and_unload()
    for which in ("text_encoder", "text_encoder_2"):
        torch.testing.assert_close(run_te(merged, which), run_te(reference, which), atol=TOL, rtol=0)
        assert (run_te(merged, which) - run_te(base, which)).abs().max() > 1e-3


def test_sdxl_te1_te2_converts_and_inspects_with_base(sdxl_te, tmp_path, capsys):
    base, adapter, base_file, model = sdxl_te
    folder = tmp_path / "peft"
    assert cli.main(["convert", str(adapter), str(folder), "--to", "peft", "--base", str(base_file)]) == 0
    capsys.readouterr()
    config = json.loads((folder / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(f"text_encoder{s}.{p}" for s in ("", "_2") for p in TE)
    loaded = lyco.LycoModel.from_pretrained(copy.deepcopy(base), folder)
    for which in ("text_encoder", "text_encoder_2"):
        torch.testing.assert_close(run_te(loaded.model, which), run_te(model.model, which), atol=TOL, rtol=0)
    assert cli.main(["inspect", str(adapter), "--base", str(base_file), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert sorted(m["name"] for m in report["modules"]) == sorted(config["target_modules"])
    assert sorted(read_lycoris_file(adapter, model=base).modules) == sorted(config["target_modules"])
