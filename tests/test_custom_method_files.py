"""A method defined in this one file round-trips through every file path: PEFT folders, LyCORIS files, the CLI.

Nothing outside this file knows the method: it declares its tensors, rank, layer shape and ΔW next to its
adapter (``lyco.methods.schema``), and every reader, writer and tool asks the registry.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lyco
from lyco import cli
from lyco.formats import read_adapter, write_adapter
from lyco.methods import METHODS

TOL = 1e-5  # fp32, same weights through different files


# -- the whole method: a 20-line LoRA ------------------------------------------------------------------------
@dataclass
class MiniConfig(lyco.AdapterConfig):
    peft_type = "MINILORA"


class MiniLoRA(lyco.Adapter):
    config_cls = MiniConfig
    param_names = ("mini_down", "mini_up")

    def create_parameters(self, config, *, device, dtype):
        self.add_param("mini_down", (self.r, math.prod(self.spec.weight_shape[1:])), device, dtype)
        self.add_param("mini_up", (self.spec.out_features, self.r), device, dtype)

    def reset_parameters(self, init_weights):
        nn.init.normal_(self.mini_down, std=0.3)
        nn.init.zeros_(self.mini_up) if init_weights is True else nn.init.normal_(self.mini_up, std=0.3)

    @classmethod
    def rank(cls, shapes):
        return shapes["mini_down"][0]

    @classmethod
    def guess_weight_shape(cls, shapes):
        return (shapes["mini_up"][0], shapes["mini_down"][1])

    @classmethod
    def compose(cls, tensors, plan):
        return tensors["mini_up"] @ tensors["mini_down"]


# -----------------------------------------------------------------------------------------------------------
@pytest.fixture
def mini():
    lyco.register_method(MiniLoRA)
    yield MiniConfig
    METHODS.pop("MINILORA", None)


def base_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 4 * 4, 6))


X = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))


def out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def trained(config_cls, alpha: float = 6.0) -> lyco.LycoModel:
    """r=2, alpha=6 (scale 3): a lost alpha/r would show."""
    model = lyco.get_model(base_net(), config_cls(r=2, alpha=alpha, target_modules=["0", "2"], init_weights=False))
    assert (out(model) - out(base_net())).abs().max() > 1e-2  # the adapter really moves the output
    return model


def test_peft_folder_round_trip(mini, tmp_path):
    model = trained(mini)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "MINILORA"
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys == ["base_model.model.0.mini_down", "base_model.model.0.mini_up",
                    "base_model.model.2.mini_down", "base_model.model.2.mini_up"]  # fmt: skip
    loaded = lyco.LycoModel.from_pretrained(base_net(), tmp_path)
    assert isinstance(loaded.model[2].lyco_adapters["default"], MiniLoRA)
    torch.testing.assert_close(out(loaded), out(model), atol=TOL, rtol=0)


def test_read_write_adapter_between_formats(mini, tmp_path):
    model = trained(mini)
    model.save_pretrained(tmp_path / "peft")
    af = read_adapter(tmp_path / "peft")
    assert af.algos() == {"minilora"} and af.modules["2"].rank == 2 and af.modules["2"].scale() == 3.0
    write_adapter(af, tmp_path / "a.safetensors")
    back = read_adapter(tmp_path / "a.safetensors")
    assert sorted(back.modules) == ["lycoris_0", "lycoris_2"]
    for name, stem in (("0", "lycoris_0"), ("2", "lycoris_2")):
        want = model.model[int(name)].get_delta_weight("default")
        torch.testing.assert_close(back.modules[stem].delta_weight(tuple(want.shape)), want, atol=TOL, rtol=0)
    write_adapter(read_adapter(tmp_path / "a.safetensors"), tmp_path / "peft2", to="peft")  # dotted-free stems
    torch.testing.assert_close(out(lyco.LycoModel.from_pretrained(base_net(), tmp_path / "peft2")), out(model),
                               atol=TOL, rtol=0)  # fmt: skip


@pytest.mark.parametrize("prefix", [None, "mini_"])
def test_lycoris_file_round_trip(mini, tmp_path, prefix):
    model = trained(mini)
    path = tmp_path / "mini.safetensors"
    lyco.save_lycoris(model, path, prefix=prefix)
    stems = {k.rsplit(".", 1)[0] for k in load_file(path)}
    assert stems == {f"{prefix or 'lycoris_'}0", f"{prefix or 'lycoris_'}2"}
    loaded = lyco.load_lycoris(base_net(), path, prefix=prefix)
    assert isinstance(loaded.model[0].lyco_adapters["default"], MiniLoRA)
    torch.testing.assert_close(out(loaded), out(model), atol=TOL, rtol=0)
    again = lyco.load_lycoris(loaded, path, adapter_name="again", prefix=prefix)  # into an existing model
    again.set_adapter("again")
    torch.testing.assert_close(out(again), out(model), atol=TOL, rtol=0)


def test_cli_inspect_convert_merge(mini, tmp_path, capsys):
    model = trained(mini)
    adapter = tmp_path / "mini.safetensors"
    lyco.save_lycoris(model, adapter)
    with safe_open(str(adapter), "pt") as fh:
        assert json.loads(fh.metadata()["ss_network_args"])["algo"] == "minilora"

    assert cli.main(["inspect", str(adapter), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["algos"] == ["minilora"] and {m["rank"] for m in report["modules"]} == {2}
    assert {m["scale"] for m in report["modules"]} == {3.0}

    base_file = tmp_path / "base.safetensors"
    save_file(base_net().state_dict(), str(base_file))
    assert cli.main(["convert", str(adapter), str(tmp_path / "peft"), "--to", "peft", "--base", str(base_file)]) == 0
    assert "max relative ΔW difference" in capsys.readouterr().out
    torch.testing.assert_close(out(lyco.LycoModel.from_pretrained(base_net(), tmp_path / "peft")), out(model),
                               atol=TOL, rtol=0)  # fmt: skip

    merged = tmp_path / "merged.safetensors"
    assert cli.main(["merge", str(base_file), str(adapter), str(merged), "--no-progress"]) == 0
    assert "merged 2 module(s)" in capsys.readouterr().out
    plain = base_net()
    plain.load_state_dict(load_file(merged))
    torch.testing.assert_close(out(plain), out(model), atol=TOL, rtol=0)
    model_copy = copy.deepcopy(model)
    torch.testing.assert_close(out(model_copy.merge_and_unload()), out(plain), atol=TOL, rtol=0)


def test_unregistered_method_file_is_a_clear_error(mini, tmp_path):
    lyco.save_lycoris(trained(mini), tmp_path / "m.safetensors")
    METHODS.pop("MINILORA")
    with pytest.raises(lyco.FormatError, match=r"mini_down.*unknown tensor name"):
        read_adapter(tmp_path / "m.safetensors")
