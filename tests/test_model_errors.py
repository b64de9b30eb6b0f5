"""Bad input raises a clear lyco error and leaves the model exactly as it was."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import lyco
from conftest import assert_untouched, fingerprint

METHODS = [lyco.LoHaConfig, lyco.LoKrConfig]


class ErrNet(nn.Module):
    """emb (Embedding) → fc → blocks.{0,1}.0 (Linear) → head; ``norm`` (LayerNorm) registered last."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.fc = nn.Linear(8, 8)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)])
        self.head = nn.Linear(8, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, ids):
        h = self.fc(self.emb(ids))
        for block in self.blocks:
            h = block(h)
        return self.norm(self.head(h))


def net() -> ErrNet:
    torch.manual_seed(0)
    return ErrNet()


IDS = torch.tensor([[1, 2, 3], [4, 5, 6]])


def model_state(model: lyco.LycoModel) -> tuple:
    return list(model.peft_config), model.active_adapters, fingerprint(model)


# -- injection errors on a plain model -----------------------------------------------------------
@pytest.mark.parametrize("cfg_cls", METHODS)
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target_modules": ["fcc"]}, lyco.TargetError, r"'fcc' \(closest: fc"),
        ({"target_modules": ["fc", "haed"]}, lyco.TargetError, r"'haed' \(closest: head"),
        ({"target_modules": r"nothing\..*"}, lyco.TargetError, "no module"),
        ({"target_modules": ["fc"], "exclude_modules": ["fc"]}, lyco.TargetError, "no module"),
        ({"target_modules": ["head"], "layers_to_transform": [7]}, lyco.TargetError, "no module"),
        ({"target_modules": ["emb"]}, lyco.UnsupportedLayerError, r"'emb'.*Embedding"),
        ({"target_modules": ["blocks.0"]}, lyco.UnsupportedLayerError, r"'blocks\.0'.*Sequential"),
        # the first targets are fine, a later one is not: nothing may be half-injected
        ({"target_modules": ["fc", "head", "norm"]}, lyco.UnsupportedLayerError, r"'norm'.*LayerNorm"),
        ({"target_modules": ["fc"], "modules_to_save": ["hed"]}, lyco.ConfigError, r"'hed' \(closest: head"),
        ({"target_modules": ["fc", "head"], "modules_to_save": ["head"]}, lyco.UnsupportedLayerError, "head"),
    ],
)
def test_get_model_errors_leave_model_untouched(cfg_cls, kwargs, error, match):
    base = net()
    before = fingerprint(base)
    with pytest.raises(error, match=match) as info:
        lyco.get_model(base, cfg_cls(r=2, **kwargs))
    assert isinstance(info.value, lyco.LycoError) and isinstance(info.value, ValueError)
    assert_untouched(base, before)
    base(IDS)


def test_unsupported_layer_error_is_also_type_error():
    with pytest.raises(TypeError):
        lyco.get_model(net(), lyco.LoHaConfig(target_modules=["emb"]))


@pytest.mark.parametrize("cfg_cls", METHODS)
@pytest.mark.parametrize(
    "kwargs",
    [
        {"r": 0},
        {"r": -2},
        {"r": 2.5},
        {"r": True},
        {"alpha": math.nan},
        {"rank_dropout": 1.5},
        {"module_dropout": -0.1},
        {"rank_pattern": {"fc": 0}},
        {"alpha_pattern": {"fc": math.inf}},
        {"target_modules": "(unclosed"},
        {"exclude_modules": "[bad"},
        {"rank_pattern": {"(bad": 2}},
        {"layers_pattern": "blocks"},  # without layers_to_transform
        {"layers_to_transform": [-1]},
        {"target_modules": r".*fc", "layers_to_transform": 0},
        {"init_weights": "gaussian"},
        {"target_modules": [1, 2]},
    ],
)
def test_invalid_config_values(cfg_cls, kwargs):
    with pytest.raises(lyco.ConfigError) as info:
        cfg_cls(**kwargs)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("value", [0, -3])
def test_invalid_lokr_decompose_factor(value):
    with pytest.raises(lyco.ConfigError, match="decompose_factor"):
        lyco.LoKrConfig(decompose_factor=value)


def test_lycoris_init_only_for_lokr():
    lyco.LoKrConfig(init_weights="lycoris")
    with pytest.raises(lyco.ConfigError):
        lyco.LoHaConfig(init_weights="lycoris")


# -- errors on an existing LycoModel -------------------------------------------------------------
def adapted_model(cfg_cls) -> lyco.LycoModel:
    model = lyco.get_model(net(), cfg_cls(r=2, target_modules=["fc", "head"], init_weights=False))
    model.add_adapter("other", cfg_cls(r=2, target_modules=["fc"], init_weights=False))
    return model


