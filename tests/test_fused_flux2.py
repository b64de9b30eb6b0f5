"""Fused ↔ split projections for Flux.2: ``lyco.formats.fused.FLUX2`` on tiny diffusers ``Flux2Transformer2DModel`` s,
with diffusers' own BFL checkpoint converter (``convert_flux2_transformer_checkpoint_to_diffusers``, 0.42.1) as the
independent oracle: a random checkpoint in BFL's layout (``double_blocks.N.img_attn.qkv``, ``single_blocks.N.linear1``
…, bare keys as BFL ships them) goes through the converter, and its diffusers weights must be exactly the rows the
table gives each split module. What the converter does besides renaming (and the table therefore holds):

- ``double_blocks.N.img_attn.qkv`` / ``txt_attn.qkv`` are cut into q, k, v thirds (``to_q`` … / ``add_q_proj`` …);
  after diffusers' ``fuse_qkv_projections()`` the model's ``to_qkv`` / ``to_added_qkv`` are those rows again, in
  order (the separate projections stay in the model, unused);
- ``final_layer.adaLN_modulation.1`` has its halves swapped (BFL: shift, scale; diffusers' ``norm_out``: scale, shift);
- everything else is renamed: the shared modulations (``double_stream_modulation_img.lin`` …, no per-block
  ``norm1.linear``), the SwiGLU MLPs (``img_mlp.0`` ↔ ``ff.linear_in``: gate rows, then up), and the single blocks'
  ``linear1`` / ``linear2``, which diffusers also keeps fused (``attn.to_qkv_mlp_proj``: q, k, v, MLP gate, MLP up;
  ``attn.to_out``); every layer is bias-free; the qk-norms (``….norm.query_norm.scale`` ↔ ``norm_q.weight`` …) are
  RMSNorm weights, no adapter.

Observed diffusers 0.42.1 adapter-loader behaviour the loader tests work around (and pin):

- the ai-toolkit converters of BFL-named adapters (``diffusion_model.<bfl path>``: LoRA as ``lora_A`` / ``lora_B``,
  LoKr with ``.alpha``) rename ``final_layer.adaLN_modulation.1`` to ``norm_out.linear`` without the swap their
  checkpoint converter does, so a file adapting it loads with the shift / scale halves of ``ΔW`` exchanged; the
  kohya converter (``lora_unet_<bfl path>``) drops it, the modulations and ``guidance_in`` (a logged warning only);
- a ``diffusion_model.`` file with ``lora_down`` / ``lora_up`` keys is taken for a kohya one (``".lora_down.weight"``
  is tested first) and loses every module; ai-toolkit LoRA files need ``lora_A`` / ``lora_B`` and no ``.alpha``
  (the converter leaves an ``.alpha`` key unconsumed and raises): the scale goes into ``lora_B``;
- (not tested) the checkpoint converter takes bare BFL keys only: a ``model.diffusion_model.``-prefixed checkpoint,
  which ``CHECKPOINT_KEY_NAMES["flux2"]`` does recognise, fails in it (``UnboundLocalError`` on ``new_q_name``).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lyco
from conftest import assert_split_reverses
from lyco.formats.fused import (
    FLUX2,
    TABLES,
    Fusion,
    Part,
    fuse,
    fused_name,
    fused_side,
    resolve,
    split,
    split_name,
    table_for,
)
from lyco.formats.lycoris import lycoris_state_dict, write_lycoris_file
from lyco.formats.names import ModuleTable
from lyco.lycoris_files import adapter_file

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from diffusers.loaders.lora_conversion_utils import (  # noqa: E402
    _convert_non_diffusers_flux2_lokr_to_diffusers,
    _convert_non_diffusers_flux2_lora_to_diffusers,
)
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers  # noqa: E402

EXACT = 1e-6
ATOL = 1e-5
MOVED = 1e-4
# the smallest valid sizes: 2 heads of 8 (4 rope axes of 2), inner dim 16, MLP 48 (SwiGLU: 96 rows in)
TINY = dict(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=8, timestep_guidance_channels=8, axes_dims_rope=(2, 2, 2, 2))  # fmt: skip
# dev: guidance embedder; klein: none; fused_qkv: dev after diffusers' fuse_qkv_projections()
VARIANTS = {"dev": {}, "klein": {"guidance_embeds": False}, "fused_qkv": {}}
D = "transformer_blocks.0.attn."
SEPARATE_QKV = [D + p for p in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")]
ADALN = "final_layer.adaLN_modulation.1"


def tiny(variant: str) -> nn.Module:
    torch.manual_seed(0)
    model = diffusers.Flux2Transformer2DModel(**TINY, **VARIANTS[variant]).eval()
    if variant == "fused_qkv":
        model.fuse_qkv_projections()
    return model


MODELS = {v: tiny(v) for v in VARIANTS}
SHAPES = {v: ModuleTable.from_module(m) for v, m in MODELS.items()}


def linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def adaptable(variant: str) -> list[str]:
    """The model's Linears that take part in its forward (a fused model's separate q, k, v do not)."""
    return [n for n in linears(MODELS[variant]) if variant != "fused_qkv" or n not in SEPARATE_QKV]


_g = torch.Generator().manual_seed(1)
_H, _W, _S = 2, 2, 3
INPUTS = {
    "hidden_states": torch.randn(1, _H * _W, 4, generator=_g),
    "encoder_hidden_states": torch.randn(1, _S, 8, generator=_g),
    "img_ids": torch.cartesian_prod(torch.arange(1), torch.arange(_H), torch.arange(_W), torch.arange(1))[None],
    "txt_ids": torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(_S))[None],
    "timestep": torch.tensor([0.5]),
    "guidance": torch.tensor([1.0]),
}


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**INPUTS).sample


# -- the table ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_flux2_layout_covers_every_linear_once(variant):
    layout = resolve(FLUX2, SHAPES[variant])
    paths = [p for g in layout.groups for p in g.paths]
    assert len(paths) == len(set(paths)) and sorted(paths) == sorted(adaptable(variant))
    by_fused = layout.by_fused()
    assert {g.fused for g in layout.groups if g.segments[0].start} == {ADALN}  # the only rows that move
    assert [(s.start, s.stop) for s in by_fused[ADALN].segments] == [(16, 32), (0, 16)]
    qkv = by_fused["double_blocks.0.img_attn.qkv"]
    assert qkv.fused_shape == (48, 16)
    assert qkv.paths == ([D + "to_qkv"] if variant == "fused_qkv" else [D + "to_q", D + "to_k", D + "to_v"])
    assert by_fused["single_blocks.0.linear1"].fused_shape == (3 * 16 + 2 * 48, 16)  # q, k, v, SwiGLU gate + up
    assert by_fused["double_stream_modulation_img.lin"].fused_shape == (2 * 3 * 16, 16)  # shared by the blocks
    assert ("guidance_in.in_layer" in by_fused) == (variant != "klein")
    assert TABLES["Flux2Transformer2DModel"] is FLUX2 and table_for(MODELS[variant]) is FLUX2


def test_flux2_names_of_one_to_one_modules():
    assert fused_name("single_transformer_blocks.7.attn.to_qkv_mlp_proj", FLUX2) == "single_blocks.7.linear1"
    assert fused_name("single_transformer_blocks.7.attn.to_out", FLUX2) == "single_blocks.7.linear2"
    assert fused_name("transformer_blocks.2.ff_context.linear_in", FLUX2) == "double_blocks.2.txt_mlp.0"
    assert fused_name("double_stream_modulation_txt.linear", FLUX2) == "double_stream_modulation_txt.lin"
    assert split_name("time_in.out_layer", FLUX2) == "time_guidance_embed.timestep_embedder.linear_2"
    assert split_name("final_layer.linear", FLUX2) == "proj_out"
    # a part of a stack, rows that move, and a q, k, v whose mapping depends on whether the model is fused
    for path in (D + "to_q", "norm_out.linear", D + "to_qkv"):
        assert fused_name(path, FLUX2) is None
    assert split_name("double_blocks.0.img_attn.qkv", FLUX2) is None


# -- diffusers' converter as the oracle --------------------------------------------------------------------------
# the qk-norm weights (no Linear) the converter also reads: diffusers' name in a block → BFL's
NORMS = {
    "transformer_blocks": {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                           "attn.norm_added_q": "txt_attn.norm.query_norm",
                           "attn.norm_added_k": "txt_attn.norm.key_norm"},
    "single_transformer_blocks": {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"},
}  # fmt: skip
BFL_BLOCKS = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks"}


def original_checkpoint(variant: str, weights: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A random BFL Flux.2 checkpoint of the tiny model (bare keys, as BFL's files): every fused module of
    ``fused_side`` (``weights`` where given) and the qk-norm scales. Bias-free, as the model."""
    g = torch.Generator().manual_seed(7)
    fused = fused_side(SHAPES[variant], FLUX2)
    assert fused is not None
    sd = {f"{name}.weight": (weights or {}).get(name, torch.randn(shape, generator=g)) for name, shape in fused.shapes.items()}
    for key, value in MODELS[variant].state_dict().items():
        blocks, block, rest = key.split(".", 2) if key.count(".") >= 2 else (key, "", "")
        norm = NORMS.get(blocks, {}).get(rest.removesuffix(".weight"))
        if norm is not None:
            sd[f"{BFL_BLOCKS[blocks]}.{block}.{norm}.scale"] = torch.rand(value.shape, generator=g)
    return sd


