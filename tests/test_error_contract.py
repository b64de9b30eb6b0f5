"""The error contract (docs/architecture.md, README): every public call given bad input raises a
``lyco.LycoError`` — never a raw ``TypeError`` / ``KeyError`` / ``AttributeError`` — and leaves the model
as it was. (File-system errors of writes are ``OSError``s, documented as such; none is provoked here.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import lyco
from conftest import assert_untouched, base_model, fingerprint
from lyco.formats import AdapterFile, read_adapter, read_lycoris_file, read_peft_adapter, write_adapter

BAD_CALLS = {
    # construction
    "get_model(not a module)": lambda m, p: lyco.get_model(5, lyco.LoHaConfig()),
    "get_model(not a config)": lambda m, p: lyco.get_model(base_model(), "LOHA"),
    "get_model(bad compute_dtype)": lambda m, p: lyco.get_model(base_model(), lyco.LoHaConfig(), compute_dtype=1),
    "get_model(bad plans)": lambda m, p: lyco.get_model(base_model(), lyco.LoHaConfig(target_modules=["fc"]), plans=5),
    "LoHaConfig(r='8')": lambda m, p: lyco.LoHaConfig(r="8"),
    "LoKrConfig(decompose_factor=0)": lambda m, p: lyco.LoKrConfig(decompose_factor=0),
    "factorization('x')": lambda m, p: lyco.factorization("x"),
    "factorization(4, 'x')": lambda m, p: lyco.factorization(4, "x"),
    "register_method(5)": lambda m, p: lyco.register_method(5),
    "register_method(a config)": lambda m, p: lyco.register_method(lyco.LoHaConfig),
    # adapters
    "add_adapter(name=5)": lambda m, p: m.add_adapter(5, lyco.LoHaConfig(target_modules=["fc"])),
    "add_adapter(not a config)": lambda m, p: m.add_adapter("x", {"r": 2}),
    "add_adapter(taken)": lambda m, p: m.add_adapter("default", lyco.LoHaConfig(target_modules=["fc"])),
    "add_adapter(no target)": lambda m, p: m.add_adapter("x", lyco.LoHaConfig(target_modules=["nope"])),
    "set_adapter(5)": lambda m, p: m.set_adapter(5),
    "set_adapter([5])": lambda m, p: m.set_adapter([5]),
    "set_adapter(unknown)": lambda m, p: m.set_adapter("nope"),
    "set_requires_grad(unknown)": lambda m, p: m.set_requires_grad("nope"),
    "set_requires_grad(flag 'x')": lambda m, p: m.set_requires_grad("default", "x"),
    "delete_adapter(5)": lambda m, p: m.delete_adapter(5),
    "set_trainable(unknown)": lambda m, p: m.set_trainable("nope"),
    "set_scale(unknown)": lambda m, p: m.set_scale("nope", 1.0),
    "set_scale('x')": lambda m, p: m.set_scale("default", "x"),
    "set_scale(nan)": lambda m, p: m.set_scale("default", float("nan")),
    "set_compute_dtype('x')": lambda m, p: m.set_compute_dtype("x"),
    "merge_adapter(5)": lambda m, p: m.merge_adapter(5),
    "merge_adapter(['nope'])": lambda m, p: m.merge_adapter(["nope"]),
    "merge_and_unload(['nope'])": lambda m, p: m.merge_and_unload(adapter_names=["nope"]),
    # files
    "save_pretrained(5)": lambda m, p: m.save_pretrained(5),
    "save_pretrained(selected unknown)": lambda m, p: m.save_pretrained(p / "o", selected_adapters=["nope"]),
    "from_pretrained(missing)": lambda m, p: lyco.LycoModel.from_pretrained(base_model(), p / "missing"),
    "from_pretrained(not a module)": lambda m, p: lyco.LycoModel.from_pretrained(5, p / "peft"),
    "from_pretrained(5)": lambda m, p: lyco.LycoModel.from_pretrained(base_model(), 5),
    "load_adapter(missing)": lambda m, p: m.load_adapter(p / "missing", "x"),
    "load_adapter(name taken)": lambda m, p: m.load_adapter(p / "peft", "default"),
    "load_adapter(name=5)": lambda m, p: m.load_adapter(p / "peft", 5),
    "save_lycoris(not a LycoModel)": lambda m, p: lyco.save_lycoris(base_model(), p / "a.safetensors"),
    "save_lycoris(unknown adapter)": lambda m, p: lyco.save_lycoris(m, p / "a.safetensors", adapter_name="nope"),
    "save_lycoris(bad style)": lambda m, p: lyco.save_lycoris(m, p / "a.safetensors", style="x"),
    "save_lycoris(bad metadata)": lambda m, p: lyco.save_lycoris(m, p / "a.safetensors", metadata={"a": 1}),
    "save_lycoris(.pt)": lambda m, p: lyco.save_lycoris(m, p / "a.pt"),
    "save_lycoris(path=5)": lambda m, p: lyco.save_lycoris(m, 5),
    "load_lycoris(not a module)": lambda m, p: lyco.load_lycoris(5, p / "a.safetensors"),
    "load_lycoris(missing)": lambda m, p: lyco.load_lycoris(base_model(), p / "missing.safetensors"),
    "load_lycoris(path=5)": lambda m, p: lyco.load_lycoris(base_model(), 5),
    "load_lycoris_into(not a LycoModel)": lambda m, p: lyco.load_lycoris_into(base_model(), p / "a.safetensors"),
    "read_adapter(5)": lambda m, p: read_adapter(5),
    "read_adapter(missing)": lambda m, p: read_adapter(p / "missing"),
    "read_lycoris_file(5)": lambda m, p: read_lycoris_file(5),
    "read_lycoris_file(model=5)": lambda m, p: read_lycoris_file(p / "a.safetensors", model=5),
    "read_peft_adapter(5)": lambda m, p: read_peft_adapter(5),
    "write_adapter(not an AdapterFile)": lambda m, p: write_adapter({"a": 1}, p / "x.safetensors"),
    "write_adapter(to='x')": lambda m, p: write_adapter(AdapterFile({}), p / "x", to="x"),
    "write_adapter(empty)": lambda m, p: write_adapter(AdapterFile({}), p / "x.safetensors"),
}  # fmt: skip


@pytest.fixture
def model(tmp_path: Path) -> lyco.LycoModel:
    m = lyco.get_model(base_model(), lyco.LoKrConfig(r=2, target_modules=["fc", "conv2d"], init_weights=False))
    m.save_pretrained(tmp_path / "peft")
    lyco.save_lycoris(m, tmp_path / "a.safetensors")
    return m


@pytest.mark.parametrize("what", list(BAD_CALLS))
def test_bad_input_raises_a_lyco_error_and_changes_nothing(what, model, tmp_path):
    before, configs = fingerprint(model), list(model.peft_config)
    with pytest.raises(lyco.LycoError):
        BAD_CALLS[what](model, tmp_path)
    assert_untouched(model, before)
    assert list(model.peft_config) == configs


def test_argument_errors_are_also_type_errors():
    with pytest.raises(TypeError):
        lyco.get_model(5, lyco.LoHaConfig())
    assert issubclass(lyco.ArgumentError, lyco.LycoError) and issubclass(lyco.ConfigError, ValueError)


def test_every_public_error_class_is_a_lyco_error():
    classes = [getattr(lyco, n) for n in lyco.__all__ if n.endswith("Error")]
    assert len(classes) >= 10 and all(issubclass(c, lyco.LycoError) for c in classes)
    assert isinstance(nn.Linear(2, 2), nn.Module) and torch.is_tensor(torch.ones(1))
