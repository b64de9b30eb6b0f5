"""PEFT adapter directories: ``adapter_config.json`` + ``adapter_model.safetensors``.

Keys are ``base_model.model.<module path>.<param>`` (adapter name removed), e.g.
``base_model.model.layers.0.q_proj.hada_w1_a``; ``modules_to_save`` copies are stored under the
wrapped module's path. The adapter ``default`` goes to the folder itself, others to sub-folders.
PEFT stores 1-D conv CP cores as ``(r, r, k, 1)``; lyco uses ``(r, r, k)`` and converts here.

One reader (:func:`read_peft_dir`: config + tensors keyed ``<module path>.<param>`` in lyco's layouts, the
keys :mod:`lyco.tree` loads) and one writer (:func:`write_peft_dir`); :func:`read_peft_adapter` /
:func:`write_peft_adapter` convert to and from an :class:`AdapterFile` on top of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, FormatError
from ..methods.config import AdapterConfig, MixedConfig, pattern_value
from ..methods.registry import method_for_peft_type
from ..methods.schema import MethodSchema
from .adapterfile import AdapterFile, ModuleAdapter
from .io import as_path, read_metadata, read_tensors, tensor_writer, text_writer, warn_nonfinite, write_files
from .keys import PEFT_PREFIX, module_keys
from .lycoris import resolve_adapter_file
from .names import ModuleTable
from .peft_config import fit_config

PREFIX = PEFT_PREFIX
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
SAVED_CONFIG = "lyco_config"  # weights metadata: the config they were saved with (torn-folder check)
# PeftConfig fields that are not adapter hyper-parameters.
PEFT_META_FIELDS = {
    "peft_type", "base_model_name_or_path", "revision", "task_type", "inference_mode", "auto_mapping", "peft_version",
}  # fmt: skip


def peft_key(key: str, inverse: bool = False) -> str | None:
    """``layers.0.q.hada_w1_a`` → ``base_model.model.layers.0.q.hada_w1_a``; ``inverse``: the other way
    (``None`` for a key without PEFT's prefix). The only place the prefix is written or read.

    >>> peft_key("fc.lokr_w1"), peft_key("base_model.model.fc.lokr_w1", inverse=True), peft_key("fc.x", inverse=True)
    ('base_model.model.fc.lokr_w1', 'fc.lokr_w1', None)
    """
    if not inverse:
        return PREFIX + key
    return key[len(PREFIX) :] if key.startswith(PREFIX) else None


def config_to_json(config: AdapterConfig, base_model: nn.Module | None) -> dict[str, Any]:
    """The JSON object PEFT writes for this config."""
    data = config.to_dict()
    hf_config = getattr(base_model, "config", None)
    data.update(
        base_model_name_or_path=getattr(hf_config, "_name_or_path", None) or None,
        revision=None,
        task_type=None,
        inference_mode=True,
    )
    if isinstance(data.get("target_modules"), (set, frozenset)):
        data["target_modules"] = sorted(data["target_modules"])
    for key, value in getattr(config, "unknown_fields", {}).items():
        data.setdefault(key, value)  # fields of a newer PEFT, kept from the folder this config was read from
    return dict(sorted(data.items()))


def config_from_json(data: dict[str, Any], source: str) -> AdapterConfig:
    """Build a lyco config from PEFT JSON. Unknown (newer PEFT) fields are reported, not used, and kept
    in ``config.unknown_fields`` so that saving the adapter writes them back."""
    config_cls = method_for_peft_type(data.get("peft_type"), source).config_cls
    for key, allowed in config_cls.peft_fixed.items():
        if key in data and not any(data[key] == a and type(data[key]) is type(a) for a in allowed):
            raise FormatError(
                f"{source}: {key}={data[key]!r} is a PEFT feature lyco does not have (lyco reads {key} only as one "
                f"of {list(allowed)})"
            )
    known = {f.name for f in dataclasses.fields(config_cls)} | set(config_cls.peft_fixed) | config_cls.peft_ignored
    unknown = sorted(k for k in data if k not in known and k not in PEFT_META_FIELDS)
    if unknown:
        warnings.warn(
            f"{source}: config fields lyco does not know (from a newer PEFT?) are kept but not used: {unknown}",
            stacklevel=4,
        )
    skip = set(config_cls.peft_fixed) | config_cls.peft_ignored
    kwargs = {k: v for k, v in data.items() if k in known and k not in skip}
    try:
        config = config_cls(**kwargs)
    except (ConfigError, TypeError) as exc:
        raise FormatError(f"{source}: invalid adapter config ({exc})") from None
    config.unknown_fields = {k: data[k] for k in unknown}
    return config


def adapter_dir(save_directory: str | os.PathLike, adapter_name: str) -> Path:
    """The folder of one adapter: ``save_directory`` for ``default``, else its sub-folder named after it
    (:class:`FormatError` for a name that would point elsewhere: a path, ``..``)."""
    root = Path(save_directory)
    if adapter_name == "default":
        return root
    if not adapter_name or any(c in adapter_name for c in "/\\\0") or adapter_name in (".", ".."):
        raise FormatError(f"adapter name {adapter_name!r} cannot name a sub-folder of {root}")
    return root / adapter_name


def renamed(tensors: Mapping[str, torch.Tensor], method: type[MethodSchema], to_peft: bool) -> dict[str, torch.Tensor]:
    """Tree keys ``<module>.<name>`` ↔ PEFT's key tails ``<module>.<peft name>`` (``lora_down`` ↔
    ``lora_A.weight``) for the method's tensors; other keys unchanged. One function, both ways."""
    pairs = [(p.name, p.peft_name) for p in method.tensor_params().values() if p.peft_name != p.name]
    if not pairs:
        return dict(tensors)
    out = {}
    for key, t in tensors.items():
        for name, peft in pairs:
            src, dst = (name, peft) if to_peft else (peft, name)
            if key.endswith("." + src):
                key = key[: -len(src)] + dst
                break
        out[key] = t
    return out


