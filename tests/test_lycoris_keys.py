"""Key conventions of single-file adapters: every convention loads (and is reported), keys resolve to the
right modules, ambiguity / unmatched / unknown keys are listed errors, and every save style has golden keys."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lyco
from conftest import assert_untouched, fingerprint
from lyco.formats import read_lycoris_file, write_lycoris_file

ATOL = 1e-6  # deltas computed two ways from the same fp32 tensors

UNET = {
    "down_blocks.0.attentions.0.proj_in": lambda: nn.Conv2d(16, 16, 1),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": lambda: nn.Linear(16, 16),
    "mid_block.attentions.0.proj_out": lambda: nn.Linear(16, 16),
}
TE = {
    "text_model.encoder.layers.0.self_attn.q_proj": lambda: nn.Linear(16, 16),
    "text_model.encoder.layers.0.mlp.fc1": lambda: nn.Linear(16, 16),
}
TRANSFORMER = {
    "transformer_blocks.0.attn.to_q": lambda: nn.Linear(16, 16),
    "single_transformer_blocks.0.proj_out": lambda: nn.Linear(16, 16),
}


def tree(cls_name: str, layers: dict) -> nn.Module:
    """A module of class ``cls_name`` holding ``layers`` (dotted path → factory) under those names."""
    torch.manual_seed(0)
    root = type(cls_name, (nn.Module,), {})()
    for path, make in layers.items():
        parent = root
        *parents, leaf = path.split(".")
        for p in parents:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        parent.add_module(leaf, make())
    return root


def unet() -> nn.Module:
    return tree("TinyUNet2DConditionModel", UNET)


def text_encoder() -> nn.Module:
    return tree("TinyCLIPTextModel", TE)


def transformer() -> nn.Module:
    return tree("TinyFluxTransformer2DModel", TRANSFORMER)


def pipeline() -> nn.Module:
    """A diffusers-pipeline-like container: ``unet``, ``text_encoder``, ``text_encoder_2``."""
    root = nn.Module()
    root.unet, root.text_encoder, root.text_encoder_2 = unet(), text_encoder(), tree("TinyCLIPTextModel", TE)
    return root


def lokr_tensors(seed: int, alpha: float | None = 0.5) -> dict[str, torch.Tensor]:
    """A LoKr for a 16→16 layer: w1 (4, 4), w2 = w2_a (4, 1) @ w2_b (1, 4), r = 1."""
    g = torch.Generator().manual_seed(seed)
    t = {"lokr_w1": torch.randn(4, 4, generator=g), "lokr_w2_a": torch.randn(4, 1, generator=g),
         "lokr_w2_b": torch.randn(1, 4, generator=g)}  # fmt: skip
    if alpha is not None:
        t["alpha"] = torch.tensor(alpha)
    return t


def expected_delta(t: dict[str, torch.Tensor], conv: bool) -> torch.Tensor:
    scale = float(t["alpha"]) / 1 if "alpha" in t else 1.0  # r = 1
    delta = torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * scale
    return delta.reshape(16, 16, 1, 1) if conv else delta


def write(path, modules: dict[str, dict[str, torch.Tensor]], metadata=None) -> None:
    save_file({f"{stem}.{p}": v for stem, ts in modules.items() for p, v in ts.items()}, str(path), metadata)


def check_loaded(model: lyco.LycoModel, expected: dict[str, dict[str, torch.Tensor]]) -> None:
    """Exactly the expected modules are adapted, each with the hand-computed scaled delta."""
    assert sorted(n for n, _ in model.adapted_layers()) == sorted(expected)
    for name, t in expected.items():
        layer = model.model.get_submodule(name)
        conv = isinstance(layer.base_layer, nn.Conv2d)
        torch.testing.assert_close(layer.get_delta_weight("default"), expected_delta(t, conv), atol=ATOL, rtol=0)


def us(path: str) -> str:
    return path.replace(".", "_")


# (id, model factory, file stem → module path in the model, convention reported)
CONVENTIONS = [
    ("kohya-unet", unet, {f"lora_unet_{us(p)}": p for p in UNET}, "kohya"),
    ("kohya-te", text_encoder, {f"lora_te_{us(p)}": p for p in TE}, "kohya"),
    ("kohya-te1-te2-unet", pipeline,
     {**{f"lora_te1_{us(p)}": f"text_encoder.{p}" for p in TE}, **{f"lora_te2_{us(p)}": f"text_encoder_2.{p}" for p in TE},
      **{f"lora_unet_{us(p)}": f"unet.{p}" for p in UNET}}, "kohya"),
    ("lycoris", transformer, {f"lycoris_{us(p)}": p for p in TRANSFORMER}, "lycoris"),
    ("lycoris-pipeline", pipeline, {f"lycoris_unet_{us(p)}": f"unet.{p}" for p in UNET}, "lycoris"),
    ("onetrainer", transformer, {f"lora_transformer_{us(p)}": p for p in TRANSFORMER}, "onetrainer"),
    ("ai-toolkit", transformer, {f"diffusion_model.{p}": p for p in TRANSFORMER}, "ai-toolkit"),
    ("diffusers-transformer", transformer, {f"transformer.{p}": p for p in TRANSFORMER}, "diffusers"),
    ("diffusers-unet", unet, {f"unet.{p}": p for p in UNET}, "diffusers"),
    ("diffusers-text-encoder", text_encoder, {f"text_encoder.{p}": p for p in TE}, "diffusers"),
    ("diffusers-pipeline", pipeline,
     {**{f"unet.{p}": f"unet.{p}" for p in UNET}, **{f"text_encoder_2.{p}": f"text_encoder_2.{p}" for p in TE}},
     "diffusers"),
    ("peft", text_encoder, {f"base_model.model.{p}": p for p in TE}, "peft"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "factory", "stems", "convention"), CONVENTIONS, ids=[c[0] for c in CONVENTIONS])
def test_convention_loads(tmp_path, name, factory, stems, convention):
    tensors = {stem: lokr_tensors(i) for i, stem in enumerate(stems)}
    path = tmp_path / "f.safetensors"
    write(path, tensors)
    base = factory()
    assert read_lycoris_file(path).convention == convention
    af = read_lycoris_file(path, model=base)
    assert af.convention == convention and af.resolved and set(af.modules) == set(stems.values())
    model = lyco.load_lycoris(base, path)
    check_loaded(model, {stems[s]: t for s, t in tensors.items()})


def test_unknown_prefix_is_a_listed_error(tmp_path):
    path = tmp_path / "f.safetensors"
    write(path, {"lora_unet_mid_block_attentions_0_proj_out": lokr_tensors(0), "my_net_layer_q": lokr_tensors(1)})
    base = unet()
    before = fingerprint(base)
    with pytest.raises(lyco.FormatError, match=r"my_net_layer_q\.lokr_w1.*unknown key prefix"):
        lyco.load_lycoris(base, path)
    assert_untouched(base, before)
    with pytest.warns(UserWarning, match=r"my_net_layer_q\.lokr_w1 .*my_net_layer_q\.lokr_w2_b"):
        model = lyco.load_lycoris(base, path, strict=False)
    check_loaded(model, {"mid_block.attentions.0.proj_out": lokr_tensors(0)})


def test_explicit_prefix_accepts_any_prefix(tmp_path):
    path = tmp_path / "f.safetensors"
    write(path, {"my_net_mid_block_attentions_0_proj_out": lokr_tensors(0)})
    model = lyco.load_lycoris(unet(), path, prefix="my_net_")
    check_loaded(model, {"mid_block.attentions.0.proj_out": lokr_tensors(0)})


def test_unmatched_keys_list_closest_modules_and_leave_model_untouched(tmp_path):
    path = tmp_path / "f.safetensors"
    good, bad = "lora_unet_mid_block_attentions_0_proj_out", "lora_unet_mid_block_attentions_0_proj_outt"
    write(path, {good: lokr_tensors(0), bad: lokr_tensors(1)})
    base = unet()
    before = fingerprint(base)
    with pytest.raises(lyco.FormatError) as err:
        lyco.load_lycoris(base, path)
    msg = str(err.value)
    assert f"{bad}.lokr_w1" in msg and f"{bad}.alpha" in msg and "closest modules: mid_block.attentions.0.proj_out" in msg
    assert_untouched(base, before)
    with pytest.warns(UserWarning) as record:
        model = lyco.load_lycoris(base, path, strict=False)
    dropped = " ".join(str(w.message) for w in record)
    assert all(f"{bad}.{p}" in dropped for p in ("lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"))
    check_loaded(model, {"mid_block.attentions.0.proj_out": lokr_tensors(0)})


def test_other_components_need_a_prefix(tmp_path):
    """A whole-pipeline kohya file into the text encoder alone: te1 and te2 both fit (same names) → error;
    prefix picks one, the other keys are listed in a warning."""
    path = tmp_path / "f.safetensors"
    te1 = {f"lora_te1_{us(p)}": lokr_tensors(i) for i, p in enumerate(TE)}
    te2 = {f"lora_te2_{us(p)}": lokr_tensors(10 + i) for i, p in enumerate(TE)}
    write(path, {**te1, **te2, f"lora_unet_{us(next(iter(UNET)))}": lokr_tensors(20)})
    base = text_encoder()
    with pytest.raises(lyco.FormatError, match="both name module"):
        lyco.load_lycoris(base, path)
    with pytest.warns(UserWarning, match=r"outside the requested prefix.*lora_te1_.*lora_unet_"):
        model = lyco.load_lycoris(base, path, prefix="lora_te2_")
    check_loaded(model, {p: lokr_tensors(10 + i) for i, p in enumerate(TE)})


def test_ambiguous_underscore_path_lists_candidates(tmp_path):
    base = tree("Net", {"a_b.c": lambda: nn.Linear(16, 16), "a.b_c": lambda: nn.Linear(16, 16)})
    path = tmp_path / "f.safetensors"
    write(path, {"lycoris_a_b_c": lokr_tensors(0)})
    with pytest.raises(lyco.FormatError, match=re.escape("can name modules ['a_b.c', 'a.b_c']")):
        lyco.load_lycoris(base, path)
    write(path, {"base_model.model.a.b_c": lokr_tensors(0)})  # dotted keys are never ambiguous
    check_loaded(lyco.load_lycoris(base, path), {"a.b_c": lokr_tensors(0)})


def test_key_naming_an_unsupported_module(tmp_path):
    base = tree("Net", {"norm": lambda: nn.LayerNorm(16), "fc": lambda: nn.Linear(16, 16)})
    path = tmp_path / "f.safetensors"
    write(path, {"lycoris_norm": lokr_tensors(0)})
    with pytest.raises(lyco.FormatError, match="module 'norm' is a LayerNorm, which lyco cannot adapt"):
        lyco.load_lycoris(base, path)


def test_dokr_file_loads_with_the_dora_formula(tmp_path):
    """A "DoKr" file (LoKr + dora_scale): W' = m ⊙ (W + s·ΔW) / ‖W + s·ΔW‖ per output row, s = alpha / r."""
    path = tmp_path / "f.safetensors"
    t = lokr_tensors(0)
    m = torch.rand(16, 1, generator=torch.Generator().manual_seed(3)) + 0.5
    write(path, {"lycoris_fc": {**t, "dora_scale": m}})
    base = tree("Net", {"fc": lambda: nn.Linear(16, 16)})
    w = base.fc.weight.detach().clone()
    model = lyco.load_lycoris(base, path)
    total = w + torch.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"]) * 0.5
    want = m * total / (total.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps)
    torch.testing.assert_close(model.model.fc.get_delta_weight("default"), want - w, atol=1e-5, rtol=1e-5)
    assert model.peft_config["default"].weight_decompose and model.peft_config["default"].wd_on_out


