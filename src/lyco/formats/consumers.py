"""What the tools that apply adapter files do with one of lyco's files, where they are known to fall short.

Checked by running their own weight code on lyco's files (docs/architecture.md, "Consumers checked"):
ComfyUI fe25114 and AUTOMATIC1111 v1.10.1 (82a973c; its Lora extension as on dev 1937682). Each finding is one
sentence naming the consumer; :func:`consumer_warnings` groups the modules of a file under each. Method-specific
findings come from the method (:meth:`~lyco.methods.schema.MethodSchema.consumer_issues`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from .adapterfile import AdapterFile
from .keys import match_convention, model_components

DORA_OUTPUT_AXIS = (
    "ComfyUI and Forge divide an output-axis DoRA magnitude by ‖W‖ instead of ‖W + s·ΔW‖ and AUTOMATIC1111 always "
    "takes input-column norms, so they apply another ΔW than lyco, lycoris-lora and PEFT — train with wd_on_out=False "
    "(input axis: they all apply it exactly) for files meant for them"
)
LYCORIS_NAMES = (
    "AUTOMATIC1111 maps only kohya key names (lora_unet_…, lora_te_…): a file in style 'lycoris' changes nothing "
    "there — save with style='kohya' for it"
)


def consumer_warnings(af: AdapterFile, style: str | None = None, written: AdapterFile | None = None) -> list[str]:
    """The known consumer shortfalls ``af`` (written in ``style``, when given) runs into: one line per finding,
    with the number of modules and the first few names. ``written``: the file as read back without a model (its
    key stems): adds what :func:`consumer_report` finds a consumer drops or misapplies in that layout (not what a
    consumer reads no file of: another key style, another model family)."""
    found: dict[str, list[str]] = {}
    for name, m in af.modules.items():
        issues = list(m.method.consumer_issues(m.shapes()))
        if m.dora is not None and m.dora_on_out(m.weight_shape):
            issues.append(DORA_OUTPUT_AXIS)
        for issue in issues:
            found.setdefault(issue, []).append(name)
    findings = _findings(written) if written is not None else ()
    # as the report lists them: per consumer, the modules it skips before those it applies differently
    for consumer, stem, skipped, different in sorted(findings, key=lambda f: (CONSUMERS.index(f[0]), not f[2])):
        for reason in [skipped] if skipped else different:
            if reason in _SHORTFALLS:
                key = reason if reason.startswith(consumer.split()[0]) else f"{consumer}: {reason}"
                found.setdefault(key, []).append(stem)
    lines = [f"{len(names)} module(s) ({', '.join(names[:3])}{', …' if len(names) > 3 else ''}): {issue}"
             for issue, names in found.items()]  # fmt: skip
    if style == "lycoris" and af.modules:
        lines.append(LYCORIS_NAMES)
    return lines


def diffusion_model(model: object) -> bool:
    """Whether ``model`` (or its ``unet`` / ``transformer``) is a diffusers model: its files go to the tools above."""
    return any(type(m).__module__.startswith("diffusers.") for m in model_components(model))


# Families whose consumers read another style best: Z-Image's (ComfyUI, diffusers) both map diffusers' names under
# transformer. (ComfyUI slicing its fused qkv), every method included; its kohya layout (lora_unet_ + the original
# fused attention.qkv) holds a LoKr on to_q / to_k / to_v only as a Full delta, and diffusers' LoKr route skips it.
_FAMILY_STYLE = {"ZImageTransformer2DModel": "diffusers"}


def default_style(model: object) -> str:
    """The key style whose files ``model``'s consumers load fully: ``kohya`` for diffusers models (the one style
    ComfyUI, AUTOMATIC1111/Forge, kohya sd-scripts and diffusers' kohya converters all map; ``diffusers`` for
    Z-Image), else ``lycoris`` (lycoris-lora's wrapper; LLM tooling reads PEFT folders)."""
    for inner in model_components(model):
        if type(inner).__name__ in _FAMILY_STYLE:
            return _FAMILY_STYLE[type(inner).__name__]
    return "kohya" if diffusion_model(model) else "lycoris"


# -- the compatibility report (lyco inspect): per consumer, which modules it matches and applies as lyco does ---
COMFYUI, A1111, FORGE, SDSCRIPTS, LYCORIS, DIFFUSERS, PEFT = (
    "ComfyUI", "AUTOMATIC1111", "Forge", "kohya sd-scripts", "lycoris-lora", "diffusers", "PEFT")  # fmt: skip
CONSUMERS = (COMFYUI, A1111, FORGE, SDSCRIPTS, LYCORIS, DIFFUSERS, PEFT)
SD1, SDXL, SD3, FLUX1, FLUX2, ZIMAGE = "sd1", "sdxl", "sd3", "flux1", "flux2", "zimage"  # file_architecture's answers
ARCH_NAMES = {SD1: "SD1/SD2", SDXL: "SDXL", SD3: "SD3", FLUX1: "Flux.1", FLUX2: "Flux.2", ZIMAGE: "Z-Image"}
# Key prefixes each consumer maps (read and run: ComfyUI fe25114 comfy/lora.py model_lora_keys_unet/clip; Forge
# dfdcbab packages_3rdparty/comfyui_lora_collection/lora.py, the same maps; AUTOMATIC1111 82a973c
# extensions-builtin/Lora/networks.py load_network; lycoris-lora 4.1.3 kohya.py / wrapper.py; diffusers 0.42.1
# loaders/lora_conversion_utils.py; sd-scripts 48d368f networks/lora.py, lora_flux.py, lora_sd3.py). A file's other
# prefixes are not matched at all there.
_COMFY = ("lora_unet_", "lycoris_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "diffusion_model.",
          "transformer.", "unet.", "text_encoder.", "text_encoder_2.")  # fmt: skip
_PREFIXES: dict[str, tuple[str, ...]] = {
    COMFYUI: _COMFY,
    FORGE: _COMFY,
    A1111: ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"),
    SDSCRIPTS: ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_"),
    LYCORIS: ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lycoris_"),
    DIFFUSERS: ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "diffusion_model.", "transformer.", "unet.",
                "text_encoder.", "text_encoder_2."),
}  # fmt: skip
# architectures a consumer has no model for (AUTOMATIC1111 v1.10.1: SD1/SD2, SDXL, SD3; Forge dfdcbab: SD1/SD2,
# SDXL, SD3.5, Flux.1): nothing of such a file is applied there
_NO_MODEL = {A1111: {FLUX1: "Forge, ComfyUI", FLUX2: "ComfyUI", ZIMAGE: "ComfyUI"},
             FORGE: {FLUX2: "ComfyUI", ZIMAGE: "ComfyUI"}}  # fmt: skip
