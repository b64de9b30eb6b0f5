"""LyCORIS-style configuration: the keywords of lycoris-lora's ``create_lycoris`` and kohya ``network_args``, its
presets (built-in names, TOML/JSON files), and the walk that decides which modules get which method — with
LyCORIS's semantics — turned into lyco method configs per module (:func:`plan_modules`, :func:`mixed_config`).

The walk (LyCORIS's rule): a module whose class name is in ``target_module`` has every Linear / Conv descendant
adapted with the default ``algo``, or with its ``module_algo_map`` entry (a nested class in the map takes its own
entry); a module whose path equals or matches a ``target_name`` pattern (``re.match``, or ``fnmatch`` with
``use_fnmatch``) is adapted itself, with its ``name_algo_map`` entry (exact name first, then the first matching
pattern) or its class's ``module_algo_map`` entry; ``exclude_name`` paths are skipped. The first rule to plan a
module wins. Linear layers take ``linear_dim`` / ``linear_alpha`` (none when 0), convs with a 1-wide kernel too,
larger convs ``conv_dim`` / ``conv_alpha`` (none when 0 or ``enable_conv`` is off); an entry's ``dim`` / ``alpha``
override them; alpha 0 or ``None`` means ``dim`` (scale 1). A LoKr whose factors both come out full is scaled by 1
whatever alpha says (:meth:`lyco.methods.lokr.LoKrAdapter.lycoris_config`).

Deliberate deviations from lycoris-lora, each a bug or trap there: presets are values, not global class state
changed by every ``create_lycoris`` call; ``weight_decompose`` at the top level means what ``dora_wd`` does (LyCORIS
silently ignores it there); nested target classes never duplicate a module (kohya's walk asserts); a per-module
``dropout`` / ``rank_dropout`` / ``module_dropout`` is an override (a ``TypeError`` in LyCORIS); keywords no reader
knows warn instead of vanishing.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import tomllib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

from torch import nn

from .errors import ConfigError
from .methods.config import AdapterConfig, MixedConfig
from .methods.registry import METHODS, method_for_lycoris_algo
from .ops.layerops import layer_spec

__all__ = ["BUILTIN_PRESETS", "LycorisOptions", "Planned", "Preset", "load_preset", "mixed_config", "plan_modules"]

# -- presets ---------------------------------------------------------------------------------------
_DIT_BLOCKS = (
    "HunYuanDiTBlock", "DoubleStreamBlock", "SingleStreamBlock", "SingleDiTBlock", "MMDoubleStreamBlock",
    "MMSingleStreamBlock", "WanAttentionBlock", "HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock",
    "JointTransformerBlock", "FinalLayer", "QwenImageTransformerBlock", "LensTransformerBlock",
    "Ideogram4TransformerBlock", "ZImageTransformerBlock", "AceStepEncoderLayer", "AceStepDiTLayer", "TextFusionBlock",
    "Block", "PatchEmbed", "TimestepEmbedding", "LLMAdapterTransformerBlock",
)  # fmt: skip
_UNET_BLOCKS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D", *_DIT_BLOCKS)
_UNET_NAMES = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")
_TE_BLOCKS = (
    "CLIPAttention", "CLIPSdpaAttention", "CLIPMLP", "MT5Block", "BertLayer", "Gemma2Attention",
    "Gemma2FlashAttention2", "Gemma2SdpaAttention", "Gemma2MLP", "Qwen3Attention", "Qwen3FlashAttention2",
    "Qwen3SdpaAttention", "Qwen3MLP",
)  # fmt: skip
_LIN_BLOCKS = ("Transformer2DModel", "ResnetBlock2D", *_DIT_BLOCKS)
_ATTN_BLOCKS = ("Transformer2DModel", *_DIT_BLOCKS)

# lycoris-lora 4.1.3's built-in presets (``preset=`` by name); the kohya network reads the unet_/text_encoder_ keys.
BUILTIN_PRESETS: dict[str, dict[str, Any]] = {
    "full": {"enable_conv": True, "unet_target_module": _UNET_BLOCKS, "unet_target_name": _UNET_NAMES,
             "text_encoder_target_module": _TE_BLOCKS, "text_encoder_target_name": ()},
    "full-lin": {"enable_conv": False, "unet_target_module": _LIN_BLOCKS, "unet_target_name": _UNET_NAMES[2:],
                 "text_encoder_target_module": _TE_BLOCKS, "text_encoder_target_name": ()},
    "attn-mlp": {"enable_conv": False, "unet_target_module": _ATTN_BLOCKS, "unet_target_name": (),
                 "text_encoder_target_module": _TE_BLOCKS, "text_encoder_target_name": ()},
    "attn-only": {"enable_conv": False, "unet_target_module": ("CrossAttention", "SelfAttention"),
                  "unet_target_name": (), "text_encoder_target_name": (),
                  "text_encoder_target_module": ("CLIPAttention", "CLIPSdpaAttention", "BertAttention",
                                                 "MT5LayerSelfAttention", "Gemma2Attention", "Gemma2FlashAttention2",
                                                 "Gemma2SdpaAttention")},
    "unet-only": {"enable_conv": True, "unet_target_module": _UNET_BLOCKS, "unet_target_name": _UNET_NAMES,
                  "text_encoder_target_module": (), "text_encoder_target_name": ()},
    "unet-transformer-only": {"enable_conv": False, "unet_target_module": _ATTN_BLOCKS, "unet_target_name": (),
                              "text_encoder_target_module": (), "text_encoder_target_name": ()},
    "unet-convblock-only": {"enable_conv": True, "unet_target_module": ("ResnetBlock2D", "Downsample2D", "Upsample2D"),
                            "unet_target_name": ("conv_in", "conv_out"), "text_encoder_target_module": (),
                            "text_encoder_target_name": ()},
    "ia3": {"enable_conv": False, "unet_target_module": (), "unet_target_name": ("to_k", "to_v", "ff.net.2"),
            "text_encoder_target_module": (), "text_encoder_target_name": ("k_proj", "v_proj", "mlp.fc2"),
            "name_algo_map": {"mlp.fc2": {"train_on_input": True}, "ff.net.2": {"train_on_input": True}}},
}  # fmt: skip

_LIST_KEYS = ("target_module", "target_name", "exclude_name", "unet_target_module", "unet_target_name",
              "text_encoder_target_module", "text_encoder_target_name")  # fmt: skip
_MAP_KEYS = ("module_algo_map", "name_algo_map")


@dataclass(frozen=True)
class Preset:
    """Which modules a LyCORIS network adapts (``LycorisNetwork.apply_preset``'s keys). Defaults: lycoris-lora's
    network class defaults (every Linear / Conv of the model; the kohya network: SD/DiT blocks and CLIP).

    ``module_algo_map`` / ``name_algo_map``: class name / module path (or pattern) → ``{"algo": …, "dim": …,
    "alpha": …, <module options>}``.
    """

    enable_conv: bool = True
    target_module: tuple[str, ...] = ("Linear", "Conv1d", "Conv2d", "Conv3d", "GroupNorm", "LayerNorm")
    target_name: tuple[str, ...] = ()
    module_algo_map: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    name_algo_map: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    lora_prefix: str = "lycoris"
    use_fnmatch: bool = False
    exclude_name: tuple[str, ...] = ()
    unet_target_module: tuple[str, ...] = _UNET_BLOCKS
    unet_target_name: tuple[str, ...] = _UNET_NAMES
    text_encoder_target_module: tuple[str, ...] = _TE_BLOCKS
    text_encoder_target_name: tuple[str, ...] = ()

    def updated(self, preset: Mapping[str, Any] | Preset | str | Path, source: str = "preset") -> Preset:
        """This preset with the keys ``preset`` gives replaced (``apply_preset``'s rule; a name or a file is read
        by :func:`load_preset`). Unknown keys and values of the wrong type are a :class:`ConfigError`."""
        if isinstance(preset, Preset):
            return preset
        if isinstance(preset, (str, Path)):
            source, preset = str(preset), load_preset(preset)
        if not isinstance(preset, Mapping):
            raise ConfigError(f"{source}: a preset is a dict of LyCORIS preset keys, got {type(preset).__name__}")
        known = {f.name for f in fields(self)}
        unknown = sorted(set(preset) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown preset key(s) {unknown}; valid keys: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, value in preset.items():
            if key in _LIST_KEYS:
                value = [value] if isinstance(value, str) else value
                if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                    raise ConfigError(f"{source}: {key} must be a list of strings, got {value!r}")
                values[key] = tuple(value)
            elif key in _MAP_KEYS:
                values[key] = _algo_map(value, f"{source}: {key}")
            elif key in ("enable_conv", "use_fnmatch"):
                values[key] = _bool(value, f"{source}: {key}")
            elif key == "lora_prefix":
                if not isinstance(value, str) or not value:
                    raise ConfigError(f"{source}: lora_prefix must be a non-empty string, got {value!r}")
                values[key] = value
        return replace(self, **values)

    def match(self, pattern: str, name: str) -> bool:
        """LyCORIS's name rule: ``fnmatch`` with ``use_fnmatch``, else ``re.match`` (a prefix match)."""
        if self.use_fnmatch:
            return fnmatch.fnmatch(name, pattern)
        return re.match(pattern, name) is not None

    def excluded(self, name: str) -> bool:
        return bool(name) and (name in self.exclude_name or any(self.match(p, name) for p in self.exclude_name))

    def name_entry(self, name: str) -> Mapping[str, Any] | None:
        """``name_algo_map``'s entry for a module path: the exact key, else the first matching pattern."""
        if name in self.name_algo_map:
            return self.name_algo_map[name]
        return next((v for k, v in self.name_algo_map.items() if self.match(k, name)), None)


def _algo_map(value: Any, source: str) -> dict[str, dict[str, Any]]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, Mapping) for k, v in value.items()):
        raise ConfigError(f"{source} must map names to dicts of options, got {value!r}")
    return {k: dict(v) for k, v in value.items()}


