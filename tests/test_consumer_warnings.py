"""Save-time warnings naming what a known consumer (ComfyUI, AUTOMATIC1111) would not apply as lyco does."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import lyco
from lyco.formats.consumers import (
    DIFFUSERS_DORA,
    DORA_OUTPUT_AXIS,
    LYCORIS_DORA_IN,
    LYCORIS_NAMES,
    SDSCRIPTS_DORA,
)

diffusers = pytest.importorskip("diffusers")


def unet() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4,
    )  # fmt: skip


def saved_warnings(model, path, **kwargs) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lyco.save_lycoris(model, path, **kwargs)
    return [str(w.message) for w in caught if "consumer shortfalls" in str(w.message)]


def test_each_known_shortfall_is_named_with_its_modules(tmp_path):
    config = lyco.MixedConfig([
        lyco.LoKrConfig(r=2, target_modules=["conv1"], use_effective_conv2d=True, decompose_factor=4),
        lyco.LoRAConfig(r=2, target_modules=["to_q"], weight_decompose=True),
    ])  # fmt: skip
    (text,) = saved_warnings(lyco.get_model(unet(), config), tmp_path / "a.safetensors", style="lycoris")
    assert "lokr_t2" in text and "#11245" in text and DORA_OUTPUT_AXIS in text and LYCORIS_NAMES in text
    assert "module(s) (down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in text


def test_the_default_style_is_the_one_the_model_familys_consumers_read(tmp_path):
    from safetensors import safe_open

    model = lyco.get_model(unet(), lyco.LoRAConfig(r=2, target_modules=["to_q"], weight_decompose=True, wd_on_out=False))
    (text,) = saved_warnings(model, tmp_path / "u.safetensors")  # kohya: nothing AUTOMATIC1111 would skip
    # input-axis DoRA: lycoris-lora's reload (output axis), diffusers' and sd-scripts' own (no magnitude) only
    assert text.count("module(s)") == 3 and all(s in text for s in (LYCORIS_DORA_IN, DIFFUSERS_DORA, SDSCRIPTS_DORA))
    with safe_open(str(tmp_path / "u.safetensors"), "pt") as fh:
        assert all(k.startswith("lora_unet_") for k in fh.keys())  # noqa: SIM118 (safe_open has no __iter__)
    other = lyco.get_model(nn.Sequential(nn.Linear(8, 8)), lyco.LoRAConfig(r=2, target_modules=["0"]))
    lyco.save_lycoris(other, tmp_path / "o.safetensors")
    with safe_open(str(tmp_path / "o.safetensors"), "pt") as fh:
        assert all(k.startswith("lycoris_") for k in fh.keys())  # noqa: SIM118 (safe_open has no __iter__)


def test_files_every_consumer_applies_warn_nothing(tmp_path):
    clean = lyco.get_model(unet(), lyco.LoRAConfig(r=2, target_modules=["to_q", "conv1", "proj_in"]))
    assert saved_warnings(clean, tmp_path / "k.safetensors", style="kohya") == []
    other = nn.Sequential(nn.Linear(8, 8))  # not a diffusion model: ComfyUI / AUTOMATIC1111 are not its consumers
    model = lyco.get_model(other, lyco.LoRAConfig(r=2, target_modules=["0"], weight_decompose=True))
    assert saved_warnings(model, tmp_path / "l.safetensors") == []


@pytest.mark.parametrize("decompose_both", [False, True])
def test_consumer_safe_writes_the_lokr_core_as_a_plain_pair(tmp_path, decompose_both):
    from safetensors.torch import load_file

    config = lyco.LoKrConfig(r=2, alpha=3, target_modules=["conv1", "conv2"], use_effective_conv2d=True,
                             decompose_both=decompose_both, decompose_factor=4, init_weights=False)  # fmt: skip
    model = lyco.get_model(unet(), config)
    layers = dict(model.adapted_layers())
    path = tmp_path / "safe.safetensors"
    assert saved_warnings(model, path, style="kohya", consumer_safe=True) == []
    keys = load_file(str(path))
    assert not any(k.endswith("lokr_t2") for k in keys) and any(k.endswith("lokr_w2_b") for k in keys)
    again = lyco.load_lycoris(unet(), path)
    for name, layer in dict(again.adapted_layers()).items():  # same ΔW and scale, plain layout (fp32: 1e-6)
        torch.testing.assert_close(layer.get_delta_weight("default"), layers[name].get_delta_weight("default"),
                                   atol=1e-6, rtol=1e-5)  # fmt: skip
        assert "lokr_t2" not in dict(layer.lyco_adapters["default"].named_parameters())


def test_convert_consumer_safe_drops_the_core_and_restates_the_args(tmp_path, capsys):
    from safetensors import safe_open

    from lyco import cli

    model = lyco.get_model(nn.Sequential(nn.Conv2d(8, 32, 3)),
                           lyco.LoKrConfig(r=2, use_effective_conv2d=True, target_modules=["0"], init_weights=False))  # fmt: skip
    src, dst = tmp_path / "cp.safetensors", tmp_path / "safe.safetensors"
    lyco.save_lycoris(model, src)
    assert cli.main(["convert", str(src), str(dst), "--consumer-safe", "--no-progress"]) == 0
    assert "max relative ΔW difference 0.0e+00" in capsys.readouterr().out  # convert checks ΔW itself
    with safe_open(str(dst), "pt") as f:
        names = f.keys()  # safe_open is not iterable
        assert not any(k.endswith("lokr_t2") for k in names)
        args = json.loads(f.metadata()["ss_network_args"])
    assert "use_tucker" not in args and args["conv_dim"] == "2"


def test_inspect_reports_the_consumer_notes(tmp_path, capsys):
    from lyco import cli

    model = lyco.get_model(nn.Sequential(nn.Conv2d(8, 32, 3)),
                           lyco.LoKrConfig(r=2, use_effective_conv2d=True, target_modules=["0"], init_weights=False))  # fmt: skip
    lyco.save_lycoris(model, tmp_path / "a.safetensors")  # lycoris style, CP core: two notes
    assert cli.main(["inspect", str(tmp_path / "a.safetensors"), "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["consumer_notes"]
    assert len(notes) == 2 and "#11245" in notes[0] and notes[1] == LYCORIS_NAMES
    lyco.save_lycoris(model, tmp_path / "b.safetensors", style="kohya", consumer_safe=True)
    assert cli.main(["inspect", str(tmp_path / "b.safetensors")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith(("ComfyUI:", "AUTOMATIC1111:", "Forge:"))
             or "  ComfyUI:" in ln]  # fmt: skip
    assert len(lines) == 3 and all("loads fully (1 module(s))" in ln for ln in lines), lines


# -- the per-consumer report (lyco inspect) ---------------------------------------------------------------------
def report(model, path, **kwargs) -> dict:
    from lyco import cli

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lyco.save_lycoris(model, path, **kwargs)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["inspect", str(path), "--json"]) == 0
    return json.loads(out.getvalue())["consumers"]


def test_report_kohya_sd1_file_loads_fully_everywhere_but_peft(tmp_path):
    model = lyco.get_model(unet(), lyco.LoRAConfig(r=2, target_modules=["to_q", "conv1", "proj_in"]))
    got = report(model, tmp_path / "a.safetensors")  # default style for a diffusers UNet: kohya
    assert [c for c, v in got.items() if v["loads_fully"]] == ["ComfyUI", "AUTOMATIC1111", "Forge", "kohya sd-scripts",
                                                              "lycoris-lora", "diffusers"]  # fmt: skip
    assert got["PEFT"]["applied"] == 0 and "--to peft" in got["PEFT"]["summary"]


def test_report_lycoris_style_is_lost_in_automatic1111(tmp_path):
    model = lyco.get_model(unet(), lyco.LoRAConfig(r=2, target_modules=["to_q"]))
    got = report(model, tmp_path / "a.safetensors", style="lycoris")
    n = len(list(model.adapted_layers()))
    assert got["AUTOMATIC1111"]["applied"] == 0 and len(got["AUTOMATIC1111"]["skipped"]) == n
    assert got["ComfyUI"]["loads_fully"] and got["lycoris-lora"]["loads_fully"]


def test_report_names_method_and_dora_shortfalls(tmp_path):
    config = lyco.MixedConfig([
        lyco.LoKrConfig(r=2, target_modules=["conv1"], use_effective_conv2d=True, decompose_factor=4),
        lyco.LoRAConfig(r=2, target_modules=["to_q"], weight_decompose=True),
        lyco.LoRAConfig(r=2, target_modules=["to_k"], weight_decompose=True, wd_on_out=False),
    ])  # fmt: skip
    got = report(lyco.get_model(unet(), config), tmp_path / "a.safetensors")
    comfy, a1111, kohya = got["ComfyUI"]["different"], got["AUTOMATIC1111"]["different"], got["lycoris-lora"]["different"]
    assert any("conv1" in k and "#11245" in v for k, v in comfy.items())
    assert {k for k in a1111} == {k for k in comfy if "to_q" in k}  # output-axis DoRA only
    assert kohya and all("to_k" in k for k in kohya)  # lycoris-lora reloads input-axis DoRA on the output axis


def test_report_of_a_peft_folder(tmp_path):
    from lyco import cli

    model = lyco.get_model(nn.Sequential(nn.Linear(8, 8)), lyco.LoRAConfig(r=2, target_modules=["0"]))
    model.save_pretrained(tmp_path / "dir")
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["inspect", str(tmp_path / "dir"), "--json"]) == 0
    got = json.loads(out.getvalue())["consumers"]
    assert got["PEFT"]["loads_fully"] and not any(v["applied"] for c, v in got.items() if c != "PEFT")


def test_consumer_safe_writes_a_conv1d_full_lokr_w2_as_a_flat_pair(tmp_path):
    """ComfyUI (fe25114, run) takes ``kron(w1, lokr_w2)`` of a 3-D full ``lokr_w2`` without lifting ``w1``: another
    ΔW. The warning names it; ``consumer_safe`` writes ``w2 = I · flat(w2)`` (rank out_r, alpha giving the same
    scale 1), which reloads in lyco with the same ΔW (and ComfyUI applies exactly, run on fe25114)."""
    from safetensors.torch import load_file

    lycoris = pytest.importorskip("lycoris")
    torch.manual_seed(0)
    model = lyco.get_model(nn.Sequential(nn.Conv1d(16, 32, 3)),
                           lyco.LoKrConfig(r=10000, alpha=3, target_modules=["0"], init_weights=False))  # fmt: skip
    with torch.no_grad():  # a ΔW well above rounding
        for p in model.parameters():
            if p.requires_grad:
                p.normal_()
    want = model.adapted_layers().__next__()[1].get_delta_weight("default")
    lyco.save_lycoris(model, tmp_path / "a.safetensors", style="kohya")
    assert load_file(tmp_path / "a.safetensors")["lora_unet_0.lokr_w2"].dim() == 3
    from lyco.formats.lycoris import read_lycoris_file
    from lyco.tools.describe import describe

    notes = describe(read_lycoris_file(tmp_path / "a.safetensors"), tmp_path / "a.safetensors").consumer_notes
    assert any("3-D full lokr_w2" in n for n in notes)
    lyco.save_lycoris(model, tmp_path / "b.safetensors", style="kohya", consumer_safe=True)
    keys = load_file(tmp_path / "b.safetensors")
    assert "lora_unet_0.lokr_w2" not in keys and keys["lora_unet_0.lokr_w2_a"].shape == (8, 8)
    assert float(keys["lora_unet_0.alpha"]) == 8.0  # alpha / r = 1: the scale of the full-full module
    again = lyco.load_lycoris(nn.Sequential(nn.Conv1d(16, 32, 3)), tmp_path / "b.safetensors")
    torch.testing.assert_close(again.adapted_layers().__next__()[1].get_delta_weight("default"), want, atol=1e-5, rtol=1e-5)
    # lycoris-lora 4.1.3 reads the 3-D layout as saved (its own) and cannot rebuild this one: its rank rule makes a
    # rank-out_r w2 full again (make_module_from_state_dict then has no lokr_w2_a) — the as-saved file is for it
    lyco.save_lycoris(model, tmp_path / "c.safetensors", style="lycoris")
    lyco.save_lycoris(model, tmp_path / "d.safetensors", style="lycoris", consumer_safe=True)
    base = nn.Sequential(nn.Conv1d(16, 32, 3))
    before = base[0].weight.detach().clone()
    net, _ = lycoris.create_lycoris_from_weights(1.0, str(tmp_path / "c.safetensors"), base)
    net.merge_to()  # a full-full module: scale 1, so its merge's second scale changes nothing
    torch.testing.assert_close(base[0].weight.detach() - before, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(AttributeError, match="lokr_w2_a"):
        lycoris.create_lycoris_from_weights(1.0, str(tmp_path / "d.safetensors"), nn.Sequential(nn.Conv1d(16, 32, 3)))