_SGM = ("input_blocks_", "middle_block_", "output_blocks_", "label_emb_", "time_embed_")
_DIFFUSERS_UNET = ("down_blocks_", "mid_block_", "up_blocks_", "add_embedding_", "time_embedding_", "conv_in", "conv_out")
# module names (underscored, below the prefix) that a consumer drops for one architecture and key prefix, as run
_DROPS: dict[tuple[str, str, str], tuple[str, str]] = {  # (consumer, family, prefix): (regex on the name, why)
    (COMFYUI, FLUX2, "transformer."): (
        r"double_stream_modulation_|single_stream_modulation_|time_guidance_embed_",
        "ComfyUI's map of Flux.2's diffusers names (comfy/utils.py flux_to_diffusers) has no entry for it: save with "
        "style 'kohya' or 'original'"),
    (FORGE, SD3, "transformer."): (
        r"", "Forge's map of SD3's diffusers names is commented out (comfyui_lora_collection/lora.py): save with "
        "style 'kohya' or 'original'"),
    (SDSCRIPTS, FLUX1, "lora_unet_"): (
        r"final_layer_", "sd-scripts' Flux network (networks/lora_flux.py) builds no module for final_layer: merged "
        "without it (lycoris.kohya applies it)"),
    (SDSCRIPTS, SDXL, "lora_unet_"): (
        r"input_blocks_0_0$|time_embed_|label_emb_|out_2$", "sd-scripts' UNet network (networks/lora.py "
        "UNET_TARGET_REPLACE_MODULE) builds no module for it (lycoris.kohya applies it)"),
    (SDSCRIPTS, SD1, "lora_unet_"): (
        r"conv_in$|conv_out$|time_embedding_", "sd-scripts' UNet network (networks/lora.py UNET_TARGET_REPLACE_MODULE) "
        "builds no module for it (lycoris.kohya applies it)"),
    (DIFFUSERS, FLUX1, "lora_unet_"): (
        r"img_in|txt_in|time_in_|vector_in_|guidance_in_|final_layer_",
        "diffusers' kohya Flux converter maps the blocks only: save with style 'diffusers' for it"),
    (DIFFUSERS, FLUX2, "lora_unet_"): (
        r"double_stream_modulation_|single_stream_modulation_|guidance_in_|final_layer_adaLN_modulation_",
        "diffusers' kohya Flux.2 converter drops it (a logged warning): save with style 'diffusers' for it"),
    (DIFFUSERS, ZIMAGE, "lora_unet_"): (
        r"x_embedder|final_layer_",
        "diffusers' Z-Image converter splits its name at every '_' and drops it: save with style 'diffusers'"),
    (DIFFUSERS, ZIMAGE, "diffusion_model."): (
        r"x_embedder|final_layer_|(layers|noise_refiner|context_refiner)_\d+_attention_(qkv|out)$",
        "diffusers' Z-Image converter of diffusion_model. files drops it (x_embedder, final_layer, the attention's "
        "qkv and out): save with style 'diffusers'"),
}  # fmt: skip
_T5 = {FLUX1: "text_encoder_2.", SD3: "text_encoder_3."}  # diffusers' pipelines load no LoRA into their T5
T5_DROPPED = "diffusers' pipeline for this family loads no LoRA into its T5 text encoder"
SD3_KOHYA = "diffusers converts no kohya SD3 file (its keys reach the transformer unrenamed): save with style 'diffusers'"
A1111_SD3_KEYS = ("AUTOMATIC1111's SD3 loader fails on any key '<module>.<name>' without a second dot (.alpha, "
                  ".dora_scale, .hada_w1_a, .lokr_w1, .diff) and skips the whole file: it takes LoRA files without "
                  ".alpha only (save_lycoris(..., fold_scale=True), which sd-scripts' and lycoris-lora's loaders "
                  "refuse)")  # fmt: skip