def test_dora_on_some_modules_only_loads_as_a_mixed_adapter(tmp_path):
    path = tmp_path / "f.safetensors"
    m = torch.rand(16, 1, generator=torch.Generator().manual_seed(3)) + 0.5
    write(path, {"lycoris_fc": {**lokr_tensors(0), "dora_scale": m}, "lycoris_fc2": lokr_tensors(1)})
    base = tree("Net", {"fc": lambda: nn.Linear(16, 16), "fc2": lambda: nn.Linear(16, 16)})
    model = lyco.load_lycoris(base, path)
    config = model.peft_config["default"]
    assert isinstance(config, lyco.MixedConfig)
    assert [(p.target_modules, p.weight_decompose) for p in config.parts] == [(["fc"], True), (["fc2"], False)]
    assert not model.model.fc2.lyco_adapters["default"].weight_decompose
    out = tmp_path / "again.safetensors"
    lyco.save_lycoris(model, out)
    again = load_file(str(out))
    assert set(again) == set(load_file(str(path))) and torch.equal(again["lycoris_fc.dora_scale"], m)


def test_dora_scale_of_the_wrong_shape_names_the_module(tmp_path):
    path = tmp_path / "f.safetensors"
    write(path, {"lycoris_fc": {**lokr_tensors(0), "dora_scale": torch.ones(8, 1)}})
    with pytest.raises(lyco.ShapeMismatchError, match=r"'fc'.*dora_scale \(8, 1\)"):
        lyco.load_lycoris(tree("Net", {"fc": lambda: nn.Linear(16, 16)}), path)


