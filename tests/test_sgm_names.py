"""SDXL's original-checkpoint (SGM) module names: kohya-style files of a diffusers SDXL UNet use them (as kohya
sd-scripts writes SDXL files), diffusers' own converters of kohya files map every key back to the module it came
from, and lyco reads them back exactly (on the UNet itself and under a pipeline's ``unet.``)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lyco
from lyco.formats.sgm import sgm_names

diffusers = pytest.importorskip("diffusers")
conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")

ATOL = 1e-5  # fp32 outputs of the same ΔW
MOVED = 1e-4


def tiny_sdxl():
    """SDXL's layout in miniature: a DownBlock2D first, CrossAttn blocks, two resnets per block, text_time embedding."""
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=4 * 6 + 8,
    ).eval()  # fmt: skip


_g = torch.Generator().manual_seed(1)
INPUTS = {"sample": torch.randn(2, 4, 8, 8, generator=_g), "timestep": torch.tensor([10, 500]),
          "encoder_hidden_states": torch.randn(2, 5, 16, generator=_g),
          "added_cond_kwargs": {"text_embeds": torch.randn(2, 8, generator=_g), "time_ids": torch.randn(2, 6, generator=_g)}}  # fmt: skip
CONFIGS = {
    "lora": lambda t: lyco.LoRAConfig(r=2, alpha=2, target_modules=t, init_weights=False),
    "loha": lambda t: lyco.LoHaConfig(r=2, alpha=2, target_modules=t, init_weights=False),
    "lokr": lambda t: lyco.LoKrConfig(r=2, alpha=2, target_modules=t, init_weights=False, decompose_both=True),
}


def leaves(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**INPUTS).sample