A1111_SD3_DIFFUSERS = ("AUTOMATIC1111's SD3 map of diffusers names covers the image stream's attention (to_q / to_k / "
                       "to_v / to_out.0) only: save with style 'kohya'")
NO_ALPHA = ("{} raises on a module without .alpha (sd-scripts: networks/lora_flux.py / lora_sd3.py KeyError, "
            "lycoris-lora: make_module_from_state_dict float(None)): the whole file fails")
SDSCRIPTS_METHODS = "sd-scripts' own networks read LoRA only: load LoHa / LoKr / Full files with lycoris.kohya"
SDSCRIPTS_DORA = "sd-scripts' own networks merge lora_up · lora_down only: the DoRA magnitude (dora_scale) is ignored"
DIFFUSERS_DORA = ("diffusers loads a DoRA module of these files as a plain LoRA (use_dora off): its magnitude "
                  "(dora_scale) is dropped")  # fmt: skip
FLUX2_FINAL_SWAP = ("diffusers' BFL Flux.2 adapter converter renames final_layer.adaLN_modulation.1 without the halves "
                    "swap of its checkpoint converter: shift and scale are exchanged")  # fmt: skip
LYCORIS_DORA_IN = "lycoris-lora 4.1.3 reloads DoRA on the output axis only (this one is input-axis)"
A1111_SDXL_DIFFUSERS = "AUTOMATIC1111 maps diffusers names of SDXL with SD1's block rule: this module is lost (write SGM names)"
TE_NAMES = ("maps text_encoder.… keys of CLIP layers in transformers 4's spelling only (text_encoder.text_model.… — "
            "transformers 5 drops that level): save text encoders with style 'kohya'")