def _per_module(
    tensors: Mapping[str, torch.Tensor], method: type[MethodSchema], convert: Callable[[dict, str], dict]
) -> dict[str, torch.Tensor]:
    """``tensors`` (keyed ``<module>.<name>``) with ``convert(method tensors of one module, module)`` applied
    per module; other keys (``modules_to_save`` copies) unchanged."""
    own = method.tensor_params()
    groups: dict[str, dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        path, _, name = key.rpartition(".")
        if name in own and path:
            groups.setdefault(path, {})[name] = t
        else:
            out[key] = t
    for path, ts in groups.items():
        out.update({f"{path}.{name}": t for name, t in convert(ts, path).items()})
    return out


def peft_fold(method: type[MethodSchema], config: AdapterConfig, path: str, source: str) -> float:
    """lyco's scale of module ``path`` over PEFT's for the same config: the factor a PEFT folder carries in the
    module's tensors, so that PEFT computes lyco's ``ΔW``; 1 except for options PEFT lacks (``use_rslora`` on
    LoHa/LoKr, LoKr's ``full_matrix``), so PEFT's own folders are never touched."""
    r = pattern_value(config.rank_pattern, path, config.r)
    alpha = float(pattern_value(config.alpha_pattern, path, config.alpha))
    ours, theirs = method.config_scaling(config, r, alpha), method.peft_scaling(config, r, alpha)
    if ours == theirs:
        return 1.0
    if theirs == 0:
        raise FormatError(
            f"{source}: module {path!r} has scale {ours:g} with alpha 0, which PEFT would apply as 0; give it a "
            "non-zero alpha (full_matrix ignores its value) or save it as a LyCORIS file"
        )
    return ours / theirs


def one_method(config: AdapterConfig | MixedConfig, where: str) -> AdapterConfig:
    """``config`` when it is one method's (a PEFT folder holds one method per adapter), else a
    :class:`FormatError` naming the LyCORIS format as the way out."""
    if not isinstance(config, MixedConfig):
        return config
    parts = ", ".join(
        type(p).__name__ + ("+DoRA" if getattr(p, "weight_decompose", False) else "") for p in config.parts
    )
    raise FormatError(
        f"{where}: the adapter holds several methods or settings ({parts}) and a PEFT folder holds one method per "
        "adapter; save it as a LyCORIS/kohya file instead (lyco.save_lycoris(model, 'adapter.safetensors', "
        "adapter_name=...), or `lyco convert <adapter> out.safetensors`), which every tool of the family loads"
    )


def peft_tensors(
    config: AdapterConfig | MixedConfig, tensors: Mapping[str, torch.Tensor], source: str = "<adapter>"
) -> dict[str, torch.Tensor]:
    """An adapter's tensors (keyed ``<module path>.<param>``, lyco layouts) as PEFT stores them: PEFT keys and
    layouts, :func:`peft_fold` folded in (the inverse of what :func:`read_peft_dir` returns)."""
    config = one_method(config, source)
    method = method_for_peft_type(config.peft_type, source)

    def to_peft(ts: dict, path: str) -> dict:
        return method.peft_layout(method.fold_scale(ts, peft_fold(method, config, path, source)))

    tensors = _per_module(tensors, method, to_peft)
    return {peft_key(k): t for k, t in renamed(tensors, method, to_peft=True).items()}


# -- the reader and the writer ----------------------------------------------------------------------------
def read_peft_dir(
    model_id: str | os.PathLike,
    allow_pickle: bool = False,
    subfolder: str | None = None,
    table: ModuleTable | None = None,
) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Config and tensors of a PEFT adapter folder, keyed ``<module path>.<param>`` (PEFT's prefix removed; a
    key without it is a :class:`FormatError`). With ``table`` (the model's modules),
    1-D conv CP cores are converted from PEFT's ``(r, r, k, 1)`` to lyco's ``(r, r, k)``; the scale ratio of
    options PEFT lacks (:func:`peft_fold`) is taken back out of the tensors."""
    folder = as_path(model_id, "adapter folder")
    folder = folder / subfolder if subfolder else folder
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise FormatError(f"{folder}: no {CONFIG_NAME} (not a PEFT adapter folder)")
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad UTF-8 or JSON
        raise FormatError(f"{cfg_path}: unreadable JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise FormatError(f"{cfg_path}: expected a JSON object")
    config = config_from_json(data, str(cfg_path))
    weights = folder / WEIGHTS_NAME
    if not weights.is_file() and (folder / PICKLE_WEIGHTS_NAME).is_file():
        weights = folder / PICKLE_WEIGHTS_NAME
    if weights.is_file():
        check_not_torn(folder, data, config, weights)
    stripped: dict[str, torch.Tensor] = {}
    for key, t in read_tensors(weights, allow_pickle=allow_pickle).items():
        tree_key = peft_key(key, inverse=True)
        if tree_key is None:
            raise FormatError(f"{weights}: key {key!r} lacks PEFT's {PREFIX!r} prefix (not a PEFT adapter's weights)")
        warn_nonfinite(t, f"{weights}: key {key!r}")
        stripped[tree_key] = t
    return config, from_peft_tensors(config, stripped, table, str(weights), str(cfg_path))


def from_peft_tensors(
    config: AdapterConfig,
    tensors: Mapping[str, torch.Tensor],
    table: ModuleTable | None = None,
    source: str = "<state dict>",
    config_source: str | None = None,
) -> dict[str, torch.Tensor]:
    """PEFT-layout tensors keyed ``<module path>.<PEFT param name>`` (prefix already removed) → lyco's names and
    layouts, each tensor checked (:class:`FormatError` naming ``source`` and the key): the inverse of
    :func:`peft_tensors`. ``table`` gives conv kernels (1-D CP cores); the scale ratio of lyco-only options
    (:func:`peft_fold`) is taken back out."""
    config = one_method(config, source)
    method = method_for_peft_type(config.peft_type, config_source or source)
    own = method.tensor_params()
    lyco = renamed(tensors, method, to_peft=False)
    for (key, t), original in zip(lyco.items(), tensors, strict=True):
        name = key.rpartition(".")[2]
        if name in own:
            own[name].check(t, f"{source}: key {peft_key(original)!r}")

    def canonical(ts: dict, path: str) -> dict:
        kernel = table.kernel(path) if table is not None and path in table.shapes else None
        fold = peft_fold(method, config, path, config_source or source)
        ts = method.from_peft_layout(ts)
        return method.canonical(method.fold_scale(ts, 1 / fold) if fold != 1 else ts, kernel)

    return _per_module(lyco, method, canonical)


def write_peft_dir(
    folder: str | os.PathLike, config: AdapterConfig | MixedConfig, tensors: Mapping[str, torch.Tensor], base_model: nn.Module | None = None
) -> Path:
    """Write one adapter (``tensors`` keyed ``<module path>.<param>``, lyco layouts) as a PEFT folder: weights
    (PEFT keys and layouts) then ``adapter_config.json``; returns the folder."""
    folder = as_path(folder, "folder")
    config = one_method(config, str(folder))
    if gaps := config.peft_gaps():
        warnings.warn(
            f"{folder}: {type(config).__name__} sets {gaps}, which PEFT does not have: lyco loads this folder exactly, "
            "PEFT would build other shapes or outputs (for other tools save a LyCORIS file: lyco.save_lycoris)",
            stacklevel=4,
        )
    payload = config_to_json(config, base_model)
    metadata = {"format": "pt", SAVED_CONFIG: _saved_config(payload, type(config))}
    write_files(folder, {  # weights first: a kill between the renames leaves new weights, which name their config
        WEIGHTS_NAME: tensor_writer(peft_tensors(config, tensors, str(folder)), metadata),
        CONFIG_NAME: text_writer(json.dumps(payload, indent=2, sort_keys=True) + "\n"),
    })  # fmt: skip
    return folder


def _saved_config(data: dict[str, Any], config_cls: type[AdapterConfig]) -> str:
    """The config fields that decide what the weights mean (the method's fields and ``peft_type``; not PEFT's
    bookkeeping nor fields lyco does not know), as compact JSON."""
    keep = {f.name for f in dataclasses.fields(config_cls)} | {"peft_type"}
    return json.dumps({k: v for k, v in sorted(data.items()) if k in keep}, separators=(",", ":"))


def check_not_torn(folder: Path, data: dict[str, Any], config: AdapterConfig, weights: Path) -> None:
    """:class:`FormatError` when ``weights`` were saved by lyco with another config than ``data``: a
    ``save_pretrained`` killed between replacing the weights and the config (or a hand-edited config)."""
    saved = read_metadata(weights).get(SAVED_CONFIG)
    if saved is None:
        return  # written by PEFT or an older lyco: nothing to compare
    try:
        was = json.loads(saved)
    except ValueError:
        raise FormatError(f"{weights}: unreadable {SAVED_CONFIG!r} metadata") from None
    now = json.loads(_saved_config(data, type(config)))
    if was != now:
        diff = sorted(k for k in {**was, **now} if was.get(k) != now.get(k))
        raise FormatError(
            f"{folder}: {CONFIG_NAME} does not match the config its {WEIGHTS_NAME} was saved with (fields {diff} "
            "differ): a save_pretrained was interrupted between the two files, or the config was edited. Save the "
            "adapter again (or restore the config it was saved with)"
        )


# -- AdapterFile readers/writers (format conversion without a LycoModel) ------------------------------
def read_peft_adapter(
    model_id: str | os.PathLike,
    allow_pickle: bool = False,
    subfolder: str | None = None,
    model: nn.Module | None = None,
) -> AdapterFile:
    """A PEFT adapter folder as an :class:`AdapterFile` (``convention="peft"``, ``config``: the JSON object).
    Per module ``alpha`` and ``r`` come from ``alpha``/``r`` and the patterns; a module without a rank (LoKr
    with both factors full) has ``alpha / r`` (which PEFT applies) folded into its tensors and ``alpha = r``,
    so ``delta_weight()`` equals PEFT's ΔW (the AdapterFile rule gives such modules scale 1).

    With ``model`` (the base module) weight shapes are taken from its layers and 1-D conv CP cores are
    converted from PEFT's ``(r, r, k, 1)`` to ``(r, r, k)``; without it shapes are read off the tensors.
    ``modules_to_save`` copies cannot be represented and are a :class:`FormatError`.
    """
    table = ModuleTable.from_module(model) if model is not None else None
    config, tensors = read_peft_dir(model_id, allow_pickle=allow_pickle, subfolder=subfolder, table=table)
    source = str(Path(model_id) / subfolder if subfolder else model_id)
    method = method_for_peft_type(config.peft_type, source)
    own = method.tensor_params()
    groups: dict[str, dict[str, torch.Tensor]] = {}
    extra = []
    for key, t in tensors.items():
        path, _, name = key.rpartition(".")
        if name not in own or not path:
            extra.append(peft_key(key))
            continue
        groups.setdefault(path, {})[name] = t
    if extra:
        raise FormatError(
            f"{source}: {len(extra)} key(s) are not {method.display()} adapter weights (modules_to_save copies cannot "
            f"be represented outside a PEFT folder): {extra[:8]}"
        )
    modules: dict[str, ModuleAdapter] = {}
    for name, ts in groups.items():
        method.check_module(set(ts), f"{source}: module {name!r}")
        if table is not None and name not in table.shapes:
            raise FormatError(f"{source}: module {name!r} is not an adaptable layer of the given model")
        r = pattern_value(config.rank_pattern, name, config.r)
        alpha = float(pattern_value(config.alpha_pattern, name, config.alpha))
        module = ModuleAdapter(method.algo, ts, None, table.shapes[name] if table is not None else None)
        scale = method.config_scaling(config, r, alpha)  # lyco's rule (read_peft_dir unfolded lyco-only options)
        if module.unranked:  # AdapterFiles scale such a module by 1
            module = module.with_scale_folded(scale, float(r))
        else:
            module.alpha = scale * module.rank
        modules[name] = module
    af = AdapterFile(modules, convention="peft", config=config_to_json(config, None))
    af.check_shapes(source)
    return af


def write_peft_adapter(
    af: AdapterFile, save_directory: str | os.PathLike, base_model: nn.Module | None = None
) -> Path:
    """Write an :class:`AdapterFile` as a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    The config (``r``/``alpha`` + ``rank_pattern``/``alpha_pattern`` per module and the method's options,
    e.g. LoKr's ``decompose_factor``) is fitted to the tensor shapes so that PEFT plans the same shapes and
    computes the same ΔW (modules without a rank: ``alpha = r``); an adapter PEFT's planning rules cannot
    describe is a :class:`FormatError` naming the modules. ``base_model`` resolves an unresolved file's
    underscore paths and gives conv kernel sizes (without it, shapes are read off the tensors, which treats
    flattened conv factors as linear layers).
    """
    table = ModuleTable.from_module(base_model) if base_model is not None else None
    if not af.resolved and table is not None:
        af = resolve_adapter_file(af, table)
    names = {n: n for n in af.modules} if af.resolved else module_keys(list(af.modules), "peft", "", resolved=False)
    shapes = {n: m.guess_weight_shape() for n, m in af.modules.items()}
    if table is not None:
        shapes.update({n: table.shapes[names[n]] for n in af.modules if names[n] in table.shapes})
    fit = fit_config(af, shapes)
    config = one_method(fit.config, str(save_directory))
    if fit.problems:
        raise FormatError(
            "PEFT's config cannot describe these adapter shapes (PEFT plans shapes from one set of options"
            + ("" if base_model is not None else "; pass base_model= if conv layers are involved")
            + "):\n  " + "\n  ".join(fit.problems)
        )
    config.target_modules = [names[n] for n in config.target_modules]  # type: ignore[union-attr]
    config.rank_pattern = {names.get(k, k): v for k, v in config.rank_pattern.items()}
    config.alpha_pattern = {names.get(k, k): v for k, v in config.alpha_pattern.items()}
    tensors = {f"{names[name]}.{p}": t for name, m in af.modules.items() for p, t in m.tensors.items()}
    return write_peft_dir(save_directory, config, tensors, base_model)
