"""Pipeline-level kohya files (issue 14): a pipeline-like container with its text encoders and denoiser is written
with the names sd-scripts writes for the family, and reads back exactly.

- transformers 5 builds ``CLIPTextModel`` without its ``text_model`` level; every SD-family file names CLIP's modules
  with it (``lora_te1_text_model_encoder_layers_0_…``), the only names ComfyUI and AUTOMATIC1111 map
  (:mod:`lyco.formats.textnames`);
- the kohya slots follow sd-scripts: one CLIP is ``lora_te_`` (SD1/SD2); several are numbered whatever is adapted
  (SDXL ``te1`` / ``te2``; SD3 ``te1`` / ``te2`` / ``te3``), and a T5 is always ``lora_te3_`` (Flux.1: CLIP-L ``te1``,
  T5 ``te3``: sd-scripts' ``networks/lora_flux.py``);
- a container's Flux / SD3 transformer gets the fused original layout as the bare transformer does.

Checked against ComfyUI fe25114's own ``model_lora_keys_clip`` / ``model_lora_keys_unet`` / ``calculate_weight`` outside
the suite (the closing note of issue 14); here the names and exact reloads.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lyco
from lyco.formats.keys import kohya_text_encoders
from lyco.formats.textnames import clip_text_names

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402

EXACT = 1e-6


def clip(projection: bool = False) -> nn.Module:
    cfg = transformers.CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=100, max_position_embeddings=16, projection_dim=8, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1)  # fmt: skip
    return (transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel)(cfg)


def t5() -> nn.Module:
    return transformers.T5EncoderModel(transformers.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                                             vocab_size=100))  # fmt: skip


class Pipe(nn.Module):
    def __init__(self, **parts: nn.Module):
        super().__init__()
        for k, v in parts.items():
            setattr(self, k, v)


def sd1() -> Pipe:
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, norm_num_groups=4, attention_head_dim=4)  # fmt: skip
    return Pipe(unet=unet, text_encoder=clip())


def sdxl() -> Pipe:
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=4 * 6 + 8)  # fmt: skip
    return Pipe(unet=unet, text_encoder=clip(), text_encoder_2=clip(projection=True))


def sd3() -> Pipe:
    tr = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8)  # fmt: skip
    return Pipe(transformer=tr, text_encoder=clip(), text_encoder_2=clip(projection=True), text_encoder_3=t5())


def flux() -> Pipe:
    tr = diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4))  # fmt: skip
    return Pipe(transformer=tr, text_encoder=clip(), text_encoder_2=t5())


PIPES = {"sd1": sd1, "sdxl": sdxl, "sd3": sd3, "flux": flux}
# the kohya prefix of each text encoder, and one of its stems (CLIP: with text_model; T5 as is)
TE_STEMS = {
    "sd1": {"lora_te_text_model_encoder_layers_0_self_attn_q_proj"},
    "sdxl": {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"},
    "sd3": {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te3_encoder_block_0_layer_0_SelfAttention_q"},
    "flux": {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te3_encoder_block_0_layer_0_SelfAttention_q"},
}  # fmt: skip
DENOISER_STEM = {"sd1": "lora_unet_down_blocks_0_attentions_0_proj_in", "sdxl": "lora_unet_input_blocks_4_1_proj_in",
                 "sd3": "lora_unet_joint_blocks_0_x_block_attn_qkv", "flux": "lora_unet_double_blocks_0_img_attn_qkv"}  # fmt: skip


def build(arch: str) -> Pipe:
    torch.manual_seed(0)
    return PIPES[arch]().eval()


def leaves(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: model.get_submodule(n).weight.detach().clone() for n in leaves(model)}


def stems(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {k.split(".")[0] for k in list(f.keys())}


def test_clip_text_names_restore_text_model_for_bare_clip_only():
    pipe = build("sdxl")
    names = clip_text_names(n for n, _ in pipe.named_modules())
    assert names["text_encoder.encoder.layers.0.self_attn.q_proj"] == "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    assert names["text_encoder.final_layer_norm"] == "text_encoder.text_model.final_layer_norm"
    assert not any(n.startswith("text_encoder_2.") for n in names)  # CLIPTextModelWithProjection keeps text_model
    assert not any(n.startswith("unet.") for n in names)


@pytest.mark.parametrize(("arch", "slots"), [("sd1", {}), ("sdxl", {"te": "te1", "te2": "te2"}),
                                             ("sd3", {"te": "te1", "te2": "te2", "te3": "te3"}),
                                             ("flux", {"te": "te1", "te2": "te3"})])  # fmt: skip
def test_kohya_text_encoder_slots_follow_sd_scripts(arch, slots):
    assert kohya_text_encoders(build(arch)) == slots


@pytest.mark.parametrize("method", ["lora", "loha", "lokr"])
@pytest.mark.parametrize("arch", list(PIPES))
def test_pipeline_kohya_file_has_sd_scripts_names_and_reloads_exactly(arch, method, tmp_path):
    base = build(arch)
    cfg = {"lora": lyco.LoRAConfig, "loha": lyco.LoHaConfig, "lokr": lyco.LoKrConfig}[method]
    extra = {"decompose_both": True} if method == "lokr" else {}
    model = lyco.get_model(copy.deepcopy(base), cfg(r=2, alpha=3, target_modules=leaves(base), init_weights=False, **extra))
    want = weights(copy.deepcopy(model).merge_and_unload())
    path = tmp_path / f"{arch}.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # LoKr q/k/v written as Full deltas on a fused qkv (noted)
        lyco.save_lycoris(model, path)  # the default style of a diffusers family: kohya
        loaded = lyco.load_lycoris(build(arch), path)
    keys = stems(path)
    assert TE_STEMS[arch] <= keys, sorted(k for k in keys if k.startswith("lora_te"))[:6]
    assert DENOISER_STEM[arch] in keys
    assert not any(k.startswith("lora_te") and "_encoder_layers_" in k and "text_model" not in k for k in keys)
    got = weights(loaded.merge_and_unload())
    assert max((got[k] - want[k]).abs().max().item() for k in want) < EXACT


def test_a_transformers5_clip_reads_kohya_files_with_text_model_names(tmp_path):
    """A file made for sd-scripts' CLIP (text_model. names) loads onto transformers 5's CLIPTextModel."""
    base = build("sd1").text_encoder
    model = lyco.get_model(copy.deepcopy(base), lyco.LoRAConfig(r=2, target_modules=leaves(base), init_weights=False))
    want = weights(copy.deepcopy(model).merge_and_unload())
    path = tmp_path / "te.safetensors"
    lyco.save_lycoris(model, path, style="kohya")
    assert "lora_te_text_model_encoder_layers_0_mlp_fc1" in stems(path)
    got = weights(lyco.load_lycoris(copy.deepcopy(base), path).merge_and_unload())
    assert max((got[k] - want[k]).abs().max().item() for k in want) < EXACT


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_original_style_of_a_unet_is_diffusion_model_and_ldm_names(arch, tmp_path):
    """Style ``original``: ComfyUI's native keys (``diffusion_model.`` + the LDM/SGM checkpoint names), SD1 too, in
    ai-toolkit's spelling (``lora_A`` / ``lora_B``, the scale folded, no ``.alpha``)."""
    base = build(arch).unet
    model = lyco.get_model(copy.deepcopy(base), lyco.LoRAConfig(r=2, target_modules=leaves(base), init_weights=False))
    want = weights(copy.deepcopy(model).merge_and_unload())
    path = tmp_path / "orig.safetensors"
    lyco.save_lycoris(model, path, style="original")
    keys = _module_stems(path)
    assert all(k.startswith("diffusion_model.") for k in keys)
    assert {"diffusion_model.input_blocks.0.0", "diffusion_model.middle_block.1.proj_in"} <= keys, sorted(keys)[:4]
    with safe_open(str(path), "pt") as f:
        assert "diffusion_model.input_blocks.0.0.lora_A.weight" in f.keys() and not any(k.endswith(".alpha") for k in f.keys())  # noqa: SIM118
    got = weights(lyco.load_lycoris(copy.deepcopy(base), path).merge_and_unload())
    assert max((got[k] - want[k]).abs().max().item() for k in want) < EXACT


def _module_stems(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
                for k in list(f.keys())}  # fmt: skip


def test_original_style_refuses_text_encoders_with_the_way_out(tmp_path):
    base = build("sd1")
    model = lyco.get_model(base, lyco.LoRAConfig(r=2, target_modules=leaves(base), init_weights=False))
    with pytest.raises(lyco.errors.FormatError, match="style 'kohya'"):
        lyco.save_lycoris(model, tmp_path / "x.safetensors", style="original")
    assert not (tmp_path / "x.safetensors").exists()