def assert_model_unchanged(model: lyco.LycoModel, before: tuple) -> None:
    names, active, fp = before
    assert list(model.peft_config) == names and model.active_adapters == active
    assert_untouched(model, fp)


@pytest.mark.parametrize("cfg_cls", METHODS)
@pytest.mark.parametrize(
    ("action", "error", "match"),
    [
        (lambda m, c: m.add_adapter("other", c(target_modules=["fc"])), lyco.AdapterNameError, "already exists"),
        (lambda m, c: m.add_adapter("a.b", c(target_modules=["fc"])), lyco.AdapterNameError, "'.'"),
        (lambda m, c: m.add_adapter("new", c(target_modules=["fc", "emb"])), lyco.UnsupportedLayerError, "Embedding"),
        (lambda m, c: m.add_adapter("new", c(target_modules=["fc", "norm"])), lyco.UnsupportedLayerError, "LayerNorm"),
        (lambda m, c: m.add_adapter("new", c(target_modules=["heda"])), lyco.TargetError, "closest: head"),
        (lambda m, c: m.set_requires_grad(["default", "nope"], False), lyco.AdapterNameError, "unknown"),
        (lambda m, c: m.delete_adapter("nope"), lyco.AdapterNameError, "unknown"),
        (lambda m, c: m.set_adapter("nope"), lyco.AdapterNameError, "unknown"),
        (lambda m, c: m.set_adapter(["default", "nope"]), lyco.AdapterNameError, "nope"),
        (lambda m, c: m.set_adapter([]), lyco.AdapterNameError, "at least one"),
        (lambda m, c: m.merge_adapter(["nope"]), lyco.AdapterNameError, "unknown"),
        (lambda m, c: m.merge_and_unload(adapter_names=["nope"]), lyco.AdapterNameError, "unknown"),
        (lambda m, c: m.save_pretrained("/nonexistent", selected_adapters=["nope"]), lyco.AdapterNameError, "nope"),
    ],
)  # fmt: skip
def test_model_errors_leave_model_untouched(cfg_cls, action, error, match):
    model = adapted_model(cfg_cls)
    out = model(IDS)
    before = model_state(model)
    with pytest.raises(error, match=match):
        action(model, cfg_cls)
    assert_model_unchanged(model, before)
    torch.testing.assert_close(model(IDS), out, atol=0, rtol=0)


@pytest.mark.parametrize("cfg_cls", METHODS)
def test_delete_merged_adapter_refused(cfg_cls):
    model = adapted_model(cfg_cls)
    model.merge_adapter(["other"])
    before = model_state(model)
    with pytest.raises(lyco.AdapterNameError, match="merged"):
        model.delete_adapter("other")
    assert_model_unchanged(model, before)


@pytest.mark.parametrize("cfg_cls", METHODS)
def test_merge_twice(cfg_cls):
    model = adapted_model(cfg_cls)
    model.merge_adapter()
    before = model_state(model)
    with pytest.raises(lyco.MergeError, match="already merged"):
        model.merge_adapter()
    with pytest.raises(lyco.MergeError):
        model.merge_adapter(["other", "default"])  # "other" is fine, "default" is merged: nothing happens
    assert_model_unchanged(model, before)
    assert model.model.fc.merged_adapters == ["default"]


@pytest.mark.parametrize("cfg_cls", METHODS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_safe_merge_non_finite(cfg_cls, bad):
    model = lyco.get_model(
        net(), cfg_cls(r=2, target_modules=["fc", "blocks.0.0", "1.0", "head"], init_weights=False)
    )
    assert [n for n, _ in model.adapted_layers()] == ["fc", "blocks.0.0", "blocks.1.0", "head"]
    adapter = model.model.head.lyco_adapters["default"]  # the LAST layer is broken
    with torch.no_grad():
        next(adapter.parameters()).view(-1)[0] = bad
    before = model_state(model)
    with pytest.raises(lyco.MergeError, match="head") as info:
        model.merge_adapter(safe_merge=True)
    assert isinstance(info.value, ValueError)
    assert_model_unchanged(model, before)
    assert not any(
        layer.merged for _, layer in model.adapted_layers()
    )  # the good layers were not merged either
    with pytest.raises(lyco.MergeError):
        model.merge_and_unload(safe_merge=True)
    assert_model_unchanged(model, before)
    assert isinstance(model.model.fc, lyco.AdaptedLayer)


def test_unsafe_merge_does_not_check():
    model = lyco.get_model(net(), lyco.LoHaConfig(r=2, target_modules=["fc"], init_weights=False))
    with torch.no_grad():
        model.model.fc.lyco_adapters["default"].hada_w1_a.fill_(math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.merge_adapter(safe_merge=False)
    assert torch.isnan(model.model.fc.base_layer.weight).all()
