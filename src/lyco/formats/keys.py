"""Key conventions of single-file adapters (LyCORIS, kohya, OneTrainer, ai-toolkit, diffusers, PEFT).

A key is ``<prefix><module path><sep><param>``. Underscore conventions write the module path with
``.`` → ``_`` (``lora_unet_down_blocks_0_attentions_0_proj_in.lokr_w1``), dotted ones keep it
(``transformer.single_transformer_blocks.0.attn.to_q.lokr_w1``). Recognised prefixes:

=====================  ============  =========================  ==========
prefix                 convention    component (where it lives)  path
=====================  ============  =========================  ==========
``lycoris_``           lycoris       the model given             underscore
``lora_unet_``         kohya         unet / diffusion model      underscore
``lora_te_``           kohya         text encoder                underscore
``lora_te1_/2_/3_``    kohya         text encoder 1/2/3          underscore
``lora_transformer_``  onetrainer    transformer                 underscore
``diffusion_model.``   ai-toolkit    diffusion model             dotted  (style ``original``: original names)
``transformer.``       diffusers     transformer                 dotted
``unet.``              diffusers     unet                        dotted
``text_encoder(_2).``  diffusers     text encoder 1/2            dotted
``base_model.model.``  peft          the model given             dotted
=====================  ============  =========================  ==========

Underscore paths are ambiguous (``a_b.c`` and ``a.b_c`` both give ``a_b_c``), so they are resolved
against real module names (:mod:`lyco.formats.names`, using ``COMPONENT_ROOTS``). The parameter part of a
key is one of the registered methods' tensor keys (:func:`lyco.methods.registry.file_keys`) or a per-module
extra (``alpha``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import FormatError
from ..methods.registry import file_keys


@dataclass(frozen=True)
class Convention:
    """One key prefix: the convention it belongs to, the model component it addresses, path style."""

    prefix: str
    name: str
    component: str  # "" (the model given), "unet", "transformer", "diffusion", "te", "te1", "te2", "te3"
    dotted: bool


PEFT_PREFIX = "base_model.model."  # PEFT's key prefix (PEFT folders: formats.peft.peft_key)
ORIGINAL_PREFIX = "diffusion_model."  # style original: the original checkpoint's names (ComfyUI's native keys)

CONVENTIONS: tuple[Convention, ...] = (
    Convention("lycoris_", "lycoris", "", False),
    Convention("lora_unet_", "kohya", "unet", False),
    Convention("lora_te_", "kohya", "te", False),
    Convention("lora_te1_", "kohya", "te1", False),
    Convention("lora_te2_", "kohya", "te2", False),
    Convention("lora_te3_", "kohya", "te3", False),
    Convention("lora_transformer_", "onetrainer", "transformer", False),
    Convention(ORIGINAL_PREFIX, "ai-toolkit", "diffusion", True),
    Convention(PEFT_PREFIX, "peft", "", True),
    Convention("transformer.", "diffusers", "transformer", True),
    Convention("unet.", "diffusers", "unet", True),
    Convention("text_encoder.", "diffusers", "te", True),
    Convention("text_encoder_2.", "diffusers", "te2", True),
    Convention("text_encoder_3.", "diffusers", "te3", True),
)
_BY_PREFIX = {c.prefix: c for c in CONVENTIONS}

# Where a component's modules live inside a pipeline-like container (the model root is always tried too).
COMPONENT_ROOTS: dict[str, tuple[str, ...]] = {
    "": (),
    "unet": ("unet", "model.diffusion_model", "diffusion_model", "transformer"),  # kohya's lora_unet_: any denoiser
    "transformer": ("transformer", "model.diffusion_model", "diffusion_model"),
    "diffusion": ("diffusion_model", "model.diffusion_model", "transformer", "unet"),
    "te": ("text_encoder",),
    "te1": ("text_encoder",),
    "te2": ("text_encoder_2",),
    "te3": ("text_encoder_3", "text_encoder_2"),  # the T5: SD3's third encoder, Flux.1's second (sd-scripts: lora_te3_)
}
# The attribute name of each component in a diffusers pipeline (used to split pipeline-level names).
PIPELINE_ATTRS = {"unet": "unet", "transformer": "transformer", "text_encoder": "te", "text_encoder_2": "te2",
                  "text_encoder_3": "te3"}  # fmt: skip

# Per-module keys that belong to no method: the module's alpha, and keys lyco knows but cannot use yet.
EXTRA_KEYS = ("alpha",)
UNSUPPORTED_KEYS: dict[str, str] = {}  # key suffix → why lyco cannot use it (none at present)

STYLES = ("lycoris", "kohya", "peft", "diffusers", "original")
_KOHYA = {"": "lora_unet_", "unet": "lora_unet_", "transformer": "lora_unet_", "diffusion": "lora_unet_",
          "te": "lora_te_", "te1": "lora_te1_", "te2": "lora_te2_", "te3": "lora_te3_"}  # fmt: skip
_DIFFUSERS = {"unet": "unet.", "transformer": "transformer.", "diffusion": "transformer.", "te": "text_encoder.",
              "te1": "text_encoder.", "te2": "text_encoder_2.", "te3": "text_encoder_3."}  # fmt: skip


def underscore(path: str) -> str:
    return path.replace(".", "_")


def split_key(key: str) -> tuple[str, str] | None:
    """``(module stem, param)`` of a key whose parameter lyco knows (``None`` otherwise).

    >>> split_key("lora_unet_mid_block_proj_in.lora_down.weight")
    ('lora_unet_mid_block_proj_in', 'lora_down.weight')
    """
    for param in sorted([*file_keys(), *EXTRA_KEYS, *UNSUPPORTED_KEYS], key=len, reverse=True):
        if key.endswith("." + param) and len(key) > len(param) + 1:
            return key[: -len(param) - 1], param
    return None


def match_convention(stem: str, prefix: str | None = None) -> Convention | None:
    """The convention of a module stem (``None``: unknown prefix). With ``prefix`` given, only that prefix.

    >>> match_convention("lora_te1_text_model_encoder_layers_0_mlp_fc1").name
    'kohya'
    """
    if prefix is not None:
        if not stem.startswith(prefix) or len(stem) == len(prefix):
            return None
        known = _BY_PREFIX.get(prefix)
        return known or Convention(prefix, "custom", "", "." in stem[len(prefix) :])
    for conv in CONVENTIONS:
        if stem.startswith(conv.prefix) and len(stem) > len(conv.prefix):
            return conv
    return None


# -- writing -----------------------------------------------------------------------------------
def split_component(name: str) -> tuple[str, str]:
    """``(component, path inside it)`` of a module name of a pipeline-like container
    (``text_encoder_2.text_model...`` → ``("te2", "text_model...")``); ``("", name)`` otherwise."""
    head, _, rest = name.partition(".")
    if rest and head in PIPELINE_ATTRS:
        return PIPELINE_ATTRS[head], rest
    return "", name


def model_components(model: object) -> list[object]:
    """``model`` and, for a pipeline-like object, the denoiser it holds (``unet`` / ``transformer``)."""
    return [m for m in (model, getattr(model, "unet", None), getattr(model, "transformer", None)) if m is not None]


def infer_component(model: nn.Module | None, names: list[str]) -> str:
    """Which component a whole model is (for kohya/diffusers prefixes): by class name, then by names."""
    cls = type(model).__name__ if model is not None else ""
    if "UNet" in cls:
        return "unet"
    if "Transformer" in cls or "DiT" in cls:
        return "transformer"
    if "Text" in cls or "CLIP" in cls or "T5" in cls:
        return "te"
    if any(n.startswith("text_model.") or n.startswith("encoder.block.") for n in names):
        return "te"
    if any(n.startswith(("down_blocks.", "up_blocks.", "mid_block.")) for n in names):
        return "unet"
    return "transformer"


TEXT_ENCODER_ATTRS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def kohya_text_encoders(model: object) -> dict[str, str]:
    """The kohya slot (``te``, ``te1``…``te3``: ``lora_te_``…``lora_te3_``) of each text-encoder component of a
    pipeline-like ``model``, numbered as sd-scripts numbers them, by the encoders the model holds (adapted or not):
    one CLIP alone is ``te`` (SD1/SD2); with several, ``text_encoder`` is ``te1``, ``text_encoder_2`` ``te2``, and a
    T5 is always ``te3`` (SD3: CLIP-L, CLIP-G, T5; Flux.1: CLIP-L ``te1``, T5 ``te3``, sd-scripts' ``lora_flux``).
    Empty for a model without text encoders."""
    held = [(attr, type(m).__name__) for attr in TEXT_ENCODER_ATTRS if (m := getattr(model, attr, None)) is not None]
    slots: dict[str, str] = {}
    for attr, cls in held:
        comp = PIPELINE_ATTRS[attr]
        if "T5" in cls:
            slots[comp] = "te3"
        elif len(held) > 1:
            slots[comp] = {"te": "te1"}.get(comp, comp)
    return slots


def key_prefix(style: str, component: str, text_encoders: dict[str, str] | None = None) -> str:
    """The key prefix ``style`` uses for ``component`` (``text_encoders``: the kohya slot of each text-encoder
    component, :func:`kohya_text_encoders`; a component without one is its own slot)."""
    if style == "lycoris":
        return "lycoris_"
    if style == "peft":
        return PEFT_PREFIX
    if style == "kohya":
        return _KOHYA[(text_encoders or {}).get(component, component)]
    if style == "diffusers":
        return _DIFFUSERS.get(component, "transformer.")
    if style == "original":
        if component.startswith("te"):
            raise FormatError(
                "style 'original' holds the diffusion model only (diffusion_model. + its original checkpoint names); "
                "save text-encoder modules with style 'kohya' (lora_te*_) or 'diffusers' (text_encoder*.)"
            )
        return ORIGINAL_PREFIX
    raise FormatError(f"unknown key style {style!r} (known: {', '.join(STYLES)})")


def module_keys(
    names: list[str],
    style: str,
    prefix: str | None = None,
    resolved: bool = True,
    component: str = "",
    text_encoders: dict[str, str] | None = None,
) -> dict[str, str]:
    """Module name → key stem (key without ``.param``) in ``style``.

    ``resolved``: names are dotted module paths (for kohya/diffusers, ``component`` says what the whole
    model is; pipeline-level names like ``unet.…`` carry their own); otherwise they are stems read from a
    file, prefix included,
    and are re-prefixed (underscore paths cannot become dotted without a model to resolve them).
    ``prefix`` replaces the style's prefix for every module; ``text_encoders``: the kohya slots of the model's text
    encoders (:func:`kohya_text_encoders`).
    """
    if style not in STYLES:
        raise FormatError(f"unknown key style {style!r} (known: {', '.join(STYLES)})")
    dotted_style = style in ("peft", "diffusers", "original")
    whole = style in ("lycoris", "peft")  # one namespace: the model the names belong to
    parts: dict[str, tuple[str, str, bool]] = {}
    for name in names:
        if resolved and whole:
            parts[name] = ("", name, True)
        elif resolved:
            comp, path = split_component(name)
            parts[name] = (comp or component, path, True)
        else:
            conv = match_convention(name)
            if conv is None:
                raise FormatError(f"module {name!r} has no known key prefix; cannot re-key it as {style}")
            path = name[len(conv.prefix) :]
            parts[name] = (conv.component, path, conv.dotted or "_" not in path)  # no "_": same path either way
    comps = {c for c, _, _ in parts.values()}
    if (prefix is not None or style in ("lycoris", "peft")) and len(comps) > 1:
        raise FormatError(
            f"the adapter spans several model components {sorted(comps)}; style {style!r}"
            f"{' with one prefix' if prefix is not None else ''} has a single namespace (use kohya or diffusers)"
        )
    # kohya slots: the model's (sd-scripts' numbering), else by the names alone (lora_te1_ beside a te2)
    slots = text_encoders or ({"te": "te1"} if "te2" in comps else {})
    out: dict[str, str] = {}
    for name, (comp, path, dotted) in parts.items():
        if dotted_style and not dotted:
            raise FormatError(
                f"module {name!r} has an underscore path; writing {style} keys needs the dotted module names: "
                "resolve them against the model (read_lycoris_file(..., model=...), or base_model=...)"
            )
        pfx = prefix if prefix is not None else key_prefix(style, comp, slots)
        out[name] = pfx + (path if dotted_style else underscore(path))
    clash = _first_clash(out)
    if clash:
        raise FormatError(f"modules {clash[0]!r} and {clash[1]!r} would both be written as {out[clash[0]]!r}")
    return out


def _first_clash(keys: dict[str, str]) -> tuple[str, str] | None:
    seen: dict[str, str] = {}
    for name, key in keys.items():
        if key in seen:
            return seen[key], name
        seen[key] = name
    return None