UNET_ATTENTION = "maps unet.… attention keys only in diffusers' attention-processor spelling (…processor.to_q)"


def file_architecture(af: AdapterFile) -> str | None:
    """The model family of a file read without a model (:data:`ARCH_NAMES`): kohya's ``ss_base_model_version``,
    else the module names below the key prefix (``None``: not a family lyco knows, or too few modules to tell)."""
    version = af.metadata.get("ss_base_model_version", "")
    known = {"sd_v1": SD1, "sd_v2": SD1, "flux1": FLUX1, "medium": SD3, "5-large": SD3, "5-medium": SD3}
    if version in known or version.startswith("sdxl"):
        return known.get(version, SDXL)
    paths = [_below_prefix(stem) for stem in af.modules]

    def has(*starts: str) -> bool:
        return any(p.startswith(starts) for p in paths)

    if has("double_stream_modulation_", "single_stream_modulation_", "time_guidance_embed_"):
        return FLUX2
    if has("noise_refiner_", "context_refiner_", "all_x_embedder", "all_final_layer", "cap_embedder"):
        return ZIMAGE
    if has("double_blocks_", "single_blocks_", "single_transformer_blocks_"):
        return FLUX1
    if has("joint_blocks_", "pos_embed_"):
        return SD3
    if has("add_embedding_", "label_emb_"):
        return SDXL
    if has(*_SGM):  # kohya writes SGM names for SDXL only; under diffusion_model. both have them
        return SDXL if any(s.startswith("lora_unet_") for s in af.modules) or _sgm_sdxl(paths) else SD1
    if has(*_DIFFUSERS_UNET):
        return SD1
    return None


def _below_prefix(stem: str) -> str:
    """A key stem's module name below its convention's prefix, underscored (``transformer.a.b`` → ``a_b``)."""
    conv = match_convention(stem)
    return (stem[len(conv.prefix) :] if conv is not None else stem).replace(".", "_")


def _sgm_sdxl(paths: list[str]) -> bool:
    """SGM names alone: SDXL's UNet has 9 input blocks (SD1's 12) and no attention in input block 1 / 2."""
    return not any(p.startswith(("input_blocks_1_1_", "input_blocks_2_1_", "input_blocks_10_", "input_blocks_11_"))
                   for p in paths)  # fmt: skip


@dataclass
class ConsumerVerdict:
    """``applied``: modules the consumer matches and applies with lyco's ΔW; ``skipped``: module → why it is not
    matched (silently, in the consumer, or with the whole file refused); ``different``: module → why it is applied
    with another ΔW."""

    applied: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    different: dict[str, str] = field(default_factory=dict)

    @property
    def loads_fully(self) -> bool:
        return not self.skipped and not self.different

    def summary(self, total: int) -> str:
        if self.loads_fully:
            return f"loads fully ({total} module(s))"
        parts = [f"applies {self.applied} of {total} module(s) as lyco does"]
        for what, found in (("skips", self.skipped), ("applies another ΔW to", self.different)):
            if found:
                reasons = sorted(set(found.values()))
                names = ", ".join(list(found)[:3]) + (", …" if len(found) > 3 else "")
                parts.append(f"{what} {len(found)} ({names}): {'; '.join(reasons)}")
        return "; ".join(parts)


