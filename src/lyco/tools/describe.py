"""``lyco inspect``: what an adapter file holds — format, producer, modules, ranks, alphas and the scale rule."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..formats.adapterfile import AdapterFile, ModuleAdapter
from ..formats.consumers import consumer_report, consumer_warnings

CONVENTIONS = {
    "peft": "PEFT (base_model.model.<module>.<param>)",
    "lycoris": "lycoris-lora wrapper (lycoris_ prefix, as SimpleTuner writes)",
    "kohya": "kohya-ss (lora_unet_ / lora_te*_ prefixes, dots as underscores)",
    "onetrainer": "OneTrainer (lora_transformer_ prefix)",
    "ai-toolkit": "ai-toolkit (diffusion_model.<dotted path>)",
    "diffusers": "diffusers / PEFT-style dotted keys (transformer., unet., text_encoder.)",
}
NETWORK_MODULES = {
    "lycoris.kohya": "LyCORIS network (lycoris.kohya) via kohya-ss sd-scripts or a compatible trainer",
    "networks.lora": "kohya-ss sd-scripts networks.lora",
}
RULE_ALPHA = "alpha / r"
RULE_NO_ALPHA = "no alpha stored → alpha = r (scale 1)"
RULE_UNRANKED = "{} → scale 1 (alpha ignored)"  # filled with the method's ``unranked`` description


@dataclass
class ModuleInfo:
    name: str
    algo: str
    rank: int | None
    alpha: float | None
    scale: float
    rule: str
    weight_shape: tuple[int, ...]  # from the base when known, else read off the tensors (conv kernels may be flattened)
    num_params: int
    dtypes: list[str]
    tensors: dict[str, tuple[int, ...]]
    dora: str | None = None  # DoRA's norm axis ("out" / "in"), None without DoRA


@dataclass
class AdapterReport:
    """Everything ``lyco inspect`` shows (``to_json()`` is its ``--json`` output)."""

    path: str
    format: str
    convention: str
    producer: str
    algos: list[str]
    modules: list[ModuleInfo]
    num_params: int
    size_bytes: int
    dtypes: list[str]
    rules: dict[str, int]
    metadata: dict[str, str] = field(default_factory=dict)
    network_args: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    consumer_notes: list[str] = field(default_factory=list)  # known ComfyUI / AUTOMATIC1111 shortfalls (files)
    # per consumer: loads_fully, applied (count), skipped / different ({module: why}), summary (one line)
    consumers: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def module_rule(m: ModuleAdapter) -> str:
    """Which part of the scale rule applies to ``m`` (see :meth:`ModuleAdapter.scale`)."""
    if m.unranked:
        return RULE_UNRANKED.format(m.method.unranked)
    if m.alpha is None:
        return RULE_NO_ALPHA
    return RULE_ALPHA


def guess_producer(af: AdapterFile) -> str:
    """The tool that wrote the file, as far as its config, metadata and key convention tell."""
    md = af.metadata
    if af.config is not None:
        version = af.config.get("peft_version")
        return f"PEFT{f' {version}' if version else ''} (adapter_config.json)"
    module = md.get("ss_network_module")
    if module:
        return NETWORK_MODULES.get(module, f"ss_network_module = {module}")
    if any(k.startswith("ss_") for k in md):
        return "kohya-ss sd-scripts or a compatible trainer (ss_* metadata)"
    return CONVENTIONS.get(af.convention, af.convention) + " — no producer metadata"


def disk_size(path: str | os.PathLike) -> int:
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.iterdir() if f.is_file())
    return p.stat().st_size if p.exists() else 0


def _consumers(af: AdapterFile) -> dict[str, dict[str, Any]]:
    report = consumer_report(af)
    return {
        name: {"loads_fully": v.loads_fully, "applied": v.applied, "skipped": v.skipped, "different": v.different,
               "summary": v.summary(len(af.modules))}
        for name, v in report.items()
    }  # fmt: skip


def describe(af: AdapterFile, path: str | os.PathLike, as_read: AdapterFile | None = None) -> AdapterReport:
    """Report on ``af``, read from ``path`` (a PEFT directory or a LyCORIS/kohya file); ``as_read``: the file as
    read, before its names were resolved against a base model (the consumers see its keys), default ``af``."""
    modules = []
    for name, m in sorted(af.modules.items()):
        dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in m.tensors.values()})
        modules.append(
            ModuleInfo(
                name, m.algo, m.rank, m.alpha, m.scale(), module_rule(m),
                m.guess_weight_shape(), m.num_params(), dtypes,
                {k: tuple(v.shape) for k, v in sorted(m.tensors.items())},
                None if m.dora is None else ("out" if m.dora_on_out() else "in"),
            )
        )  # fmt: skip
    args = af.metadata.get("ss_network_args")
    try:
        network_args = json.loads(args) if args else None
    except json.JSONDecodeError:
        network_args = {"unparsed": args}
    return AdapterReport(
        path=str(path),
        format="PEFT directory" if Path(path).is_dir() else "LyCORIS/kohya safetensors file",
        convention=af.convention,
        producer=guess_producer(af),
        algos=sorted(af.algos()),
        modules=modules,
        num_params=af.num_params(),
        size_bytes=disk_size(path),
        dtypes=sorted({d for m in modules for d in m.dtypes}),
        rules=dict(Counter(m.rule for m in modules)),
        metadata=dict(sorted(af.metadata.items())),
        network_args=network_args,
        config=af.config,
        consumer_notes=[] if Path(path).is_dir() else consumer_warnings(
            af, style=af.convention, written=None if (as_read or af).resolved else (as_read or af)),
        consumers=_consumers(as_read or af) if not (as_read or af).resolved or af.config is not None else {},
    )