# -- writing: golden keys per style ------------------------------------------------------------------
def _adapted(base: nn.Module, names: list[str]) -> lyco.LycoModel:
    torch.manual_seed(1)
    return lyco.get_model(base, lyco.LoKrConfig(r=1, alpha=2, target_modules=names, init_weights=False))


UNET_NAMES = ["down_blocks.0.attentions.0.proj_in", "mid_block.attentions.0.proj_out"]
STYLES = [
    ("lycoris", unet, UNET_NAMES, ["lycoris_down_blocks_0_attentions_0_proj_in", "lycoris_mid_block_attentions_0_proj_out"]),
    ("kohya", unet, UNET_NAMES, ["lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_mid_block_attentions_0_proj_out"]),
    ("peft", unet, UNET_NAMES, ["base_model.model.down_blocks.0.attentions.0.proj_in",
                                "base_model.model.mid_block.attentions.0.proj_out"]),
    ("diffusers", unet, UNET_NAMES, ["unet.down_blocks.0.attentions.0.proj_in", "unet.mid_block.attentions.0.proj_out"]),
    ("kohya", text_encoder, list(TE), [f"lora_te_{us(p)}" for p in TE]),
    ("diffusers", transformer, list(TRANSFORMER), [f"transformer.{p}" for p in TRANSFORMER]),
    ("kohya", pipeline, ["unet.mid_block.attentions.0.proj_out", "text_encoder.text_model.encoder.layers.0.mlp.fc1",
                         "text_encoder_2.text_model.encoder.layers.0.mlp.fc1"],
     ["lora_unet_mid_block_attentions_0_proj_out", "lora_te1_text_model_encoder_layers_0_mlp_fc1",
      "lora_te2_text_model_encoder_layers_0_mlp_fc1"]),
    ("diffusers", pipeline, ["unet.mid_block.attentions.0.proj_out", "text_encoder_2.text_model.encoder.layers.0.mlp.fc1"],
     ["unet.mid_block.attentions.0.proj_out", "text_encoder_2.text_model.encoder.layers.0.mlp.fc1"]),
]  # fmt: skip


