"""The one author of a LyCORIS/kohya file's ``ss_*`` metadata (what kohya's ``train_network.py`` writes).

:func:`file_metadata` decides everything a writer puts in the header, in this order:

1. the adapter's own ``metadata`` — the source file's when it was read, a tool's when it made the adapter
   (``extract``, ``to-lora``): these values reach the file unchanged — minus stale ``sshs_*`` hashes;
2. the ``ss_network_*`` keys it lacks, computed from the tensors (:func:`network_metadata`:
   ``ss_network_module``, most common rank and alpha, and ``ss_network_args`` merged key by key, the
   declared ones winning);
3. the caller's ``metadata`` (strings only), on top — :func:`lyco.save_lycoris` puts the base model's
   ``ss_base_model_version`` / ``ss_v2`` there (:func:`base_model_metadata`), below the user's own.

Values are strings, ``ss_network_args`` a JSON object of strings (kohya passes ``--network_args`` through
as strings: ``"True"``, ``"8"``).
"""

from __future__ import annotations

import json
from collections import Counter

from ..errors import FormatError
from ..methods.registry import method_for_algo
from .adapterfile import AdapterFile
from .keys import model_components

NETWORK_MODULE = "lycoris.kohya"
ARGS = "ss_network_args"

# kohya sd-scripts' ``ss_base_model_version`` values (model_util.get_model_version_str_for_sd1_sd2,
# sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0, flux_utils.MODEL_VERSION_FLUX_V1). AUTOMATIC1111 shows a file
# on its Lora page for SDXL checkpoints only when the value starts with "sdxl_", for SD2 only with ss_v2 "True".
SD1, SD2, SDXL, FLUX1 = "sd_v1", "sd_v2", "sdxl_base_v1-0", "flux1"
SD3_MEDIUM, SD35_MEDIUM, SD35_LARGE = "medium", "5-medium", "5-large"  # sd3_utils.analyze_state_dict_state


def base_model_version(model: object) -> str | None:
    """kohya's name for the architecture of ``model`` (a diffusers UNet / Flux transformer, or an object holding
    one as ``unet`` / ``transformer``), from its config: SDXL (``addition_embed_type="text_time"``), SD2 (text
    features 1024), SD1 (768), Flux.1, SD3 (sd-scripts' model type: qk-norm makes it 3.5, dual attention layers
    medium); ``None`` when it cannot tell (text encoders, other models)."""
    for inner in model_components(model):
        name, config = type(inner).__name__, getattr(inner, "config", None)
        if name == "FluxTransformer2DModel":
            return FLUX1
        if name == "SD3Transformer2DModel" and config is not None:
            if getattr(config, "qk_norm", None) is None:
                return SD3_MEDIUM
            return SD35_MEDIUM if getattr(config, "dual_attention_layers", ()) else SD35_LARGE
        if name == "UNet2DConditionModel" and config is not None:
            if getattr(config, "addition_embed_type", None) == "text_time":
                return SDXL
            return {768: SD1, 1024: SD2}.get(getattr(config, "cross_attention_dim", None))
    return None


def base_model_metadata(model: object) -> dict[str, str]:
    """``ss_base_model_version`` and ``ss_v2`` as kohya's trainer writes them for ``model`` (empty when
    :func:`base_model_version` cannot tell)."""
    version = base_model_version(model)
    if version is None:
        return {}
    return {"ss_base_model_version": version, "ss_v2": str(version == SD2)}


def effective_alpha(rank: int | None, alpha: float | None, r: int) -> float:
    """The alpha that gives a module's scale as ``alpha / r`` (no rank or no alpha: ``r``, scale 1)."""
    if rank is None or alpha is None:
        return float(r)
    return float(alpha)


