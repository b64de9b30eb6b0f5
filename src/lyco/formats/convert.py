"""Between an :class:`AdapterFile` and lyco models / PEFT configs: shape plans, alpha/r, ``ss_*`` metadata.

**Scale.** An ``AdapterFile`` follows one rule (:meth:`ModuleAdapter.scale`): ``alpha / r`` with ``r`` the
rank of the factored parts, ``alpha`` missing or 0 → ``alpha = r``, a LoKr with both factors full → 1.
lyco adapters and PEFT use ``scaling = alpha / r`` always, with ``r`` from the config. So:

* file → model/PEFT config: every module gets its own ``r`` (the tensors' rank) and ``alpha``
  (``rank_pattern`` / ``alpha_pattern`` where modules differ); full–full LoKr modules get ``alpha = r``.
* model/PEFT → file: a full–full LoKr with ``alpha ≠ r`` has ``alpha / r`` folded into ``lokr_w1`` and is
  written with ``alpha = r`` (what lycoris-lora writes there).

**Shapes** always come from the tensors (:func:`infer_plan`), never from a factorization or metadata. A
PEFT config can only describe shapes its planning rules reproduce (one ``decompose_factor``,
``decompose_both`` and ``use_effective_conv2d`` for all modules); :func:`fit_config` finds such a config
and lists the modules it cannot describe (a lyco model loads them anyway, through per-module plans).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import FormatError, ShapeMismatchError
from ..methods import LoHaConfig, LoKrConfig
from ..methods.base import AdapterConfig
from ..ops.factorize import (
    LoHaPlan,
    LoKrPlan,
    factorization,
    infer_loha_plan,
    infer_lokr_plan,
    plan_loha,
    plan_lokr,
)
from ..targeting import find_targets, pattern_value
from .adapterfile import AdapterFile, ModuleAdapter
from .peft import PREFIX as PEFT_PREFIX
from .peft import assign_adapter_weights

if TYPE_CHECKING:
    from ..model import LycoModel

Plan = LoKrPlan | LoHaPlan
ALGO_OF_PEFT_TYPE = {"LOHA": "loha", "LOKR": "lokr"}


def infer_plan(module: ModuleAdapter, weight_shape: tuple[int, ...]) -> Plan:
    """The shape plan of one module's tensors for a layer weight ``(out, in, *k)`` (``ShapeMismatchError``)."""
    shapes = {k: tuple(v.shape) for k, v in module.tensors.items()}
    if module.algo == "lokr":
        return infer_lokr_plan(shapes, weight_shape)
    if module.algo == "loha":
        return infer_loha_plan(shapes, weight_shape)
    raise FormatError("plain LoRA modules (lora_down/lora_up) cannot become lyco adapters; lyco has LoHa and LoKr")


def guess_weight_shape(module: ModuleAdapter) -> tuple[int, ...]:
    """``module.weight_shape``, else the layer weight shape read off the tensors. Where the tensors keep a
    conv kernel flattened into the input dimension (LoKr ``lokr_w2_b``, LoHa ``hada_w*_b`` without CP
    cores) the layer is taken to be linear; pass a model wherever conv layers matter."""
    if module.weight_shape is not None:
        return tuple(module.weight_shape)
    t = {k: tuple(v.shape) for k, v in module.tensors.items()}
    if module.algo == "loha":
        if "hada_t1" in t:
            return (t["hada_w1_a"][1], t["hada_w1_b"][1], *t["hada_t1"][2:])
        return (t["hada_w1_a"][0], t["hada_w1_b"][1])
    if module.algo == "lora":
        return (t["lora_up"][0], math.prod(t["lora_down"][1:]))
    out_l, in_l = t["lokr_w1"] if "lokr_w1" in t else (t["lokr_w1_a"][0], t["lokr_w1_b"][1])
    if "lokr_w2" in t:
        out_r, in_r, *k = t["lokr_w2"]
    elif "lokr_t2" in t:
        (out_r, in_r), k = (t["lokr_w2_a"][1], t["lokr_w2_b"][1]), list(t["lokr_t2"][2:])
    else:
        out_r, in_r, k = t["lokr_w2_a"][0], t["lokr_w2_b"][1], []
    return (out_l * out_r, in_l * in_r, *k)


def effective_alpha(module: ModuleAdapter, r: int) -> float:
    """The alpha that gives ``module.scale()`` as ``alpha / r`` (full–full LoKr: ``r``, scale 1)."""
    if module.full_lokr or not module.alpha:
        return float(r)
    return float(module.alpha)