@pytest.mark.parametrize(("style", "factory", "names", "stems"), STYLES, ids=[f"{s[0]}-{s[1].__name__}" for s in STYLES])
def test_save_style_golden_keys_and_reload(tmp_path, style, factory, names, stems):
    base = factory()
    model = _adapted(copy.deepcopy(base), names)
    path = tmp_path / "a.safetensors"
    lyco.save_lycoris(model, path, style=style)
    baked = style == "diffusers"  # diffusers' own layout: no .alpha, the scale (alpha / r = 2) folded into lokr_w1
    with safe_open(str(path), "pt") as fh:
        keys = sorted(fh.keys())
        alpha = None if baked else fh.get_tensor(f"{stems[0]}.alpha")
    params = ["lokr_w1", "lokr_w2_a", "lokr_w2_b", *([] if baked else ["alpha"])]
    assert keys == sorted(f"{s}.{p}" for s in stems for p in params)
    assert baked or (alpha.shape == () and alpha.dtype == torch.float32 and float(alpha) == 2.0)
    reloaded = lyco.load_lycoris(copy.deepcopy(base), path)
    for name in names:
        torch.testing.assert_close(
            reloaded.model.get_submodule(name).get_delta_weight("default"),
            model.model.get_submodule(name).get_delta_weight("default"), atol=ATOL, rtol=0,
        )  # fmt: skip


