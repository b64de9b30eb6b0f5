"""GPU training step (issue 5): lyco vs PEFT vs lycoris-lora on a bf16 Llama, as ratios to the frozen model.

How to run it on the GPU machine (no network there; it has torch, transformers, peft, einops, numpy,
tqdm and safetensors, but no lycoris-lora, and lyco is not installed: use ``PYTHONPATH=src``)::

    # here, once, in the repo root (network to PyPI needed): wheels into a git-ignored .whl/
    mkdir -p .git/info && echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps -d .whl lycoris-lora==4.1.3 toml peft==0.21.2
    # (all three are pure-python py3-none-any wheels; for binary ones add --only-binary=:all:
    #  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64)

    # on the device (carry .whl), in the repo root:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
      && PYTHONPATH=/tmp/site:src:$PYTHONPATH python3 benchmarks/gpu_step.py

lycoris-lora 4.1.3's Requires-Dist is torch, einops, toml, tqdm, numpy, safetensors; importing it needs
all of them (``lycoris.modules`` imports ``einops`` for BOFT, ``lycoris.utils`` ``numpy``/``tqdm``/
``safetensors``, the presets ``toml``). Only ``toml`` is missing on the GPU machine. ``peft==0.21.2`` is
carried to measure the PEFT version the project tests against (the machine's own peft may differ).
Without lycoris-lora its rows print as skipped.

What it measures (one process, everything in the same run):

* Model: ``LlamaForCausalLM`` built from a ``transformers.LlamaConfig`` with random weights (no
  download): ``--layers 4``, ``--hidden 4096``, ``--intermediate 11008``, head_dim 128 (32 heads, as
  many KV heads), vocab ``--vocab 1000`` (as in ``compare.py``: a 32000-token head would add ~14 % of
  fixed work to every row and flatten the ratios), SDPA attention (transformers' default), in
  ``--dtype bfloat16`` on ``--device cuda``. Input: ``--batch 1`` × ``--tokens 4096 / batch`` positions
  of random ``inputs_embeds``.
* Step: forward + backward of ``logits.mean()`` with the input embeddings requiring grad in every
  implementation and the base weights frozen (``compare.py``'s convention), so that the frozen model
  also runs a backward through every layer. No optimizer step.
* Implementations (all 7 projections q,k,v,o,gate,up,down targeted; r = alpha = ``--rank 8``; every
  adapter random, ``init_weights=False``, so each one really moves the output — checked):
  frozen model; ``lyco.get_model`` LoHa / LoKr with its default fp32 adapter weights on the bf16 base
  (``autocast_adapter_dtype=True``) and, with ``--adapter-dtype both`` (default), also with adapters in
  the base dtype (``autocast_adapter_dtype=False``, rows ``… bf16``); ``peft.get_peft_model`` LoHa / LoKr
  with PEFT's defaults (fp32 adapters), and PEFT LoRA r = alpha = 2·rank (16: the same number of
  trainable parameters as LoHa r8) as a reference point; lycoris-lora ``create_lycoris(algo,
  linear_dim=r, linear_alpha=r, factor=-1)`` + ``apply_to()`` in its default mode (``bypass_mode=False``:
  ΔW rebuilt in every forward, as ``compare.py`` drives it; ``--lycoris-bypass`` adds bypass mode),
  network moved to the device in fp32.
* Time: ``--warmup`` untimed steps per implementation, then ``--rounds`` rounds in which every
  implementation runs one step, in an order rotated each round. One step is timed as
  ``synchronize; perf_counter; step; synchronize; perf_counter`` (host overhead of the wrappers
  included). Reported: the median.
* Memory (CUDA): peak of one step = the bytes of this implementation's own parameters and buffers
  (base weights + adapters) + (``max_memory_allocated`` during the step − ``memory_allocated`` before it,
  after ``reset_peak_memory_stats``; gradients set to None first). All implementations are resident at
  once (deep copies), so the raw peak would include the others' weights; this is what the step would
  peak at alone. The input tensor itself and optimizer state are not counted.
  (CPU): bytes saved for backward, as in ``compare.py`` (distinct non-parameter storages packed by
  autograd); no peak is measured on CPU.

Targets (issue 5, the H100 setup): lyco ≤ 1.15× the frozen step time and ≤ 1.10× its peak memory;
shown next to lyco's rows on CUDA. "lyco vs PEFT" = PEFT time / lyco time, same method, PEFT with its
defaults (> 1: lyco faster).

``--profile``: afterwards one step of the frozen model and of each lyco row under ``torch.profiler``,
top 15 ops by self CUDA time (self CPU time on CPU). ``--only``: comma-separated row names or groups
(``lyco``, ``peft``, ``lora``, ``lycoris``, ``loha``, ``lokr``, ``lyco-loha-bf16``, …); the frozen model
always runs. ``--json PATH``: raw samples.

Without a CUDA device and ``--device cuda`` (the default) it prints one line and exits 0. Smoke mode::

    .venv/bin/python benchmarks/gpu_step.py --device cpu --dtype float32 --layers 1 --hidden 64 \\
        --intermediate 128 --tokens 32 --rounds 2
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))  # compare.py's helpers
if importlib.util.find_spec("lyco") is None:
    sys.path.insert(0, str(_HERE.parent / "src"))  # a checkout where lyco is not installed (the GPU machine)
from compare import (  # noqa: E402
    LLAMA_TARGETS,
    Impl,
    environment,
    fmt_bytes,
    fmt_ms,
    fmt_ratio,
    make_lycoris,
    make_peft,
    sanity,
    saved_for_backward,
    step,
)

import lyco  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SHORT = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
TARGET_TIME = 1.15
TARGET_MEM = 1.10
METHOD_LABEL = {"loha": "LoHa", "lokr": "LoKr", "lora": "LoRA"}


@dataclass
class Row:
    """One planned implementation: ``name`` e.g. ``lyco-loha-bf16``; ``group`` for ``--only``."""

    name: str
    label: str
    group: str  # "frozen" | "lyco" | "peft" | "lycoris"
    method: str | None
    build: Callable[[], Impl] | None
    skip: str = ""  # reason it did not run


# ---------------------------------------------------------------------------------------------
# model and implementations
# ---------------------------------------------------------------------------------------------
def build_llama(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    seq = args.tokens // args.batch
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(2048, seq),
    )
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(dtype)
    model.requires_grad_(False)
    return model


def llama_call(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return m(inputs_embeds=x, use_cache=False).logits


def make_lyco(base: nn.Module, method: str, r: int, autocast: bool) -> Impl:
    cls = lyco.LoHaConfig if method == "loha" else lyco.LoKrConfig
    cfg = cls(r=r, alpha=r, target_modules=LLAMA_TARGETS, init_weights=False)
    suffix = "" if autocast else f"-{SHORT[next(base.parameters()).dtype]}"
    model = lyco.get_model(copy.deepcopy(base), cfg, autocast_adapter_dtype=autocast)
    note = f"LYCO_PATH={os.environ.get('LYCO_PATH', 'auto')}, autocast_adapter_dtype={autocast}"
    return Impl(f"lyco-{method}{suffix}", "lyco", method, model, note=note)


def make_peft_lora(base: nn.Module, r: int) -> Impl:
    import peft

    cfg = peft.LoraConfig(r=r, lora_alpha=r, target_modules=LLAMA_TARGETS, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), cfg)
    return Impl("peft-lora", "peft", "lora", model)


def make_lycoris_on(base: nn.Module, method: str, r: int, bypass: bool, device: torch.device) -> Impl:
    impl = make_lycoris(base, method, LLAMA_TARGETS, r, bypass=bypass)
    for net in impl.extra:
        net.to(device=device, dtype=torch.float32)
    return impl


def lycoris_missing() -> str:
    try:
        import lycoris  # noqa: F401
    except ImportError as e:
        return f"lycoris-lora not installed ({e})"
    return ""


def plan_rows(
    args: argparse.Namespace, base: nn.Module, device: torch.device, dtype: torch.dtype
) -> list[Row]:
    r = args.rank
    rows = [Row("frozen", "frozen", "frozen", None, lambda: Impl("frozen", "frozen", None, base))]
    variants = {"default": [True], "base": [False], "both": [True, False]}[args.adapter_dtype]
    if dtype == torch.float32:
        variants = [True]  # adapters are fp32 either way
    no_lycoris = lycoris_missing()
    for method in args.methods:
        ml = METHOD_LABEL[method]
        for autocast in variants:
            suffix = "" if autocast else f"-{SHORT[dtype]}"
            label = f"lyco {ml}" + ("" if autocast else f" {SHORT[dtype]}")
            rows.append(Row(f"lyco-{method}{suffix}", label, "lyco", method,
                            lambda m=method, a=autocast: make_lyco(base, m, r, a)))  # fmt: skip
        rows.append(Row(f"peft-{method}", f"PEFT {ml}", "peft", method,
                        lambda m=method: make_peft(base, m, LLAMA_TARGETS, r)))  # fmt: skip
        for bypass in [False, True] if args.lycoris_bypass else [False]:
            name = f"lycoris{'-bypass' if bypass else ''}-{method}"
            label = f"lycoris {ml}" + (" bypass" if bypass else "")
            rows.append(Row(name, label, "lycoris", method,
                            lambda m=method, b=bypass: make_lycoris_on(base, m, r, b, device), skip=no_lycoris))  # fmt: skip
    rows.append(Row("peft-lora", f"PEFT LoRA r{args.lora_rank}", "peft", "lora",
                    lambda: make_peft_lora(base, args.lora_rank)))  # fmt: skip
    if args.only:
        keep = set(args.only)
        rows = [row for row in rows if row.name == "frozen" or keep & {row.name, row.group, row.method}]
    return rows


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(impl: Impl, x: torch.Tensor, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    step(impl, llama_call, x, True)
    sync(device)
    return time.perf_counter() - t0


def own_bytes(impl: Impl) -> int:
    """Bytes of the distinct storages of this implementation's parameters and buffers."""
    seen: dict[int, int] = {}
    for m in impl.modules():
        for t in [*m.parameters(), *m.buffers()]:
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def clear_grads(impl: Impl, x: torch.Tensor) -> None:
    for p in impl.trainable():
        p.grad = None
    x.grad = None


