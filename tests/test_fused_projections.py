"""Fused ↔ split projections for Flux.1 (issue 14, item 2): ``lyco.formats.fused`` on a tiny diffusers
``FluxTransformer2DModel``, every method, with diffusers' own kohya Flux converter as the independent oracle.

The expected fused layout is written out here again (``GOLDEN``, from diffusers 0.42.1's
``_convert_kohya_flux_lora_to_diffusers`` and ``convert_flux_transformer_checkpoint_to_diffusers``), not read
from the library's table. Observed diffusers 0.42.1 behaviour the oracle tests work around (and pin):

- ``_convert_kohya_flux_lora_to_diffusers`` splits ``single_blocks.N.linear1`` with hard-coded Flux.1-dev sizes
  ``[3072, 3072, 3072, 12288]`` (its BFL checkpoint converter hard-codes ``inner_dim = 3072`` too), so a tiny
  model's ``linear1`` cannot go through it: that split is checked at the real sizes on a synthetic LoRA.
- it returns the top-level modules (``x_embedder``, ``context_embedder``, ``time_text_embed.*``, ``norm_out.linear``,
  ``proj_out``) without the ``transformer.`` prefix, so ``load_lora_weights`` / ``load_lora_adapter(prefix=
  "transformer")`` silently drop them;
- it ignores the ``.alpha`` of ``final_layer.*`` (its "TODO: alphas"): those modules load at scale 1.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lyco
from lyco.errors import FormatError, ShapeMismatchError
from lyco.formats.adapterfile import AdapterFile, ModuleAdapter
from lyco.formats.fused import FLUX1, fuse, fused_name, resolve, split, split_name
from lyco.formats.lycoris import lycoris_state_dict
from lyco.formats.names import ModuleTable
from lyco.lycoris_files import adapter_file

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers  # noqa: E402

EXACT = 1e-6
ATOL = 1e-5
D = "transformer_blocks.0."
S = "single_transformer_blocks.0."
# BFL module → the diffusers rows it stacks, in order; (path, k) is the k-th half of that module's rows.
GOLDEN: dict[str, list[str | tuple[str, int]]] = {
    "double_blocks.0.img_attn.qkv": [D + "attn.to_q", D + "attn.to_k", D + "attn.to_v"],
    "double_blocks.0.txt_attn.qkv": [D + "attn.add_q_proj", D + "attn.add_k_proj", D + "attn.add_v_proj"],
    "double_blocks.0.img_attn.proj": [D + "attn.to_out.0"],
    "double_blocks.0.txt_attn.proj": [D + "attn.to_add_out"],
    "double_blocks.0.img_mlp.0": [D + "ff.net.0.proj"],
    "double_blocks.0.img_mlp.2": [D + "ff.net.2"],
    "double_blocks.0.txt_mlp.0": [D + "ff_context.net.0.proj"],
    "double_blocks.0.txt_mlp.2": [D + "ff_context.net.2"],
    "double_blocks.0.img_mod.lin": [D + "norm1.linear"],
    "double_blocks.0.txt_mod.lin": [D + "norm1_context.linear"],
    "single_blocks.0.linear1": [S + "attn.to_q", S + "attn.to_k", S + "attn.to_v", S + "proj_mlp"],
    "single_blocks.0.linear2": [S + "proj_out"],
    "single_blocks.0.modulation.lin": [S + "norm.linear"],
    "img_in": ["x_embedder"],
    "txt_in": ["context_embedder"],
    "time_in.in_layer": ["time_text_embed.timestep_embedder.linear_1"],
    "time_in.out_layer": ["time_text_embed.timestep_embedder.linear_2"],
    "vector_in.in_layer": ["time_text_embed.text_embedder.linear_1"],
    "vector_in.out_layer": ["time_text_embed.text_embedder.linear_2"],
    "guidance_in.in_layer": ["time_text_embed.guidance_embedder.linear_1"],
    "guidance_in.out_layer": ["time_text_embed.guidance_embedder.linear_2"],
    "final_layer.adaLN_modulation.1": [("norm_out.linear", 1), ("norm_out.linear", 0)],  # BFL: shift, scale
    "final_layer.linear": ["proj_out"],
}
MULTI = {f for f, parts in GOLDEN.items() if len(parts) > 1 and isinstance(parts[0], str)}  # stacks of modules
PERMUTED = "final_layer.adaLN_modulation.1"


def tiny_flux() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    ).eval()  # fmt: skip


BASE = tiny_flux()
SHAPES = ModuleTable.from_module(BASE)
LINEARS = [n for n, m in BASE.named_modules() if isinstance(m, nn.Linear)]
WEIGHTS = {n: BASE.get_submodule(n).weight.detach() for n in LINEARS}


def flux_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    rows, cols, txt = 2, 3, 3
    ids = torch.stack([torch.zeros(rows, cols), *torch.meshgrid(torch.arange(2.0), torch.arange(3.0), indexing="ij")], -1)
    return {
        "hidden_states": torch.randn(2, rows * cols, 4, generator=g),
        "encoder_hidden_states": torch.randn(2, txt, 16, generator=g),
        "pooled_projections": torch.randn(2, 8, generator=g),
        "timestep": torch.tensor([0.1, 0.7]),
        "guidance": torch.tensor([3.5, 2.0]),
        "img_ids": ids.reshape(-1, 3),
        "txt_ids": torch.zeros(txt, 3),
    }


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**flux_inputs()).sample


def golden_stack(fused: str, rows_of) -> torch.Tensor:
    """``rows_of(path)`` (rows first) stacked as ``GOLDEN`` says ``fused`` is."""
    out = []
    for part in GOLDEN[fused]:
        path, half = part if isinstance(part, tuple) else (part, None)
        t = rows_of(path)
        out.append(t if half is None else t.chunk(2)[half])
    return torch.cat(out)


def lyco_file(config: lyco.AdapterConfig, seed: int = 1) -> tuple[lyco.LycoModel, AdapterFile]:
    torch.manual_seed(seed)
    model = lyco.get_model(copy.deepcopy(BASE), config).eval()
    return model, adapter_file(model)


# -- the table ------------------------------------------------------------------------------------------
def test_flux1_layout_is_diffusers_mapping_and_covers_every_linear():
    layout = resolve(FLUX1, SHAPES)
    got = {g.fused: [(s.path, s.start, s.stop) for s in g.segments] for g in layout.groups}
    want = {}
    for fused, parts in GOLDEN.items():
        want[fused] = []
        for part in parts:
            path, half = part if isinstance(part, tuple) else (part, None)
            n = SHAPES.shapes[path][0]
            want[fused].append((path, 0, n) if half is None else (path, half * n // 2, (half + 1) * n // 2))
    assert got == want
    assert sorted(layout.by_split()) == sorted(LINEARS)  # every Linear of the model, each in one fused module
    assert layout.by_fused()["single_blocks.0.linear1"].fused_shape == (16 * 3 + 64, 16)


def test_names_of_one_to_one_modules():
    for fused, parts in GOLDEN.items():
        if len(parts) == 1:
            assert fused_name(parts[0]) == fused and split_name(fused) == parts[0]
    assert fused_name("transformer_blocks.7.attn.to_add_out") == "double_blocks.7.txt_attn.proj"
    assert split_name("single_blocks.12.modulation.lin") == "single_transformer_blocks.12.norm.linear"
    for path in (D + "attn.to_q", S + "proj_mlp", "norm_out.linear"):  # parts of a stack, rows that move
        assert fused_name(path) is None
    assert split_name("double_blocks.0.img_attn.qkv") is None and split_name(PERMUTED) is None


# -- every method: fuse is exact, split reverses it -------------------------------------------------------
def lora(**kw):
    return lyco.LoRAConfig(**{"r": 4, "alpha": 2, "target_modules": LINEARS, "init_weights": False, **kw})


# config, fused modules expected dense (besides none), split modules expected dense after split(fuse(...))
CASES = {
    # rank and alpha patterns: q, k, v differ in rank and scale (the scales are folded into the up blocks)
    "lora": (lora(rank_pattern={"to_k": 2}, alpha_pattern={"to_v": 8.0}), set()),
    "lora-dora-out": (lora(weight_decompose=True, rank_pattern={"add_k_proj": 3}), set()),
    "loha": (lyco.LoHaConfig(r=2, alpha=3, target_modules=LINEARS, init_weights=False, rank_pattern={"to_q": 3}), set()),
    "loha-dora-out": (lyco.LoHaConfig(r=2, alpha=1, target_modules=LINEARS, init_weights=False, weight_decompose=True), set()),
    # factor 4: norm_out.linear (32, 16) splits out 4 × 8, so its halves are whole w2 row blocks
    "lokr-aligned": (lyco.LoKrConfig(r=2, alpha=3, target_modules=LINEARS, init_weights=False, decompose_factor=4), MULTI),
    # factor 1: w2 has all 32 rows, a half is not a whole block
    "lokr-misaligned": (
        lyco.LoKrConfig(r=2, alpha=3, target_modules=LINEARS, init_weights=False, decompose_factor=1),
        MULTI | {PERMUTED},
    ),
    "full": (lyco.FullConfig(target_modules=LINEARS, init_weights=False), set()),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_fuse_is_exact_and_split_reverses_it(case):
    config, dense = CASES[case]
    _, af = lyco_file(config)
    algo = next(iter(af.algos()))
    fused, notes = fuse(af, SHAPES)
    assert sorted(fused.modules) == sorted(GOLDEN)
    for name, m in fused.modules.items():
        want = golden_stack(name, lambda p: af.modules[p].delta_weight())
        assert torch.allclose(m.delta_weight(), want, atol=EXACT, rtol=0), name
        bias = golden_stack(name, lambda p: af.modules[p].delta_bias()) if algo == "full" else None
        assert (m.delta_bias() is None) == (bias is None) and (bias is None or torch.allclose(m.delta_bias(), bias))
        assert m.algo == ("full" if name in dense else algo), name
    assert sorted(n.split(":")[0] for n in notes) == sorted(dense)
    assert all("written as Full" in n for n in notes)
    if case == "lora":
        qkv = fused.modules["double_blocks.0.img_attn.qkv"]
        assert qkv.rank == 4 + 2 + 4 and qkv.tensors["lora_up"].shape == (48, 10)  # block-diagonal: Σ ranks
        assert fused.modules[PERMUTED].rank == 4  # a permutation keeps the rank
    if "dora" in case:  # output-axis DoRA: the merged fused weight is the stack of the merged split weights
        for name, m in fused.modules.items():
            want = golden_stack(name, lambda p: af.modules[p].merged_weight(WEIGHTS[p]))
            got = m.merged_weight(golden_stack(name, WEIGHTS.__getitem__))
            assert torch.allclose(got, want, atol=EXACT, rtol=0), name

    back, notes_back = split(fused, SHAPES)
    assert sorted(back.modules) == sorted(af.modules) and not notes_back
    for name, m in back.modules.items():
        assert torch.allclose(m.delta_weight(), af.modules[name].delta_weight(), atol=EXACT, rtol=0), name
        if m.dora is not None:
            assert torch.allclose(m.merged_weight(WEIGHTS[name]), af.modules[name].merged_weight(WEIGHTS[name]), atol=EXACT)
        assert m.algo == ("full" if FLUX1_GROUP[name] in dense else algo), name


FLUX1_GROUP = {p if isinstance(p, str) else p[0]: f for f, parts in GOLDEN.items() for p in parts}


def test_input_axis_dora_is_kept_where_rows_stay_whole_and_needs_the_base_elsewhere():
    _, af = lyco_file(lora(weight_decompose=True, wd_on_out=False))
    with pytest.raises(FormatError, match=r"double_blocks\.0\.img_attn\.qkv.*input-axis DoRA.*base="):
        fuse(af, SHAPES)
    fused, notes = fuse(af, SHAPES, base=WEIGHTS)
    assert sorted(n.split(":")[0] for n in notes) == sorted(MULTI)
    for name, m in fused.modules.items():
        assert m.algo == ("full" if name in MULTI else "lora"), name
        assert (m.dora is not None) == (name not in MULTI)  # a permutation of all rows keeps column norms
        want = golden_stack(name, lambda p: af.modules[p].merged_weight(WEIGHTS[p]))
        got = m.merged_weight(golden_stack(name, WEIGHTS.__getitem__))
        assert torch.allclose(got, want, atol=EXACT, rtol=0), name

    # a fused input-axis DoRA module cut into its parts needs the fused base weight
    qkv = "double_blocks.0.img_attn.qkv"
    one = AdapterFile({qkv: ModuleAdapter("lora", {"lora_down": torch.randn(3, 16), "lora_up": torch.randn(48, 3),
                                                   "dora_scale": torch.rand(1, 16) + 1}, 2.0, (48, 16))})  # fmt: skip
    with pytest.raises(FormatError, match=r"transformer_blocks\.0\.attn\.to_q.*base=\{'double_blocks"):
        split(one, SHAPES)
    w_fused = golden_stack(qkv, WEIGHTS.__getitem__)
    parts, notes = split(one, SHAPES, base={qkv: w_fused})
    assert len(notes) == 3 and parts.algos() == {"full"}
    merged = one.modules[qkv].merged_weight(w_fused)
    assert torch.allclose(golden_stack(qkv, lambda p: parts.modules[p].merged_weight(WEIGHTS[p])), merged, atol=EXACT)


def lokr_qkv(w1: tuple[int, int], w2: tuple[int, int]) -> AdapterFile:
    torch.manual_seed(3)
    tensors = {"lokr_w1": torch.randn(*w1), "lokr_w2_a": torch.randn(w2[0], 2), "lokr_w2_b": torch.randn(2, w2[1])}
    return AdapterFile({"double_blocks.0.img_attn.qkv": ModuleAdapter("lokr", tensors, 1.5, (48, 16))})


@pytest.mark.parametrize(("w1", "w2", "exact"), [((12, 4), (4, 4), True), ((16, 4), (3, 4), False)],
                         ids=["aligned", "misaligned"])  # fmt: skip
def test_split_of_a_fused_lokr_is_a_lokr_when_aligned_to_w2_rows(w1, w2, exact):
    one = lokr_qkv(w1, w2)
    qkv = one.modules["double_blocks.0.img_attn.qkv"]
    parts, notes = split(one, SHAPES)
    assert list(parts.modules) == [D + "attn.to_q", D + "attn.to_k", D + "attn.to_v"]
    delta = qkv.delta_weight()
    for i, m in enumerate(parts.modules.values()):
        assert torch.allclose(m.delta_weight(), delta[16 * i : 16 * (i + 1)], atol=EXACT, rtol=0)
        assert m.algo == ("lokr" if exact else "full")
        if exact:
            assert m.tensors["lokr_w1"].shape == (4, 4) and m.scale() == qkv.scale()
    assert len(notes) == (0 if exact else 3)
    assert exact or "LoKr cannot hold rows 0:16 of double_blocks.0.img_attn.qkv" in notes[0]


def test_split_of_a_fused_lora_keeps_its_down_and_rank():
    torch.manual_seed(4)
    one = AdapterFile({"single_blocks.0.linear1": ModuleAdapter(
        "lora", {"lora_down": torch.randn(6, 16), "lora_up": torch.randn(112, 6)}, 3.0, (112, 16))})  # fmt: skip
    parts, notes = split(one, SHAPES)
    assert not notes and list(parts.modules) == [S + "attn.to_q", S + "attn.to_k", S + "attn.to_v", S + "proj_mlp"]
    assert [m.tensors["lora_up"].shape[0] for m in parts.modules.values()] == [16, 16, 16, 64]
    assert all(m.rank == 6 and m.alpha == 3.0 for m in parts.modules.values())
    whole = one.modules["single_blocks.0.linear1"].delta_weight()
    assert torch.allclose(torch.cat([m.delta_weight() for m in parts.modules.values()]), whole, atol=EXACT)


def test_missing_parts_are_zero_rows_and_mixed_methods_go_dense():
    _, af = lyco_file(lyco.LoRAConfig(r=2, target_modules=[D + "attn.to_q", D + "attn.to_v"], init_weights=False))
    fused, notes = fuse(af, SHAPES)
    qkv = fused.modules["double_blocks.0.img_attn.qkv"]
    assert not notes and qkv.rank == 4 and list(fused.modules) == ["double_blocks.0.img_attn.qkv"]
    zero = torch.zeros(16, 16)
    want = torch.cat([af.modules[D + "attn.to_q"].delta_weight(), zero, af.modules[D + "attn.to_v"].delta_weight()])
    assert torch.allclose(qkv.delta_weight(), want, atol=EXACT, rtol=0)

    _, loha = lyco_file(lyco.LoHaConfig(r=2, target_modules=[D + "attn.to_k"], init_weights=False))
    mixed = AdapterFile({**af.modules, **loha.modules})
    fused, notes = fuse(mixed, SHAPES)
    assert fused.modules["double_blocks.0.img_attn.qkv"].algo == "full" and "different methods (loha, lora)" in notes[0]
    want[16:32] = loha.modules[D + "attn.to_k"].delta_weight()
    assert torch.allclose(fused.modules["double_blocks.0.img_attn.qkv"].delta_weight(), want, atol=EXACT, rtol=0)


def test_errors_name_the_module():
    _, af = lyco_file(lora())
    stray = AdapterFile({**af.modules, "pos_embed.proj": af.modules["x_embedder"]})
    with pytest.raises(FormatError, match=r"1 module\(s\) \(pos_embed\.proj\) are not split-side .*Flux\.1"):
        fuse(stray, SHAPES)
    with pytest.raises(FormatError, match="keyed by module paths"):
        fuse(AdapterFile(af.modules, resolved=False), SHAPES)
    with pytest.raises(FormatError, match=r"30 module\(s\) \(time_text_embed.*, …\) are not fused-side"):
        split(af, SHAPES)
    other = copy.copy(af.modules["x_embedder"])
    other.weight_shape = (16, 5)
    with pytest.raises(ShapeMismatchError, match=r"'x_embedder'.*\(16, 5\)"):
        fuse(AdapterFile({"x_embedder": other}), SHAPES)


# -- diffusers as the oracle ------------------------------------------------------------------------------
NOT_LINEAR1 = [n for n in LINEARS if not n.startswith(S) or n.endswith(("proj_out", "norm.linear"))]
TOP_LEVEL = ("x_embedder", "context_embedder", "time_text_embed", "norm_out", "proj_out")


def kohya_lora_file() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The lyco model's output and its fused adapter in kohya's Flux keys (``lora_unet_<bfl path>``)."""
    config = lora(target_modules=NOT_LINEAR1, rank_pattern={"to_k": 2, "add_v_proj": 3}, alpha_pattern={"to_v": 8.0})
    model, af = lyco_file(config)
    fused, notes = fuse(af, SHAPES)
    assert not notes
    for name in ("final_layer.adaLN_modulation.1", "final_layer.linear"):  # diffusers ignores these alphas
        m = fused.modules[name]
        fused.modules[name] = m.with_scale_folded(m.scale(), float(m.rank))
    return run(model), lycoris_state_dict(fused, style="kohya", component="transformer")