def fold_full_lokr(tensors: dict[str, torch.Tensor], alpha: float, r: int) -> dict[str, torch.Tensor]:
    """Tensors of a full–full LoKr whose ``alpha / r`` (applied by PEFT/lyco) is folded into ``lokr_w1``."""
    if alpha == r:
        return dict(tensors)
    out = dict(tensors)
    out["lokr_w1"] = tensors["lokr_w1"] * (alpha / r)
    return out


@dataclass
class ConfigFit:
    """A config describing an :class:`AdapterFile`: ``plans`` per module (what the tensors are) and
    ``problems`` (modules whose shapes this config's planning rules would not reproduce, so PEFT could
    not load them; empty when PEFT can)."""

    config: AdapterConfig
    plans: dict[str, Plan]
    ranks: dict[str, int]
    alphas: dict[str, float]
    problems: list[str]


def _ceil_half(x: int) -> int:
    return (x + 1) // 2


def _pick_factor(plans: dict[str, LoKrPlan]) -> int | None:
    """A ``decompose_factor`` under which PEFT's ``factorization`` gives every module's split, or ``None``."""
    candidates = [-1, *sorted({d for p in plans.values() for d in (p.out_l, p.in_l, p.out_r, p.in_r)})]
    for f in candidates:
        if all(
            factorization(p.out_features, f) == (p.out_l, p.out_r) and factorization(p.in_features, f) == (p.in_l, p.in_r)
            for p in plans.values()
        ):
            return f
    return None


def _patterns(values: dict[str, float], default: float) -> dict[str, float]:
    """Per-module pattern (exact names, longest first: PEFT's first-match rule then picks each module's own
    key); keys are regex-escaped only where a plain name would match another module."""
    names = sorted((n for n in values if values[n] != default), key=len, reverse=True)
    plain = {n: values[n] for n in names}
    if all(pattern_value(plain, n, default) == v for n, v in values.items()):
        return plain
    return {re.escape(n): values[n] for n in names}


def fit_config(af: AdapterFile, weight_shapes: dict[str, tuple[int, ...]], default_r: int | None = None) -> ConfigFit:
    """Plans, per-module ranks/alphas and a LoHa/LoKr config (``target_modules`` = the module names)
    for ``af``; ``weight_shapes``: per module name, the layer's canonical weight shape.

    Raises :class:`FormatError` for files mixing algorithms or holding plain LoRA modules, and
    :class:`ShapeMismatchError` when tensors do not fit their layer.
    """
    algos = af.algos()
    if len(algos) != 1 or algos & {"lora"}:
        what = "plain LoRA modules" if "lora" in algos else f"several algorithms {sorted(algos)}"
        raise FormatError(f"the adapter holds {what}; a lyco adapter is one LoHa or LoKr adapter")
    algo = algos.pop()
    plans: dict[str, Plan] = {}
    for name, m in af.modules.items():
        try:
            plans[name] = infer_plan(m, weight_shapes[name])
        except ShapeMismatchError as exc:
            raise ShapeMismatchError(f"module {name!r}: {exc}") from None
    factored = Counter(m.rank for m in af.modules.values() if m.rank is not None)
    base_r = factored.most_common(1)[0][0] if factored else (default_r or 1)
    problems: list[str] = []
    if algo == "lokr":
        decompose_both = any(not p.use_w1 for p in plans.values())
        use_cp = any(p.use_cp for p in plans.values())
        for name, p in plans.items():
            if p.both_full:  # the rank is free: pick one under which PEFT's rules also give two full factors
                need = max(_ceil_half(max(p.out_r, p.in_r)), _ceil_half(max(p.out_l, p.in_l)) if decompose_both else 1)
                plans[name] = dataclasses.replace(p, r=max(base_r, need))
        factor = _pick_factor(plans)  # type: ignore[arg-type]
        if factor is None:
            problems.append("no single decompose_factor gives every module's Kronecker split")
        f = -1 if factor is None else factor
        for name, p in plans.items():
            planned = plan_lokr(p.out_features, p.in_features, p.kernel, p.r, f, decompose_both, use_cp)
            if factor is not None and planned != p:
                problems.append(f"{name}: PEFT would plan {planned.param_shapes()}, the tensors are {p.param_shapes()}")
        kwargs = {"decompose_both": decompose_both, "decompose_factor": f, "use_effective_conv2d": use_cp}
    else:
        use_cp = any(p.use_cp for p in plans.values())
        for name, p in plans.items():
            planned = plan_loha(p.out_features, p.in_features, p.kernel, p.r, use_cp)
            if planned != p:
                problems.append(f"{name}: PEFT would plan {planned.param_shapes()}, the tensors are {p.param_shapes()}")
        kwargs = {"use_effective_conv2d": use_cp}
    ranks = {name: p.r for name, p in plans.items()}
    alphas = {name: effective_alpha(af.modules[name], ranks[name]) for name in plans}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config_cls = LoKrConfig if algo == "lokr" else LoHaConfig
    config = config_cls(
        r=r, alpha=alpha, target_modules=list(plans), rank_pattern=_patterns(ranks, r),  # type: ignore[arg-type]
        alpha_pattern=_patterns(alphas, alpha), **kwargs,
    )  # fmt: skip
    return ConfigFit(config, plans, ranks, alphas, problems)


