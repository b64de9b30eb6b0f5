"""LycoModel life cycle: trainable params, modules_to_save, several adapters, disable, merge, unload."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lyco
from conftest import MixedNet, base_model

ATOL = 1e-5  # fp32 tolerance for outputs computed along different paths (merged vs factored)
METHODS = [lyco.LoHaConfig, lyco.LoKrConfig]
TARGETS = ["conv2d", "conv1d", "fc"]


def inputs() -> torch.Tensor:
    return torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(1))


def make(cfg_cls, **kwargs) -> lyco.LycoModel:
    kwargs = {"r": 2, "alpha": 3, "target_modules": TARGETS, "init_weights": False, **kwargs}
    return lyco.get_model(base_model(), cfg_cls(**kwargs))


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs())


BASE_OUT = run(base_model())
LAYER_INPUTS = {"conv2d": (2, 4, 5, 5), "conv1d": (2, 16, 7), "fc": (2, 32), "head": (2, 16)}


def layer_outputs(model: lyco.LycoModel) -> dict[str, torch.Tensor]:
    """Each targeted layer on its own fixed input: the adapter deltas are linear in there."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        return {
            n: model.model.get_submodule(n)(torch.randn(*LAYER_INPUTS[n], generator=gen)) for n in TARGETS
        }


def assert_layers_close(got: dict, expected: dict, atol: float = ATOL) -> None:
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], atol=atol, rtol=0, msg=name)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# -- trainable parameters ------------------------------------------------------------------------
# LoHa (plain, conv flattened): 2·r·(out + in·prod(k)); r=2 → conv2d 2·2·(16+36), conv1d 2·2·(32+48), fc 2·2·(16+32).
# LoKr, r=2, factor -1: conv2d out 16=(4,4), in 4=(2,2): w1 (4,2) + full w2 (4,2,3,3) [2 ≥ max(4,2)/2] = 8+72;
# conv1d out 32=(4,8), in 16=(4,4): w1 (4,4) + w2_a (8,2) + w2_b (2,4·3) = 16+16+24;
# fc out 16=(4,4), in 32=(4,8): w1 (4,4) + w2_a (4,2) + w2_b (2,8) = 16+8+16.
EXPECTED_TRAINABLE = {lyco.LoHaConfig: 208 + 320 + 192, lyco.LoKrConfig: 80 + 56 + 40}
BASE_TOTAL = sum(p.numel() for p in MixedNet().parameters())
HEAD = 16 * 3 + 3


@pytest.mark.parametrize("cfg_cls", METHODS)
def test_only_adapter_params_trainable(cfg_cls, capsys):
    model = make(cfg_cls)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lyco_adapters.default." in n for n in trainable)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lyco_adapters." not in n)
    n_train = EXPECTED_TRAINABLE[cfg_cls]
    assert model.get_nb_trainable_parameters() == (n_train, BASE_TOTAL + n_train)
    model.print_trainable_parameters()
    total = BASE_TOTAL + n_train
    expected = (
        f"trainable params: {n_train:,d} || all params: {total:,d} || trainable%: {100 * n_train / total:.4f}"
    )
    assert capsys.readouterr().out.strip() == expected
    model(inputs()).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == trainable


@pytest.mark.parametrize("cfg_cls", METHODS)
def test_trainable_counts_with_modules_to_save_and_second_adapter(cfg_cls):
    model = make(cfg_cls, modules_to_save=["head"])
    n_train = EXPECTED_TRAINABLE[cfg_cls]
    assert model.get_nb_trainable_parameters() == (n_train + HEAD, BASE_TOTAL + n_train + HEAD)
    model.add_adapter("other", cfg_cls(r=2, target_modules=TARGETS))
    # the inactive adapter is counted in the total but is not trainable
    assert model.get_nb_trainable_parameters() == (n_train + HEAD, BASE_TOTAL + 2 * n_train + HEAD)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".default" in n for n in trainable)
    model.set_adapter("other")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lyco_adapters.other." in n for n in trainable)  # "other" has no head copy