def consumer_report(af: AdapterFile) -> dict[str, ConsumerVerdict]:
    """Per consumer (:data:`CONSUMERS`), which modules of a single file (``af`` keyed by its key stems, as read
    without a model) it would match and apply with lyco's ΔW, and why not the others — from the consumers' key
    mapping and weight code as run on lyco's files for each architecture (see ``docs/architecture.md``,
    "Consumers checked"). A PEFT folder is PEFT's alone (the others read single files)."""
    stems = list(af.modules)
    if af.config is not None:  # a PEFT folder
        out = {c: ConsumerVerdict(skipped=dict.fromkeys(stems, "reads single files, not PEFT folders (lyco convert "
                                                            "DIR FILE.safetensors --style kohya)")) for c in CONSUMERS}  # fmt: skip
        out[PEFT] = ConsumerVerdict(applied=len(stems))
        return out
    out = {c: ConsumerVerdict() for c in CONSUMERS}
    for consumer, stem, skipped, different in _findings(af):
        v = out[consumer]
        if skipped:
            v.skipped[stem] = skipped
        elif different:
            v.different[stem] = "; ".join(different)
        else:
            v.applied += 1
    return out


def _findings(af: AdapterFile) -> Iterator[tuple[str, str, str | None, list[str]]]:
    """``(consumer, stem, why it is not matched or None, why it is applied with another ΔW)`` for every consumer
    and module of a single file read without a model (what :func:`consumer_report` and :func:`consumer_warnings`
    are made of)."""
    arch = file_architecture(af)
    for consumer in CONSUMERS:
        refused = _refused(consumer, arch, af)
        for stem, m in af.modules.items():
            conv = match_convention(stem)
            prefix, path = (conv.prefix if conv is not None else ""), _below_prefix(stem)
            skipped = refused or _skip_reason(consumer, arch, prefix, path, m)
            yield consumer, stem, skipped, [] if skipped else _different(consumer, arch, prefix, path, m)


def _refused(consumer: str, arch: str | None, af: AdapterFile) -> str | None:
    """Why ``consumer`` applies nothing of the file (no model of its family, or it refuses the whole file)."""
    if consumer == PEFT:
        return "PEFT reads folders (adapter_config.json), not single files: lyco convert FILE DIR --to peft"
    if arch in _NO_MODEL.get(consumer, {}):
        return f"{consumer} has no {ARCH_NAMES[arch]} model ({_NO_MODEL[consumer][arch]} load this file)"
    # AUTOMATIC1111's SD3 model has a diffusers weight map, and then load_network splits every key in three at its
    # last two dots: a key '<stem>.alpha' (or .dora_scale, .hada_w1_a, .lokr_w1, .diff) raises, the file is skipped
    if consumer == A1111 and arch == SD3 and any(
            "." not in stem and "." not in k for stem, m in af.modules.items() for k in m.key_tails()):  # fmt: skip
        return A1111_SD3_KEYS
    no_alpha = any(m.method.stores_alpha and m.alpha is None and stem.startswith(_PREFIXES.get(consumer, ()))
                   for stem, m in af.modules.items())  # among the modules it reads at all
    if no_alpha and (consumer == LYCORIS or (consumer == SDSCRIPTS and arch in (FLUX1, SD3))):
        return NO_ALPHA.format(consumer)
    if consumer == DIFFUSERS:
        for stem, m in af.modules.items():
            if m.method.diffusers_reads is not None and arch not in m.method.diffusers_reads:
                return (f"diffusers refuses the whole file: its loaders read no {m.method.display()} modules "
                        f"({stem}) for this model family")
    return None