def test_kohya_file_loads_into_diffusers_with_the_lyco_output():
    expected, sd = kohya_lora_file()
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight" in sd and "lora_unet_img_in.alpha" in sd
    converted = diffusers.FluxPipeline.lora_state_dict(dict(sd))
    assert not any(k.startswith("lora_unet_") for k in converted)
    converted = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in converted.items()}
    theirs = copy.deepcopy(BASE)
    theirs.load_lora_adapter(converted, prefix="transformer", adapter_name="fused")
    assert (expected - run(BASE)).abs().max() > 1e-3
    assert torch.allclose(run(theirs), expected, atol=ATOL, rtol=0)


def test_diffusers_drops_top_level_kohya_flux_modules():
    """Pins diffusers 0.42.1: through ``load_lora_weights``' own path the top-level modules get no LoRA, and the
    ``final_layer.*`` alphas are ignored."""
    _, sd = kohya_lora_file()
    converted = diffusers.FluxPipeline.lora_state_dict(dict(sd))
    theirs = copy.deepcopy(BASE)
    theirs.load_lora_adapter(converted, prefix="transformer", adapter_name="fused")
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in theirs.named_modules() if n.endswith(".lora_A")}
    assert adapted and not any(n.startswith(TOP_LEVEL) for n in adapted)
    assert all(n.startswith(("transformer_blocks.", "single_transformer_blocks.")) for n in adapted)
    # and final_layer.* load at scale 1 whatever their alpha says (img_in, a top-level module too, keeps its alpha)
    for stem in ("lora_unet_final_layer_linear", "lora_unet_img_in"):
        sd[f"{stem}.alpha"] = torch.tensor(sd[f"{stem}.lora_down.weight"].shape[0] / 2)
    converted = diffusers.FluxPipeline.lora_state_dict(dict(sd))
    for stem, path, scale in (("lora_unet_final_layer_linear", "proj_out", 1.0), ("lora_unet_img_in", "x_embedder", 0.5)):
        theirs = converted[f"{path}.lora_B.weight"] @ converted[f"{path}.lora_A.weight"]
        ours = sd[f"{stem}.lora_up.weight"] @ sd[f"{stem}.lora_down.weight"]
        assert torch.allclose(theirs, ours * scale, atol=EXACT), path


