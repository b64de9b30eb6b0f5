"""Which modules get adapters, and with which rank/alpha (PEFT's matching rules, documented).

* ``target_modules`` list: a module matches when its name equals an entry or ends with ``"." + entry``.
* ``target_modules`` str: a regex that must match the *full* module name (``re.fullmatch``);
  ``"all-linear"``: every Linear / transformers Conv1D except the output head and layers whose parent
  reads their weight directly (``BYPASSING_PARENTS``: ``nn.MultiheadAttention.out_proj``,
  ``nn.TransformerEncoderLayer.linear1/2``); naming such a layer explicitly is an ``UnsupportedLayerError``.
* ``exclude_modules``: same rules; excluded names are never adapted.
* ``layers_to_transform`` (+ ``layers_pattern``): keep only modules whose name has
  ``<layers_pattern>.<index>.`` (default: any ``<name>.<index>.``) with that index.
* ``rank_pattern`` / ``alpha_pattern``: key ``K`` applies to module ``N`` when
  ``re.match(rf"(.*\\.)?({K})$", N)`` — ``K`` equals ``N``, equals a dotted suffix of ``N``, or is a
  regex matching ``N`` (or a dotted suffix) in full. **Precedence: the first matching key in the dict's
  order wins** (identical to PEFT, so PEFT configs give the same ranks); default ``r`` / ``alpha``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from typing import Any

from torch import nn

from .errors import ConfigError, TargetError
from .methods.config import config_parts
from .methods.config import pattern_value as pattern_value  # re-exported: the rank/alpha pattern rule
from .ops.layerops import layer_spec

# Default targets per transformers ``config.model_type`` (attention projections, as PEFT's LoHa/LoKr maps).
DEFAULT_TARGETS: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "falcon": ["query_key_value"],
    "gptj": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "distilbert": ["q_lin", "v_lin"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "vit": ["query", "value"],  # transformers < 5; see DEFAULT_TARGET_ALTERNATIVES
    "clip": ["q_proj", "v_proj"],
    "clip_text_model": ["q_proj", "v_proj"],
    "clip_vision_model": ["q_proj", "v_proj"],
    "siglip": ["q_proj", "v_proj"],
    "whisper": ["q_proj", "v_proj"],
}

# Names used by newer transformers releases for the same projections; the first list whose names
# all exist in the model is used.
DEFAULT_TARGET_ALTERNATIVES: dict[str, list[list[str]]] = {
    "vit": [["q_proj", "v_proj"]],
    "bert": [["q_proj", "v_proj"]],
    "roberta": [["q_proj", "v_proj"]],
}

# diffusers models have no ``model_type``; matched by class name.
DIFFUSERS_ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
DIFFUSERS_CLASSES = (
    "UNet2DConditionModel", "UNet2DModel", "UNetSpatioTemporalConditionModel", "Transformer2DModel",
    "DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel",
    "SanaTransformer2DModel", "HunyuanDiT2DModel", "CogVideoXTransformer3DModel", "LTXVideoTransformer3DModel",
)  # fmt: skip


def default_target_modules(model: nn.Module) -> list[str]:
    """Default ``target_modules`` for a transformers model (by ``config.model_type``) or diffusers model."""
    if type(model).__name__ in DIFFUSERS_CLASSES:
        return list(DIFFUSERS_ATTENTION_TARGETS)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) if config is not None else None
    if model_type in DEFAULT_TARGETS:
        candidates = [DEFAULT_TARGETS[model_type], *DEFAULT_TARGET_ALTERNATIVES.get(model_type, [])]
        names = [n for n, _ in model.named_modules() if n]
        for targets in candidates:
            if all(any(name_matches(n, [t]) for n in names) for t in targets):
                return list(targets)
        return list(candidates[0])
    raise TargetError(
        f"target_modules is not set and there is no default for {type(model).__name__}"
        f"{f' (model_type={model_type!r})' if model_type else ''}; pass target_modules=[...] "
        f"(module names or suffixes) or a regex string"
    )


def name_matches(name: str, targets: list[str] | str) -> bool:
    """``targets`` list: equal or dotted suffix; str: full regex match."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    """Index ``i`` from ``...<pattern>.<i>.`` in a module name (any pattern when ``layers_pattern`` is empty)."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    regexes = [rf"(?:^|.*\.){re.escape(p)}\.(\d+)\." for p in patterns] or [r"(?:^|.*\.)[^.]+\.(\d+)\."]
    for rx in regexes:
        m = re.match(rx, name)
        if m:
            return int(m.group(1))
    return None


# Parents whose forward reads some children's weights directly instead of calling them, so an adapter on such
# a child would be ignored: nn.MultiheadAttention hands ``out_proj.weight`` to F.multi_head_attention_forward;
# nn.TransformerEncoderLayer's inference fast path hands ``linear1`` / ``linear2`` weights to one fused kernel.
BYPASSING_PARENTS: dict[type[nn.Module], tuple[str, ...]] = {
    nn.MultiheadAttention: ("out_proj",),
    nn.TransformerEncoderLayer: ("linear1", "linear2"),
}