def _skip_reason(consumer: str, arch: str | None, prefix: str, path: str, m) -> str | None:
    """Why ``consumer`` does not match one module (``path``: its name below ``prefix``, underscored)."""
    if consumer == A1111 and arch == SD3 and prefix == "transformer.":  # its SD3 model's diffusers weight map
        if re.match(r"transformer_blocks_\d+_attn_(to_q|to_k|to_v|to_out_0)$", path):
            return None
        return A1111_SD3_DIFFUSERS
    mapped = _PREFIXES[consumer] + (("lycoris_",) if consumer == DIFFUSERS and arch in (FLUX2, ZIMAGE) else ())
    if prefix not in mapped:
        return f"keys {prefix or '(no prefix)'}… are not mapped there (use lyco's style 'kohya')"
    drops = _DROPS.get((consumer, arch, prefix))
    if drops is not None and re.match(drops[0], path):
        return drops[1]
    if consumer == DIFFUSERS and arch in _T5 and prefix == _T5[arch]:
        return T5_DROPPED
    if consumer == DIFFUSERS and prefix == "diffusion_model." and arch in (SD1, SDXL, SD3):
        return "diffusers reads diffusion_model. files for Flux only: save with style 'diffusers' or 'kohya'"
    if consumer == DIFFUSERS and arch == SD3 and prefix.startswith("lora_"):
        return SD3_KOHYA
    if consumer == A1111 and arch == SD3 and prefix != "lora_unet_":
        return A1111_SD3_DIFFUSERS
    if consumer == SDSCRIPTS and not m.method.sd_scripts_reads:
        return SDSCRIPTS_METHODS
    if prefix == "lora_unet_" and arch == SDXL and path.startswith(_DIFFUSERS_UNET):
        if consumer in (SDSCRIPTS, LYCORIS):
            return "sd-scripts' SDXL UNet has the original (SGM) names: diffusers-named SDXL keys match nothing"
        if consumer == A1111 and (path.startswith("add_embedding_") or path.startswith("up_blocks_0_upsamplers")):
            return A1111_SDXL_DIFFUSERS
    if consumer in (COMFYUI, FORGE) and prefix == "unet." and "_to_" in f"_{path}" and "_processor_" not in path:
        return f"{consumer} {UNET_ATTENTION}"
    if consumer in (COMFYUI, FORGE) and prefix.startswith("text_encoder") and not path.startswith("text_model_"):
        return f"{consumer} {TE_NAMES}"
    return None


def _different(consumer: str, arch: str | None, prefix: str, path: str, m) -> list[str]:
    """Why ``consumer`` applies a module it matches with another ΔW than lyco (none: the same)."""
    issues = list(m.method.consumer_issues(m.shapes())) if consumer == COMFYUI else []
    if m.dora is not None and m.dora_on_out(m.weight_shape) and consumer in (COMFYUI, FORGE, A1111):
        issues.append(DORA_OUTPUT_AXIS)
    if consumer == LYCORIS and m.dora is not None and not m.dora_on_out(m.weight_shape):
        issues.append(LYCORIS_DORA_IN)
    if consumer == SDSCRIPTS and m.dora is not None:
        issues.append(SDSCRIPTS_DORA)
    if consumer == DIFFUSERS and m.dora is not None:
        issues.append(DIFFUSERS_DORA)
    if consumer == A1111 and arch == SD3 and prefix == "transformer." and m.dora is not None:
        issues.append("AUTOMATIC1111's SD3 loader matches no dora_scale key under diffusers names: the LoRA is applied "
                      "without its magnitude")  # fmt: skip
    if consumer == DIFFUSERS and arch == FLUX2 and prefix == "diffusion_model." and path.startswith("final_layer_adaLN_"):
        issues.append(FLUX2_FINAL_SWAP)
    return issues


# what consumer_warnings names at save time: modules a consumer of the file's layout drops or applies differently
_SHORTFALLS = {reason for _, reason in _DROPS.values()} | {
    T5_DROPPED, SD3_KOHYA, A1111_SD3_KEYS, DIFFUSERS_DORA, FLUX2_FINAL_SWAP, LYCORIS_DORA_IN, A1111_SDXL_DIFFUSERS,
    SDSCRIPTS_DORA, NO_ALPHA.format(SDSCRIPTS), NO_ALPHA.format(LYCORIS), A1111_SD3_DIFFUSERS,
    *(f"{c} {why}" for c in (COMFYUI, FORGE) for why in (UNET_ATTENTION, TE_NAMES))}
