"""The compatibility report (``lyco inspect``'s ``consumers``) against a consumer the suite can run: diffusers 0.42.1.

For lyco's files of tiny SD1, SDXL, SD3, Flux.1, Flux.2 and Z-Image models (every Linear / Conv2d of the denoiser
adapted) in the layouts whose keys map one module to one model path (style ``diffusers``; SD1 ``kohya``), the
modules :func:`~lyco.formats.consumers.consumer_report` says diffusers applies are exactly those
``Pipeline.load_lora_weights`` injects, and where it says diffusers refuses the file, diffusers raises. Plus the
model family a file is read as, diffusers' own LoRA files read by lyco, and what ``consumer_safe`` writes for
AUTOMATIC1111's SD3 loader (checked there by running its code outside the suite: the closing note of issue 14).
"""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from torch import nn

import lyco
from conftest import tiny_zimage
from lyco.formats.consumers import (
    A1111,
    A1111_SD3_KEYS,
    COMFYUI,
    DIFFUSERS,
    DIFFUSERS_DORA,
    LYCORIS,
    SDSCRIPTS,
    consumer_report,
    file_architecture,
)  # fmt: skip
from lyco.formats.fused import resolve, table_for
from lyco.formats.lycoris import read_lycoris_file
from lyco.formats.names import ModuleTable

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402

from test_pipeline_names import flux, sd1, sd3, sdxl  # noqa: E402

ATOL = 1e-5


def flux2() -> nn.Module:
    return diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=8, timestep_guidance_channels=8, axes_dims_rope=(2, 2, 2, 2))  # fmt: skip


# arch: (the bare denoiser, its component name, diffusers' pipeline class)
ARCHS = {
    "sd1": (lambda: sd1().unet, "unet", diffusers.StableDiffusionPipeline),
    "sdxl": (lambda: sdxl().unet, "unet", diffusers.StableDiffusionXLPipeline),
    "sd3": (lambda: sd3().transformer, "transformer", diffusers.StableDiffusion3Pipeline),
    "flux1": (lambda: flux().transformer, "transformer", diffusers.FluxPipeline),
    "flux2": (flux2, "transformer", diffusers.Flux2Pipeline),
    "zimage": (tiny_zimage, "transformer", diffusers.ZImagePipeline),
}
METHODS = {
    "lora": lambda t: lyco.LoRAConfig(r=2, alpha=3, target_modules=t, init_weights=False),
    "loha": lambda t: lyco.LoHaConfig(r=2, alpha=3, target_modules=t, init_weights=False),
    "lokr": lambda t: lyco.LoKrConfig(r=2, alpha=3, target_modules=t, init_weights=False, decompose_both=True),
    "dora": lambda t: lyco.LoRAConfig(r=2, alpha=3, target_modules=t, init_weights=False, weight_decompose=True,
                                      wd_on_out=False),
}