def converted_model(variant: str, checkpoint: dict[str, torch.Tensor]) -> nn.Module:
    """The tiny model with diffusers' conversion of ``checkpoint`` loaded (strict: every key converted, none
    missing); for ``fused_qkv`` the converted model then fused by diffusers."""
    theirs = convert_flux2_transformer_checkpoint_to_diffusers(dict(checkpoint))
    model = tiny("klein" if variant == "klein" else "dev")
    assert sorted(theirs) == sorted(model.state_dict())  # no BFL key left over, no weight missing
    model.load_state_dict(theirs, strict=True)
    if variant == "fused_qkv":
        model.fuse_qkv_projections()
    return model


def mismatches(table, variant: str) -> list[str]:
    """The fused modules whose converted rows are not where ``table`` puts them."""
    ckpt = original_checkpoint(variant)
    theirs = converted_model(variant, ckpt).state_dict()
    bad = []
    for g in resolve(table, SHAPES[variant]).groups:
        ours = torch.cat([theirs[f"{s.path}.weight"][s.start : s.stop] for s in g.segments])
        if not torch.equal(ours, ckpt[f"{g.fused}.weight"]):
            bad.append(g.fused)
    return sorted(bad)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_converter_puts_every_row_where_the_table_does(variant):
    assert mismatches(FLUX2, variant) == []