def cuda_peak(impl: Impl, x: torch.Tensor, device: torch.device) -> dict[str, int]:
    clear_grads(impl, x)
    gc.collect()
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step(impl, llama_call, x, True)
    sync(device)
    delta = torch.cuda.max_memory_allocated(device) - before
    clear_grads(impl, x)
    own = own_bytes(impl)
    return {"peak_bytes": own + delta, "own_bytes": own, "step_delta_bytes": delta}


def profile_step(impl: Impl, x: torch.Tensor, device: torch.device, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step(impl, llama_call, x, True)  # warm
    sync(device)
    with profile(activities=activities) as prof:
        step(impl, llama_call, x, True)
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def measure(
    rows: list[Row], args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    impls: list[Impl] = []
    for row in rows:
        if row.skip or row.build is None:
            continue
        try:
            torch.manual_seed(args.seed + 1)
            impls.append(row.build())
        except Exception as e:  # a missing or incompatible library must not stop the other rows
            row.skip = f"build failed: {type(e).__name__}: {e}"
    gen = torch.Generator().manual_seed(args.seed + 2)
    x0 = torch.randn(args.batch, args.tokens // args.batch, args.hidden, generator=gen)
    x = x0.to(device=device, dtype=dtype).requires_grad_(True)
    result: dict[str, Any] = {
        "notes": {i.name: i.note for i in impls if i.note},
        "trainable_params": {i.name: sum(p.numel() for p in i.trainable()) for i in impls},
        "sanity_rel_change": sanity(impls, llama_call, x.detach()),
    }
    for impl in impls:
        impl.set_mode(True)
    by_name = {row.name: row for row in rows}
    ok = []
    for impl in impls:  # warmup, one implementation after the other
        try:
            for _ in range(args.warmup):
                step(impl, llama_call, x, True)
            sync(device)
            ok.append(impl)
        except torch.OutOfMemoryError as e:
            by_name[impl.name].skip = f"out of memory: {str(e).splitlines()[0]}"
            clear_grads(impl, x)
            gc.collect()
            torch.cuda.empty_cache()
    impls = ok
    samples: dict[str, list[float]] = {i.name: [] for i in impls}
    for k in range(args.rounds):
        for impl in impls[k % len(impls) :] + impls[: k % len(impls)]:
            samples[impl.name].append(timed_step(impl, x, device))
    result["samples_s"] = samples
    result["median_s"] = {n: statistics.median(s) for n, s in samples.items()}
    if device.type == "cuda":
        result["memory"] = {i.name: cuda_peak(i, x, device) for i in impls}
        result["mem_key"] = "peak_bytes"
    else:
        result["memory"] = {i.name: saved_for_backward(i, llama_call, x) for i in impls}
        result["mem_key"] = "saved_bytes"
    if args.profile:
        result["profiles"] = {
            i.name: profile_step(i, x, device) for i in impls if i.impl in ("frozen", "lyco")
        }
    del impls
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def render(rows: list[Row], res: dict[str, Any], device: torch.device) -> str:
    med, mem, key = res["median_s"], res["memory"], res["mem_key"]
    cuda = device.type == "cuda"
    f_t = med["frozen"]
    f_m = mem["frozen"][key]
    mem_head = "peak" if cuda else "saved"

    def fmt_mem(n: float) -> str:
        return f"{n / 2**30:.2f} GiB" if cuda else fmt_bytes(n)

    cols = ["implementation", "ms", "time ×", f"{mem_head}", f"{mem_head} ×", "trainable", "lyco vs PEFT"]
    if cuda:
        cols += [f"target t≤{TARGET_TIME}×", f"target m≤{TARGET_MEM}×"]
    table = []
    for row in rows:
        if row.name not in med:
            table.append([row.label, f"skipped: {row.skip or 'not run'}"])
            continue
        t, m = med[row.name], mem[row.name][key]
        tr, mr = t / f_t, (m / f_m if f_m else None)
        vs = ""
        if row.group == "lyco" and f"peft-{row.method}" in med:
            vs = fmt_ratio(med[f"peft-{row.method}"] / t)
        line = [row.label, fmt_ms(t), fmt_ratio(tr), fmt_mem(m), fmt_ratio(mr),
                f"{res['trainable_params'][row.name]:,d}", vs]  # fmt: skip
        if cuda:
            if row.group == "lyco":
                line += [
                    "ok" if tr <= TARGET_TIME else "MISS",
                    "ok" if mr is not None and mr <= TARGET_MEM else "MISS",
                ]
            else:
                line += ["", ""]
        table.append(line)
    full = [r for r in table if len(r) == len(cols)]
    widths = [max(len(c), *(len(r[k]) for r in full)) if full else len(c) for k, c in enumerate(cols)]

    def fmt_row(r: list[str]) -> str:
        if len(r) != len(cols):
            return f"{r[0].ljust(widths[0])}  {r[1]}"
        return "  ".join(
            v.ljust(w) if k == 0 else v.rjust(w) for k, (v, w) in enumerate(zip(r, widths, strict=True))
        )

    lines = [fmt_row(cols), *(fmt_row(r) for r in table)]
    mem_txt = (
        "peak = own weights/buffers + max_memory_allocated growth over the step"
        if cuda
        else "saved = bytes saved for backward (params excluded; no peak on CPU)"
    )
    lines.append(
        f"frozen: {fmt_ms(f_t)} ms, {mem_head} {fmt_mem(f_m)}. × = ratio to the frozen model; {mem_txt}; lyco vs PEFT = PEFT time / lyco time (same method)."
    )
    changes = ", ".join(f"{n} {v:.2g}" for n, v in res["sanity_rel_change"].items())
    bad = [n for n, v in res["sanity_rel_change"].items() if not v > 1e-4]
    lines.append(
        f"sanity (rel. output change vs frozen): {changes}" + (f"  !! NO CHANGE: {bad}" if bad else "")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default; skips without one) or cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="base model dtype")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--intermediate", type=int, default=11008)
    ap.add_argument(
        "--heads", type=int, default=None, help="attention heads (default hidden // 128, at least 1)"
    )
    ap.add_argument("--vocab", type=int, default=1000)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per step (batch × sequence)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=8, help="LoHa/LoKr rank (alpha = rank)")
    ap.add_argument("--lora-rank", type=int, default=None, help="PEFT LoRA reference rank (default 2 × rank)")
    ap.add_argument("--methods", default="loha,lokr", help="comma-separated subset of: loha,lokr")
    ap.add_argument("--adapter-dtype", default="both", choices=["default", "base", "both"],
                    help="lyco adapters: default (fp32 on a half base), base (the base dtype), both rows")  # fmt: skip
    ap.add_argument(
        "--only", default="", help="comma-separated row names or groups (lyco, peft, lora, lycoris, loha, …)"
    )
    ap.add_argument("--lycoris-bypass", action="store_true", help="also lycoris-lora with bypass_mode=True")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation")
    ap.add_argument("--rounds", type=int, default=20, help="timed rounds (one step of each implementation)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of one step per lyco row")
    ap.add_argument("--json", metavar="PATH", help="write raw results as JSON")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device (torch.cuda.is_available() is False): skipping the GPU benchmark")
        return 0
    dtype = DTYPES[args.dtype]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods or not set(args.methods) <= {"loha", "lokr"}:
        ap.error("--methods must be from loha,lokr")
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    args.heads = args.heads or max(1, args.hidden // 128)
    args.lora_rank = args.lora_rank or 2 * args.rank
    if args.hidden % args.heads or args.tokens % args.batch or args.rounds < 1:
        ap.error("--hidden must divide by --heads, --tokens by --batch, and --rounds must be ≥ 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    env = environment()
    env.pop("LYCO_PATH")
    env["LYCO_PATH"] = os.environ.get("LYCO_PATH", "(unset: auto)")
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    print("gpu_step — " + ", ".join(f"{k} {v}" for k, v in env.items()))
    t_start = time.perf_counter()
    base = build_llama(args, device, dtype)
    seq = args.tokens // args.batch
    print(
        f"Llama {args.layers}L hidden {args.hidden} / intermediate {args.intermediate}, {args.heads} heads, "
        f"vocab {args.vocab}, attn {getattr(base.config, '_attn_implementation', '?')}; batch {args.batch} × seq "
        f"{seq} = {args.tokens} tokens; {SHORT[dtype]} on {device}; forward + backward of logits.mean(), "
        f"input embeddings require grad, base frozen; all 7 projections; r = alpha = {args.rank} "
        f"(LoRA {args.lora_rank}); warmup {args.warmup}, {args.rounds} interleaved rounds, median."
    )
    rows = plan_rows(args, base, device, dtype)
    res = measure(rows, args, device, dtype)
    print()
    print(render(rows, res, device))
    for name, table in res.get("profiles", {}).items():
        print(f"\n== profile: {name} (one training step) ==\n{table}")
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s")
    if args.json:
        payload = {"env": env, "args": {k: v for k, v in vars(args).items() if k != "json"},
                   "skipped": {r.name: r.skip for r in rows if r.skip}, **res}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"raw results written to {args.json}")
    if any(not v > 1e-4 for v in res["sanity_rel_change"].values()):
        print("!! an adapter did not change the output", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