def leaves(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def saved(arch: str, method: str, style: str | None, path, **kwargs) -> lyco.LycoModel:
    make, _, _ = ARCHS[arch]
    torch.manual_seed(0)
    base = make().eval()
    model = lyco.get_model(base, METHODS[method](leaves(base)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lyco.save_lycoris(model, path, style=style, **kwargs)
    return model


def diffusers_injects(arch: str, path) -> dict[str, nn.Module]:
    """``Pipeline.load_lora_weights`` on a fresh denoiser (no other components): the model paths it gives an adapter
    layer (raises what diffusers raises)."""
    make, component, pipeline = ARCHS[arch]
    torch.manual_seed(0)
    denoiser = make().eval()
    params = inspect.signature(pipeline.__init__).parameters
    kwargs = {k: None for k, p in params.items() if k != "self" and p.default is inspect.Parameter.empty}
    kwargs[component] = denoiser
    if "requires_safety_checker" in params:
        kwargs["requires_safety_checker"] = False
    pipeline(**kwargs).load_lora_weights(str(path), adapter_name="lyco")
    return {n: m for n, m in denoiser.named_modules() if isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer)}


CASES = [(arch, "diffusers", method) for arch in ARCHS for method in METHODS] + [
    ("sd1", "kohya", method) for method in METHODS]  # fmt: skip


@pytest.mark.parametrize(("arch", "style", "method"), CASES, ids=["-".join(c) for c in CASES])
def test_report_matches_what_diffusers_injects(arch, style, method, tmp_path):
    path = tmp_path / "a.safetensors"
    model = saved(arch, method, style, path)
    af = read_lycoris_file(path)
    verdict = consumer_report(af)[DIFFUSERS]
    component = ARCHS[arch][1]
    # a stem → the model path it names (these layouts: one module each)
    paths = {stem: stem.removeprefix(f"{component}.") for stem in af.modules} if style == "diffusers" else {
        f"lora_unet_{n.replace('.', '_')}": n for n, _ in model.adapted_layers()}  # fmt: skip
    assert set(paths) == set(af.modules)
    try:
        injected = diffusers_injects(arch, path)
    except (ValueError, KeyError, IndexError, RuntimeError) as e:  # refused: the report says so for every module
        assert verdict.applied == 0 and set(verdict.skipped) == set(af.modules), (type(e).__name__, str(e)[:200])
        assert all("refuses the whole file" in why for why in verdict.skipped.values())
        return
    said = {paths[s] for s in af.modules if s not in verdict.skipped}
    assert said == set(injected)
    # DoRA modules: injected as plain LoRA (the magnitude dropped), as the report says
    dora = {paths[s] for s, why in verdict.different.items() if DIFFUSERS_DORA in why}
    assert dora == {paths[s] for s, m in af.modules.items() if m.dora is not None}
    assert not any(getattr(m, "use_dora", {}).get("lyco", False) for m in injected.values())


FUSED = [("flux2", "kohya"), ("flux2", "original"), ("zimage", "kohya"), ("zimage", "original"), ("sd1", "original")]


@pytest.mark.parametrize(("arch", "style"), FUSED, ids=["-".join(c) for c in FUSED])
def test_report_of_original_layouts_matches_what_diffusers_injects(arch, style, tmp_path):
    """Fused / original names (a stem may stand for several diffusers modules, ``formats.fused``'s table): the
    modules behind the stems the report says diffusers skips are exactly those diffusers leaves without adapter."""
    path = tmp_path / "a.safetensors"
    model = saved(arch, "lora", style, path)
    verdict = consumer_report(read_lycoris_file(path))[DIFFUSERS]
    adapted = {n for n, _ in model.adapted_layers()}
    table = table_for(model.model)
    behind = {g.fused: [s.path for s in g.segments] for g in resolve(table, ModuleTable.from_module(model.model)).groups} if table else {}
    prefix = "lora_unet_" if style == "kohya" else "diffusion_model."
    stems = {(prefix + f.replace(".", "_") if style == "kohya" else prefix + f): paths for f, paths in behind.items()}
    try:
        injected = set(diffusers_injects(arch, path))
    except ValueError:
        injected = set()
    if not table:  # a UNet's original (SGM / LDM) names: diffusers refuses such a file, the report says so
        assert not injected and verdict.applied == 0 and len(verdict.skipped) == len(adapted)
        return
    assert {p for s in verdict.skipped for p in stems.get(s, [None])} == adapted - injected
    assert verdict.applied + len(verdict.different) + len(verdict.skipped) == len(read_lycoris_file(path).modules)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("style", ["kohya", "original", "diffusers"])
def test_file_architecture_of_lyco_files(arch, style, tmp_path):
    """Read back without a model, lyco's files name their family — by their header and, without one, by the
    module names alone."""
    saved(arch, "lora", style, tmp_path / "a.safetensors")
    af = read_lycoris_file(tmp_path / "a.safetensors")
    assert file_architecture(af) == arch
    bare = lyco.formats.AdapterFile(af.modules, convention=af.convention, metadata={}, resolved=False)
    assert file_architecture(bare) == arch


def test_fold_scale_writes_the_sd3_lora_automatic1111_reads(tmp_path):
    """AUTOMATIC1111's SD3 loader fails on any ``<module>.alpha`` key and skips the whole file (run on its code: the
    closing note), while kohya sd-scripts' Flux / SD3 loaders and lycoris-lora raise on a module without one: the
    default file (with alphas) is reported refused by the first, ``fold_scale=True`` (the scale in the tensors, no
    ``.alpha``) by the others — the same ΔW either way."""
    model = saved("sd3", "lora", None, tmp_path / "a.safetensors")  # default style for SD3: kohya
    plain = consumer_report(read_lycoris_file(tmp_path / "a.safetensors"))
    assert plain[A1111].applied == 0 and set(plain[A1111].skipped.values()) == {A1111_SD3_KEYS}
    assert plain[SDSCRIPTS].loads_fully and plain[LYCORIS].loads_fully
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lyco.save_lycoris(model, tmp_path / "b.safetensors", fold_scale=True)
    keys = load_file(tmp_path / "b.safetensors")
    assert keys and not any(k.endswith(".alpha") for k in keys) and all(k.count(".") == 2 for k in keys)
    folded = consumer_report(read_lycoris_file(tmp_path / "b.safetensors"))
    assert folded[A1111].loads_fully and folded[COMFYUI].loads_fully
    assert {c for c in (SDSCRIPTS, LYCORIS) if folded[c].applied == 0} == {SDSCRIPTS, LYCORIS}
    names = [n for n, _ in model.adapted_layers()]
    merged = copy.deepcopy(model).merge_and_unload()
    torch.manual_seed(0)
    reloaded = lyco.load_lycoris(ARCHS["sd3"][0]().eval(), tmp_path / "b.safetensors").merge_and_unload()
    for n in names:
        torch.testing.assert_close(reloaded.get_submodule(n).weight, merged.get_submodule(n).weight, atol=ATOL, rtol=0)


def test_save_names_the_modules_a_consumer_of_the_style_drops(tmp_path):
    """Flux.1's default (kohya) file: diffusers' kohya converter keeps the blocks only; SD3's: AUTOMATIC1111 refuses
    it (``.alpha``) and diffusers converts no kohya SD3 file — each named with its modules when saving."""
    for arch, needles in (("flux1", ["diffusers' kohya Flux converter maps the blocks only", "lora_unet_final_layer_linear"]),
                          ("sd3", [A1111_SD3_KEYS, "diffusers converts no kohya SD3 file"])):  # fmt: skip
        make = ARCHS[arch][0]
        base = make().eval()
        model = lyco.get_model(base, METHODS["lora"](leaves(base)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            lyco.save_lycoris(model, tmp_path / f"{arch}.safetensors")
        (text,) = [str(w.message) for w in caught if "consumer shortfalls" in str(w.message)]
        assert all(n in text for n in needles), text


def test_diffusers_own_lora_file_loads_into_lyco(tmp_path):
    """A LoRA diffusers trains and saves itself (``add_adapter`` + ``save_lora_weights``: ``transformer.<path>.lora_A
    .weight``, the PEFT config in the header) loads into lyco with diffusers' outputs."""
    torch.manual_seed(0)
    transformer = tiny_zimage().eval()
    targets = [n for n in leaves(transformer) if ".attention." in n]
    transformer.add_adapter(peft.LoraConfig(r=2, lora_alpha=6, target_modules=targets, init_lora_weights=False))
    layers = peft.get_peft_model_state_dict(transformer)
    diffusers.ZImagePipeline.save_lora_weights(tmp_path, transformer_lora_layers=layers,
                                               transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())  # fmt: skip
    (path,) = tmp_path.glob("*.safetensors")
    assert any(k.endswith(".lora_A.weight") for k in load_file(path))
    torch.manual_seed(0)
    loaded = lyco.load_lycoris(tiny_zimage().eval(), path)
    assert {n for n, _ in loaded.adapted_layers()} == set(targets)
    for n in targets:
        theirs = transformer.get_submodule(n)
        want = theirs.get_base_layer().weight + theirs.get_delta_weight("default")
        got = copy.deepcopy(loaded).merge_and_unload().get_submodule(n).weight
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_cli_convert_fold_scale(tmp_path, capsys):
    """``lyco convert --fold-scale``: the same ΔW (convert reads the result back), no ``.alpha`` key; a PEFT
    directory has no such layout (an error, nothing written)."""
    from lyco import cli

    saved("sd3", "lora", None, tmp_path / "a.safetensors")
    assert cli.main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--style", "kohya",
                     "--fold-scale"]) == 0  # fmt: skip
    assert "max relative ΔW difference" in capsys.readouterr().out
    keys = load_file(tmp_path / "b.safetensors")
    assert keys and not any(k.endswith(".alpha") for k in keys)
    assert consumer_report(read_lycoris_file(tmp_path / "b.safetensors"))[A1111].loads_fully
    assert cli.main(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "dir"), "--to", "peft", "--fold-scale"]) == 1
    assert "--fold-scale" in capsys.readouterr().err and not (tmp_path / "dir").exists()
