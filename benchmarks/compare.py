"""lyco vs PEFT vs lycoris-lora: step time and bytes saved for backward, relative to the frozen model.

What it measures (CPU, fp32, one process, everything in the same run):

* Cases: stacks of ``[Linear(d, h), GELU, Linear(h, d)]`` blocks (big, tiny, and decode-size batches
  of 1 and 4 tokens besides 512-token ones), and a small Llama built from a ``LlamaConfig`` (no
  download; hidden 1024, intermediate 2752, 2 layers, 16 heads, vocab 1000) with all 7 projections
  adapted, and two stacks of ``[Conv2d(c, c, 3, padding=1), SiLU]`` (UNet-like: 320 channels at 32×32 and
  64 channels at 64×64, batch 2; lycoris-lora gets ``conv_dim = conv_alpha = r``). Every adapted model
  is a deep copy of one seeded base model; r = alpha = 8.
* Implementations, per method (LoRA, LoHa, LoKr): the frozen base model; ``lyco.get_model``;
  ``peft.get_peft_model`` with ``peft.LoraConfig`` / ``peft.LoHaConfig`` / ``peft.LoKrConfig``; lycoris-lora's
  ``create_lycoris(algo="lora"|"loha"|"lokr", linear_dim=r, linear_alpha=r, factor=-1)`` + ``apply_to()``,
  targets given as a ``target_name`` regex preset matching exactly the modules lyco and PEFT adapt.
  lycoris-lora runs in its default mode for ``nn.Linear`` (``bypass_mode=False``: it rebuilds the dense
  ΔW in every forward and computes ``W x + ΔW x``); ``--lycoris-bypass`` adds its bypass mode as an
  extra implementation. All adapters are random (``init_weights=False``; lycoris-lora's zero-initialised
  factors are filled with random numbers), so every adapter really moves the output: that is checked
  for each case (sanity only, no numerics are compared — the inits differ).
* Modes: ``train`` = forward + backward of a scalar loss (``output.mean()``); adapter weights require
  grad, base weights are frozen, and the *input requires grad* in every implementation, so that the
  frozen model has a backward (gradient w.r.t. the input through every layer) to compare with.
  ``infer`` = ``torch.no_grad()`` forward in eval mode.
* Time: ``--warmup`` untimed rounds (more for very short steps), then rounds in which every implementation of the case runs once,
  in an order rotated each round (interleaved, so machine drift hits all alike); the number of rounds
  fits a per-case time budget, between ``--min-repeats`` and ``--max-repeats``. Reported: the median.
* Memory: bytes saved for backward in one training step, via ``torch.autograd.graph.saved_tensors_hooks``:
  the sum of the sizes of the distinct storages of packed tensors (dedup by storage pointer), leaving
  out storages of parameters and buffers (base weights and adapter factors exist anyway; a rebuilt
  dense ΔW or an r²-wide intermediate is counted). Deterministic, a proxy for the training peak on top
  of the weights. Tensors a custom ``autograd.Function`` keeps as plain ``ctx`` attributes escape the
  hooks. The JSON also has ``rss_fwd_delta``: resident-set growth over that forward (``/proc/self/statm``)
  after ``malloc_trim(0)``; since freed temporaries stay in the heap it approximates the forward's peak
  (saved tensors + temporaries such as a rebuilt ΔW), but it is allocator dependent and noisy; shown
  in the table with ``--rss``.

Each case also prints how much CPU other processes used meanwhile (``/proc/stat``) and warns above
0.2 cores: on a 2-core machine a concurrent job (a test run) inflates and quantises step times.

Output: per case a table with time and saved-memory ratios to the frozen model (× frozen) for lyco,
PEFT and lycoris-lora, and lyco's speed-up over PEFT (PEFT time / lyco time, > 1: lyco is faster).

Run::

    .venv/bin/python benchmarks/compare.py              # all cases, about 5 minutes on 2 cores
    .venv/bin/python benchmarks/compare.py --quick      # fewer, smaller cases, under a minute
    .venv/bin/python benchmarks/compare.py --json results.json --cases llama --threads 4
    LYCO_PATH=factored .venv/bin/python benchmarks/compare.py   # force a lyco path (default: auto)

Caveats: a shared 2-core machine is noisy; medians of interleaved runs make the *ratios* fairly
stable, but absolute times mean little and ratios of sub-millisecond steps (decode, tiny dims) are
dominated by Python overhead. fp32 only. lyco measures whatever forward path it picks when run
(``LYCO_PATH`` is recorded in the output). ``--quick`` uses a 1-layer, 256-token Llama and fewer cases.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import lyco

METHODS = ("lora", "loha", "lokr", "lora+dora", "loha+dora", "lokr+dora")
LABELS = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "lora+dora": "LoRA+DoRA", "loha+dora": "LoHa+DoRA",
          "lokr+dora": "LoKr+DoRA"}  # fmt: skip
PEFT_HAS = {"lora", "loha", "lokr", "lora+dora"}  # PEFT has DoRA on LoRA only
IMPLS = ("lyco", "peft", "lycoris")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MLP_TARGETS = ["up", "down"]
CONV_TARGETS = ["conv"]


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # "mlp" | "llama"
    d: int
    h: int
    tokens: int
    layers: int
    budget_s: float  # time budget for the timed rounds of one mode

    def label(self) -> str:
        if self.kind == "llama":
            return f"llama {self.layers}L {self.d}/{self.h}, {self.tokens} tok"
        if self.kind == "conv":
            return f"conv {self.layers}×[{self.d}ch 3×3, SiLU], {self.tokens}×{self.h}×{self.h}"
        return f"mlp {self.layers}×[{self.d}→{self.h}→{self.d}], {self.tokens} tok"


def default_cases(quick: bool) -> list[Case]:
    if quick:
        return [
            Case("mlp-1024x2752-t128", "mlp", 1024, 2752, 128, 1, 2.0),
            Case("mlp-1024x2752-t1", "mlp", 1024, 2752, 1, 1, 1.0),
            Case("mlp-64x64-t512", "mlp", 64, 64, 512, 2, 1.0),
            Case("conv-64ch-32px", "conv", 64, 32, 2, 1, 1.0),
            Case("llama-1L-t256", "llama", 1024, 2752, 256, 1, 3.0),
        ]
    return [
        Case("mlp-1024x1024-t512", "mlp", 1024, 1024, 512, 1, 8.0),
        Case("mlp-1024x2752-t512", "mlp", 1024, 2752, 512, 1, 12.0),
        Case("mlp-1024x2752-t4", "mlp", 1024, 2752, 4, 1, 3.0),
        Case("mlp-1024x2752-t1", "mlp", 1024, 2752, 1, 1, 3.0),
        Case("mlp-64x64-t512", "mlp", 64, 64, 512, 2, 2.0),
        Case("mlp-64x64-t1", "mlp", 64, 64, 1, 2, 2.0),
        Case("mlp-16x16-t512", "mlp", 16, 16, 512, 2, 2.0),
        Case("conv-320ch-32px", "conv", 320, 32, 2, 2, 8.0),  # conv: d = channels, h = height = width, tokens = batch
        Case("conv-64ch-64px", "conv", 64, 64, 2, 2, 3.0),
        Case("llama-2L-t512", "llama", 1024, 2752, 512, 2, 60.0),
    ]


class Block(nn.Module):
    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, h, bias=False)
        self.act = nn.GELU()
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class ConvStack(nn.Module):
    """``layers`` × [Conv2d(d, d, 3, padding=1), SiLU]: UNet-resblock-like convolutions."""

    def __init__(self, d: int, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"conv": nn.Conv2d(d, d, 3, padding=1), "act": nn.SiLU()}) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block["act"](block["conv"](x))
        return x


class MLPStack(nn.Module):
    def __init__(self, d: int, h: int, layers: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, h) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def build_base(case: Case) -> tuple[nn.Module, list[str], Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
    """(frozen base model, target module suffixes, call(model, x) -> output tensor)."""
    if case.kind == "mlp":
        return MLPStack(case.d, case.h, case.layers), MLP_TARGETS, lambda m, x: m(x)
    if case.kind == "conv":
        return ConvStack(case.d, case.layers), CONV_TARGETS, lambda m, x: m(x)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=case.d,
        intermediate_size=case.h,
        num_hidden_layers=case.layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=1000,
    )
    model = LlamaForCausalLM(config)

    def call(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m(inputs_embeds=x, use_cache=False).logits

    return model, LLAMA_TARGETS, call


# ---------------------------------------------------------------------------------------------
# implementations
# ---------------------------------------------------------------------------------------------
@dataclass
class Impl:
    name: str  # e.g. "lyco-loha", "frozen"
    impl: str  # "frozen" | "lyco" | "peft" | "lycoris" | "lycoris-bypass"
    method: str | None
    model: nn.Module
    extra: list[nn.Module] = field(default_factory=list)  # modules outside `model` (lycoris network)
    note: str = ""

    def modules(self) -> list[nn.Module]:
        return [self.model, *self.extra]

    def trainable(self) -> list[nn.Parameter]:
        return [p for m in self.modules() for p in m.parameters() if p.requires_grad]

    def frozen_storages(self) -> set[int]:
        ptrs = set()
        for m in self.modules():
            for t in [*m.parameters(), *m.buffers()]:
                ptrs.add(t.untyped_storage().data_ptr())
        return ptrs

    def set_mode(self, train: bool) -> None:
        for m in self.modules():
            m.train(train)


def split_method(method: str) -> tuple[str, bool]:
    """``"lokr+dora"`` → ``("lokr", True)``."""
    algo, _, extra = method.partition("+")
    return algo, extra == "dora"


def make_lyco(base: nn.Module, method: str, targets: list[str], r: int) -> Impl:
    algo, dora = split_method(method)
    cls = {"lora": lyco.LoRAConfig, "loha": lyco.LoHaConfig, "lokr": lyco.LoKrConfig}[algo]
    config = cls(r=r, alpha=r, target_modules=targets, init_weights=False, weight_decompose=dora)
    model = lyco.get_model(copy.deepcopy(base), config)
    return Impl(
        f"lyco-{method}", "lyco", method, model, note=f"LYCO_PATH={os.environ.get('LYCO_PATH', 'auto')}"
    )


def make_peft(base: nn.Module, method: str, targets: list[str], r: int) -> Impl:
    import peft

    algo, dora = split_method(method)
    if algo == "lora":
        config = peft.LoraConfig(r=r, lora_alpha=r, target_modules=targets, init_lora_weights=False, use_dora=dora)
    else:
        cls = peft.LoHaConfig if algo == "loha" else peft.LoKrConfig
        config = cls(r=r, alpha=r, target_modules=targets, init_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), config)
    return Impl(f"peft-{method}", "peft", method, model)


def make_lycoris(base: nn.Module, method: str, targets: list[str], r: int, bypass: bool) -> Impl:
    from lycoris import LycorisNetwork, create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    # Class-level (global) preset state: reset every key, select modules by full-name regex only.
    LycorisNetwork.apply_preset(
        {
            "enable_conv": True,
            "target_module": [],
            "target_name": [rf"^(.*\.)?({'|'.join(targets)})$"],
            "module_algo_map": {},
            "name_algo_map": {},
            "use_fnmatch": False,
            "lora_prefix": "lycoris",
            "exclude_name": [],
        }
    )
    model = copy.deepcopy(base)
    algo, dora = split_method(method)
    kwargs: dict[str, Any] = {"algo": algo, "factor": -1, **({"dora_wd": True} if dora else {})}
    if bypass:
        kwargs["bypass_mode"] = True
    net = create_lycoris(model, 1.0, linear_dim=r, linear_alpha=r, conv_dim=r, conv_alpha=r, **kwargs)
    net.apply_to()
    expected = sum(1 for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in targets)
    if len(net.loras) != expected:
        raise RuntimeError(f"lycoris-lora wrapped {len(net.loras)} modules, expected {expected}")
    model.requires_grad_(False)
    net.requires_grad_(True)
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in net.parameters():  # its LoHa zeroes w2_a and its LoKr w2 / w2_b: make the delta non-zero
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.01)
    modes = {getattr(lora, "bypass_mode", None) for lora in net.loras}
    name = "lycoris-bypass" if bypass else "lycoris"
    return Impl(f"{name}-{method}", name, method, model, [net], note=f"bypass_mode={sorted(map(str, modes))}")


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------
def _trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc), so RSS growth reflects new allocations."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class CpuMonitor:
    """CPU time other processes used while it ran, in cores (from ``/proc/stat`` minus this process)."""

    def __init__(self) -> None:
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            own = int(fields[11]) + int(fields[12])  # utime + stime (all threads)
        except (OSError, ValueError, IndexError):
            return None
        busy = sum(vals[:8]) - vals[3] - vals[4]  # minus idle, iowait
        return time.perf_counter(), busy, own

    def other_cores(self) -> float | None:
        end = self._read()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return None
        ticks = os.sysconf("SC_CLK_TCK")
        return max(
            0.0, ((end[1] - self.start[1]) - (end[2] - self.start[2])) / ticks / (end[0] - self.start[0])
        )


def step(impl: Impl, call: Callable, x: torch.Tensor, train: bool) -> None:
    if train:
        for p in impl.trainable():
            p.grad = None
        x.grad = None
        call(impl.model, x).mean().backward()
    else:
        with torch.no_grad():
            call(impl.model, x)


def saved_for_backward(impl: Impl, call: Callable, x: torch.Tensor) -> dict[str, Any]:
    """Bytes of distinct non-parameter storages packed for backward in one training step."""
    skip = impl.frozen_storages()
    seen: dict[int, int] = {}
    n_packed = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal n_packed
        n_packed += 1
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            seen[id(t)] = t.numel() * t.element_size()
            return t
        ptr = storage.data_ptr()
        if ptr not in skip:
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    impl.set_mode(True)
    for p in impl.trainable():
        p.grad = None
    x.grad = None
    gc.collect()
    _trim_heap()
    rss0 = rss_bytes()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = call(impl.model, x)
        loss = out.mean()
    rss1 = rss_bytes()
    loss.backward()
    del out, loss
    rss_delta = None if rss0 is None or rss1 is None else rss1 - rss0
    return {"saved_bytes": sum(seen.values()), "n_packed": n_packed, "rss_fwd_delta": rss_delta}


def timed_rounds(
    impls: list[Impl], call: Callable, x: torch.Tensor, train: bool, case: Case, args: argparse.Namespace
) -> tuple[dict[str, list[float]], int]:
    for impl in impls:
        impl.set_mode(train)
    est = dict.fromkeys((i.name for i in impls), 0.0)
    done = 0
    # at least --warmup rounds; short steps get up to 3 (first calls at new shapes are slow)
    while done < args.warmup or (done < 3 and sum(est.values()) < 0.1):
        for impl in impls:
            t0 = time.perf_counter()
            step(impl, call, x, train)
            est[impl.name] = time.perf_counter() - t0
        done += 1
    per_round = max(sum(est.values()), 1e-6)
    rounds = int(
        min(args.max_repeats, max(args.min_repeats, math.ceil(case.budget_s * args.budget_scale / per_round)))
    )
    samples: dict[str, list[float]] = {i.name: [] for i in impls}
    for k in range(rounds):
        order = impls[k % len(impls) :] + impls[: k % len(impls)]
        for impl in order:
            t0 = time.perf_counter()
            step(impl, call, x, train)
            samples[impl.name].append(time.perf_counter() - t0)
    return samples, rounds


def sanity(impls: list[Impl], call: Callable, x: torch.Tensor) -> dict[str, float]:
    """Relative max change of each adapted model's output vs the frozen model (must be > 0)."""
    outs = {}
    with torch.no_grad():
        for impl in impls:
            impl.set_mode(False)
            outs[impl.name] = call(impl.model, x).float()
    ref = outs["frozen"]
    scale = ref.abs().max().clamp_min(1e-12)
    return {n: float((o - ref).abs().max() / scale) for n, o in outs.items() if n != "frozen"}


