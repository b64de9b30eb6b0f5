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
``diffusion_model.``   ai-toolkit    diffusion model             dotted
``transformer.``       diffusers     transformer                 dotted
``unet.``              diffusers     unet                        dotted
``text_encoder(_2).``  diffusers     text encoder 1/2            dotted
``base_model.model.``  peft          the model given             dotted
=====================  ============  =========================  ==========

Underscore paths are ambiguous (``a_b.c`` and ``a.b_c`` both give ``a_b_c``), so they are resolved
against the real module names of a model (:class:`ModuleIndex`); a component's modules are looked
up both at the model's root (the model *is* the unet / text encoder) and under the attribute names a
pipeline-like container uses (``unet``, ``transformer``, ``text_encoder``, ``model.diffusion_model``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn

from ..errors import FormatError
from ..ops.layerops import LayerSpec, layer_spec


@dataclass(frozen=True)
class Convention:
    """One key prefix: the convention it belongs to, the model component it addresses, path style."""

    prefix: str
    name: str
    component: str  # "" (the model given), "unet", "transformer", "diffusion", "te", "te1", "te2", "te3"
    dotted: bool


CONVENTIONS: tuple[Convention, ...] = (
    Convention("lycoris_", "lycoris", "", False),
    Convention("lora_unet_", "kohya", "unet", False),
    Convention("lora_te_", "kohya", "te", False),
    Convention("lora_te1_", "kohya", "te1", False),
    Convention("lora_te2_", "kohya", "te2", False),
    Convention("lora_te3_", "kohya", "te3", False),
    Convention("lora_transformer_", "onetrainer", "transformer", False),
    Convention("diffusion_model.", "ai-toolkit", "diffusion", True),
    Convention("base_model.model.", "peft", "", True),
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
    "unet": ("unet", "model.diffusion_model", "diffusion_model"),
    "transformer": ("transformer", "model.diffusion_model", "diffusion_model"),
    "diffusion": ("diffusion_model", "model.diffusion_model", "transformer", "unet"),
    "te": ("text_encoder",),
    "te1": ("text_encoder",),
    "te2": ("text_encoder_2",),
    "te3": ("text_encoder_3",),
}
# The attribute name of each component in a diffusers pipeline (used to split pipeline-level names).
PIPELINE_ATTRS = {"unet": "unet", "transformer": "transformer", "text_encoder": "te", "text_encoder_2": "te2",
                  "text_encoder_3": "te3"}  # fmt: skip

# Parameter suffixes → algorithm (``None``: per-module extras).
PARAM_ALGOS: dict[str, str | None] = {
    **{p: "loha" for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    **{p: "lokr" for p in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")},
    "lora_down.weight": "lora",
    "lora_up.weight": "lora",
    "alpha": None,
    "dora_scale": None,
}
_PARAMS_LONGEST_FIRST = sorted(PARAM_ALGOS, key=len, reverse=True)

STYLES = ("lycoris", "kohya", "peft", "diffusers")
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
    for param in _PARAMS_LONGEST_FIRST:
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


def _adaptable(root: nn.Module) -> tuple[dict[str, LayerSpec], dict[str, str]]:
    """Adaptable modules (name → spec; adapter wrappers count as their base layer) and all other
    module names (name → type name), skipping the internals of lyco's wrappers."""
    from ..methods.base import AdaptedLayer
    from ..modules_to_save import ModulesToSaveWrapper

    specs: dict[str, LayerSpec] = {}
    others: dict[str, str] = {}
    hidden: list[str] = []
    for name, module in root.named_modules():
        if any(name.startswith(h + ".") for h in hidden):
            continue
        if isinstance(module, AdaptedLayer):
            specs[name] = module.spec
            hidden.append(name)
        elif isinstance(module, ModulesToSaveWrapper):
            others[name] = "ModulesToSaveWrapper"
            hidden.append(name)
        elif (spec := layer_spec(module)) is not None:
            specs[name] = spec
        elif name:
            others[name] = type(module).__name__
    return specs, others


class ModuleIndex:
    """The module names of a model, for resolving file keys (dotted or underscore paths) to modules."""

    def __init__(self, root: nn.Module) -> None:
        self.specs, self.others = _adaptable(root)
        self._underscore: dict[str, dict[str, list[str]]] = {}

    def _roots(self, component: str) -> list[str]:
        extra = [r for r in COMPONENT_ROOTS.get(component, ()) if r in self.others or r in self.specs]
        return ["", *extra]

    def _under(self, root: str) -> dict[str, list[str]]:
        if root not in self._underscore:
            table: dict[str, list[str]] = {}
            for name in self.specs:
                if root and not name.startswith(root + "."):
                    continue
                table.setdefault(underscore(name[len(root) + 1 :] if root else name), []).append(name)
            self._underscore[root] = table
        return self._underscore[root]

    def candidates(self, conv: Convention, path: str) -> list[str]:
        """Module names ``path`` (the stem without its prefix) can denote, in model order."""
        found: list[str] = []
        for root in self._roots(conv.component):
            full = f"{root}.{path}" if root else path
            if conv.dotted or "." in path:
                if full in self.specs:
                    found.append(full)
            else:
                found.extend(self._under(root).get(path, []))
        return list(dict.fromkeys(found))

    def describe_missing(self, conv: Convention, path: str) -> str:
        """Why ``path`` names no adaptable module: a module of another type, or the closest names."""
        for root in self._roots(conv.component):
            full = f"{root}.{path}" if root else path
            hit = [n for n in self.others if n == full or (not conv.dotted and underscore(n) == underscore(full))]
            if hit:
                return f"module {hit[0]!r} is a {self.others[hit[0]]}, which lyco cannot adapt"
        forms = {underscore(n) if not conv.dotted else n: n for n in self.specs}
        close = difflib.get_close_matches(path, list(forms), n=3, cutoff=0.5)
        return "closest modules: " + (", ".join(forms[c] for c in close) if close else "none")


# -- writing -----------------------------------------------------------------------------------
def split_component(name: str) -> tuple[str, str]:
    """``(component, path inside it)`` of a module name of a pipeline-like container
    (``text_encoder_2.text_model...`` → ``("te2", "text_model...")``); ``("", name)`` otherwise."""
    head, _, rest = name.partition(".")
    if rest and head in PIPELINE_ATTRS:
        return PIPELINE_ATTRS[head], rest
    return "", name


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


def key_prefix(style: str, component: str, has_te2: bool = False) -> str:
    """The key prefix ``style`` uses for ``component`` (``lora_te1_`` for the first of two text encoders)."""
    if style == "lycoris":
        return "lycoris_"
    if style == "peft":
        return "base_model.model."
    if style == "kohya":
        return "lora_te1_" if component == "te" and has_te2 else _KOHYA[component]
    if style == "diffusers":
        return _DIFFUSERS.get(component, "transformer.")
    raise FormatError(f"unknown key style {style!r} (known: {', '.join(STYLES)})")


def module_keys(
    names: list[str],
    style: str,
    prefix: str | None = None,
    resolved: bool = True,
    component: str = "",
) -> dict[str, str]:
    """Module name → key stem (key without ``.param``) in ``style``.

    ``resolved``: names are dotted module paths (for kohya/diffusers, ``component`` says what the whole
    model is; pipeline-level names like ``unet.…`` carry their own); otherwise they are stems read from a
    file, prefix included,
    and are re-prefixed (underscore paths cannot become dotted without a model to resolve them).
    ``prefix`` replaces the style's prefix for every module.
    """
    if style not in STYLES:
        raise FormatError(f"unknown key style {style!r} (known: {', '.join(STYLES)})")
    dotted_style = style in ("peft", "diffusers")
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
    out: dict[str, str] = {}
    for name, (comp, path, dotted) in parts.items():
        if dotted_style and not dotted:
            raise FormatError(
                f"module {name!r} has an underscore path; writing {style} keys needs the dotted module names: "
                "resolve them against the model (read_lycoris_file(..., model=...), or base_model=...)"
            )
        pfx = prefix if prefix is not None else key_prefix(style, comp, has_te2="te2" in comps)
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
