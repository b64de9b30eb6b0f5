"""Mixed adapters: one adapter name holding different methods on different layers (``lyco.MixedConfig``), as
LyCORIS files and presets with per-module algorithms (lycoris-lora's ``name_algo_map``) have them."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lyco
from conftest import shake_dora
from lyco import cli
from lycoris_cases import ATOL, MOVED, base_root, run

X = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))


def mixed_config(**common) -> lyco.MixedConfig:
    return lyco.MixedConfig([
        lyco.LoRAConfig(r=2, alpha=1, target_modules=["0"], init_weights=False, **common),
        lyco.LoKrConfig(r=2, alpha=3, target_modules=["2"], init_weights=False, weight_decompose=True, **common),
        lyco.LoHaConfig(r=2, alpha=2, target_modules=["4"], init_weights=False, **common),
    ])  # fmt: skip


def mixed_model() -> lyco.LycoModel:
    model = lyco.get_model(net(), mixed_config())
    shake_dora(model)
    return model


def test_each_layer_gets_its_parts_method_and_equals_separate_adapters():
    model = mixed_model()
    kinds = {n: type(layer.lyco_adapters["default"]).__name__ for n, layer in model.adapted_layers()}
    assert kinds == {"0": "LoRAAdapter", "2": "LoKrAdapter", "4": "LoHaAdapter"}
    # the same weights as three plain adapters, all active: identical outputs
    plain = lyco.get_model(net(), model.peft_config["default"].parts[0], "a")
    for name, part in zip("bc", model.peft_config["default"].parts[1:], strict=True):
        plain.add_adapter(name, part)
    for (_, mine), (_, theirs) in zip(model.adapted_layers(), plain.adapted_layers(), strict=True):
        (adapter,) = theirs.lyco_adapters.values()
        adapter.load_state_dict(mine.lyco_adapters["default"].state_dict())
    plain.set_adapter(["a", "b", "c"])
    out = model(X)
    assert (out - net()(X)).abs().max() > MOVED
    torch.testing.assert_close(out, plain(X), atol=1e-6, rtol=0)  # same maths, summation order only


def test_merge_unmerge_and_scale_are_exact():
    model = mixed_model()
    before, weights = model(X), {n: layer.base_layer.weight.detach().clone() for n, layer in model.adapted_layers()}
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(model(X), before, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    for n, layer in model.adapted_layers():
        torch.testing.assert_close(layer.base_layer.weight, weights[n], atol=1e-6, rtol=0)
    model.set_scale("default", 0.0)  # every part's layers follow the adapter's scale (DoRA: m·W/‖W‖)
    for _, layer in model.adapted_layers():
        if not layer.lyco_adapters["default"].weight_decompose:
            assert layer.get_delta_weight("default").abs().max() == 0


def test_lycoris_round_trip_in_every_style(tmp_path):
    model = mixed_model()
    want = model(X)
    for style in ("lycoris", "kohya", "diffusers"):
        path = tmp_path / f"{style}.safetensors"
        lyco.save_lycoris(model, path, style=style)
        again = lyco.load_lycoris(net(), path)
        config = again.peft_config["default"]
        assert isinstance(config, lyco.MixedConfig) and len(config.parts) == 3
        torch.testing.assert_close(again(X), want, atol=ATOL, rtol=0)


def test_a_peft_folder_is_refused_naming_the_lycoris_format(tmp_path):
    model = mixed_model()
    with pytest.raises(lyco.FormatError, match=r"one method per adapter.*save_lycoris"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(lyco.FormatError, match="LoKrConfig\\+DoRA"):
        from lyco.model_io import adapter_state_dict

        adapter_state_dict(model)


@pytest.mark.parametrize(
    ("parts", "error", "pattern"),
    [
        ([], lyco.ConfigError, "non-empty list"),
        ([{"r": 2}], lyco.ConfigError, r"parts\[0\] must be a method config"),
        ([lyco.LoRAConfig(target_modules=["0"], modules_to_save=["4"])], lyco.ConfigError, "to the MixedConfig itself"),
    ],
    ids=["empty", "not-a-config", "part-modules-to-save"],
)
def test_bad_mixed_configs(parts, error, pattern):
    with pytest.raises(error, match=pattern):
        lyco.MixedConfig(parts)


def test_a_module_chosen_by_two_parts_is_an_error_and_nothing_changes():
    base = net()
    config = lyco.MixedConfig([lyco.LoRAConfig(target_modules=["0", "4"]), lyco.LoKrConfig(target_modules=["2", "0"])])
    with pytest.raises(lyco.TargetError, match=r"module '0' is selected by parts\[0\] \(LoRAConfig\) and parts\[1\]"):
        lyco.get_model(base, config)
    assert all(type(m) in (nn.Sequential, nn.Linear, nn.ReLU) for m in base.modules())


def test_a_mixed_adapter_next_to_a_plain_one():
    model = mixed_model()
    model.add_adapter("plain", lyco.LoRAConfig(r=2, target_modules=["0", "2"], init_weights=False))
    model.set_adapter(["default", "plain"])
    out = model(X)
    model.merge_and_unload()
    torch.testing.assert_close(model.model(X), out, atol=1e-5, rtol=0)


def _lycoris_mixed_file(tmp_path):
    """A file made by lycoris-lora with per-name algorithms: LoCon default, Full / LoHa / LoKr by name."""
    from lycoris import LycorisNetwork, create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    base = base_root()
    model = copy.deepcopy(base)
    LycorisNetwork.apply_preset({  # name_algo_map applies to target_name modules (not inside a target_module)
        "target_module": [], "target_name": ["net.small"], "exclude_name": [],
        "name_algo_map": {"net.fc": {"algo": "lokr", "factor": 4}, "net.pw": {"algo": "loha"},
                          "net.conv": {"algo": "full"}},
    })  # fmt: skip
    try:
        net_ = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=2, algo="lora")
    finally:
        LycorisNetwork.apply_preset({"name_algo_map": {}})
    net_.apply_to()
    assert {type(m).__name__ for m in net_.loras} == {"LoConModule", "FullModule", "LohaModule", "LokrModule"}
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net_.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    expected = run(model)
    assert (expected - run(base)).abs().max() > MOVED
    path = tmp_path / "mixed.safetensors"
    net_.save_weights(str(path), torch.float32, None)
    return base, expected, path


def test_lycoris_name_algo_map_file_loads_exactly_both_ways(tmp_path):
    pytest.importorskip("lycoris")
    from lycoris_cases import lycoris_load

    base, expected, path = _lycoris_mixed_file(tmp_path)
    model = lyco.load_lycoris(copy.deepcopy(base), path)
    assert sorted(type(p).__name__ for p in model.peft_config["default"].parts) == [
        "FullConfig", "LoHaConfig", "LoKrConfig", "LoRAConfig"]  # fmt: skip
    torch.testing.assert_close(run(model), expected, atol=ATOL, rtol=0)
    out = tmp_path / "lyco.safetensors"
    lyco.save_lycoris(model, out)
    torch.testing.assert_close(run(lycoris_load(base, out)), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(run(model.merge_and_unload()), expected, atol=ATOL, rtol=0)


def _cli(capsys, *argv, rc=0) -> str:
    code = cli.main([str(a) for a in argv] + ["--no-progress"])
    captured = capsys.readouterr()
    assert code == rc, captured.out + captured.err
    return captured.out + captured.err


def test_cli_tools_on_a_mixed_file(tmp_path, capsys):
    model = mixed_model()
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in net().state_dict().items()}, str(base))
    path = tmp_path / "mixed.safetensors"
    lyco.save_lycoris(model, path)
    text = _cli(capsys, "inspect", path)
    assert "loha, lokr, lora" in text and "+dora(out)" in text
    text = _cli(capsys, "convert", path, tmp_path / "k.safetensors", "--style", "kohya")
    assert "max relative ΔW difference 0.0e+00" in text
    text = _cli(capsys, "convert", path, tmp_path / "peft", "--to", "peft", "--base", base, rc=1)
    assert "one method per adapter" in text and "Traceback" not in text and not (tmp_path / "peft").exists()
    _cli(capsys, "merge", base, path, tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    want = copy.deepcopy(model).merge_and_unload().state_dict()
    for key, value in want.items():
        torch.testing.assert_close(merged[key], value, atol=1e-5, rtol=0)
    _cli(capsys, "resize", path, tmp_path / "r.safetensors", "--rank", "1")
    small = lyco.load_lycoris(net(), tmp_path / "r.safetensors")
    assert {n: layer.r["default"] for n, layer in small.adapted_layers() if n != "2"} == {"0": 1, "4": 1}  # 2: full LoKr
    # to-lora keeps layer 2's DoRA magnitude: LoRA+DoRA there and plain LoRA elsewhere, still two parts
    _cli(capsys, "to-lora", path, tmp_path / "l.safetensors", "--rank", "2")
    assert isinstance(lyco.load_lycoris(net(), tmp_path / "l.safetensors").peft_config["default"], lyco.MixedConfig)


def test_from_adapter_tensors_infers_each_parts_plans():
    model = mixed_model()
    from lyco.tree import adapter_tensors

    tensors = adapter_tensors(model.model, "default")
    config = copy.deepcopy(model.peft_config["default"])
    config.parts[1].decompose_factor = 2  # LoKr would plan another split: the tensors' own split wins
    again = lyco.LycoModel.from_adapter_tensors(net(), config, tensors)
    torch.testing.assert_close(again(X), model(X), atol=1e-6, rtol=0)