def load_preset(preset: str | Path) -> dict[str, Any]:
    """A built-in preset by name (:data:`BUILTIN_PRESETS`) or a preset file (``.toml``, or ``.json``) as a dict."""
    if isinstance(preset, str) and preset in BUILTIN_PRESETS:
        return dict(BUILTIN_PRESETS[preset])
    path = Path(preset)
    if not path.is_file():
        raise ConfigError(
            f"preset {str(preset)!r} is neither a built-in preset ({', '.join(BUILTIN_PRESETS)}) nor a preset file"
        )
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
        else:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read the preset file ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset file holds a table of preset keys")
    return data


# -- options ---------------------------------------------------------------------------------------
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "none", "")


def _bool(value: Any, what: str) -> bool:
    """kohya's ``network_args`` arrive as strings ("True", "false", "1")."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if value is None:
        return False
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{what} must be true or false, got {value!r}")


def _number(value: Any, what: str, kind: type = float) -> Any:
    try:
        out = kind(float(value)) if kind is int else kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {value!r}") from None
    if isinstance(out, float) and not math.isfinite(out):
        raise ConfigError(f"{what} must be finite, got {value!r}")
    return out


# Module options and their LyCORIS defaults (what every module gets unless an entry of a map overrides it).
_MODULE_DEFAULTS: dict[str, Any] = {
    "use_tucker": False, "use_scalar": False, "rank_dropout_scale": False, "weight_decompose": False,
    "wd_on_out": True, "rs_lora": False, "full_matrix": False, "unbalanced_factorization": False,
    "decompose_both": False, "factor": -1, "dropout": 0.0, "rank_dropout": 0.0, "module_dropout": 0.0,
}  # fmt: skip
_BOOL_OPTIONS = {k for k, v in _MODULE_DEFAULTS.items() if isinstance(v, bool)}
_FLOAT_OPTIONS = {"dropout", "rank_dropout", "module_dropout"}
# create_lycoris / network_args spellings → the module option (LyCORIS's own renames and deprecated names)
_ALIASES = {"dora_wd": "weight_decompose", "wd_on_output": "wd_on_out", "use_cp": "use_tucker",
            "use_conv_cp": "use_tucker", "constrain": "constraint"}  # fmt: skip
# Options for features lyco does not have: any value but these is a ConfigError naming it.
_UNAVAILABLE: dict[str, tuple[Any, str]] = {
    "train_norm": (False, "adapters on norm layers (LyCORIS's train_norm) are not in lyco yet"),
    "train_llm_adapter": (False, "Anima's LLM adapter blocks are not in lyco yet"),
}
# Options that only steer how LyCORIS computes (lyco picks each layer's path by its cost model) or belong to
# algorithms lyco does not have; accepted and ignored.
_IGNORED = frozenset({"bypass_mode", "block_size", "constraint", "rescaled", "train_t5xxl", "preset", "apply_preset",
                      "multiplier", "neuron_dropout", "disable_conv_cp", "warn_on_unmatched", "train_on_input",
                      "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"})  # fmt: skip


def module_options(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """LyCORIS module options from keywords (aliases resolved, kohya's strings parsed); other keys are left out."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        key = _ALIASES.get(key, key)
        if key in _BOOL_OPTIONS:
            out[key] = _bool(value, f"{source}: {key}")
        elif key in _FLOAT_OPTIONS:
            out[key] = _number(value or 0.0, f"{source}: {key}")
        elif key == "factor":
            out[key] = _number(value if value is not None else -1, f"{source}: factor", int)
    if "disable_conv_cp" in raw and not _bool(raw["disable_conv_cp"], f"{source}: disable_conv_cp"):
        out["use_tucker"] = True
    return out


def _check_available(raw: Mapping[str, Any], source: str) -> None:
    for key, (allowed, why) in _UNAVAILABLE.items():
        if key in raw and _bool(raw[key], f"{source}: {key}") != allowed:
            raise ConfigError(f"{source}: {key}={raw[key]!r}: {why}")


@dataclass(frozen=True)
class LycorisOptions:
    """The network-wide keywords of ``create_lycoris`` / kohya's ``create_network``, parsed as LyCORIS parses them.

    ``linear_dim`` / ``linear_alpha`` (kohya: ``network_dim`` / ``network_alpha``), ``conv_dim`` / ``conv_alpha``
    (default: the linear ones), ``algo`` (default ``"lora"``), and ``module`` — the module options every planned
    module starts from (:data:`_MODULE_DEFAULTS`, then the given keywords).
    """

    algo: str = "lora"
    linear_dim: int = 4
    linear_alpha: float = 1.0
    conv_dim: int = 4
    conv_alpha: float = 1.0
    module: Mapping[str, Any] = field(default_factory=lambda: dict(_MODULE_DEFAULTS))

    @classmethod
    def from_kwargs(
        cls, linear_dim: Any = 4, linear_alpha: Any = 1, kwargs: Mapping[str, Any] | None = None,
        source: str = "create_lycoris",
    ) -> LycorisOptions:  # fmt: skip
        """Parse ``create_lycoris(module, multiplier, linear_dim, linear_alpha, **kwargs)``'s keywords. Options naming
        a feature lyco does not have are a :class:`ConfigError`; keywords no reader knows warn."""
        kwargs = dict(kwargs or {})
        _check_available(kwargs, source)
        algo = str(kwargs.get("algo") or "lora").lower()
        _method(algo, source)
        dim = _number(4 if linear_dim is None else linear_dim, f"{source}: linear_dim", int)
        alpha = _number(1 if linear_alpha is None else linear_alpha, f"{source}: linear_alpha")
        # LyCORIS: a conv_dim / conv_alpha of 0 (or none) means the linear one (enable_conv=False leaves convs out)
        conv_dim = _number(kwargs.get("conv_dim") or 0, f"{source}: conv_dim", int) or dim
        conv_alpha = _number(kwargs.get("conv_alpha") or 0, f"{source}: conv_alpha") or alpha
        if min(dim, conv_dim) < 0:
            raise ConfigError(f"{source}: linear_dim and conv_dim must be ≥ 0 (0 leaves those layers out)")
        module = {**_MODULE_DEFAULTS, **module_options(kwargs, source)}
        if "weight_decompose" in kwargs and "dora_wd" not in kwargs:  # LyCORIS reads only dora_wd here
            module["weight_decompose"] = _bool(kwargs["weight_decompose"], f"{source}: weight_decompose")
        known = set(_MODULE_DEFAULTS) | set(_ALIASES) | set(_IGNORED) | {"algo", "conv_dim", "conv_alpha"}
        unknown = sorted(set(kwargs) - known - set(_UNAVAILABLE))
        if unknown:
            warnings.warn(f"{source}: keyword(s) {unknown} are not LyCORIS options and are ignored", stacklevel=3)
        return cls(algo, dim, alpha, conv_dim, conv_alpha, module)


def _method(algo: str, source: str) -> type:
    method = method_for_lycoris_algo(algo)
    if method is None:
        have = sorted({m.algo for m in METHODS.values()} | {a for m in METHODS.values() for a in m.lycoris_algos})
        raise ConfigError(f"{source}: algo={algo!r} is not in lyco yet (lyco trains: {', '.join(have)})")
    return method


# -- the walk ---------------------------------------------------------------------------------------
class Planned(NamedTuple):
    """One module a LyCORIS network adapts: its path in the root, its LyCORIS name and lyco config."""

    path: str
    lora_name: str
    config: AdapterConfig
    plan: Any = None  # a shape plan where LyCORIS plans otherwise than the config would


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def plan_modules(
    root: nn.Module,
    prefix: str,
    options: LycorisOptions,
    preset: Preset,
    target_module: tuple[str, ...] | None = None,
    target_name: tuple[str, ...] | None = None,
    warn_on_unmatched: bool = True,
) -> list[Planned]:
    """The modules of ``root`` a LyCORIS network with ``options`` and ``preset`` adapts, in LyCORIS's walk order
    (see the module docstring), named ``<prefix>_<path with _>``. ``target_module`` / ``target_name``: the classes
    and names to walk (default: the preset's ``target_module`` / ``target_name`` plus the keys of its maps, the
    wrapper's rule). Conv3d layers, which lyco cannot adapt yet, are left out with a warning."""
    if target_module is None:
        target_module = (*preset.target_module, *preset.module_algo_map)
    if target_name is None:
        target_name = (*preset.target_name, *preset.name_algo_map)
    if not preset.enable_conv:
        options = replace(options, conv_dim=0)
    planned: dict[str, Planned] = {}
    skipped: list[str] = []
    matched: set[str] = set()
    source = f"LyCORIS network ({type(root).__name__})"

    def single(path: str, module: nn.Module, algo: str, entry: Mapping[str, Any]) -> None:
        lora_name = f"{prefix}_{path}".replace(".", "_")
        if lora_name in planned:
            return
        dim, alpha = entry.get("dim"), entry.get("alpha")
        kernel = getattr(module, "kernel_size", None)
        if isinstance(module, nn.Linear):
            if options.linear_dim <= 0:
                return
            dim, alpha = dim or options.linear_dim, alpha or options.linear_alpha
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if kernel[0] == 1 and options.linear_dim > 0:
                dim, alpha = dim or options.linear_dim, alpha or options.linear_alpha
            elif options.conv_dim > 0 or dim:
                dim, alpha = dim or options.conv_dim, alpha or options.conv_alpha
            else:
                return
        else:
            return
        spec = layer_spec(module)
        if spec is None:
            skipped.append(path)
            return
        what = f"{source}: module {path!r}"
        dim = _number(dim, f"{what}: dim", int)
        alpha = _number(alpha, f"{what}: alpha") if alpha is not None else 0.0
        _check_available(entry, what)
        method = _method(algo, what)
        opts = {**options.module, **module_options(entry, what)}
        config, plan = method.lycoris_config(spec, dim, float(alpha) or float(dim), opts)
        planned[lora_name] = Planned(path, lora_name, config, plan)

    def descend(path: str, top: nn.Module, algo: str, entry: Mapping[str, Any]) -> None:
        for sub, module in top.named_modules():
            full = _join(path, sub)
            if preset.excluded(full):
                continue
            cls = type(module).__name__
            if cls in preset.module_algo_map and module is not top:
                nested = preset.module_algo_map[cls]
                descend(full, module, str(nested.get("algo", algo)).lower(), nested)
                continue
            single(full, module, algo, entry)

    for name, module in root.named_modules():
        if preset.excluded(name):
            continue
        cls = type(module).__name__
        by_name = name in target_name or any(preset.match(t, name) for t in target_name)
        if cls in target_module and not by_name:
            matched.add(cls)
            entry = preset.module_algo_map.get(cls, {})
            descend(name, module, str(entry.get("algo", options.algo)).lower(), entry)
        elif by_name:
            matched.update(t for t in target_name if t == name or preset.match(t, name))
            entry = preset.name_entry(name)
            if entry is None:
                entry = preset.module_algo_map.get(cls, {})
            single(name, module, str(entry.get("algo", options.algo)).lower(), entry)
    if skipped:
        warnings.warn(
            f"{source}: {len(skipped)} Conv3d module(s) left out (lyco cannot adapt Conv3d yet): {skipped[:6]}",
            stacklevel=3,
        )
    if warn_on_unmatched:
        unmatched = sorted((set(target_module) | set(target_name)) - matched - set(_DEFAULT_LAYER_CLASSES))
        if unmatched and not planned:
            warnings.warn(f"{source}: no module matched the preset's targets {unmatched}", stacklevel=3)
    return list(planned.values())


_DEFAULT_LAYER_CLASSES = Preset().target_module


def mixed_config(planned: list[Planned]) -> AdapterConfig | MixedConfig:
    """One lyco config adapting exactly the planned modules: modules with equal configs share a part, whose
    ``target_modules`` is a regex naming exactly their paths."""
    groups: list[tuple[AdapterConfig, list[str]]] = []
    for p in planned:
        for config, paths in groups:
            if config == p.config:
                paths.append(p.path)
                break
        else:
            groups.append((p.config, [p.path]))
    parts = [replace(config, target_modules="(?:" + "|".join(re.escape(n) for n in paths) + ")") for config, paths in groups]
    return parts[0] if len(parts) == 1 else MixedConfig(parts)