@pytest.mark.parametrize("ranks", [(4, 4, 4, 4), (4, 2, 3, 5)], ids=["equal-ranks", "unequal-ranks"])
def test_linear1_at_flux_dev_sizes_splits_as_diffusers_does(ranks):
    """diffusers' kohya converter splits a stacked ``linear1`` (block-diagonal up: its "sparse" path when the ranks
    are equal, else down copied to every part) into the same ΔW per module as lyco's ``split`` and the originals."""
    torch.manual_seed(5)
    names = [S + "attn.to_q", S + "attn.to_k", S + "attn.to_v", S + "proj_mlp"]
    shapes = dict(zip(names, [(3072, 8), (3072, 8), (3072, 8), (12288, 8)], strict=True))
    af = AdapterFile({
        n: ModuleAdapter("lora", {"lora_down": torch.randn(r, 8), "lora_up": torch.randn(s[0], r) / 8}, a, s)
        for (n, s), r, a in zip(shapes.items(), ranks, (2.0, 1.0, 8.0, 4.0), strict=True)
    })  # fmt: skip
    fused, _ = fuse(af, shapes)
    sd = lycoris_state_dict(fused, style="kohya", component="transformer")
    theirs = _convert_kohya_flux_lora_to_diffusers(dict(sd))
    back, notes = split(fused, shapes)
    assert not notes
    for n in names:
        key = f"transformer.{n}"
        delta = theirs[f"{key}.lora_B.weight"] @ theirs[f"{key}.lora_A.weight"]
        assert torch.allclose(delta, af.modules[n].delta_weight(), atol=EXACT, rtol=0), n
        assert torch.allclose(back.modules[n].delta_weight(), delta, atol=EXACT, rtol=0), n