def test_the_oracle_sees_a_missing_swap_and_a_wrong_order():
    """The check is not vacuous: a table that renames the final adaLN in order, or stacks k before q, fails there."""
    fusions = []
    for f in FLUX2.fusions:
        if f.fused == ADALN:
            f = Fusion(ADALN, (Part("norm_out.linear"),))
        elif f.fused.endswith("img_attn.qkv") and len(f.parts) == 3:
            f = dataclasses.replace(f, parts=(f.parts[1], f.parts[0], f.parts[2]))
        fusions.append(f)
    naive = dataclasses.replace(FLUX2, name="naive", fusions=tuple(fusions))
    assert mismatches(naive, "dev") == sorted([ADALN, "double_blocks.0.img_attn.qkv"])
    assert mismatches(naive, "fused_qkv") == [ADALN]  # the fused model's to_qkv is a rename


# -- fuse / split: exact, checked through the converter ----------------------------------------------------------
def lora(targets):
    return lyco.LoRAConfig(r=4, alpha=2, target_modules=targets, init_weights=False, rank_pattern={"to_k": 2},
                           alpha_pattern={"to_v": 8.0, "add_q_proj": 1.0, "norm_out.linear": 3.0})  # fmt: skip


def loha(targets):
    return lyco.LoHaConfig(r=2, alpha=3, target_modules=targets, init_weights=False, rank_pattern={"to_q": 3})


def lokr(targets):
    return lyco.LoKrConfig(r=2, alpha=3, target_modules=targets, init_weights=False)


def lyco_model(variant: str, make, targets: list[str]) -> lyco.LycoModel:
    torch.manual_seed(1)
    model = lyco.get_model(copy.deepcopy(MODELS[variant]), make(targets)).eval()
    assert (run(model) - run(MODELS[variant])).abs().max() > MOVED
    return model


@pytest.mark.parametrize("variant", ["dev", "fused_qkv"])
@pytest.mark.parametrize("make", [lora, loha], ids=["lora", "loha"])
def test_fuse_is_exact_and_split_reverses_it(make, variant):
    shapes, targets = SHAPES[variant], adaptable(variant)
    af = adapter_file(lyco_model(variant, make, targets))
    assert sorted(af.modules) == sorted(targets)
    algo = next(iter(af.algos()))
    fused, notes = fuse(af, shapes, FLUX2)
    assert not notes and {m.algo for m in fused.modules.values()} == {algo}  # stacks and swaps stay in the method
    assert sorted(fused.modules) == sorted(fused_side(shapes, FLUX2).shapes)

    # the fused ΔWs as checkpoint weights: the converter's split of them is each module's own ΔW
    deltas = {name: m.delta_weight() for name, m in fused.modules.items()}
    theirs = converted_model(variant, original_checkpoint(variant, deltas)).state_dict()
    for path in targets:
        assert torch.allclose(theirs[f"{path}.weight"], af.modules[path].delta_weight(), atol=EXACT, rtol=0), path

    assert_split_reverses(fused, af, shapes, FLUX2, algo, EXACT)


