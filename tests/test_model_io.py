"""save_pretrained / from_pretrained / load_adapter (PEFT directory layout), file errors, meta device."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lyco
from conftest import MixedNet, X, assert_untouched, base_model, fingerprint

EXACT = 1e-6  # same weights, same code path: outputs must agree to rounding
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


TARGETS = ["conv2d", "conv1d", "fc"]
CONFIGS = {
    "loha": lambda: lyco.LoHaConfig(r=2, alpha=3, target_modules=TARGETS, init_weights=False),
    "loha-cp-patterns": lambda: lyco.LoHaConfig(
        r=2, alpha=3, target_modules=TARGETS, init_weights=False, use_effective_conv2d=True,
        rank_pattern={"conv1d": 3}, alpha_pattern={r"f\w": 5.0}),
    "lokr": lambda: lyco.LoKrConfig(r=2, alpha=3, target_modules=TARGETS, init_weights=False),
    "lokr-cp-patterns": lambda: lyco.LoKrConfig(
        r=2, alpha=3, target_modules=TARGETS, init_weights=False, use_effective_conv2d=True,
        rank_pattern={"conv2d": 1}, alpha_pattern={"conv1d": 4.0}),
    "lokr-decompose-both-factor": lambda: lyco.LoKrConfig(
        r=1, alpha=2, target_modules=TARGETS, init_weights=False, decompose_both=True, decompose_factor=4,
        rank_dropout=0.1, module_dropout=0.1),
    "lora-tucker-rslora": lambda: lyco.LoRAConfig(
        r=2, alpha=3, target_modules=TARGETS, init_weights=False, use_effective_conv2d=True, use_rslora=True),
    "full": lambda: lyco.FullConfig(target_modules=TARGETS, init_weights=False, rank_dropout=0.1),
}  # fmt: skip


# -- round trip ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_load_round_trip(tmp_path, name):
    torch.manual_seed(7)
    model = lyco.get_model(base_model(), CONFIGS[name]())
    model.eval()
    out = run(model)
    assert not torch.allclose(out, run(base_model()), atol=1e-4)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CONFIG, WEIGHTS]
    loaded = lyco.LycoModel.from_pretrained(base_model(), tmp_path)
    loaded.eval()  # the dropout configs must not drop anything here
    torch.testing.assert_close(run(loaded), out, atol=EXACT, rtol=0)
    src, dst = dict(model.adapted_layers()), dict(loaded.adapted_layers())
    assert src.keys() == dst.keys()
    for lname in src:
        a, b = src[lname].lyco_adapters["default"], dst[lname].lyco_adapters["default"]
        assert (a.r, a.alpha, a.scaling) == (b.r, b.alpha, b.scaling), lname
        for (pa, ta), (pb, tb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
            assert pa == pb and torch.equal(ta, tb), (lname, pa)
    assert loaded.peft_config["default"] == model.peft_config["default"]


def test_file_layout_and_keys(tmp_path):
    model = lyco.get_model(base_model(), CONFIGS["loha-cp-patterns"]())
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG).read_text())
    assert data["peft_type"] == "LOHA"
    assert {"r", "alpha", "rank_dropout", "module_dropout", "target_modules", "exclude_modules", "init_weights",
            "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "modules_to_save",
            "use_effective_conv2d"} <= set(data)  # fmt: skip
    assert data["rank_pattern"] == {"conv1d": 3} and data["alpha_pattern"] == {r"f\w": 5.0}
    assert sorted(data["target_modules"]) == sorted(TARGETS) and data["use_effective_conv2d"] is True
    shapes = {k: tuple(v.shape) for k, v in load_file(tmp_path / WEIGHTS).items()}
    assert shapes == {
        # Conv2d 4→16, k3, CP form: w_a (r, out), w_b (r, in), t (r, r, 3, 3)
        "base_model.model.conv2d.hada_w1_a": (2, 16), "base_model.model.conv2d.hada_w1_b": (2, 4),
        "base_model.model.conv2d.hada_t1": (2, 2, 3, 3), "base_model.model.conv2d.hada_w2_a": (2, 16),
        "base_model.model.conv2d.hada_w2_b": (2, 4), "base_model.model.conv2d.hada_t2": (2, 2, 3, 3),
        # Conv1d 16→32, k3, r=3 (rank_pattern): PEFT stores the 1-D CP core as (r, r, k, 1)
        "base_model.model.conv1d.hada_w1_a": (3, 32), "base_model.model.conv1d.hada_w1_b": (3, 16),
        "base_model.model.conv1d.hada_t1": (3, 3, 3, 1), "base_model.model.conv1d.hada_w2_a": (3, 32),
        "base_model.model.conv1d.hada_w2_b": (3, 16), "base_model.model.conv1d.hada_t2": (3, 3, 3, 1),
        # Linear 32→16, plain: w_a (out, r), w_b (r, in)
        "base_model.model.fc.hada_w1_a": (16, 2), "base_model.model.fc.hada_w1_b": (2, 32),
        "base_model.model.fc.hada_w2_a": (16, 2), "base_model.model.fc.hada_w2_b": (2, 32),
    }  # fmt: skip


def test_lokr_keys_and_peft_type(tmp_path):
    lyco.get_model(base_model(), CONFIGS["lokr"]()).save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG).read_text())
    assert data["peft_type"] == "LOKR"
    assert {"decompose_both", "decompose_factor", "rank_dropout_scale", "use_effective_conv2d"} <= set(data)
    assert sorted(load_file(tmp_path / WEIGHTS)) == sorted([
        "base_model.model.conv2d.lokr_w1", "base_model.model.conv2d.lokr_w2",
        "base_model.model.conv1d.lokr_w1", "base_model.model.conv1d.lokr_w2_a", "base_model.model.conv1d.lokr_w2_b",
        "base_model.model.fc.lokr_w1", "base_model.model.fc.lokr_w2_a", "base_model.model.fc.lokr_w2_b",
    ])  # fmt: skip


@pytest.mark.parametrize("is_trainable", [False, True])
def test_from_pretrained_trainable_flag(tmp_path, is_trainable):
    lyco.get_model(base_model(), CONFIGS["lokr"]()).save_pretrained(tmp_path)
    loaded = lyco.LycoModel.from_pretrained(base_model(), tmp_path, is_trainable=is_trainable)
    trainable, _ = loaded.get_nb_trainable_parameters()
    assert (trainable > 0) is is_trainable
    assert not any(p.requires_grad for n, p in loaded.named_parameters() if ".lyco_adapters." not in n)


def test_multiple_adapters_and_modules_to_save(tmp_path):
    torch.manual_seed(3)
    model = lyco.get_model(base_model(), lyco.LoHaConfig(r=2, target_modules=["fc"], init_weights=False,
                                                         modules_to_save=["head"]))  # fmt: skip
    model.add_adapter("other", lyco.LoKrConfig(r=1, target_modules=["conv1d", "fc"], init_weights=False))
    with torch.no_grad():
        model.model.head.modules_to_save["default"].bias.add_(0.5)
    out_default = run(model)
    model.set_adapter("other")
    out_other = run(model)
    model.save_pretrained(tmp_path)
    assert (tmp_path / CONFIG).is_file() and (tmp_path / "other" / CONFIG).is_file()
    assert (tmp_path / "other" / WEIGHTS).is_file()
    keys = load_file(tmp_path / WEIGHTS).keys()
    assert {
        "base_model.model.head.weight",
        "base_model.model.head.bias",
    } <= keys  # PEFT's modules_to_save keys
    assert not any("other" in k or "default" in k for k in keys)

    loaded = lyco.LycoModel.from_pretrained(base_model(), tmp_path)
    torch.testing.assert_close(run(loaded), out_default, atol=EXACT, rtol=0)
    assert torch.equal(
        loaded.model.head.modules_to_save["default"].bias, model.model.head.modules_to_save["default"].bias
    )
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    loaded.load_adapter(tmp_path, adapter_name="other2", subfolder="other")
    assert loaded.active_adapters == ["default"]
    assert loaded.get_nb_trainable_parameters()[0] == 0  # loaded for inference
    for name in ("other", "other2"):
        loaded.set_adapter(name)
        torch.testing.assert_close(run(loaded), out_other, atol=EXACT, rtol=0)

    only = tmp_path / "only"
    model.save_pretrained(only, selected_adapters=["other"])
    assert not (only / CONFIG).exists() and (only / "other" / CONFIG).is_file()


# -- bad files -----------------------------------------------------------------------------------
def _saved(tmp_path):
    lyco.get_model(base_model(), CONFIGS["loha"]()).save_pretrained(tmp_path)
    return tmp_path


def _edit_tensors(path, fn):
    tensors = load_file(path / WEIGHTS)
    fn(tensors)
    save_file(tensors, path / WEIGHTS)


def _edit_config(path, fn):
    data = json.loads((path / CONFIG).read_text())
    fn(data)
    (path / CONFIG).write_text(json.dumps(data))


CORRUPTIONS = {
    "no-config": (lambda p: (p / CONFIG).unlink(), lyco.FormatError, "adapter_config.json"),
    "bad-json": (lambda p: (p / CONFIG).write_text("{not json"), lyco.FormatError, "JSON"),
    "json-list": (lambda p: (p / CONFIG).write_text("[1, 2]"), lyco.FormatError, "JSON object"),
    "unknown-type": (lambda p: _edit_config(p, lambda d: d.update(peft_type="VERA")), lyco.FormatError, "VERA"),
    "invalid-r": (lambda p: _edit_config(p, lambda d: d.update(r=0)), lyco.FormatError, "r"),
    "no-weights": (lambda p: (p / WEIGHTS).unlink(), lyco.FormatError, "no such file"),
    "garbage-weights": (lambda p: (p / WEIGHTS).write_bytes(b"\x00garbage" * 10), lyco.FormatError, "safetensors"),
    "truncated": (lambda p: (p / WEIGHTS).write_bytes((p / WEIGHTS).read_bytes()[:100]), lyco.FormatError, WEIGHTS),
    "missing-key": (lambda p: _edit_tensors(p, lambda t: t.pop("base_model.model.fc.hada_w2_b")),
                    lyco.FormatError, "fc.hada_w2_b"),
    "extra-key": (lambda p: _edit_tensors(p, lambda t: t.update({"base_model.model.head.hada_w1_a": torch.ones(3, 2)})),
                  lyco.FormatError, "head.hada_w1_a"),
    "wrong-shape": (lambda p: _edit_tensors(p, lambda t: t.update({"base_model.model.fc.hada_w1_a": torch.ones(16, 3)})),
                    lyco.ShapeMismatchError, r"fc\.hada_w1_a.*\(16, 3\)"),
    "int-dtype": (lambda p: _edit_tensors(p, lambda t: t.update({"base_model.model.fc.hada_w1_a": torch.ones(16, 2, dtype=torch.int32)})),
                  lyco.FormatError, "dtype"),
}  # fmt: skip


@pytest.mark.parametrize("case", [c for c in CORRUPTIONS if c != "wrong-shape"])
def test_load_adapter_bad_files(tmp_path, case):
    corrupt, error, match = CORRUPTIONS[case]
    path = _saved(tmp_path / "a")
    corrupt(path)
    model = lyco.get_model(base_model(), lyco.LoKrConfig(r=2, target_modules=["fc"], init_weights=False))
    before, out = fingerprint(model), run(model)
    with pytest.raises(error, match=match):
        model.load_adapter(path, adapter_name="x")
    assert_untouched(model, before)
    assert list(model.peft_config) == ["default"]
    torch.testing.assert_close(run(model), out, atol=0, rtol=0)


@pytest.mark.parametrize(
    "case",
    CORRUPTIONS,
)
def test_from_pretrained_bad_files_leave_base_untouched(tmp_path, case):
    corrupt, error, match = CORRUPTIONS[case]
    path = _saved(tmp_path / "a")
    corrupt(path)
    base = base_model()
    before = fingerprint(base)
    with pytest.raises(error, match=match):
        lyco.LycoModel.from_pretrained(base, path)
    assert_untouched(base, before)


def test_pickle_weights_need_allow_pickle(tmp_path):
    path = _saved(tmp_path)
    out = run(lyco.LycoModel.from_pretrained(base_model(), path))
    torch.save(load_file(path / WEIGHTS), path / "adapter_model.bin")
    (path / WEIGHTS).unlink()
    with pytest.raises(lyco.FormatError, match="allow_pickle"):
        lyco.LycoModel.from_pretrained(base_model(), path)
    with pytest.warns(UserWarning, match="pickle"):
        loaded = lyco.LycoModel.from_pretrained(base_model(), path, allow_pickle=True)
    torch.testing.assert_close(run(loaded), out, atol=0, rtol=0)


def test_unknown_config_fields_warn(tmp_path):
    path = _saved(tmp_path)
    _edit_config(path, lambda d: d.update(some_future_option=1, task_type="CAUSAL_LM", peft_version="9.9"))
    with pytest.warns(UserWarning, match="some_future_option"):
        lyco.LycoModel.from_pretrained(base_model(), path)


# -- meta device ---------------------------------------------------------------------------------
def test_low_cpu_mem_usage_creates_meta_adapters():
    base = base_model()
    ptrs = {n: p.data_ptr() for n, p in base.named_parameters()}
    values = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = lyco.get_model(base, CONFIGS["lokr-cp-patterns"](), low_cpu_mem_usage=True)
    for _, layer in model.adapted_layers():
        assert all(p.is_meta for p in layer.lyco_adapters["default"].parameters())
        assert not layer.base_layer.weight.is_meta
    base_params = {
        n.replace(".base_layer", ""): p
        for n, p in model.model.named_parameters()
        if ".lyco_adapters." not in n
    }
    assert {n: p.data_ptr() for n, p in base_params.items()} == ptrs
    assert all(torch.equal(base_params[n], v) for n, v in values.items())
    with pytest.raises(lyco.FormatError, match="meta"):
        model.save_pretrained("/nonexistent/never-written")


@pytest.mark.parametrize("cfg_cls", [lyco.LoHaConfig, lyco.LoKrConfig])
def test_forward_with_meta_adapters_raises(cfg_cls):
    model = lyco.get_model(base_model(), cfg_cls(r=2, target_modules=TARGETS), low_cpu_mem_usage=True)
    with pytest.raises(lyco.StateError, match="meta"):
        run(model)
    with pytest.raises(lyco.StateError, match="meta"):
        model.merge_adapter()


@pytest.mark.parametrize("name", ["loha-cp-patterns", "lokr-cp-patterns"])
def test_from_pretrained_materialises_meta_weights(tmp_path, name):
    model = lyco.get_model(base_model(), CONFIGS[name]())
    out = run(model)
    model.save_pretrained(tmp_path)
    base = base_model()
    ptrs = {n: p.data_ptr() for n, p in base.named_parameters()}
    loaded = lyco.LycoModel.from_pretrained(base, tmp_path)
    assert not any(p.is_meta for p in loaded.parameters())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in loaded.parameters())
    assert {n: p.data_ptr() for n, p in base.named_parameters() if ".lyco_adapters." not in n} == {
        n: ptrs[n.replace(".base_layer", "")]
        for n, p in base.named_parameters()
        if ".lyco_adapters." not in n
    }
    torch.testing.assert_close(run(loaded), out, atol=EXACT, rtol=0)


@pytest.mark.parametrize("cfg_cls", [lyco.LoHaConfig, lyco.LoKrConfig])
def test_meta_base_model_can_be_adapted(tmp_path, cfg_cls):
    with torch.device("meta"):
        base = MixedNet()
    model = lyco.get_model(base, cfg_cls(r=2, target_modules=TARGETS))
    assert all(p.is_meta for p in model.parameters())
    assert model.get_nb_trainable_parameters()[0] > 0
    # materialise: real base weights, then the saved adapter
    reference = lyco.get_model(base_model(), cfg_cls(r=2, target_modules=TARGETS, init_weights=False))
    reference.save_pretrained(tmp_path)
    model.unload().to_empty(device="cpu").load_state_dict(base_model().state_dict())
    loaded = lyco.LycoModel.from_pretrained(base, tmp_path)
    torch.testing.assert_close(run(loaded), run(reference), atol=EXACT, rtol=0)