# -- modules_to_save -----------------------------------------------------------------------------
@pytest.mark.parametrize("cfg_cls", METHODS)
def test_modules_to_save_copy(cfg_cls):
    base = base_model()
    original_head = base.head
    model = lyco.get_model(base, cfg_cls(r=2, target_modules=["fc"], modules_to_save=["head"]))
    wrapper = model.model.head
    assert isinstance(wrapper, lyco.ModulesToSaveWrapper)
    assert wrapper.original_module is original_head
    clone = wrapper.modules_to_save["default"]
    assert clone is not original_head and all(p.requires_grad for p in clone.parameters())
    assert not any(p.requires_grad for p in original_head.parameters())
    torch.testing.assert_close(run(model), BASE_OUT, atol=0, rtol=0)  # zero-init adapter, identical copy
    orig_weight = original_head.weight.detach().clone()
    with torch.no_grad():
        clone.bias.add_(1.0)
    torch.testing.assert_close(run(model), BASE_OUT + 1.0, atol=ATOL, rtol=0)  # the copy is used
    torch.testing.assert_close(original_head.weight, orig_weight, atol=0, rtol=0)
    with model.disable_adapter():
        torch.testing.assert_close(run(model), BASE_OUT, atol=0, rtol=0)  # original when disabled
    model(inputs()).sum().backward()
    assert clone.weight.grad is not None and original_head.weight.grad is None


@pytest.mark.parametrize("cfg_cls", METHODS)
@pytest.mark.parametrize("merge", [True, False])
def test_modules_to_save_merge_and_unload(cfg_cls, merge):
    base = base_model()
    original_head = base.head
    model = lyco.get_model(
        base, cfg_cls(r=2, target_modules=["fc"], modules_to_save=["head"], init_weights=False)
    )
    clone = model.model.head.modules_to_save["default"]
    with torch.no_grad():
        clone.weight.mul_(2.0)
    adapted_out = run(model)
    plain = model.merge_and_unload() if merge else model.unload()
    assert plain.head is (clone if merge else original_head)
    assert isinstance(plain.fc, nn.Linear)
    torch.testing.assert_close(run(plain), adapted_out if merge else BASE_OUT, atol=ATOL, rtol=0)
    assert plain.state_dict().keys() == base_model().state_dict().keys()


