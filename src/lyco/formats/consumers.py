"""What the tools that apply adapter files do with one of lyco's files, where they are known to fall short.

Checked by running their own weight code on lyco's files (docs/architecture.md, "Consumers checked"):
ComfyUI fe25114 and AUTOMATIC1111 v1.10.1 (82a973c; its Lora extension as on dev 1937682). Each finding is one
sentence naming the consumer; :func:`consumer_warnings` groups the modules of a file under each. Method-specific
findings come from the method (:meth:`~lyco.methods.schema.MethodSchema.consumer_issues`).
"""

from __future__ import annotations

from .adapterfile import AdapterFile
from .keys import model_components

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


def default_style(model: object) -> str:
    """The key style whose files ``model``'s consumers load fully: ``kohya`` for diffusers models (the one style
    ComfyUI, AUTOMATIC1111/Forge, kohya sd-scripts and diffusers' kohya converters all map), else ``lycoris``
    (lycoris-lora's wrapper; LLM tooling reads PEFT folders)."""
    return "kohya" if diffusion_model(model) else "lycoris"