def save(model, path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # consumer notes for diffusers models
        lyco.save_lycoris(model, path, style="kohya")
    return load_file(path)


def test_sgm_names_are_sdxls():
    unet = tiny_sdxl()
    names = sgm_names(n for n, _ in unet.named_modules())
    layers = leaves(unet)
    assert set(layers) <= set(names) and len({names[n] for n in layers}) == len(layers)
    assert names["conv_in"] == "input_blocks.0.0" and names["conv_out"] == "out.2"
    assert names["add_embedding.linear_2"] == "label_emb.0.2" and names["time_embedding.linear_1"] == "time_embed.0"
    assert names["down_blocks.0.downsamplers.0.conv"] == "input_blocks.3.0.op"
    assert names["down_blocks.1.resnets.0.conv_shortcut"] == "input_blocks.4.0.skip_connection"
    assert names["down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_k"] == "input_blocks.5.1.transformer_blocks.0.attn2.to_k"
    assert names["mid_block.resnets.1.conv2"] == "middle_block.2.out_layers.3"
    assert names["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.2.conv"  # after an attention: .2 (SDXL's)
    assert names["up_blocks.1.resnets.2.time_emb_proj"] == "output_blocks.5.0.emb_layers.1"


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_sdxl_kohya_file_has_sgm_names_that_diffusers_maps_back(method, tmp_path):
    base = tiny_sdxl()
    model = lyco.get_model(copy.deepcopy(base), CONFIGS[method](leaves(base)))
    sd = save(model, tmp_path / "a.safetensors")
    stems = {k.split(".")[0] for k in sd}
    assert len(stems) == len(leaves(base))
    assert not any(p in s for s in stems for p in ("down_blocks", "mid_block", "up_blocks"))
    assert {"lora_unet_label_emb_0_0", "lora_unet_output_blocks_2_2_conv", "lora_unet_input_blocks_0_0"} <= stems
    # lyco reads its file back onto a fresh UNet with the same outputs
    loaded = lyco.load_lycoris(copy.deepcopy(base), tmp_path / "a.safetensors")
    assert (run(model) - run(base)).abs().max() > MOVED
    torch.testing.assert_close(run(loaded), run(model), atol=ATOL, rtol=0)
    if method == "lora":  # diffusers' converters of kohya files (independent of lyco) map every key back
        mapped = conversion._maybe_map_sgm_blocks_to_diffusers(dict(sd), base.config)
        converted, _ = conversion._convert_non_diffusers_lora_to_diffusers(mapped)
        peft = diffusers.utils.convert_unet_state_dict_to_peft(
            {k[len("unet.") :]: v for k, v in converted.items() if k.startswith("unet.")}
        )
        assert {k.rsplit(".lora_", 1)[0] for k in peft} == set(leaves(base))


def test_sgm_file_loads_under_a_pipelines_unet(tmp_path):
    base = tiny_sdxl()
    model = lyco.get_model(copy.deepcopy(base), CONFIGS["lora"](leaves(base)))
    save(model, tmp_path / "a.safetensors")
    pipe = nn.Module()
    pipe.unet = copy.deepcopy(base)
    loaded = lyco.load_lycoris(pipe, tmp_path / "a.safetensors")
    assert {n for n, _ in loaded.adapted_layers()} == {f"unet.{n}" for n in leaves(base)}
    torch.testing.assert_close(run(loaded.model.unet), run(model), atol=ATOL, rtol=0)


def test_sd1_kohya_files_keep_diffusers_names(tmp_path):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4,
    )  # fmt: skip
    model = lyco.get_model(unet, CONFIGS["lora"](["to_q", "conv1"]))
    stems = {k.split(".")[0] for k in save(model, tmp_path / "a.safetensors")}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in stems  # sd-scripts' SD1 names


def test_inspect_report_of_sdxl_files_matches_the_automatic1111_run(tmp_path):
    """lyco inspect's AUTOMATIC1111 verdict: SGM names load fully; diffusers names of SDXL lose exactly the 3 modules
    AUTOMATIC1111 82a973c drops when run locally (120 of 123 applied), and every UNet module in sd-scripts."""
    from lyco.formats.consumers import consumer_report
    from lyco.formats.lycoris import read_lycoris_file, write_lycoris_file
    from lyco.lycoris_files import adapter_file

    base = tiny_sdxl()
    model = lyco.get_model(copy.deepcopy(base), CONFIGS["lora"](leaves(base)))
    save(model, tmp_path / "sgm.safetensors")
    write_lycoris_file(adapter_file(model), tmp_path / "old.safetensors", style="kohya", component="unet")  # diffusers names
    sgm = consumer_report(read_lycoris_file(tmp_path / "sgm.safetensors"))
    old = consumer_report(read_lycoris_file(tmp_path / "old.safetensors"))
    assert sgm["AUTOMATIC1111"].loads_fully and sgm["lycoris-lora"].loads_fully
    assert set(sgm["kohya sd-scripts"].skipped) == {"lora_unet_input_blocks_0_0", "lora_unet_label_emb_0_0",
        "lora_unet_label_emb_0_2", "lora_unet_out_2", "lora_unet_time_embed_0", "lora_unet_time_embed_2"}  # fmt: skip
    assert sorted(old["AUTOMATIC1111"].skipped) == [
        "lora_unet_add_embedding_linear_1", "lora_unet_add_embedding_linear_2", "lora_unet_up_blocks_0_upsamplers_0_conv"]  # fmt: skip
    assert old["AUTOMATIC1111"].applied == 120
    assert old["kohya sd-scripts"].applied == 0 and old["lycoris-lora"].applied == 0


def test_cli_convert_to_kohya_with_a_diffusers_config_writes_sgm_names(tmp_path, capsys):
    """``lyco convert DIR OUT --style kohya --base config.json`` of an SDXL UNet writes sd-scripts' SGM names too."""
    from lyco import cli

    base = tiny_sdxl()
    base.save_config(tmp_path / "unet")  # config.json only: the base is built on the meta device
    model = lyco.get_model(copy.deepcopy(base), CONFIGS["lora"](leaves(base)))
    model.save_pretrained(tmp_path / "peft")
    out = tmp_path / "k.safetensors"
    assert cli.main(["convert", str(tmp_path / "peft"), str(out), "--style", "kohya",
                     "--base", str(tmp_path / "unet" / "config.json")]) == 0  # fmt: skip
    said = capsys.readouterr().out
    assert "in the original layout of UNet2DConditionModel" in said and "difference 0.0e+00" in said
    stems = {k.split(".")[0] for k in load_file(out)}
    assert "lora_unet_label_emb_0_0" in stems and not any("down_blocks" in s for s in stems)
    loaded = lyco.load_lycoris(copy.deepcopy(base), out)
    torch.testing.assert_close(run(loaded), run(model), atol=ATOL, rtol=0)