def test_lokr_fuses_as_lokr_on_a_fused_model_and_dense_only_where_q_k_v_stack():
    """A Kronecker ΔW does not stack: on the split model the two q, k, v stacks are written as Full (noted), every
    other module, the swapped adaLN included, stays LoKr; on a QKV-fused model nothing stacks."""
    for variant, dense in (("dev", {"double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv"}), ("fused_qkv", set())):
        af = adapter_file(lyco_model(variant, lokr, adaptable(variant)))
        fused, notes = fuse(af, SHAPES[variant], FLUX2)
        assert {n.split(":")[0] for n in notes} == dense
        assert {n for n, m in fused.modules.items() if m.algo != "lokr"} == dense
        back, _ = split(fused, SHAPES[variant], FLUX2)
        for path, m in af.modules.items():
            assert torch.allclose(back.modules[path].delta_weight(), m.delta_weight(), atol=EXACT, rtol=0), path


# -- wired into save_lycoris / load_lycoris ---------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["dev", "fused_qkv"])
def test_kohya_style_of_flux2_is_the_bfl_layout_and_reloads(variant, tmp_path):
    """``save_lycoris(style="kohya")`` of a diffusers Flux.2 writes BFL's names (``lora_unet_double_blocks_0_img_attn_
    qkv`` …); ``load_lycoris`` splits the file back onto the diffusers model exactly."""
    model = lyco_model(variant, lora, adaptable(variant))
    path = tmp_path / "flux2.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # consumer notes of diffusers models
        lyco.save_lycoris(model, path, style="kohya")
    stems = {k.split(".")[0] for k in load_file(path)}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1",
            "lora_unet_final_layer_adaLN_modulation_1", "lora_unet_double_stream_modulation_img_lin"} <= stems  # fmt: skip
    assert not any("transformer_blocks" in s for s in stems)
    loaded = lyco.load_lycoris(copy.deepcopy(MODELS[variant]), path)
    assert {n for n, _ in loaded.adapted_layers()} == set(adaptable(variant))
    torch.testing.assert_close(run(loaded), run(model), atol=ATOL, rtol=0)


# -- diffusers' own adapter loaders (Flux2Pipeline.load_lora_weights) ------------------------------------------
def pipeline_load(path, variant: str = "dev") -> nn.Module:
    """A fresh base transformer with the file loaded by diffusers' whole path (conversion, QKV fusion, PEFT)."""
    transformer = copy.deepcopy(MODELS["dev" if variant == "fused_qkv" else variant])
    pipe = diffusers.Flux2Pipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.load_lora_weights(str(path), adapter_name="lyco")
    return transformer


def n_peft(model: nn.Module, layer=None) -> int:
    return sum(isinstance(m, layer or peft.tuners.tuners_utils.BaseTunerLayer) for m in model.modules())


def test_fused_lora_in_ai_toolkit_bfl_keys_loads_in_diffusers(tmp_path):
    """A LoRA of the diffusers model, fused, as ``diffusion_model.<bfl path>.lora_A`` / ``lora_B`` (scale in B):
    diffusers' ai-toolkit converter splits the q, k, v stacks back and its output is lyco's. The final adaLN is left
    out: that converter does not swap its halves (next test)."""
    targets = [t for t in adaptable("dev") if t != "norm_out.linear"]
    model = lyco_model("dev", lora, targets)
    fused, notes = fuse(adapter_file(model), SHAPES["dev"], FLUX2)
    assert not notes and "double_blocks.0.img_attn.qkv" in fused.modules
    sd = {}
    for name, m in fused.modules.items():
        sd[f"diffusion_model.{name}.lora_A.weight"] = m.tensors["lora_down"].contiguous()
        sd[f"diffusion_model.{name}.lora_B.weight"] = (m.tensors["lora_up"] * m.scale()).contiguous()
    save_file(sd, tmp_path / "ai_toolkit.safetensors")
    loaded = pipeline_load(tmp_path / "ai_toolkit.safetensors")
    assert n_peft(loaded, peft.tuners.lora.LoraLayer) == len(targets)
    torch.testing.assert_close(run(loaded), run(model), atol=ATOL, rtol=0)

    # the same file with kohya's lora_down / lora_up names is read as a kohya file, and loses every module
    kohya_named = {k.replace("lora_A", "lora_down").replace("lora_B", "lora_up"): v for k, v in sd.items()}
    assert diffusers.Flux2Pipeline.lora_state_dict(kohya_named) == {}


