"""What the tools that apply adapter files do with one of lyco's files, where they are known to fall short.

Checked by running their own weight code on lyco's files (docs/architecture.md, "Consumers checked"):
ComfyUI fe25114 and AUTOMATIC1111 v1.10.1 (82a973c; its Lora extension as on dev 1937682). Each finding is one
sentence naming the consumer; :func:`consumer_warnings` groups the modules of a file under each. Method-specific
findings come from the method (:meth:`~lyco.methods.schema.MethodSchema.consumer_issues`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .adapterfile import AdapterFile
from .keys import match_convention, model_components

DORA_OUTPUT_AXIS = (
    "ComfyUI divides an output-axis DoRA magnitude by ‖W‖ instead of ‖W + s·ΔW‖ and AUTOMATIC1111 always takes "
    "input-column norms, so both apply another ΔW than lyco, lycoris-lora and PEFT; train with wd_on_out=False "
    "(input axis: both apply it exactly) for files meant for them"
)
LYCORIS_NAMES = (
    "AUTOMATIC1111 maps only kohya key names (lora_unet_…, lora_te_…): a file in style 'lycoris' changes nothing "
    "there; save with style='kohya' for it"
)


def consumer_warnings(af: AdapterFile, style: str | None = None) -> list[str]:
    """The known consumer shortfalls ``af`` (written in ``style``, when given) runs into: one line per finding,
    with the number of modules and the first few names."""
    found: dict[str, list[str]] = {}
    for name, m in af.modules.items():
        issues = list(m.method.consumer_issues(m.shapes()))
        if m.dora is not None and m.dora_on_out(m.weight_shape):
            issues.append(DORA_OUTPUT_AXIS)
        for issue in issues:
            found.setdefault(issue, []).append(name)
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
COMFYUI, A1111, KOHYA, DIFFUSERS, PEFT = "ComfyUI", "AUTOMATIC1111/Forge", "kohya sd-scripts / lycoris-lora", "diffusers", "PEFT"
CONSUMERS = (COMFYUI, A1111, KOHYA, DIFFUSERS, PEFT)
# Key prefixes each consumer maps (read in: ComfyUI fe25114 comfy/lora.py model_lora_keys_unet/clip; AUTOMATIC1111
# 82a973c extensions-builtin/Lora/networks.py load_network; lycoris-lora 4.1.3 kohya.py / wrapper.py; diffusers
# 0.42 loaders/lora_conversion_utils.py). A file's other prefixes are not matched at all there.
_PREFIXES: dict[str, tuple[str, ...]] = {
    COMFYUI: ("lora_unet_", "lycoris_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "diffusion_model.",
              "transformer.", "unet.", "text_encoder.", "text_encoder_2."),
    A1111: ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_"),
    KOHYA: ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lycoris_"),
    DIFFUSERS: ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "diffusion_model.", "transformer.", "unet.",
                "text_encoder.", "text_encoder_2."),
}  # fmt: skip
_SGM = ("input_blocks_", "middle_block_", "output_blocks_", "label_emb_", "time_embed_")
_DIFFUSERS_UNET = ("down_blocks_", "mid_block_", "up_blocks_", "add_embedding_", "time_embedding_", "conv_in", "conv_out")


@dataclass
class ConsumerVerdict:
    """``applied``: modules the consumer matches and applies with lyco's ΔW; ``skipped``: module → why it is not
    matched (silently, in the consumer); ``different``: module → why it is applied with another ΔW."""

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
    mapping and weight code as read and run (see ``docs/architecture.md``; diffusers: key names only). A PEFT
    folder is PEFT's alone (the others read single files)."""
    stems = list(af.modules)
    if af.config is not None:  # a PEFT folder
        out = {c: ConsumerVerdict(skipped=dict.fromkeys(stems, "reads single files, not PEFT folders (lyco convert "
                                                            "DIR FILE.safetensors --style kohya)")) for c in CONSUMERS}  # fmt: skip
        out[PEFT] = ConsumerVerdict(applied=len(stems))
        return out
    sdxl = af.metadata.get("ss_base_model_version", "").startswith("sdxl") or any(  # or SGM / SDXL-only names
        s.startswith("lora_unet_") and s[len("lora_unet_") :].startswith((*_SGM, "add_embedding_")) for s in stems
    )
    out = {c: ConsumerVerdict() for c in CONSUMERS}
    for stem, m in af.modules.items():
        conv = match_convention(stem)
        prefix = conv.prefix if conv is not None else ""
        path = stem[len(prefix) :]
        issues = list(m.method.consumer_issues(m.shapes()))
        dora_out = m.dora is not None and m.dora_on_out(m.weight_shape)
        for consumer in CONSUMERS:
            v = out[consumer]
            why = _skip_reason(consumer, prefix, path, m, sdxl)
            if why:
                v.skipped[stem] = why
            elif consumer == COMFYUI and (issues or dora_out):
                v.different[stem] = "; ".join(issues + ([DORA_OUTPUT_AXIS] if dora_out else []))
            elif consumer == A1111 and dora_out:
                v.different[stem] = DORA_OUTPUT_AXIS
            elif consumer == KOHYA and m.dora is not None and not dora_out:
                v.different[stem] = "lycoris-lora 4.1.3 reloads DoRA on the output axis only (this one is input-axis)"
            else:
                v.applied += 1
    return out


def _skip_reason(consumer: str, prefix: str, path: str, m, sdxl: bool) -> str | None:
    if consumer == PEFT:
        return "PEFT reads folders (adapter_config.json), not single files: lyco convert FILE DIR --to peft"
    if prefix not in _PREFIXES[consumer]:
        return f"keys {prefix or '(no prefix)'}… are not mapped there (use lyco's style 'kohya')"
    if prefix == "lora_unet_" and sdxl and path.startswith(_DIFFUSERS_UNET):
        if consumer == KOHYA:
            return "sd-scripts' SDXL UNet has the original (SGM) names: diffusers-named SDXL keys match nothing"
        if consumer == A1111 and (path.startswith("add_embedding_") or path.startswith("up_blocks_0_upsamplers")):
            return "AUTOMATIC1111 maps diffusers names of SDXL with SD1's block rule: this module is lost (write SGM names)"
    if consumer == COMFYUI and prefix == "unet." and ".to_" in f".{path}" and ".processor." not in path:
        return "ComfyUI maps unet.… attention keys only in diffusers' attention-processor spelling (…processor.to_q)"
    return None