# -- wired into save_lycoris / load_lycoris -------------------------------------------------------------------
@pytest.mark.parametrize("case", ["lora", "loha", "lokr-aligned", "full"])
def test_kohya_style_of_a_flux_model_is_bfls_fused_layout_and_reloads(case, tmp_path):
    """``save_lycoris(style="kohya")`` of a diffusers Flux.1 writes what sd-scripts writes (``lora_unet_`` + BFL
    paths, fused q,k,v and linear1); ``load_lycoris`` splits such a file back onto the diffusers model exactly."""
    from safetensors.torch import load_file

    model, _ = lyco_file(CASES[case][0])
    path = tmp_path / "flux.safetensors"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lyco.save_lycoris(model, path, style="kohya")
    stems = {k.split(".")[0] for k in load_file(path)}
    assert {"lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1",
            "lora_unet_final_layer_adaLN_modulation_1", "lora_unet_img_in"} <= stems  # fmt: skip
    assert not any("transformer_blocks" in s or "to_q" in s for s in stems)
    dense = [str(w.message) for w in caught if "Full deltas" in str(w.message)]
    assert bool(dense) == bool(CASES[case][1])  # only where the method cannot hold a stack (LoKr), noted
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the split note of a stacked LoKr
        loaded = lyco.load_lycoris(copy.deepcopy(BASE), path)
    assert {n for n, _ in loaded.adapted_layers()} == set(LINEARS)
    assert (run(model) - run(BASE)).abs().max() > 1e-4
    torch.testing.assert_close(run(loaded), run(model), atol=1e-5, rtol=0)


def test_cli_convert_to_kohya_with_a_flux_config_writes_the_fused_layout(tmp_path, capsys):
    """``lyco convert DIR OUT --style kohya --base config.json`` of a Flux.1 transformer fuses as save_lycoris does,
    and the file splits back onto the diffusers model exactly."""
    from lyco import cli

    model, _ = lyco_file(CASES["lora"][0])
    model.save_pretrained(tmp_path / "peft")
    BASE.save_config(tmp_path / "flux")
    out = tmp_path / "k.safetensors"
    assert cli.main(["convert", str(tmp_path / "peft"), str(out), "--style", "kohya",
                     "--base", str(tmp_path / "flux" / "config.json")]) == 0  # fmt: skip
    assert "original layout of FluxTransformer2DModel" in capsys.readouterr().out
    loaded = lyco.load_lycoris(copy.deepcopy(BASE), out)
    torch.testing.assert_close(run(loaded), run(model), atol=1e-5, rtol=0)