def bypassed(model: nn.Module, name: str) -> str | None:
    """Why the forward of module ``name`` never runs as a module call (its parent uses its weight directly),
    or ``None``. An adapter there would change nothing until merged."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    for cls, children in BYPASSING_PARENTS.items():
        if isinstance(parent, cls) and child in children:
            return (
                f"its parent {parent_name or type(model).__name__!r} ({type(parent).__name__}) reads "
                f"{child}.weight directly instead of calling {child}, so an adapter there would be ignored"
            )
    return None


def _is_output_head(name: str, model: nn.Module) -> bool:
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None:
        return any(m is head for n, m in model.named_modules() if n == name)
    return name.split(".")[-1] in {"lm_head", "classifier", "score"}


def find_targets(model: nn.Module, config: Any, skip: Iterable[str] = ()) -> list[str]:
    """Names of the modules of ``model`` that ``config`` targets, in model order.

    Raises :class:`TargetError` when nothing matches, or when a name in a ``target_modules`` list
    matches no module at all (a typo), listing the closest real names.
    """
    skip = set(skip)
    names = [n for n, _ in model.named_modules() if n and n not in skip and not _inside(n, skip)]
    targets = config.target_modules
    if targets is None:
        targets = default_target_modules(model)
    if targets == "all-linear":
        modules = dict(model.named_modules())
        specs = {n: layer_spec(getattr(modules[n], "base_layer", modules[n])) for n in names}
        chosen = [
            n for n in names
            if specs[n] and specs[n].kind != "conv" and not _is_output_head(n, model) and bypassed(model, n) is None
        ]  # fmt: skip
    else:
        if isinstance(targets, list):
            unknown = [t for t in targets if not any(name_matches(n, [t]) for n in names)]
            if unknown:
                raise TargetError(_unknown_message("target_modules", unknown, names))
        chosen = [n for n in names if name_matches(n, targets)]
    if config.exclude_modules:
        chosen = [n for n in chosen if not name_matches(n, config.exclude_modules)]
    if config.layers_to_transform is not None:
        wanted = config.layers_to_transform
        wanted = {wanted} if isinstance(wanted, int) else set(wanted)
        chosen = [n for n in chosen if layer_index(n, config.layers_pattern) in wanted]
    if not chosen:
        raise TargetError(
            f"no module of {type(model).__name__} matched target_modules={targets!r}"
            f" (exclude_modules={config.exclude_modules!r}, layers_to_transform={config.layers_to_transform!r}); "
            f"leaf modules include: {_leaf_sample(model)}"
        )
    # A module nested inside another chosen one cannot be wrapped twice.
    return [n for n in chosen if not _inside(n, set(chosen) - {n})]


def assign_targets(model: nn.Module, config: Any, skip: Iterable[str] = ()) -> dict[str, Any]:
    """Module name → the method config that adapts it, in model order: every target of ``config``, or of each
    part of a :class:`~lyco.methods.config.MixedConfig` (:func:`find_targets` per part).

    Raises :class:`TargetError` when two parts select the same module (or one inside the other).
    """
    chosen: dict[str, Any] = {}
    owner: dict[str, int] = {}
    parts = config_parts(config)
    for i, part in enumerate(parts):
        for name in find_targets(model, part, skip):
            clash = next((o for o in owner if o == name or _inside(name, {o}) or _inside(o, {name})), None)
            if clash is not None:
                j = owner[clash]
                raise TargetError(
                    f"module {name!r} is selected by parts[{j}] ({type(parts[j]).__name__}"
                    f"{', as ' + repr(clash) if clash != name else ''}) and parts[{i}] ({type(part).__name__}) of "
                    "the MixedConfig; narrow their target_modules or exclude_modules so that each module has one method"
                )
            chosen[name], owner[name] = part, i
    order = {n: k for k, (n, _) in enumerate(model.named_modules())}
    return dict(sorted(chosen.items(), key=lambda item: order[item[0]]))


def _inside(name: str, others: set[str]) -> bool:
    return any(name.startswith(o + ".") for o in others)


def _leaf_sample(model: nn.Module, k: int = 12) -> str:
    leaves = sorted({n.split(".")[-1] for n, m in model.named_modules() if n and not list(m.children())})
    return ", ".join(leaves[:k]) + (", ..." if len(leaves) > k else "")


def _unknown_message(field: str, unknown: list[str], names: list[str]) -> str:
    suffixes = sorted({n.split(".")[-1] for n in names} | set(names))
    hints = []
    for u in unknown:
        close = difflib.get_close_matches(u, suffixes, n=3)
        hints.append(f"{u!r} (closest: {', '.join(close) or 'none'})")
    return f"{field} names no module of the model: " + "; ".join(hints)


def check_modules_to_save(model: nn.Module, modules_to_save: list[str] | None, skip: Iterable[str] = ()) -> list[str]:
    """Names of modules to copy as trainable; :class:`ConfigError` for entries matching nothing."""
    if not modules_to_save:
        return []
    skip = set(skip)
    names = [n for n, _ in model.named_modules() if n and n not in skip and not _inside(n, skip)]
    unknown = [t for t in modules_to_save if not any(name_matches(n, [t]) for n in names)]
    if unknown:
        raise ConfigError(_unknown_message("modules_to_save", unknown, names))
    chosen = [n for n in names if name_matches(n, modules_to_save)]
    return [n for n in chosen if not _inside(n, set(chosen) - {n})]
