"""Extension point: a method defined outside lyco (config + adapter + register_method) works end to end."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import lyco
from conftest import X, base_model
from lyco.methods import METHODS

ATOL = 1e-5
EXACT = 1e-6


@dataclass
class TestLoraConfig(lyco.AdapterConfig):
    """Plain LoRA, as a user would write it: ``ΔW = lora_up (out, r) @ lora_down (r, in·prod(k))``."""

    __test__ = False  # not a pytest test class
    peft_type = "TESTLORA"


class TestLoraAdapter(lyco.Adapter):
    __test__ = False
    config_cls = TestLoraConfig
    param_names = ("lora_up", "lora_down")

    def create_parameters(self, config, *, device, dtype):
        s = self.spec
        self.add_param("lora_up", (s.out_features, self.r), device, dtype)
        self.add_param("lora_down", (self.r, s.in_features * math.prod(s.kernel)), device, dtype)

    def reset_parameters(self, init_weights):
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.lora_up)
        else:
            nn.init.normal_(self.lora_up, std=0.1)

    def delta_weight(self, dtype=None):
        return (self.lora_up @ self.lora_down).reshape(self.spec.weight_shape)


@pytest.fixture
def testlora():
    assert "TESTLORA" not in METHODS
    lyco.register_method(TestLoraAdapter)
    yield TestLoraConfig
    METHODS.pop("TESTLORA", None)


TARGETS = ["conv2d", "conv1d", "fc"]


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def test_custom_method_forward_and_params(testlora):
    model = lyco.get_model(base_model(), testlora(r=2, alpha=4, target_modules=TARGETS, init_weights=False))
    layer = model.model.fc
    adapter = layer.lyco_adapters["default"]
    assert isinstance(adapter, TestLoraAdapter) and layer.scaling == {"default": 2.0}
    # r·(out + in·prod(k)): conv2d 2·(16+36), conv1d 2·(32+48), fc 2·(16+32)
    assert model.get_nb_trainable_parameters()[0] == 104 + 160 + 96
    x = torch.randn(2, 32)
    with torch.no_grad():
        expected = layer.base_layer(x) + 2.0 * x @ (adapter.lora_up @ adapter.lora_down).T
        torch.testing.assert_close(layer(x), expected, atol=ATOL, rtol=0)
        conv = model.model.conv2d
        xc = torch.randn(2, 4, 5, 5)
        w = conv.lyco_adapters["default"].delta_weight() * 2.0
        torch.testing.assert_close(conv(xc), conv.base_layer(xc) + nn.functional.conv2d(xc, w, padding=1),
                                   atol=ATOL, rtol=0)  # fmt: skip
    model(X).sum().backward()
    assert adapter.lora_up.grad is not None and layer.base_layer.weight.grad is None


def test_custom_method_zero_init_is_identity(testlora):
    model = lyco.get_model(base_model(), testlora(r=2, target_modules=TARGETS))
    torch.testing.assert_close(run(model), run(base_model()), atol=0, rtol=0)


def test_custom_method_merge(testlora):
    model = lyco.get_model(base_model(), testlora(r=2, target_modules=TARGETS, init_weights=False))
    out = run(model)
    assert not torch.allclose(out, run(base_model()), atol=1e-4)
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(run(model), out, atol=ATOL, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(run(model), out, atol=ATOL, rtol=0)
    plain = model.merge_and_unload()
    assert type(plain.fc) is nn.Linear and type(plain.conv1d) is nn.Conv1d
    torch.testing.assert_close(run(plain), out, atol=ATOL, rtol=0)


def test_custom_method_with_loha_on_same_model(testlora, tmp_path):
    model = lyco.get_model(base_model(), testlora(r=2, target_modules=TARGETS, init_weights=False))
    torch.manual_seed(4)
    model.add_adapter("loha", lyco.LoHaConfig(r=2, target_modules=["fc", "conv2d"], init_weights=False))
    out_lora = run(model)
    model.set_adapter("loha")
    out_loha = run(model)
    model.set_adapter(["default", "loha"])
    out_both = run(model)
    fc = model.model.fc
    assert type(fc.lyco_adapters["loha"]).__name__ == "LoHaAdapter"
    x = torch.randn(2, 32)
    with torch.no_grad(), model.disable_adapter():
        base = fc(x)
    with torch.no_grad():
        both = fc(x)
        fc.active_adapters = ["default"]
        a = fc(x)
        fc.active_adapters = ["loha"]
        b = fc(x)
        fc.active_adapters = ["default", "loha"]
    torch.testing.assert_close(both - base, (a - base) + (b - base), atol=ATOL, rtol=0)
    model.merge_adapter()
    torch.testing.assert_close(run(model), out_both, atol=ATOL, rtol=0)
    model.unmerge_adapter()

    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["peft_type"] == "TESTLORA"
    assert json.loads((tmp_path / "loha" / "adapter_config.json").read_text())["peft_type"] == "LOHA"
    loaded = lyco.LycoModel.from_pretrained(base_model(), tmp_path)
    assert isinstance(loaded.peft_config["default"], TestLoraConfig)
    loaded.load_adapter(tmp_path / "loha", adapter_name="loha")
    torch.testing.assert_close(run(loaded), out_lora, atol=EXACT, rtol=0)
    loaded.set_adapter("loha")
    torch.testing.assert_close(run(loaded), out_loha, atol=EXACT, rtol=0)
    loaded.set_adapter(["default", "loha"])
    torch.testing.assert_close(run(loaded), out_both, atol=EXACT, rtol=0)


def test_unregistered_method_is_refused(tmp_path):
    assert "TESTLORA" not in METHODS
    with pytest.raises(lyco.ConfigError, match="register"):
        lyco.get_model(base_model(), TestLoraConfig(target_modules=["fc"]))
    lyco.register_method(TestLoraAdapter)
    try:
        lyco.get_model(base_model(), TestLoraConfig(r=2, target_modules=["fc"])).save_pretrained(tmp_path)
    finally:
        METHODS.pop("TESTLORA")
    with pytest.raises(lyco.FormatError, match="TESTLORA"):
        lyco.LycoModel.from_pretrained(base_model(), tmp_path)


def test_register_needs_peft_type():
    @dataclass
    class NoTypeConfig(lyco.AdapterConfig):
        pass

    class NoTypeAdapter(TestLoraAdapter):
        config_cls = NoTypeConfig

    with pytest.raises(lyco.ConfigError, match="peft_type"):
        lyco.register_method(NoTypeAdapter)
    assert all(cls is not NoTypeAdapter for cls in METHODS.values())


def test_custom_supports_restricts_layer_types():
    @dataclass
    class LinearOnlyConfig(lyco.AdapterConfig):
        peft_type = "TESTLINEARONLY"

    class LinearOnlyAdapter(TestLoraAdapter):
        config_cls = LinearOnlyConfig

        @classmethod
        def supports(cls, spec):
            return spec.kind == "linear"

    lyco.register_method(LinearOnlyAdapter)
    try:
        base = base_model()
        with pytest.raises(lyco.UnsupportedLayerError, match=r"'conv2d'.*Conv2d"):
            lyco.get_model(base, LinearOnlyConfig(target_modules=["fc", "conv2d"]))
        assert type(base.fc) is nn.Linear
        model = lyco.get_model(base, LinearOnlyConfig(target_modules=["fc", "head"]))
        assert [n for n, _ in model.adapted_layers()] == ["fc", "head"]
    finally:
        METHODS.pop("TESTLINEARONLY")