def network_metadata(af: AdapterFile) -> dict[str, str]:
    """``ss_network_module/dim/alpha/args`` as kohya's trainer writes them for a LyCORIS network, computed
    from the tensors: generic ``algo``, ``conv_dim``, ``conv_alpha``, DoRA's ``dora_wd`` / ``wd_on_output``, plus
    each method's own args (:meth:`~lyco.methods.schema.MethodSchema.network_args`)."""
    if not af.modules:
        return {}
    ranks = {n: m.rank for n, m in af.modules.items()}
    dims = Counter(r for r in ranks.values() if r is not None)
    dim = dims.most_common(1)[0][0] if dims else 1
    alphas = Counter(effective_alpha(ranks[n], m.alpha, ranks[n] or dim) for n, m in af.modules.items())
    algos = sorted(af.algos())
    args: dict[str, str] = {"algo": ",".join(algos)}
    shapes = {n: m.guess_weight_shape() for n, m in af.modules.items()}
    conv = [n for n, s in shapes.items() if len(s) > 2]
    if conv:
        conv_dim = Counter(ranks[n] or dim for n in conv).most_common(1)[0][0]
        conv_alpha = Counter(effective_alpha(ranks[n], af.modules[n].alpha, ranks[n] or dim) for n in conv)
        args.update(conv_dim=str(conv_dim), conv_alpha=str(conv_alpha.most_common(1)[0][0]))
    for algo in algos:
        mods = [(m.shapes(), shapes[n]) for n, m in af.modules.items() if m.algo == algo]
        args.update(method_for_algo(algo).network_args(mods))
    dora = {m.dora_on_out(shapes[n]) for n, m in af.modules.items() if m.dora is not None}
    if dora:  # kohya's network_args spelling (lycoris-lora's create_lycoris reads the same names)
        args.update(dora_wd="True", wd_on_output=str(dora.pop()) if len(dora) == 1 else "mixed")
    return {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alphas.most_common(1)[0][0]),
        ARGS: json.dumps(args),
    }


def _args(text: str | None) -> dict[str, str]:
    """``ss_network_args`` as a dict of strings (unreadable or non-object JSON: empty)."""
    try:
        parsed = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    if not isinstance(parsed, dict):
        return {}
    return {str(k): v if isinstance(v, str) else _string(v) for k, v in parsed.items()}


def _string(value: object) -> str:
    """A JSON value as kohya would have passed it: ``True`` / ``8`` / ``0.5``; lists and objects as JSON."""
    return str(value) if isinstance(value, (bool, int, float)) or value is None else json.dumps(value)


RANK_KEYS = ("ss_network_dim", "ss_network_alpha")
RANK_ARGS = ("conv_dim", "conv_alpha")


def without_ranks(metadata: dict[str, str]) -> dict[str, str]:
    """``metadata`` minus the ``ss_*`` values that state ranks or alphas (a tool that changed them leaves
    them to :func:`file_metadata` to compute again); other ``ss_network_args`` are kept."""
    out = {k: v for k, v in metadata.items() if k not in RANK_KEYS}
    if ARGS in out:
        out[ARGS] = json.dumps({k: v for k, v in _args(out[ARGS]).items() if k not in RANK_ARGS})
    return out


def without_derived_args(metadata: dict[str, str], af: AdapterFile) -> dict[str, str]:
    """``metadata`` minus the ``ss_network_args`` that :func:`network_metadata` derives from ``af``'s tensors (a tool
    that changed the layout, e.g. ``lyco convert --consumer-safe``, leaves them to be derived again from the new
    ones); args the tensors do not state (a preset, a trainer's own) are kept."""
    if ARGS not in metadata:
        return dict(metadata)
    derived = _args(network_metadata(af).get(ARGS))
    return {**metadata, ARGS: json.dumps({k: v for k, v in _args(metadata[ARGS]).items() if k not in derived})}


def file_metadata(af: AdapterFile, user: dict[str, str] | None = None) -> dict[str, str]:
    """The metadata a writer puts in ``af``'s file (see the module docstring)."""
    out = {k: v for k, v in af.metadata.items() if not k.startswith("sshs_")}
    computed = network_metadata(af)
    declared_args = _args(out.get(ARGS)) if ARGS in out else None
    for key, value in computed.items():
        out.setdefault(key, value)
    if declared_args is not None:
        out[ARGS] = json.dumps({**_args(computed.get(ARGS)), **declared_args})
    for k, v in (user or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise FormatError(f"metadata must map strings to strings (safetensors), got {k!r}: {v!r}")
        out[k] = v
    return out
