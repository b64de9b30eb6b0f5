"""Fused ↔ split projections for SD3 / SD3.5: ``lyco.formats.fused.SD3`` on tiny diffusers ``SD3Transformer2DModel`` s,
with diffusers' own MMDiT checkpoint converter (``convert_sd3_transformer_checkpoint_to_diffusers``, 0.42.1) as the
independent oracle: a random checkpoint in the original layout (the names kohya sd-scripts trains and writes as
``lora_unet_<path>``) goes through the converter, and its diffusers weights must be exactly the rows the table gives
each split module. What the converter does besides renaming (and the table therefore holds):

- ``x_block`` / ``context_block.attn.qkv`` and SD3.5's ``x_block.attn2.qkv`` are cut into q, k, v thirds;
- ``final_layer.adaLN_modulation.1`` has its halves swapped (MMDiT: shift, scale; diffusers: scale, shift);
- so has the last joint block's ``context_block.adaLN_modulation.1`` (2 chunks: its context stream stops after the
  attention, diffusers' ``context_pre_only``, which has no ``attn.to_add_out`` / ``ff_context``); the other blocks'
  6-chunk adaLNs and SD3.5's 9-chunk x adaLN keep their order;
- the qk-norms (``ln_q`` / ``ln_k`` → ``norm_q`` / ``norm_k`` / ``norm_added_*``) are RMSNorm weights, no adapter.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import lyco
from conftest import assert_split_reverses
from lyco.formats.fused import SD3, Fusion, Part, fuse, fused_name, fused_side, resolve, split_name
from lyco.formats.names import ModuleTable
from lyco.lycoris_files import adapter_file

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers  # noqa: E402

EXACT = 1e-6
TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=8, out_channels=4,
            pos_embed_max_size=8)  # fmt: skip
VARIANTS = {"sd3": {}, "sd3.5": {"dual_attention_layers": (0,), "qk_norm": "rms_norm"}}
# the fused modules whose rows the converter reorders (halves swapped); block 1 is the last one
PERMUTED = {"final_layer.adaLN_modulation.1", "joint_blocks.1.context_block.adaLN_modulation.1"}


def tiny(variant: str) -> nn.Module:
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(**TINY, **VARIANTS[variant]).eval()


MODELS = {v: tiny(v) for v in VARIANTS}
SHAPES = {v: ModuleTable.from_module(m) for v, m in MODELS.items()}


def adaptable(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


# -- the table ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sd3_layout_covers_every_linear_and_conv_once(variant):
    layout = resolve(SD3, SHAPES[variant])
    paths = [p for g in layout.groups for p in g.paths]
    assert len(paths) == len(set(paths)) and sorted(paths) == sorted(adaptable(MODELS[variant]))
    assert "x_embedder.proj" in layout.by_fused() and layout.by_fused()["x_embedder.proj"].fused_shape == (16, 4, 2, 2)
    permuted = {g.fused for g in layout.groups if g.segments[0].start}
    assert permuted == PERMUTED
    last = layout.by_fused()["joint_blocks.1.context_block.adaLN_modulation.1"]
    assert [(s.start, s.stop) for s in last.segments] == [(16, 32), (0, 16)]  # 2 chunks of 16: swapped
    first = layout.by_fused()["joint_blocks.0.context_block.adaLN_modulation.1"]
    assert [(s.start, s.stop) for s in first.segments] == [(0, 96)]  # 6 chunks, in order
    assert ("joint_blocks.0.x_block.attn2.qkv" in layout.by_fused()) == (variant == "sd3.5")
    assert layout.by_fused()["joint_blocks.0.x_block.adaLN_modulation.1"].fused_shape[0] == (
        9 if variant == "sd3.5" else 6
    ) * 16


def test_sd3_names_of_one_to_one_modules():
    assert fused_name("transformer_blocks.5.attn.to_out.0", SD3) == "joint_blocks.5.x_block.attn.proj"
    assert fused_name("transformer_blocks.5.attn2.to_out.0", SD3) == "joint_blocks.5.x_block.attn2.proj"
    assert fused_name("pos_embed.proj", SD3) == "x_embedder.proj"
    assert fused_name("context_embedder", SD3) == "context_embedder"
    assert split_name("joint_blocks.2.context_block.mlp.fc2", SD3) == "transformer_blocks.2.ff_context.net.2"
    assert split_name("final_layer.linear", SD3) == "proj_out"
    # a part of a stack, rows that move, and a module whose mapping depends on its block (last or not)
    for path in ("transformer_blocks.0.attn.to_q", "norm_out.linear", "transformer_blocks.0.norm1_context.linear"):
        assert fused_name(path, SD3) is None
    assert split_name("joint_blocks.0.context_block.adaLN_modulation.1", SD3) is None


# -- diffusers' converter as the oracle --------------------------------------------------------------------------
def original_checkpoint(variant: str, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A random MMDiT checkpoint of the tiny model, keyed as Stability's files are (``model.diffusion_model.``):
    every fused module of ``fused_side`` (``weights`` where given), biases, ``pos_embed`` and the qk-norms."""
    model, g = MODELS[variant], torch.Generator().manual_seed(7)
    fused = fused_side(SHAPES[variant], SD3)
    assert fused is not None
    sd = {}
    for name, shape in fused.shapes.items():
        sd[f"{name}.weight"] = (weights or {}).get(name, torch.randn(shape, generator=g))
        sd[f"{name}.bias"] = torch.randn(shape[0], generator=g)
    sd["pos_embed"] = torch.randn(model.pos_embed.pos_embed.shape, generator=g)
    norms = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
             "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
             "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}  # fmt: skip
    for key, value in model.state_dict().items():
        block, _, rest = key.removeprefix("transformer_blocks.").partition(".")
        if key.startswith("transformer_blocks.") and rest.removesuffix(".weight") in norms:
            sd[f"joint_blocks.{block}.{norms[rest.removesuffix('.weight')]}.weight"] = torch.rand(value.shape, generator=g)
    return {f"model.diffusion_model.{k}": v for k, v in sd.items()}


