"""The real ``peft`` package as oracle: its adapter folders load in lyco and lyco's load in peft, same outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lyco
from conftest import PEFT_CASES as CASES
from conftest import X, base_model, random_lyco_model

peft = pytest.importorskip("peft")

ATOL = 1e-5  # fp32; peft rebuilds ΔW densely, lyco may use a factored path
MOVED = 1e-4  # the adapter must change the output by more than this, or the comparison proves nothing




def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def _peft_model(cls_name, kwargs, base):
    torch.manual_seed(11)
    model = peft.get_peft_model(copy.deepcopy(base), getattr(peft, cls_name)(init_weights=False, **kwargs))
    if "modules_to_save" in kwargs:
        with torch.no_grad():  # make the saved copy differ from the original
            model.base_model.model.head.modules_to_save["default"].bias.add_(0.25)
    return model.eval()


@pytest.mark.parametrize(("name", "cls_name", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_peft_dir_loads_in_lyco(tmp_path, name, cls_name, kwargs):
    base = base_model()
    base_out = run(base)
    peft_model = _peft_model(cls_name, kwargs, base)
    expected = run(peft_model)
    assert (expected - base_out).abs().max() > MOVED
    peft_model.save_pretrained(tmp_path)
    model = lyco.LycoModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert type(model.peft_config["default"]).__name__ == cls_name
    torch.testing.assert_close(run(model.eval()), expected, atol=ATOL, rtol=0)
    # per-layer rank / scaling as peft computed them
    for lname, layer in model.adapted_layers():
        peft_layer = peft_model.base_model.model.get_submodule(lname)
        assert layer.r["default"] == peft_layer.r["default"], lname
        assert layer.scaling["default"] == pytest.approx(peft_layer.scaling["default"]), lname
    # merged lyco == peft too
    plain = model.merge_and_unload()
    torch.testing.assert_close(run(plain), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(("name", "cls_name", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_lyco_dir_loads_in_peft(tmp_path, name, cls_name, kwargs):
    base = base_model()
    model, expected = random_lyco_model(base, getattr(lyco, cls_name)(init_weights=False, **kwargs))
    model.save_pretrained(tmp_path)
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert peft_model.peft_config["default"].peft_type.value == model.peft_config["default"].peft_type
    torch.testing.assert_close(run(peft_model), expected, atol=ATOL, rtol=0)


def test_peft_multiple_adapters_load_adapter(tmp_path):
    base = base_model()
    peft_model = _peft_model("LoHaConfig", {"r": 2, "target_modules": ["fc", "conv2d"]}, base)
    torch.manual_seed(17)
    peft_model.add_adapter("second", peft.LoHaConfig(r=1, alpha=2, target_modules=["fc"], init_weights=False))
    out_default = run(peft_model)
    peft_model.set_adapter("second")
    out_second = run(peft_model)
    peft_model.save_pretrained(tmp_path)
    assert (tmp_path / "second" / "adapter_config.json").is_file()  # peft's layout for non-default adapters
    model = lyco.LycoModel.from_pretrained(copy.deepcopy(base), tmp_path)
    model.load_adapter(tmp_path / "second", adapter_name="second")
    torch.testing.assert_close(run(model), out_default, atol=ATOL, rtol=0)
    model.set_adapter("second")
    torch.testing.assert_close(run(model), out_second, atol=ATOL, rtol=0)