# -- several adapters ----------------------------------------------------------------------------
@pytest.mark.parametrize("cfg_cls", METHODS)
def test_multiple_adapters_add_up(cfg_cls):
    model = make(cfg_cls)
    with model.disable_adapter():
        base = layer_outputs(model)
    torch.manual_seed(5)
    model.add_adapter("b", cfg_cls(r=3, alpha=2, target_modules=TARGETS, init_weights=False))
    assert model.active_adapters == ["default"]
    out_a, full_a = layer_outputs(model), run(model)
    model.set_adapter("b")
    assert model.active_adapters == ["b"] and model.active_adapter == "b"
    out_b = layer_outputs(model)
    model.set_adapter(["default", "b"])
    assert model.active_adapters == ["default", "b"]
    out_ab, full_ab = layer_outputs(model), run(model)
    for name in TARGETS:
        assert not torch.allclose(out_a[name], base[name], atol=1e-3), name
        assert not torch.allclose(out_b[name], base[name], atol=1e-3), name
    assert_layers_close({n: out_ab[n] - base[n] for n in TARGETS},
                        {n: (out_a[n] - base[n]) + (out_b[n] - base[n]) for n in TARGETS})  # fmt: skip
    trainable = {
        n.split(".lyco_adapters.")[1].split(".")[0] for n, p in model.named_parameters() if p.requires_grad
    }
    assert trainable == {"default", "b"}
    # merging both gives the same result as applying both
    model.merge_adapter()
    torch.testing.assert_close(run(model), full_ab, atol=ATOL, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(run(model), full_ab, atol=ATOL, rtol=0)
    model.set_adapter("default")
    torch.testing.assert_close(run(model), full_a, atol=ATOL, rtol=0)  # unmerge rounds in fp32


@pytest.mark.parametrize("cfg_cls", METHODS)
def test_delete_adapter(cfg_cls):
    base = base_model()
    head = base.head
    model = lyco.get_model(base, cfg_cls(r=2, target_modules=["fc"], init_weights=False))
    out = run(model)
    model.add_adapter("b", cfg_cls(r=2, target_modules=["fc", "head"], init_weights=False))
    assert isinstance(model.model.head, lyco.AdaptedLayer)
    model.delete_adapter("b")
    assert model.model.head is head  # layer left without adapters is unwrapped
    assert set(model.model.fc.lyco_adapters) == {"default"}
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    torch.testing.assert_close(run(model), out, atol=0, rtol=0)
    model.add_adapter("b", cfg_cls(r=2, target_modules=["fc"]))  # the name is free again


# -- disable_adapter -----------------------------------------------------------------------------
@pytest.mark.parametrize("cfg_cls", METHODS)
def test_disable_adapter_context(cfg_cls):
    model = make(cfg_cls)
    out = run(model)
    assert not torch.allclose(out, BASE_OUT, atol=1e-3)
    with model.disable_adapter():
        torch.testing.assert_close(run(model), BASE_OUT, atol=0, rtol=0)  # exactly the base output
    torch.testing.assert_close(run(model), out, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="boom"), model.disable_adapter():
        raise RuntimeError("boom")
    torch.testing.assert_close(run(model), out, atol=0, rtol=0)  # restored after an exception too


@pytest.mark.parametrize("cfg_cls", METHODS)
def test_disable_adapter_when_merged(cfg_cls):
    model = make(cfg_cls)
    out = run(model)
    model.merge_adapter()
    with pytest.warns(UserWarning, match="unmerge"), model.disable_adapter():
        assert not any(layer.merged for _, layer in model.adapted_layers())
        torch.testing.assert_close(run(model), BASE_OUT, atol=ATOL, rtol=0)
    assert all(layer.merged_adapters == ["default"] for _, layer in model.adapted_layers())
    torch.testing.assert_close(run(model), out, atol=ATOL, rtol=0)


# -- merge / unmerge / unload --------------------------------------------------------------------
@pytest.mark.parametrize("cfg_cls", METHODS)
def test_merge_unmerge(cfg_cls):
    model = make(cfg_cls)
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in model.adapted_layers()}
    out = run(model)
    model.merge_adapter()
    assert all(layer.merged for _, layer in model.adapted_layers())
    torch.testing.assert_close(run(model), out, atol=ATOL, rtol=0)
    model.unmerge_adapter()
    for name, layer in model.adapted_layers():
        assert not layer.merged
        torch.testing.assert_close(layer.base_layer.weight, weights[name], atol=1e-6, rtol=0)
    torch.testing.assert_close(run(model), out, atol=ATOL, rtol=0)
    with pytest.warns(UserWarning, match="nothing to unmerge"):
        model.unmerge_adapter()


@pytest.mark.parametrize("cfg_cls", METHODS)
@pytest.mark.parametrize("merged_first", [False, True])
def test_merge_and_unload_restores_original_modules(cfg_cls, merged_first):
    base = base_model()
    originals = {n: m for n, m in base.named_modules()}
    keys = base.state_dict().keys()
    model = lyco.get_model(base, cfg_cls(r=2, alpha=3, target_modules=TARGETS, init_weights=False))
    out = run(model)
    if merged_first:
        model.merge_adapter()
    plain = model.merge_and_unload()
    assert plain is base
    for name, module in plain.named_modules():
        assert module is originals[name], name
    assert plain.state_dict().keys() == keys
    torch.testing.assert_close(run(plain), out, atol=ATOL, rtol=0)
    assert not torch.allclose(plain.fc.weight, base_model().fc.weight)


@pytest.mark.parametrize("cfg_cls", METHODS)
@pytest.mark.parametrize("merged_first", [False, True])
def test_unload_restores_original_modules(cfg_cls, merged_first):
    base = base_model()
    originals = dict(base.named_modules())
    before = snapshot(base)
    model = lyco.get_model(base, cfg_cls(r=2, target_modules=TARGETS, init_weights=False))
    if merged_first:
        model.merge_adapter()
    plain = model.unload()
    assert all(module is originals[name] for name, module in plain.named_modules())
    after = snapshot(plain)
    assert after.keys() == before.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k], atol=1e-6 if merged_first else 0, rtol=0)