def test_save_with_explicit_prefix(tmp_path):
    model = _adapted(text_encoder(), list(TE))
    path = tmp_path / "a.safetensors"
    lyco.save_lycoris(model, path, style="kohya", prefix="lora_te2_")
    assert read_lycoris_file(path).modules.keys() == {f"lora_te2_{us(p)}" for p in TE}


def test_metadata(tmp_path):
    model = _adapted(unet(), UNET_NAMES)
    path = tmp_path / "a.safetensors"
    lyco.save_lycoris(model, path, metadata={"ss_output_name": "mine", "ss_network_dim": "99"})
    meta = read_lycoris_file(path).metadata
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_output_name"] == "mine"
    assert meta["ss_network_dim"] == "99" and meta["ss_network_alpha"] == "2.0"  # user metadata wins
    args = json.loads(meta["ss_network_args"])
    assert args["algo"] == "lokr" and args["factor"] == "-1" and args["conv_dim"] == "1"
    with pytest.raises(lyco.FormatError, match="strings"):
        lyco.save_lycoris(model, path, metadata={"ss_network_dim": 8})


def test_model_free_conversion_between_styles(tmp_path):
    src = tmp_path / "kohya.safetensors"
    write(src, {f"lora_unet_{us(p)}": lokr_tensors(i) for i, p in enumerate(TRANSFORMER)})
    af = read_lycoris_file(src)
    assert not af.resolved
    out = tmp_path / "lycoris.safetensors"
    write_lycoris_file(af, out, style="lycoris")
    assert set(read_lycoris_file(out).modules) == {f"lycoris_{us(p)}" for p in TRANSFORMER}
    with pytest.raises(lyco.FormatError, match="underscore path"):
        write_lycoris_file(af, out, style="diffusers")
    resolved = read_lycoris_file(src, model=transformer())
    write_lycoris_file(resolved, out, style="diffusers")
    assert set(read_lycoris_file(out).modules) == {f"transformer.{p}" for p in TRANSFORMER}
    model = lyco.load_lycoris(transformer(), out)
    check_loaded(model, {p: lokr_tensors(i) for i, p in enumerate(TRANSFORMER)})


def test_load_into_existing_model(tmp_path):
    base = unet()
    first = _adapted(copy.deepcopy(base), UNET_NAMES)
    path = tmp_path / "a.safetensors"
    write(path, {f"lora_unet_{us(p)}": lokr_tensors(i) for i, p in enumerate(list(UNET)[1:])})
    lyco.load_lycoris_into(first, path, adapter_name="other")
    assert first.active_adapters == ["default"]
    layer = first.model.get_submodule(list(UNET)[1])
    torch.testing.assert_close(layer.get_delta_weight("other"), expected_delta(lokr_tensors(0), False), atol=ATOL, rtol=0)
    with pytest.raises(lyco.AdapterNameError):
        lyco.load_lycoris(first, path, adapter_name="other")