# -- ss_* metadata (kohya's train_network.py writes these; values are strings) --------------------------
def network_metadata(af: AdapterFile) -> dict[str, str]:
    """``ss_network_module/dim/alpha/args`` as kohya's trainer writes them for a LyCORIS network."""
    algos = sorted(af.algos())
    if not af.modules:
        return {}
    ranks = {n: m.rank for n, m in af.modules.items()}
    dims = Counter(r for r in ranks.values() if r is not None)
    dim = dims.most_common(1)[0][0] if dims else 1
    alphas = Counter(effective_alpha(m, ranks[n] or dim) for n, m in af.modules.items())
    args: dict[str, str] = {"algo": algos[0] if len(algos) == 1 else ",".join(algos)}
    shapes = {n: guess_weight_shape(m) for n, m in af.modules.items()}
    conv = [n for n, s in shapes.items() if len(s) > 2]
    if conv:
        conv_dims = Counter(ranks[n] or dim for n in conv)
        conv_dim = conv_dims.most_common(1)[0][0]
        conv_alphas = Counter(effective_alpha(af.modules[n], ranks[n] or dim) for n in conv)
        args.update(conv_dim=str(conv_dim), conv_alpha=str(conv_alphas.most_common(1)[0][0]))
    mods = af.modules.values()
    if any("hada_t1" in m.tensors or "lokr_t2" in m.tensors for m in mods):
        args["use_tucker"] = "True"
    lokr = [m for m in mods if m.algo == "lokr"]
    if lokr:
        factor = _lycoris_factor(af, shapes)
        if factor is not None:
            args["factor"] = str(factor)
        if any("lokr_w1_a" in m.tensors for m in lokr):
            args["decompose_both"] = "True"
        if all(m.full_lokr for m in lokr):
            args["full_matrix"] = "True"
    return {
        "ss_network_module": "lycoris.kohya",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alphas.most_common(1)[0][0]),
        "ss_network_args": json.dumps(args),
    }


