"""diffusers as oracle for LoKr on tiny Flux.2 and Z-Image transformers (issue 14): lyco's files load through
diffusers' own loaders (``Flux2Pipeline`` / ``ZImagePipeline.load_lora_weights``, and the classmethod
``lora_state_dict`` + the model's ``load_lora_adapter``) with lyco's outputs, and PEFT LoKr adapters made and
saved by diffusers load into lyco with theirs.

Observed diffusers 0.42.1 behaviour these tests pin down (``loaders/lora_pipeline.py``,
``loaders/lora_conversion_utils.py``, ``utils/peft_utils.py``):

- Flux.2 reads a LoKr file as: ``lycoris_<path with _>`` (only the block sub-paths of
  ``_LYCORIS_FLUX2_SUBPATH_MAP``; ``x_embedder`` … are refused); BFL names under ``diffusion_model.`` or
  ``base_model.model.`` (``double_blocks.N.img_attn.qkv`` …, the double blocks' fused QKV mapped to
  ``to_qkv`` / ``to_added_qkv``, the model fused on load); bare dotted diffusers paths (SimpleTuner, with
  ``.alpha``); ``transformer.`` + dotted paths with *no* ``.alpha`` (diffusers' own save and lyco's ``diffusers`` style: scale baked).
- Z-Image reads: ``diffusion_model.`` + dotted diffusers paths (ai-toolkit) and bare dotted paths, both
  with ``.alpha``; ``transformer.`` + dotted paths with no ``.alpha``. No ``lycoris_`` / ``lora_unet_``.
- ``.alpha`` is baked as ``alpha / rank`` into ``lokr_w1`` (or ``lokr_w1_a``) when a factor is low rank and
  dropped when both are full; the injected PEFT config then has scale 1. With a ``lora_adapter_metadata``
  header (what diffusers saves) the PEFT ``LoKrConfig`` is rebuilt from it instead, alpha included.

The pipelines are built with every component ``None`` but the transformer: ``load_lora_weights`` then runs
diffusers' whole path (state-dict conversion, QKV fusion, config inference, PEFT injection).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lyco
from conftest import tiny_zimage

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors import safe_open  # noqa: E402

ATOL = 1e-5  # fp32: lyco and diffusers/PEFT agree to ~5e-7 here
MOVED = 1e-4  # every adapter must move the output by more than this, so a dropped adapter fails the test


# -- tiny models (from configs, no download) ---------------------------------------------------------
def tiny_flux2() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4),
    ).eval()  # fmt: skip


_g = torch.Generator().manual_seed(1)
_H = _W = 4
_S = 8
FLUX2_IN = {
    "hidden_states": torch.randn(1, _H * _W, 4, generator=_g),
    "encoder_hidden_states": torch.randn(1, _S, 32, generator=_g),
    "img_ids": torch.cartesian_prod(torch.arange(1), torch.arange(_H), torch.arange(_W), torch.arange(1))[None],
    "txt_ids": torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(_S))[None],
    "timestep": torch.tensor([0.5]),
    "guidance": torch.tensor([1.0]),
}
ZIMAGE_IN = {"x": [torch.randn(4, 1, _H, _W, generator=_g)], "cap_feats": [torch.randn(_S, 16, generator=_g)],
             "t": torch.tensor([0.5])}  # fmt: skip


def run_flux2(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**FLUX2_IN).sample


def run_zimage(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([t.flatten() for t in model(**ZIMAGE_IN).sample])  # one tensor per image


@dataclass(frozen=True)
class Arch:
    build: Any
    run: Any
    pipeline: Any  # the diffusers pipeline class whose LoRA loader mixin reads the files
    blocks: str  # regex (PEFT semantics: full match) of every Linear in the transformer blocks
    extras: str  # regex of Linears outside the blocks
    probe: str  # a 32×32 attention projection whose factor layout each config asserts


# Flux.2 double blocks have `attn.to_out` as a ModuleList (`to_out.0` is the Linear); single blocks a Linear.
FLUX2_BLOCKS = (r"transformer_blocks\.\d+\.(attn\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)"
                r"|ff(_context)?\.linear_(in|out))|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)")  # fmt: skip
FLUX2_EXTRAS = (r"x_embedder|context_embedder|proj_out|norm_out\.linear|time_guidance_embed\.timestep_embedder\.linear_2"
                r"|double_stream_modulation_(img|txt)\.linear|single_stream_modulation\.linear")  # fmt: skip
ZIMAGE_BLOCKS = r"(noise_refiner|context_refiner|layers)\.\d+\.(attention\.(to_[qkv]|to_out\.0)|feed_forward\.w[123]|adaLN_modulation\.0)"
ZIMAGE_EXTRAS = r"cap_embedder\.1|all_x_embedder\.2-1|all_final_layer\.2-1\.(linear|adaLN_modulation\.1)|t_embedder\.mlp\.2"

ARCHS = {
    "flux2": Arch(tiny_flux2, run_flux2, diffusers.Flux2Pipeline, FLUX2_BLOCKS, FLUX2_EXTRAS,
                  "transformer_blocks.0.attn.to_q"),
    "zimage": Arch(tiny_zimage, run_zimage, diffusers.ZImagePipeline, ZIMAGE_BLOCKS, ZIMAGE_EXTRAS,
                   "layers.0.attention.to_q"),
}  # fmt: skip

_BASES: dict[str, tuple[nn.Module, torch.Tensor]] = {}


def base(arch: str) -> tuple[nn.Module, torch.Tensor]:
    """A fresh copy of ``arch``'s base transformer and the base output (built once per module)."""
    if arch not in _BASES:
        model = ARCHS[arch].build()
        _BASES[arch] = (model, ARCHS[arch].run(model))
    model, out = _BASES[arch]
    return copy.deepcopy(model), out


