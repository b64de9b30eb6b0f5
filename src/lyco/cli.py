"""``lyco`` command line. One ``_add_<name>`` function per subcommand registers its parser and handler."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__

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


def build_parser() -> argparse.ArgumentParser:
    """The ``lyco`` parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="lyco", description="LyCORIS-family adapters (LoHa, LoKr) for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"lyco {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for add in (_add_demo,):
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the subcommand, return its exit status (2: no command)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Handler | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    return func(args)