def _lycoris_factor(af: AdapterFile, shapes: dict[str, tuple[int, ...]]) -> int | None:
    """The ``factor`` argument of lycoris-lora that gives every LoKr module's split (its rule sorts the pair)."""
    splits = []
    for name, m in af.modules.items():
        if m.algo != "lokr":
            continue
        t = m.tensors
        out_l, in_l = tuple(t["lokr_w1"].shape) if "lokr_w1" in t else (t["lokr_w1_a"].shape[0], t["lokr_w1_b"].shape[1])
        out, in_ = shapes[name][:2]
        splits.append((out, out_l, in_, in_l))
    cands = [-1, *sorted({d for s in splits for d in (s[1], s[3], s[0] // s[1], s[2] // s[3])})]
    for f in cands:
        if all(min(factorization(o, f)) == ol and min(factorization(i, f)) == il for o, ol, i, il in splits):
            return f
    return None


def merge_metadata(
    source: dict[str, str], computed: dict[str, str], user: dict[str, str] | None
) -> dict[str, str]:
    """Metadata to write: the source file's (minus stale hashes), ``computed`` ``ss_network_*`` on top
    (``ss_network_args`` merged key by key), then ``user``'s. Values must be strings."""
    out = {k: v for k, v in source.items() if not k.startswith("sshs_")}
    args = {}
    try:
        old = json.loads(out.get("ss_network_args", "{}"))
        args = old if isinstance(old, dict) else {}
    except json.JSONDecodeError:
        pass
    out.update(computed)
    if "ss_network_args" in computed:
        args.update(json.loads(computed["ss_network_args"]))
        out["ss_network_args"] = json.dumps(args)
    for k, v in (user or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise FormatError(f"metadata must map strings to strings (safetensors), got {k!r}: {v!r}")
        out[k] = v
    return out


def check_shapes(af: AdapterFile, source: str) -> None:
    """Raise :class:`ShapeMismatchError` naming the file and module where tensors do not fit their layer."""
    for name, m in af.modules.items():
        if m.weight_shape is None or m.algo == "lora":
            continue
        try:
            infer_plan(m, tuple(m.weight_shape))
        except ShapeMismatchError as exc:
            raise ShapeMismatchError(f"{source}: module {name!r}: {exc}") from None


# -- lyco models ---------------------------------------------------------------------------------
def adapter_file_from_model(model: LycoModel, adapter_name: str = "default") -> AdapterFile:
    """One adapter of a :class:`LycoModel` as an :class:`AdapterFile` (module paths, canonical tensors,
    full–full LoKr folded to scale 1)."""
    if adapter_name not in model.peft_config:
        raise FormatError(f"no adapter named {adapter_name!r} (adapters: {list(model.peft_config)})")
    algo = ALGO_OF_PEFT_TYPE.get(model.peft_config[adapter_name].peft_type)
    if algo is None:
        raise FormatError(
            f"adapter {adapter_name!r} uses method {model.peft_config[adapter_name].peft_type}, which has no "
            "LyCORIS file format (LoHa and LoKr do)"
        )
    modules: dict[str, ModuleAdapter] = {}
    for lname, layer in model.adapted_layers():
        if adapter_name not in layer.lyco_adapters:
            continue
        adapter = layer.lyco_adapters[adapter_name]
        if adapter.is_meta:
            raise FormatError(f"adapter {adapter_name!r} on {lname!r} has weights on the meta device; load them first")
        tensors = {n: p.detach() for n, p in adapter.named_parameters()}
        alpha = adapter.alpha
        if algo == "lokr" and adapter.plan.both_full:
            tensors, alpha = fold_full_lokr(tensors, alpha, adapter.r), float(adapter.r)
        modules[lname] = ModuleAdapter(algo, tensors, alpha, tuple(layer.spec.weight_shape))
    if model.peft_config[adapter_name].modules_to_save:
        raise FormatError(
            f"adapter {adapter_name!r} has modules_to_save, which a LyCORIS file cannot hold; use save_pretrained"
        )
    return AdapterFile(modules, convention="lyco")


def _exact_targets(root: nn.Module, config: AdapterConfig, skip: set[str]) -> None:
    """Make ``config.target_modules`` select exactly its listed names (a regex if the list's suffix rule
    would also pick other modules)."""
    names = list(config.target_modules)  # type: ignore[arg-type]
    if set(find_targets(root, config, skip)) != set(names):
        config.target_modules = "(?:" + "|".join(re.escape(n) for n in names) + ")"


def _peft_keyed(af: AdapterFile) -> dict[str, torch.Tensor]:
    return {f"{PEFT_PREFIX}{name}.{p}": t for name, m in af.modules.items() for p, t in m.tensors.items()}


def _finish(model: LycoModel, adapter_name: str, is_trainable: bool) -> None:
    model.set_trainable(adapter_name, is_trainable)
    if not is_trainable:
        model.eval()


def model_from_adapter_file(
    base: nn.Module, af: AdapterFile, adapter_name: str = "default", is_trainable: bool = False, source: str = ""
) -> LycoModel:
    """Wrap ``base`` with the adapter ``af`` (resolved against ``base``): adapters are built from the tensors'
    shape plans; on any error ``base`` is left as it was."""
    from ..model import LycoModel

    fit = fit_config(af, {n: tuple(m.weight_shape) for n, m in af.modules.items()})  # type: ignore[arg-type]
    _exact_targets(base, fit.config, set())
    model = LycoModel(base, fit.config, adapter_name, low_cpu_mem_usage=True, plans=fit.plans)
    try:
        assign_adapter_weights(model, adapter_name, _peft_keyed(af), source)
    except BaseException:
        model.unload()
        raise
    _finish(model, adapter_name, is_trainable)
    return model


def add_adapter_file(
    model: LycoModel, af: AdapterFile, adapter_name: str, is_trainable: bool = False, source: str = ""
) -> None:
    """Add ``af`` (resolved against ``model.model``) to an existing model as adapter ``adapter_name``."""
    fit = fit_config(af, {n: tuple(m.weight_shape) for n, m in af.modules.items()})  # type: ignore[arg-type]
    _exact_targets(model.model, fit.config, model._internal_names())
    model.add_adapter(adapter_name, fit.config, low_cpu_mem_usage=True, plans=fit.plans)
    try:
        assign_adapter_weights(model, adapter_name, _peft_keyed(af), source)
    except BaseException:
        model.delete_adapter(adapter_name)
        raise
    _finish(model, adapter_name, is_trainable)