def pipeline(arch: str, transformer: nn.Module):
    return ARCHS[arch].pipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)


def diffusers_load(arch: str, path: Path, route: str) -> nn.Module:
    """A fresh base transformer with the file at ``path`` loaded by diffusers, through the pipeline's
    ``load_lora_weights`` or through the classmethod ``lora_state_dict`` + the model's ``load_lora_adapter``."""
    transformer, _ = base(arch)
    if route == "pipeline":
        pipeline(arch, transformer).load_lora_weights(str(path), adapter_name="lyco")
    else:
        state_dict, metadata = ARCHS[arch].pipeline.lora_state_dict(str(path), return_lora_metadata=True)
        transformer.load_lora_adapter(state_dict, prefix="transformer", adapter_name="lyco", metadata=metadata)
    return transformer


def file_keys(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def params_of(keys: list[str], stem: str) -> set[str]:
    return {k[len(stem) + 1 :] for k in keys if k.startswith(stem + ".") and "." not in k[len(stem) + 1 :]}


def save(model: lyco.LycoModel, path: Path, style: str, prefix: str | None) -> None:
    with warnings.catch_warnings():  # style "lycoris": the AUTOMATIC1111 consumer note
        warnings.simplefilter("ignore", UserWarning)
        lyco.save_lycoris(model, path, style=style, prefix=prefix)


# -- LoKr factor layouts ------------------------------------------------------------------------------
# On a 32×32 projection (split 4×4 ⊗ 8×8; with factor 8, 8×8 ⊗ 4×4): (LoKrConfig kwargs, the probe's file params).
# alpha 3 ≠ r everywhere, so diffusers' alpha baking (or lyco's folding, both factors full) matters.
CONFIGS = {
    "w1_full_w2_lowrank": (dict(r=2, alpha=3), {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}),
    "both_full": (dict(r=16, alpha=3), {"lokr_w1", "lokr_w2", "alpha"}),
    "decompose_both": (dict(r=1, alpha=3, decompose_both=True), {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha"}),
    "decompose_both_factor8": (dict(r=2, alpha=3, decompose_both=True, decompose_factor=8),
                               {"lokr_w1_a", "lokr_w1_b", "lokr_w2", "alpha"}),
}  # fmt: skip

# The layouts of lyco files that diffusers reads: (arch, id, save_lycoris style, prefix, targets, key prefix).
LAYOUTS = [
    # LyCORIS underscore names, decoded by diffusers through its table of Flux.2 block sub-paths
    ("flux2", "lycoris", "lycoris", None, "blocks", "lycoris_"),
    # bare dotted diffusers paths + alpha (SimpleTuner-style), blocks and the modules outside them
    ("flux2", "bare_dotted", "diffusers", "", "all", ""),
    # ai-toolkit Z-Image: diffusion_model. + dotted diffusers paths + alpha
    ("zimage", "ai_toolkit", "diffusers", "diffusion_model.", "all", "diffusion_model."),
    ("zimage", "bare_dotted", "diffusers", "", "all", ""),
]
ROUTES = ["pipeline", "state_dict+load_lora_adapter"]


def targets(arch: str, which: str) -> str:
    a = ARCHS[arch]
    return a.blocks if which == "blocks" else f"{a.blocks}|{a.extras}"


def lyco_lokr(arch: str, config: dict, target_modules: str, fuse: bool = False) -> tuple[lyco.LycoModel, torch.Tensor]:
    model, base_out = base(arch)
    if fuse:
        model.fuse_qkv_projections()
    torch.manual_seed(2)
    model = lyco.get_model(model, lyco.LoKrConfig(target_modules=target_modules, init_weights=False, **config))
    out = ARCHS[arch].run(model)
    assert (out - base_out).abs().max() > MOVED
    return model, out


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize(("arch", "layout", "style", "prefix", "which", "key_prefix"), LAYOUTS,
                         ids=[f"{c[0]}-{c[1]}" for c in LAYOUTS])  # fmt: skip
def test_lyco_lokr_file_loads_in_diffusers(arch, layout, style, prefix, which, key_prefix, config, route, tmp_path):
    kwargs, probe_params = CONFIGS[config]
    model, out = lyco_lokr(arch, kwargs, targets(arch, which))
    path = tmp_path / f"{layout}.safetensors"
    save(model, path, style, prefix)
    keys = file_keys(path)
    probe = ARCHS[arch].probe
    stem = key_prefix + (probe.replace(".", "_") if style == "lycoris" else probe)
    assert params_of(keys, stem) == probe_params  # the file has the layout this case claims
    assert all(k.startswith(key_prefix) for k in keys)
    n_modules = len(list(model.adapted_layers()))
    assert len({k.rsplit(".", 1)[0] for k in keys}) == n_modules
    loaded = diffusers_load(arch, path, route)
    n_peft = sum(isinstance(m, peft.tuners.lokr.LoKrLayer) for m in loaded.modules())
    assert n_peft == n_modules  # every module injected (none silently skipped)
    torch.testing.assert_close(ARCHS[arch].run(loaded), out, atol=ATOL, rtol=0)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("config", ["w1_full_w2_lowrank", "both_full"])
def test_lyco_lokr_on_fused_flux2_qkv_loads_in_diffusers(config, route, tmp_path):
    """A LoKr on Flux.2's fused ``to_qkv`` / ``to_added_qkv`` (the user fuses the base first; a Kronecker delta
    does not split into Q/K/V) written as bare dotted paths: diffusers fuses a fresh unfused model on load."""
    model, out = lyco_lokr("flux2", CONFIGS[config][0], r"transformer_blocks\.\d+\.attn\.(to_qkv|to_added_qkv|to_out\.0)", fuse=True)
    path = tmp_path / "fused.safetensors"
    save(model, path, "diffusers", "")
    assert {k.rsplit(".", 1)[0] for k in file_keys(path)} == {
        "transformer_blocks.0.attn.to_qkv", "transformer_blocks.0.attn.to_added_qkv", "transformer_blocks.0.attn.to_out.0"}  # fmt: skip
    loaded = diffusers_load("flux2", path, route)
    assert loaded.transformer_blocks[0].attn.fused_projections
    torch.testing.assert_close(run_flux2(loaded), out, atol=ATOL, rtol=0)


# -- lyco's `diffusers` style (component prefix, dotted paths): no .alpha, the scale folded into the tensors, as
# diffusers' own `transformer.` LoKr layout (its loaders take alpha = r there)
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_lyco_diffusers_style_file_loads_in_diffusers(arch, route, tmp_path):
    model, out = lyco_lokr(arch, CONFIGS["w1_full_w2_lowrank"][0], ARCHS[arch].blocks)
    path = tmp_path / "diffusers.safetensors"
    save(model, path, "diffusers", None)
    assert all(k.startswith("transformer.") and not k.endswith(".alpha") for k in file_keys(path))
    loaded = diffusers_load(arch, path, route)
    torch.testing.assert_close(ARCHS[arch].run(loaded), out, atol=ATOL, rtol=0)


# diffusers reads Flux.2 keys under diffusion_model. (ai-toolkit) and base_model.model. as BFL names: lyco's style
# "original" writes BFL's fused layout there (double_blocks.N.img_attn.qkv, single_blocks.N.linear1 …). A LoKr on
# split to_q / to_k / to_v has no LoKr on the fused qkv (it would become a Full delta, which diffusers' LoKr route
# does not read): the user fuses the base first, as for the bare-dotted fused file above.
FLUX2_FUSED_BLOCKS = (r"transformer_blocks\.\d+\.(attn\.(to_qkv|to_added_qkv|to_out\.0|to_add_out)|ff(_context)?\.linear_(in|out))"
                      r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)")  # fmt: skip


@pytest.mark.parametrize("config", ["w1_full_w2_lowrank", "both_full"])
@pytest.mark.parametrize("prefix", [None, "base_model.model."], ids=["ai_toolkit", "peft_prefix"])
def test_lyco_flux2_bfl_layout_loads_in_diffusers(prefix, config, tmp_path):
    model, out = lyco_lokr("flux2", CONFIGS[config][0], FLUX2_FUSED_BLOCKS, fuse=True)
    path = tmp_path / "bfl.safetensors"
    save(model, path, "original", prefix)
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert any(".double_blocks.0.img_attn.qkv.lokr_w1" in k for k in keys), sorted(keys)[:5]
    loaded = diffusers_load("flux2", path, "pipeline")
    torch.testing.assert_close(run_flux2(loaded), out, atol=ATOL, rtol=0)
    fused = base("flux2")[0]
    fused.fuse_qkv_projections()
    reloaded = lyco.load_lycoris(fused, path)  # and back onto the fused diffusers model
    torch.testing.assert_close(run_flux2(reloaded), out, atol=ATOL, rtol=0)


# -- the reverse: PEFT LoKr made and saved by diffusers, loaded into lyco ------------------------------------
PEFT_CONFIGS = {  # peft.LoKrConfig kwargs (alpha = r: PEFT's default r=8, alpha=8 has it too)
    "w1_full_w2_lowrank": dict(r=2, alpha=2),
    "both_full": dict(r=16, alpha=16),
    "decompose_both": dict(r=1, alpha=1, decompose_both=True),
    "decompose_both_factor8": dict(r=2, alpha=2, decompose_both=True, decompose_factor=8),
}
PEFT_ALPHA_CONFIGS = {"w1_full_w2_lowrank_alpha5": dict(r=2, alpha=5), "both_full_alpha4": dict(r=16, alpha=4)}
SAVES = ["save_lora_adapter", "pipeline_save_lora_weights"]


def peft_lokr(arch: str, config: dict, tmp_path: Path, how: str) -> tuple[Path, torch.Tensor]:
    """A random PEFT LoKr added by diffusers' ``add_adapter``, saved by diffusers; (its file, its output)."""
    transformer, base_out = base(arch)
    torch.manual_seed(3)
    transformer.add_adapter(peft.LoKrConfig(target_modules=f"{ARCHS[arch].blocks}|{ARCHS[arch].extras}",
                                            init_weights=False, **config))  # fmt: skip
    out = ARCHS[arch].run(transformer)
    assert (out - base_out).abs().max() > MOVED
    folder = tmp_path / how
    if how == "save_lora_adapter":  # bare dotted keys (no prefix) + lora_adapter_metadata
        transformer.save_lora_adapter(str(folder))
    else:  # transformer. + dotted keys + transformer.-packed lora_adapter_metadata
        ARCHS[arch].pipeline.save_lora_weights(
            str(folder), transformer_lora_layers=get_peft_model_state_dict(transformer),
            transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
        )  # fmt: skip
    path = folder / "pytorch_lora_weights.safetensors"
    assert not any(k.endswith(".alpha") for k in file_keys(path))  # the scale lives in the header only
    return path, out


def lyco_load(arch: str, path: Path, how: str) -> lyco.LycoModel:
    model, _ = base(arch)
    # save_lora_adapter's keys have no prefix: with its lora_adapter_metadata header lyco reads them as the model's
    # own dotted paths (no prefix= needed)
    return lyco.load_lycoris(model, path)


@pytest.mark.parametrize("how", SAVES)
@pytest.mark.parametrize("config", list(PEFT_CONFIGS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_diffusers_peft_lokr_loads_in_lyco(arch, config, how, tmp_path):
    path, out = peft_lokr(arch, PEFT_CONFIGS[config], tmp_path, how)
    model = lyco_load(arch, path, how)
    assert len(list(model.adapted_layers())) == len({k.rsplit(".", 1)[0] for k in file_keys(path)})
    torch.testing.assert_close(ARCHS[arch].run(model), out, atol=ATOL, rtol=0)


@pytest.mark.parametrize("config", list(PEFT_ALPHA_CONFIGS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_diffusers_reloads_its_own_lokr_file_with_alpha(arch, config, tmp_path):
    """Oracle check for the next test: with alpha ≠ r, diffusers' file (no ``.alpha`` keys) still means PEFT's
    ``alpha / r`` — diffusers rebuilds the config from the ``lora_adapter_metadata`` header."""
    path, out = peft_lokr(arch, PEFT_ALPHA_CONFIGS[config], tmp_path, "pipeline_save_lora_weights")
    transformer, _ = base(arch)
    pipeline(arch, transformer).load_lora_weights(str(path))
    torch.testing.assert_close(ARCHS[arch].run(transformer), out, atol=ATOL, rtol=0)


@pytest.mark.parametrize("how", SAVES)
@pytest.mark.parametrize("config", list(PEFT_ALPHA_CONFIGS))
@pytest.mark.parametrize("arch", list(ARCHS))
def test_diffusers_peft_lokr_with_alpha_loads_in_lyco(arch, config, how, tmp_path):
    path, out = peft_lokr(arch, PEFT_ALPHA_CONFIGS[config], tmp_path, how)
    torch.testing.assert_close(ARCHS[arch].run(lyco_load(arch, path, how)), out, atol=ATOL, rtol=0)


def test_diffusers_peft_lokr_on_fused_flux2_qkv_loads_in_lyco(tmp_path):
    """A PEFT LoKr on fused ``to_qkv`` / ``to_added_qkv`` (what diffusers injects for a BFL file) loads into a
    base that is fused the same way."""
    transformer, base_out = base("flux2")
    transformer.fuse_qkv_projections()
    torch.manual_seed(3)
    transformer.add_adapter(peft.LoKrConfig(r=2, alpha=2, init_weights=False,
                                            target_modules=r"transformer_blocks\.\d+\.attn\.(to_qkv|to_added_qkv)"))  # fmt: skip
    out = run_flux2(transformer)
    assert (out - base_out).abs().max() > MOVED
    diffusers.Flux2Pipeline.save_lora_weights(str(tmp_path), transformer_lora_layers=get_peft_model_state_dict(transformer))
    fused, _ = base("flux2")
    fused.fuse_qkv_projections()
    model = lyco.load_lycoris(fused, tmp_path / "pytorch_lora_weights.safetensors")
    assert sorted(n for n, _ in model.adapted_layers()) == [
        "transformer_blocks.0.attn.to_added_qkv", "transformer_blocks.0.attn.to_qkv"]  # fmt: skip
    torch.testing.assert_close(run_flux2(model), out, atol=ATOL, rtol=0)