def converted(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    left = dict(checkpoint)
    out = convert_sd3_transformer_checkpoint_to_diffusers(left)
    assert not left, f"the converter left {sorted(left)}"  # every fused module is one the converter reads
    return out


def mismatches(table, variant: str) -> list[str]:
    """The fused modules whose converted rows are not where ``table`` puts them (weights and biases)."""
    ckpt = original_checkpoint(variant)
    theirs = converted(ckpt)
    bad = []
    for g in resolve(table, SHAPES[variant]).groups:
        for param in ("weight", "bias"):
            ours = torch.cat([theirs[f"{s.path}.{param}"][s.start : s.stop] for s in g.segments])
            if not torch.equal(ours, ckpt[f"model.diffusion_model.{g.fused}.{param}"]):
                bad.append(g.fused)
    return sorted(set(bad))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converter_puts_every_row_where_the_table_does(variant):
    theirs = converted(original_checkpoint(variant))
    model = copy.deepcopy(MODELS[variant])
    assert sorted(theirs) == sorted(model.state_dict())
    model.load_state_dict(theirs, strict=True)  # the checkpoint is a real one of this model
    assert mismatches(SD3, variant) == []


def test_the_oracle_sees_a_missing_swap():
    """The check is not vacuous: a table that renames the adaLNs in order fails exactly on the swapped ones."""
    plain = tuple(
        Fusion(f.fused, (Part(f.parts[0].path),)) if f.fused.endswith("adaLN_modulation.1") else f
        for f in SD3.fusions
        if not (f.fused.endswith("context_block.adaLN_modulation.1") and f.only_with is not None)
    )
    naive = dataclasses.replace(SD3, name="naive", fusions=plain)
    assert mismatches(naive, "sd3.5") == sorted(PERMUTED)


# -- fuse / split: exact, checked through the converter ----------------------------------------------------------
def lora(targets):
    return lyco.LoRAConfig(r=4, alpha=2, target_modules=targets, init_weights=False, rank_pattern={"to_k": 2},
                           alpha_pattern={"to_v": 8.0, "add_q_proj": 1.0})  # fmt: skip


def loha(targets):
    return lyco.LoHaConfig(r=2, alpha=3, target_modules=targets, init_weights=False, rank_pattern={"to_q": 3})


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("make", [lora, loha], ids=["lora", "loha"])
def test_fuse_is_exact_and_split_reverses_it(make, variant):
    base, shapes = MODELS[variant], SHAPES[variant]
    targets = adaptable(base)
    torch.manual_seed(1)
    af = adapter_file(lyco.get_model(copy.deepcopy(base), make(targets)).eval())
    assert sorted(af.modules) == sorted(targets)
    algo = next(iter(af.algos()))
    fused, notes = fuse(af, shapes, SD3)
    assert not notes and {m.algo for m in fused.modules.values()} == {algo}  # stacks and swaps stay in the method
    assert sorted(fused.modules) == sorted(fused_side(shapes, SD3).shapes)
    qkv = fused.modules["joint_blocks.0.x_block.attn.qkv"]
    assert qkv.weight_shape == (48, 16)

    # the fused ΔWs as checkpoint weights: the converter's split of them is each module's own ΔW
    deltas = {name: m.delta_weight() for name, m in fused.modules.items()}
    theirs = converted(original_checkpoint(variant, deltas))
    for path in targets:
        want = af.modules[path].delta_weight()
        assert torch.allclose(theirs[f"{path}.weight"], want, atol=EXACT, rtol=0), path

    assert_split_reverses(fused, af, shapes, SD3, algo, EXACT)


def test_a_table_mapping_a_module_twice_is_refused():
    from lyco.errors import FormatError

    both = tuple(dataclasses.replace(f, only_with=None, only_without=None) for f in SD3.fusions)
    with pytest.raises(FormatError, match=r"two fusions make joint_blocks\.0\.context_block\.adaLN_modulation\.1"):
        resolve(dataclasses.replace(SD3, fusions=both), SHAPES["sd3"])


# -- wired into save_lycoris / load_lycoris ---------------------------------------------------------------------
def sd3_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([10, 500]),
            "encoder_hidden_states": torch.randn(2, 5, 16, generator=g),
            "pooled_projections": torch.randn(2, 8, generator=g)}  # fmt: skip