def test_kohya_style_file_of_flux2_loads_in_diffusers(tmp_path):
    """``save_lycoris(style="kohya")`` (``lora_unet_<bfl path>`` + ``.alpha``) through diffusers' kohya Flux.2
    converter, on the modules it maps (it drops the modulations, ``guidance_in`` and the final adaLN)."""
    kept = r"^(transformer_blocks|single_transformer_blocks)\.|^(x_embedder|context_embedder|proj_out)$|timestep_embedder"
    targets = [t for t in adaptable("dev") if re.search(kept, t)]
    model = lyco_model("dev", lora, targets)
    path = tmp_path / "kohya.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lyco.save_lycoris(model, path, style="kohya")
    assert "lora_unet_double_blocks_0_img_attn_qkv.alpha" in load_file(path)
    loaded = pipeline_load(path)
    assert n_peft(loaded, peft.tuners.lora.LoraLayer) == len(targets)
    torch.testing.assert_close(run(loaded), run(model), atol=ATOL, rtol=0)

    # what the kohya converter drops of a file adapting every module (it logs a warning, nothing more)
    every = lycoris_state_dict(fuse(adapter_file(lyco_model("dev", lora, adaptable("dev"))), SHAPES["dev"], FLUX2)[0],
                               style="kohya", component="transformer")  # fmt: skip
    kept_modules = {k.removeprefix("transformer.").rsplit(".", 2)[0] for k in diffusers.Flux2Pipeline.lora_state_dict(every)}
    assert set(adaptable("dev")) - kept_modules == {
        "time_guidance_embed.guidance_embedder.linear_1", "time_guidance_embed.guidance_embedder.linear_2",
        "double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
        "single_stream_modulation.linear", "norm_out.linear"}  # fmt: skip


def test_fused_lokr_of_a_qkv_fused_model_loads_in_diffusers(tmp_path):
    """A LoKr of a QKV-fused diffusers model (``to_qkv`` …, what diffusers itself injects a BFL LoKr into), fused
    into BFL names (all renames: stays LoKr) and written as ``diffusion_model.<bfl path>`` + ``.alpha``: diffusers
    fuses a fresh model on load and its output is lyco's (the final adaLN left out, as above)."""
    targets = [t for t in adaptable("fused_qkv") if t != "norm_out.linear"]
    model = lyco_model("fused_qkv", lokr, targets)
    fused, notes = fuse(adapter_file(model), SHAPES["fused_qkv"], FLUX2)
    assert not notes and fused.algos() == {"lokr"}
    path = tmp_path / "bfl_lokr.safetensors"
    write_lycoris_file(fused, path, style="diffusers", prefix="diffusion_model.")
    assert "diffusion_model.double_blocks.0.img_attn.qkv.alpha" in load_file(path)
    loaded = pipeline_load(path, "fused_qkv")
    assert loaded.transformer_blocks[0].attn.fused_projections
    assert n_peft(loaded, peft.tuners.lokr.LoKrLayer) == len(targets)
    torch.testing.assert_close(run(loaded), run(model), atol=ATOL, rtol=0)


def test_diffusers_adapter_converters_do_not_swap_the_final_adaln():
    """Pins diffusers 0.42.1: the checkpoint converter swaps ``final_layer.adaLN_modulation.1``'s halves (the
    table does too), its BFL LoRA / LoKr converters keep the rows in order."""
    layout = resolve(FLUX2, SHAPES["dev"]).by_fused()[ADALN]
    g = torch.Generator().manual_seed(3)
    up, down = torch.randn(32, 2, generator=g), torch.randn(2, 16, generator=g)
    key = f"diffusion_model.{ADALN}"
    theirs = _convert_non_diffusers_flux2_lora_to_diffusers({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up})
    assert torch.equal(theirs["transformer.norm_out.linear.lora_B.weight"], up)  # not swapped
    assert not torch.equal(up[layout.rows_in_fused("norm_out.linear")], up)  # where the table puts the rows
    w1, w2 = torch.randn(2, 2, generator=g), torch.randn(16, 16, generator=g)
    theirs = _convert_non_diffusers_flux2_lokr_to_diffusers({f"{key}.lokr_w1": w1, f"{key}.lokr_w2": w2})
    assert torch.equal(theirs["transformer.norm_out.linear.lokr_w1"], w1)