def run_case(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    monitor = CpuMonitor()
    torch.manual_seed(args.seed)
    base, targets, call = build_base(case)
    base.requires_grad_(False)
    impls = [Impl("frozen", "frozen", None, base)]
    for method in args.methods:
        torch.manual_seed(args.seed + 1)
        impls.append(make_lyco(base, method, targets, args.r))
        if method in PEFT_HAS:
            torch.manual_seed(args.seed + 1)
            impls.append(make_peft(base, method, targets, args.r))
        torch.manual_seed(args.seed + 1)
        impls.append(make_lycoris(base, method, targets, args.r, bypass=False))
        if args.lycoris_bypass:
            torch.manual_seed(args.seed + 1)
            impls.append(make_lycoris(base, method, targets, args.r, bypass=True))
    gen = torch.Generator().manual_seed(args.seed + 2)
    shape = (case.tokens, case.d, case.h, case.h) if case.kind == "conv" else (1, case.tokens, case.d)
    x = torch.randn(*shape, generator=gen)

    result: dict[str, Any] = {
        "case": case.name,
        "label": case.label(),
        "notes": {i.name: i.note for i in impls if i.note},
        "trainable_params": {i.name: sum(p.numel() for p in i.trainable()) for i in impls},
    }
    result["sanity_rel_change"] = sanity(impls, call, x)
    result["modes"] = {}
    for mode in args.modes:
        train = mode == "train"
        xin = x.clone().requires_grad_(train)
        samples, rounds = timed_rounds(impls, call, xin, train, case, args)
        entry: dict[str, Any] = {"rounds": rounds, "samples_s": samples}
        entry["median_s"] = {n: statistics.median(s) for n, s in samples.items()}
        if train:
            entry["memory"] = {i.name: saved_for_backward(i, call, xin) for i in impls}
        result["modes"][mode] = entry
    result["other_cores"] = monitor.other_cores()
    del impls, base
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def fmt_ratio(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    if v >= 100:
        return f"{v:.0f}×"
    if v >= 10:
        return f"{v:.1f}×"
    return f"{v:.2f}×"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def fmt_ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.3f}" if ms < 1 else f"{ms:.2f}" if ms < 100 else f"{ms:.0f}"


def render_case(res: dict[str, Any], args: argparse.Namespace) -> str:
    impls = list(IMPLS) + (["lycoris-bypass"] if args.lycoris_bypass else [])
    head = {"lyco": "lyco", "peft": "PEFT", "lycoris": "lycoris", "lycoris-bypass": "lyc-byp"}
    lines = []
    rounds = ", ".join(f"{m} {e['rounds']}" for m, e in res["modes"].items())
    lines.append(f"== {res['label']}  (rounds: {rounds}) ==")
    cols = ["mode", "method", "frozen ms", *(f"{head[i]} t×" for i in impls), "lyco vs PEFT"]
    has_mem = "train" in res["modes"]
    if has_mem:
        cols += ["frozen saved", *(f"{head[i]} m×" for i in impls)]
        if args.rss:
            cols += ["frozen RSS+", *(f"{head[i]} RSS+" for i in impls)]
    rows = []
    for mode, entry in res["modes"].items():
        med = entry["median_s"]
        f = med["frozen"]
        for method in args.methods:
            row = [mode, LABELS[method], fmt_ms(f)]
            row += [fmt_ratio(med[f"{i}-{method}"] / f if f"{i}-{method}" in med else None) for i in impls]
            row.append(fmt_ratio(med[f"peft-{method}"] / med[f"lyco-{method}"] if f"peft-{method}" in med else None))
            if has_mem:
                if mode == "train":
                    mem = entry["memory"]
                    fb = mem["frozen"]["saved_bytes"]
                    row.append(fmt_bytes(fb))
                    row += [
                        fmt_ratio(mem[f"{i}-{method}"]["saved_bytes"] / fb if fb and f"{i}-{method}" in mem else None)
                        for i in impls
                    ]
                    if args.rss:
                        row.append(fmt_bytes(mem["frozen"]["rss_fwd_delta"]))
                        row += [
                            fmt_bytes(mem[f"{i}-{method}"]["rss_fwd_delta"] if f"{i}-{method}" in mem else None)
                            for i in impls
                        ]
                else:
                    row += [""] * (len(cols) - len(row))
            rows.append(row)
    widths = [max(len(c), *(len(r[k]) for r in rows)) for k, c in enumerate(cols)]

    def fmt_row(r: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if k > 1 else v.ljust(w) for k, (v, w) in enumerate(zip(r, widths, strict=True))
        )

    lines.append(fmt_row(cols))
    lines.extend(fmt_row(r) for r in rows)
    bad = [n for n, v in res["sanity_rel_change"].items() if not v > args.sanity_tol]
    changes = ", ".join(f"{n} {v:.2g}" for n, v in res["sanity_rel_change"].items())
    lines.append(
        f"sanity (rel. output change vs frozen): {changes}" + (f"  !! NO CHANGE: {bad}" if bad else "")
    )
    counts = res["trainable_params"]
    per_method = {m: sorted({v for n, v in counts.items() if n.endswith(f"-{m}")}) for m in args.methods}
    lines.append(
        "trainable params: " + ", ".join(f"{m} {'/'.join(map(str, v))}" for m, v in per_method.items())
    )
    if any(len(v) != 1 or 0 in v for v in per_method.values()):
        lines.append(f"!! trainable parameter counts differ between implementations: {counts}")
    other = res.get("other_cores")
    if other is not None and other > 0.2:
        lines.append(
            f"!! other processes used {other:.2f} cores on average during this case: timings are disturbed"
        )
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    import peft
    import transformers

    try:
        from importlib.metadata import version

        lycoris_version = version("lycoris-lora")
    except Exception:
        lycoris_version = "?"
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "lyco": lyco.__version__,
        "peft": peft.__version__,
        "lycoris-lora": lycoris_version,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "LYCO_PATH": os.environ.get("LYCO_PATH", "(unset: auto)"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer, smaller cases; under a minute")
    ap.add_argument("--cases", default="", help="comma-separated substrings of case names to keep")
    ap.add_argument("--methods", default="lora,loha,lokr", help=f"comma-separated subset of: {','.join(METHODS)}")
    ap.add_argument("--modes", default="train,infer", help="comma-separated subset of: train,infer")
    ap.add_argument("--r", type=int, default=8, help="rank (alpha = r)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed rounds at least (default 1; rounds under 0.1 s: up to 3)",
    )
    ap.add_argument(
        "--min-repeats", type=int, default=None, help="timed rounds at least (default 5, --quick 3)"
    )
    ap.add_argument(
        "--max-repeats", type=int, default=None, help="timed rounds at most (default 50, --quick 20)"
    )
    ap.add_argument("--budget-scale", type=float, default=1.0, help="multiply every case's time budget")
    ap.add_argument(
        "--lycoris-bypass", action="store_true", help="also time lycoris-lora with bypass_mode=True"
    )
    ap.add_argument("--rss", action="store_true", help="show RSS growth over the training forward (MiB)")
    ap.add_argument("--sanity-tol", type=float, default=1e-4, help="min relative output change per adapter")
    ap.add_argument("--json", metavar="PATH", help="write raw results (all samples) as JSON")
    args = ap.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not set(args.methods) <= set(METHODS) or not set(args.modes) <= {"train", "infer"} or not args.methods:
        ap.error(f"--methods must be from {','.join(METHODS)} and --modes from train,infer")
    args.warmup = args.warmup if args.warmup is not None else 1
    args.min_repeats = args.min_repeats if args.min_repeats is not None else (3 if args.quick else 5)
    args.max_repeats = args.max_repeats if args.max_repeats is not None else (20 if args.quick else 50)
    torch.set_num_threads(args.threads)
    cases = default_cases(args.quick)
    if args.cases:
        keep = [s.strip() for s in args.cases.split(",") if s.strip()]
        cases = [c for c in cases if any(k in c.name for k in keep)]
        if not cases:
            ap.error(f"no case matches {keep}; cases: {[c.name for c in default_cases(args.quick)]}")

    env = environment()
    print("lyco vs PEFT vs lycoris-lora — " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print(
        f"r={args.r}, alpha={args.r}, fp32. t× = median step time / frozen's; m× = bytes saved for backward / "
        "frozen's (params excluded); lyco vs PEFT = PEFT time / lyco time (> 1: lyco faster).\n"
        "lycoris-lora: create_lycoris(algo, linear_dim=r, linear_alpha=r, factor=-1), default mode "
        "(bypass_mode=False: dense ΔW rebuilt each forward)."
    )
    start = time.perf_counter()
    results = []
    n_bad = 0
    for case in cases:
        t0 = time.perf_counter()
        res = run_case(case, args)
        res["wall_s"] = time.perf_counter() - t0
        results.append(res)
        n_bad += sum(1 for v in res["sanity_rel_change"].values() if not v > args.sanity_tol)
        print()
        other = "?" if res["other_cores"] is None else f"{res['other_cores']:.2f}"
        print(
            render_case(res, args) + f"\n({res['wall_s']:.1f} s; other processes: {other} cores)", flush=True
        )
    total = time.perf_counter() - start
    print(f"\ntotal {total:.1f} s")
    if args.json:
        payload = {"env": env, "args": {k: v for k, v in vars(args).items() if k != "json"}, "total_s": total,
                   "cases": results}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"raw results written to {args.json}")
    if n_bad:
        print(f"!! {n_bad} adapter(s) did not change the output", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
