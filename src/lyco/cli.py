"""``lyco`` command line. One ``_add_<name>`` function per subcommand registers its parser and handler."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .cli_output import print_errors, print_report, progress_bar
from .errors import ArgumentError, LycoError
from .formats.adapterfile import AdapterFile
from .formats.dispatch import FORMATS, STYLES, read_adapter, target_format, write_adapter
from .ops.hadamard import LOHA_STEPS
from .tools.extract import extract_algos

if TYPE_CHECKING:
    from .demo import DemoResult

Handler = Callable[[argparse.Namespace], int]


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="offline fine-tuning demo: LoHa and LoKr vs full fine-tuning on sklearn's digits",
        description=(
            "Pretrain a small CNN on digits 0–4, adapt it to digits 5–9 with full fine-tuning, LoHa and "
            "LoKr, then save, reload and merge the adapters and check that outputs match. "
            "Needs the demo extras: pip install 'lyco[demo]'."
        ),
    )
    p.add_argument(
        "--out", type=Path, default=Path("lyco_demo_out"), help="output directory (default: %(default)s)"
    )
    p.add_argument("--quick", action="store_true", help="fewer epochs (a few seconds; used by the tests)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default: %(default)s; the ops are too small to gain from more, "
        "and extra threads slow down badly when the cores are busy)",
    )
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from . import demo

    if missing := demo.missing_extras():
        print(
            f"lyco demo needs {', '.join(missing)}; install the demo extras: {demo.INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    result = demo.run_demo(args.out, quick=args.quick, seed=args.seed, threads=args.threads)
    return _print_demo(result)


def _print_demo(result: DemoResult) -> int:
    """Render the demo result with rich; exit status 1 when a check failed."""
    from rich.console import Console
    from rich.table import Table

    from .demo.digits import MERGE_RTOL, RELOAD_RTOL

    console = Console()
    console.print(f"Pretrained CNN: {result.pretrain_acc:.1%} accuracy on the 0–4 test set.")
    for note in result.notes:
        console.print(f"[dim]• {note}[/dim]")
    table = Table(
        title="Adapting digits 0–4 → 5–9",
        caption="trainable parameters (% of full fine-tuning); accuracy on the 5–9 test set",
    )
    for col in ("Method", "Trainable", "% of full", "Acc before", "Acc after", "Train time"):
        table.add_column(col, justify="left" if col == "Method" else "right", no_wrap=col == "Method")
    for m in result.methods:
        table.add_row(
            m.method, f"{m.trainable_params:,}", f"{m.fraction_of_full:.1%}",
            f"{m.acc_before:.1%}", f"{m.acc_after:.1%}", f"{m.train_seconds:.1f} s",
        )  # fmt: skip
    console.print(table)
    checks = Table(
        title="Adapter checks (max |Δ logits| on the 5–9 test set)",
        caption=f"tolerance = rtol · max(1, max |logits|); rtol {MERGE_RTOL:g} for merge, {RELOAD_RTOL:g} otherwise",
    )
    for col in ("Method", "Check", "max |Δ|", "Tolerance", "Result"):
        checks.add_column(col)
    for c in result.checks:
        status = "[green]ok[/green]" if c.passed else "[bold red]FAILED[/bold red]"
        checks.add_row(c.method, c.check, f"{c.max_abs_diff:.2e}", f"{c.tol:.1e}", status)
    console.print(checks)
    for m in result.methods:
        if m.adapter_dir is not None:
            console.print(f"{m.method} adapter saved to {m.adapter_dir}/", markup=False, soft_wrap=True)
    console.print(f"Loss curves: {result.plot_path}", markup=False, soft_wrap=True)
    console.print(f"Total time: {result.total_seconds:.1f} s")
    if not result.checks_passed:
        console.print("[bold red]Some checks failed.[/bold red]")
        return 1
    return 0



# -- adapter-file commands -------------------------------------------------------------------------------
def _parser(subparsers: argparse._SubParsersAction, name: str, help: str, description: str, examples: str):
    return subparsers.add_parser(
        name, help=help, description=description, epilog="examples:\n" + examples,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip


def _common(p: argparse.ArgumentParser, reads: bool = True) -> None:
    if reads:
        p.add_argument(
            "--allow-pickle", action="store_true",
            help="also read .pt/.bin/.ckpt pickle files (they can run code: only for files you trust)",
        )  # fmt: skip
    p.add_argument("--plain", action="store_true", help="plain-text tables even when rich is installed")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _output_options(p: argparse.ArgumentParser, default_style: str = "lycoris") -> None:
    p.add_argument(
        "--to", choices=FORMATS, default=None,
        help="output format (default: a LyCORIS file for a .safetensors OUT, else a PEFT directory)",
    )  # fmt: skip
    p.add_argument(
        "--style", choices=STYLES, default=None,
        help=f"key convention of a LyCORIS/kohya file (default: {default_style})",
    )  # fmt: skip
    p.add_argument("--prefix", default=None, help="key prefix of a LyCORIS/kohya file (e.g. lora_unet_)")


def _add_inspect(subparsers: argparse._SubParsersAction) -> None:
    p = _parser(
        subparsers, "inspect", "show what an adapter file or PEFT directory holds",
        "Format, key convention and producer recognised, algorithms, modules with rank, alpha and the scale "
        "rule applied (scale = alpha / r; no alpha → 1; LoKr with both factors full → 1), dtypes, parameter "
        "count, size on disk and metadata (ss_*).",
        "  lyco inspect my_lokr.safetensors\n  lyco inspect peft_adapter_dir/ --json > report.json\n"
        "  lyco inspect kohya_file.safetensors --base unet.safetensors   # resolve names and shapes\n",
    )  # fmt: skip
    p.add_argument("path", type=Path, metavar="FILE_OR_DIR")
    p.add_argument("--json", action="store_true", help="machine-readable JSON on stdout")
    p.add_argument("--base", type=Path, default=None, help="base weights or config.json to resolve module names")
    _common(p)
    p.set_defaults(func=_run_inspect)


def _run_inspect(args: argparse.Namespace) -> int:
    from .tools.base_weights import index_base
    from .tools.convert import prepare
    from .tools.describe import describe

    raw = _read(args.path, args)
    af = prepare(raw, index_base(args.base) if args.base else None)
    report = describe(af, args.path, as_read=raw)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, default=str))
    else:
        print_report(report, plain=args.plain)
    return 0


def _add_convert(subparsers: argparse._SubParsersAction) -> None:
    p = _parser(
        subparsers, "convert", "convert between PEFT directories and LyCORIS/kohya files",
        "Rewrite an adapter in another format or key convention. alpha/r is mapped so every module's ΔW is "
        "unchanged; the result is read back and compared (max relative ΔW difference printed).",
        "  lyco convert peft_dir/ out.safetensors --style kohya --prefix lora_unet_\n"
        "  lyco convert lokr.safetensors peft_dir/ --to peft --base model.safetensors\n",
    )  # fmt: skip
    p.add_argument("src", type=Path, metavar="SRC")
    p.add_argument("dst", type=Path, metavar="DST")
    _output_options(p)
    p.add_argument(
        "--base", type=Path, default=None, metavar="MODEL_OR_CONFIG",
        help="base weights (.safetensors file or folder) or config.json: resolves kohya underscore names "
        "to module paths and gives weight shapes (needed for kohya files → PEFT)",
    )  # fmt: skip
    p.add_argument(
        "--consumer-safe", action="store_true",
        help="write every module in a layout ComfyUI and AUTOMATIC1111 apply as lyco does, where one with the "
        "same ΔW exists (a LoKr CP core lokr_t2 becomes a plain low-rank lokr_w2_a/b)",
    )  # fmt: skip
    p.add_argument(
        "--fold-scale", action="store_true",
        help="fold each module's scale into its tensors and write no .alpha keys: the only LoRA file "
        "AUTOMATIC1111's SD3 loader takes (ComfyUI, Forge, diffusers read it too; sd-scripts' Flux / SD3 loaders "
        "and lycoris-lora refuse it)",
    )  # fmt: skip
    _common(p)
    p.set_defaults(func=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from .formats.lycoris import style_layout
    from .formats.metadata import without_derived_args
    from .tools.base_weights import index_base
    from .tools.convert import compare_adapters, prepare

    if args.fold_scale and target_format(args.dst, args.to) == "peft":
        raise ArgumentError("--fold-scale applies to LyCORIS/kohya files, not PEFT directories (PEFT keeps alpha in "
                            "adapter_config.json)")
    base = index_base(args.base) if args.base else None
    af = prepare(_read(args.src, args), base, target_format(args.dst, args.to))
    written = af
    if args.consumer_safe:  # the same ΔW in layouts the checked consumers apply; layout args derived anew
        written = dataclasses.replace(af.in_consumer_layout(), metadata=without_derived_args(af.metadata, af))
    layout = ""
    if args.style in ("kohya", "original") and base is not None and base.model is not None and written.resolved:
        # a diffusers config as --base: the original names / fused layout of its family (SDXL, Flux.1, Flux.2, SD3)
        regrouped = style_layout(written, base.model, args.style)
        if regrouped.adapter.modules.keys() != written.modules.keys():
            layout = f"; in the original layout of {type(base.model).__name__}"
        for note in regrouped.notes:
            print(f"lyco convert: note: {note}", file=sys.stderr)
        written = regrouped.adapter
    out = write_adapter(written, args.dst, to=args.to, style=args.style, prefix=args.prefix, fold_scale=args.fold_scale)
    worst, n = compare_adapters(written, read_adapter(out, allow_pickle=False))
    print(f"wrote {out} ({target_format(out, args.to)}): {n} module(s), max relative ΔW difference {worst:.1e}{layout}")
    if worst >= 1e-5:
        print(f"lyco convert: error: the written adapter's ΔW differs from the source's ({worst:.1e})", file=sys.stderr)
        return 1
    return 0


def _add_merge(subparsers: argparse._SubParsersAction) -> None:
    p = _parser(
        subparsers, "merge", "merge an adapter into a base safetensors state dict",
        "Write OUT = BASE_WEIGHTS with W + scale·ΔW for every adapted module (module paths resolved against "
        "the base's <module>.weight keys, kohya underscore names included); other tensors copied through. "
        "Streams tensor by tensor: the base is memory-mapped and the output written as it is produced, so "
        "memory holds one base tensor at a time, never two copies of the model.",
        "  lyco merge model.safetensors my_lokr.safetensors merged.safetensors\n"
        "  lyco merge unet.safetensors peft_dir/ merged.safetensors --scale 0.8\n"
        "  lyco merge llama_dir/ lokr.safetensors merged_dir/   # a folder of shards → a folder of shards\n",
    )  # fmt: skip
    p.add_argument("base", type=Path, metavar="BASE_WEIGHTS", help="a .safetensors file or a folder of shards")
    p.add_argument("adapter", type=Path, metavar="ADAPTER")
    p.add_argument("out", type=Path, metavar="OUT")
    p.add_argument("--scale", type=float, default=1.0, help="multiplier on the adapter's ΔW (default: 1)")
    _common(p)
    p.set_defaults(func=_run_merge)


def _run_merge(args: argparse.Namespace) -> int:
    from .tools.merge import merge_file

    af = _read(args.adapter, args)
    report = merge_file(args.base, af, args.out, scale=args.scale, progress=progress_bar(not args.no_progress))
    note = f"; {len(report.transposed)} stored (in, out) (transformers Conv1D)" if report.transposed else ""
    if report.merged_bias:
        note += f"; {len(report.merged_bias)} bias(es) changed"
    print(
        f"wrote {report.out_path}: merged {len(report.merged)} module(s) (max |scale·ΔW| "
        f"{report.max_abs_delta:.3e}), copied {report.copied} tensor(s){note}"
    )
    return 0


def _add_extract(subparsers: argparse._SubParsersAction) -> None:
    p = _parser(
        subparsers, "extract", "extract a LoKr/LoHa/LoRA adapter from a base and a fine-tuned state dict",
        "For every 2-D or conv weight that differs, approximate ΔW = tuned − base. LoKr: nearest Kronecker "
        "product (Van Loan–Pitsianis SVD, optimal), then rank-r SVD factors where lyco's plan makes a factor "
        "low-rank. LoHa: a short seeded Adam fit. LoRA: the rank-r truncated SVD (optimal). Prints the "
        "relative error per module.",
        "  lyco extract base.safetensors tuned.safetensors lokr.safetensors --algo lokr --rank 8\n"
        "  lyco extract base.safetensors tuned.safetensors out_dir/ --algo loha --rank 4 --to peft\n"
        "  lyco extract base.safetensors tuned.safetensors x.safetensors --algo lokr --rank 4 --factor 8 "
        "--exclude 'embed|norm'\n",
    )  # fmt: skip
    p.add_argument("base", type=Path, metavar="BASE")
    p.add_argument("tuned", type=Path, metavar="TUNED")
    p.add_argument("out", type=Path, metavar="OUT")
    p.add_argument("--algo", choices=extract_algos(), required=True)
    p.add_argument("--rank", type=_positive, required=True, help="rank r of the low-rank factors")
    p.add_argument("--factor", type=int, default=-1, help="LoKr factor (split size; -1: balanced)")
    p.add_argument("--decompose-both", action="store_true", help="LoKr: factor w1 too")
    p.add_argument("--steps", type=int, default=LOHA_STEPS, help="LoHa: Adam steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="LoHa: random seed (default: %(default)s)")
    p.add_argument("--include", default=None, help="regex: only modules whose path matches")
    p.add_argument("--exclude", default=None, help="regex: skip modules whose path matches")
    p.add_argument("--min-diff", type=float, default=0.0, help="skip modules with ‖ΔW‖/‖W‖ at or below this")
    p.add_argument("--device", default="cpu", help="torch device for the SVDs and fits, e.g. cuda (default: cpu)")
    _output_options(p)
    _common(p, reads=False)
    p.set_defaults(func=_run_extract)


def _run_extract(args: argparse.Namespace) -> int:
    from .tools.extract import extract_files

    af, results = extract_files(
        args.base, args.tuned, args.algo, args.rank, args.factor, args.decompose_both, args.steps, args.seed,
        args.include, args.exclude, args.min_diff, progress=progress_bar(not args.no_progress), device=args.device,
    )  # fmt: skip
    print_errors(f"extract {args.algo}, r={args.rank}", results, plain=args.plain)
    return _write(af, args)


def _add_resize(subparsers: argparse._SubParsersAction) -> None:
    p = _parser(
        subparsers, "resize", "re-factor an adapter's low-rank parts at another rank",
        "LoRA/LoKr: SVD of the low-rank products (w1_a@w1_b, w2_a@w2_b); LoHa: branch SVDs then a short "
        "fit of the Hadamard product. Scale (alpha/r) is kept; higher ranks leave modules unchanged. Prints "
        "the relative ΔW error per module.",
        "  lyco resize lokr_r16.safetensors lokr_r4.safetensors --rank 4\n"
        "  lyco resize peft_dir/ small_dir/ --rank 2\n",
    )  # fmt: skip
    p.add_argument("adapter", type=Path, metavar="ADAPTER")
    p.add_argument("out", type=Path, metavar="OUT")
    p.add_argument("--rank", type=_positive, required=True)
    p.add_argument("--steps", type=int, default=LOHA_STEPS, help="LoHa: Adam steps (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="LoHa: random seed (default: %(default)s)")
    _output_options(p)
    _common(p)
    p.set_defaults(func=_run_resize)


def _run_resize(args: argparse.Namespace) -> int:
    from .tools.resize import resize_adapter

    af, results = resize_adapter(
        _read(args.adapter, args), args.rank, args.steps, args.seed, progress=progress_bar(not args.no_progress)
    )
    print_errors(f"resize to r={args.rank}", results, plain=args.plain)
    return _write(af, args)


def _add_to_lora(subparsers: argparse._SubParsersAction) -> None:
    p = _parser(
        subparsers, "to-lora", "convert LoKr/LoHa to a plain LoRA (kohya lora_down/lora_up + alpha)",
        "For tools that only know LoRA: the rank-r SVD of each module's scaled ΔW (the best rank-r "
        "approximation), written with alpha = r. Prints the relative ΔW error per module.",
        "  lyco to-lora my_lokr.safetensors my_lora.safetensors --rank 32 --style kohya\n"
        "  lyco to-lora my_loha.safetensors lora.safetensors --rank 16 --base unet.safetensors  # conv kernels\n",
    )  # fmt: skip
    p.add_argument("adapter", type=Path, metavar="ADAPTER")
    p.add_argument("out", type=Path, metavar="OUT")
    p.add_argument("--rank", type=_positive, required=True)
    p.add_argument(
        "--base", type=Path, default=None, metavar="MODEL_OR_CONFIG",
        help="base weights or config.json: resolves module names and gives conv kernel shapes that the "
        "adapter's tensors do not show (LoHa / low-rank LoKr conv factors are stored flattened)",
    )  # fmt: skip
    _output_options(p, default_style="the input's")
    _common(p)
    p.set_defaults(func=_run_to_lora)


def _run_to_lora(args: argparse.Namespace) -> int:
    from .tools.resize import to_lora

    src = _read(args.adapter, args)
    if args.base is not None:
        from .tools.base_weights import index_base
        from .tools.convert import prepare

        src = prepare(src, index_base(args.base))
    af, results = to_lora(src, args.rank, progress=progress_bar(not args.no_progress))
    print_errors(f"to-lora, r={args.rank}", results, plain=args.plain)
    if args.style is None and src.convention in STYLES:
        args.style = src.convention
    return _write(af, args)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _read(path: Path, args: argparse.Namespace) -> AdapterFile:
    return read_adapter(path, allow_pickle=getattr(args, "allow_pickle", False))


def _write(af: AdapterFile, args: argparse.Namespace) -> int:
    fmt = target_format(args.out, args.to)
    out = write_adapter(af, args.out, to=fmt, style=args.style, prefix=args.prefix)
    print(f"wrote {out} ({target_format(out, args.to)}, {len(af.modules)} module(s), {af.num_params():,} parameters)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``lyco`` parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="lyco", description="LyCORIS-family adapters (LoRA/LoCon, LoHa, LoKr, Full) for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"lyco {__version__}")
    parser.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    for add in (_add_inspect, _add_convert, _add_merge, _add_extract, _add_resize, _add_to_lora, _add_demo):
        add(subparsers)
    return parser


EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 2, 70, 130


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return its exit status.

    0: done; 1: an expected failure (bad input, I/O, out of memory), reported as ``lyco CMD: error: …``
    without a traceback; 2: usage (no command, bad arguments); 70: an unexpected exception (a bug: the
    message says so); 130: interrupted. ``--debug`` re-raises instead, with the traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return func(args)
    except (Exception, KeyboardInterrupt) as exc:
        if args.debug:
            raise
        code, message = _failure(exc)
        print(f"lyco {args.command}: error: {message}", file=sys.stderr)
        return code


def _failure(exc: BaseException) -> tuple[int, str]:
    """Exit status and message for an exception that ended a command."""
    if isinstance(exc, LycoError):
        return EXIT_ERROR, str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "alloc" in str(exc).lower()):
        return EXIT_ERROR, f"out of memory ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return EXIT_ERROR, f"{where}{exc.strerror or exc}"
    return EXIT_INTERNAL, (
        f"unexpected {type(exc).__name__}: {exc} — a bug in lyco; rerun with --debug for the traceback and report it"
    )
