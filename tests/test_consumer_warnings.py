"""Save-time warnings naming what a known consumer (ComfyUI, AUTOMATIC1111) would not apply as lyco does."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import lyco
from lyco.formats.consumers import DORA_OUTPUT_AXIS, LYCORIS_NAMES

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
    (text,) = saved_warnings(lyco.get_model(unet(), config), tmp_path / "a.safetensors")
    assert "lokr_t2" in text and "#11245" in text and DORA_OUTPUT_AXIS in text and LYCORIS_NAMES in text
    assert "module(s) (down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in text


def test_files_every_consumer_applies_warn_nothing(tmp_path):
    clean = lyco.get_model(unet(), lyco.LoRAConfig(r=2, target_modules=["to_q"], weight_decompose=True, wd_on_out=False))
    assert saved_warnings(clean, tmp_path / "k.safetensors", style="kohya") == []
    other = nn.Sequential(nn.Linear(8, 8))  # not a diffusion model: ComfyUI / AUTOMATIC1111 are not its consumers
    model = lyco.get_model(other, lyco.LoRAConfig(r=2, target_modules=["0"], weight_decompose=True))
    assert saved_warnings(model, tmp_path / "l.safetensors") == []