def sd3_run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**sd3_inputs()).sample


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("make", [lora, loha], ids=["lora", "loha"])
def test_kohya_style_of_sd3_is_the_mmdit_layout_and_reloads(make, variant, tmp_path):
    """``save_lycoris(style="kohya")`` of a diffusers SD3 writes sd-scripts' names (``lora_unet_joint_blocks_N_x_block_
    attn_qkv`` …: the MMDiT it trains on); ``load_lycoris`` splits the file back onto the diffusers model exactly."""
    import copy
    import warnings

    from safetensors.torch import load_file

    base = MODELS[variant]
    model = lyco.get_model(copy.deepcopy(base), make(adaptable(base)))
    path = tmp_path / "sd3.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # consumer notes of diffusers models
        lyco.save_lycoris(model, path, style="kohya")
    stems = {k.split(".")[0] for k in load_file(path)}
    assert {"lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_joint_blocks_1_context_block_adaLN_modulation_1",
            "lora_unet_final_layer_linear", "lora_unet_x_embedder_proj"} <= stems  # fmt: skip
    assert not any("transformer_blocks" in s for s in stems)
    loaded = lyco.load_lycoris(copy.deepcopy(base), path)
    assert {n for n, _ in loaded.adapted_layers()} == set(adaptable(base))
    assert (sd3_run(model) - sd3_run(base)).abs().max() > 1e-4
    torch.testing.assert_close(sd3_run(loaded), sd3_run(model), atol=1e-5, rtol=0)