@pytest.mark.parametrize("cfg_cls", METHODS)
def test_merge_subset_of_adapters(cfg_cls):
    model = make(cfg_cls)
    out_a = run(model)
    torch.manual_seed(3)
    model.add_adapter("b", cfg_cls(r=2, target_modules=["fc", "conv1d"], init_weights=False))
    model.set_adapter(["default", "b"])
    out_ab = run(model)
    model.merge_adapter(adapter_names=["b"])
    assert all(layer.merged_adapters == (["b"] if "b" in layer.lyco_adapters else [])
               for _, layer in model.adapted_layers())  # fmt: skip
    torch.testing.assert_close(run(model), out_ab, atol=ATOL, rtol=0)  # "default" still applied unmerged
    model.unmerge_adapter()
    plain = model.merge_and_unload(adapter_names=["default"])
    torch.testing.assert_close(run(plain), out_a, atol=ATOL, rtol=0)  # "b" dropped, not merged
    assert type(plain.conv1d) is nn.Conv1d


@pytest.mark.parametrize("cfg_cls", METHODS)
def test_set_scale(cfg_cls):
    model = make(cfg_cls)
    with model.disable_adapter():
        base = layer_outputs(model)
    out = layer_outputs(model)
    model.set_scale("default", 0.5)
    for _, layer in model.adapted_layers():
        assert layer.scaling["default"] == pytest.approx(0.5 * 3 / 2)
    assert_layers_close({n: v - base[n] for n, v in layer_outputs(model).items()},
                        {n: 0.5 * (v - base[n]) for n, v in out.items()})  # fmt: skip
    model.set_scale("default", 1.0)
    assert_layers_close(layer_outputs(model), out)
    with pytest.raises(lyco.AdapterNameError):
        model.set_scale("nope", 1.0)


@pytest.mark.parametrize("cfg_cls", METHODS)
def test_set_scale_while_merged_keeps_unmerge_exact(cfg_cls):
    model = make(cfg_cls)
    weights = {n: layer.base_layer.weight.detach().clone() for n, layer in model.adapted_layers()}
    model.merge_adapter()
    try:
        model.set_scale("default", 0.5)
    except lyco.MergeError:
        return  # refusing to rescale a merged adapter would be fine too
    model.unmerge_adapter()
    for name, layer in model.adapted_layers():
        torch.testing.assert_close(layer.base_layer.weight, weights[name], atol=1e-6, rtol=0, msg=name)


# -- dtypes --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg_cls", METHODS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_base_fp32_adapter_forward_backward(cfg_cls, dtype):
    base = base_model().to(dtype)
    model = lyco.get_model(base, cfg_cls(r=2, target_modules=TARGETS, init_weights=False))
    for _, layer in model.adapted_layers():
        assert layer.base_layer.weight.dtype == dtype
        assert all(p.dtype == torch.float32 for p in layer.lyco_adapters["default"].parameters())
    x = inputs().to(dtype)
    out = model(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    out.float().sum().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all(), n
    with torch.no_grad():
        ref = model(x).float()
        model.merge_adapter()
        merged = model(x).float()
    torch.testing.assert_close(merged, ref, atol=5e-2, rtol=5e-2)  # half-precision merge rounding


def test_half_base_keeps_half_adapter_without_autocast():
    base = base_model().to(torch.bfloat16)
    model = lyco.get_model(base, lyco.LoHaConfig(r=2, target_modules=["fc"]), autocast_adapter_dtype=False)
    assert all(p.dtype == torch.bfloat16 for p in model.model.fc.lyco_adapters["default"].parameters())
    model(inputs().to(torch.bfloat16)).float().sum().backward()


def test_lycomodel_forwards_attributes_and_kwargs():
    model = make(lyco.LoHaConfig)
    assert model.head is model.model.head  # unknown attributes go to the wrapped model
    assert model.model.fc.in_features == 32  # and AdaptedLayer forwards to its base layer
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(model(x=inputs()), run(model), atol=0, rtol=0)
    assert copy.deepcopy(model).get_nb_trainable_parameters() == model.get_nb_trainable_parameters()
