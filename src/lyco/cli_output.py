"""Terminal output for the ``lyco`` command: tables with rich when installed (plain text otherwise) and
tqdm progress bars when installed (none otherwise). Both are optional extras (``lyco[demo]``)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any, TextIO

from .tools import ModuleResult, Progress
from .tools.describe import AdapterReport


def has_rich() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def print_table(
    title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]], file: TextIO | None = None,
    plain: bool = False,
) -> None:  # fmt: skip
    """A table on ``file`` (stdout): rich when installed and ``plain`` is false, else aligned text.
    Columns whose name starts with ``>`` are right-aligned (the ``>`` is not shown)."""
    file = file or sys.stdout
    right = [c.startswith(">") for c in columns]
    names = [c.lstrip(">") for c in columns]
    cells = [[str(v) for v in row] for row in rows]
    if has_rich() and not plain:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title, title_justify="left")
        for name, r in zip(names, right, strict=True):
            table.add_column(name, justify="right" if r else "left", overflow="fold")
        for row in cells:
            table.add_row(*row)
        Console(file=file, soft_wrap=False, markup=False, width=max(100, _width(file))).print(table)
        return
    widths = [max([len(n)] + [len(row[i]) for row in cells]) for i, n in enumerate(names)]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)]
        return "  ".join(parts).rstrip()

    print(title, file=file)
    print(line(names), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells:
        print(line(row), file=file)


def _width(file: TextIO) -> int:
    import shutil

    return shutil.get_terminal_size((120, 24)).columns if file.isatty() else 160


def progress_bar(enabled: bool = True) -> Progress | None:
    """A tqdm-compatible wrapper (``bar(iterable, total=, desc=)``) on stderr, or ``None`` without tqdm."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None

    def bar(iterable: Iterable[Any], total: int | None = None, desc: str | None = None) -> Iterable[Any]:
        return tqdm(iterable, total=total, desc=desc, unit="tensor", leave=False, file=sys.stderr, disable=None)

    return bar


def human_bytes(n: int) -> str:
    """``1536 → '1.5 KiB'``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def shape_str(shape: Sequence[int] | None) -> str:
    return "?" if not shape else "×".join(str(d) for d in shape)


def print_errors(title: str, results: Sequence[ModuleResult], plain: bool = False) -> None:
    """Per-module relative reconstruction errors, then a summary line."""
    rows = [
        (r.name, r.algo, shape_str(r.weight_shape), "full" if r.rank is None else r.rank, f"{r.num_params:,}",
         f"{r.error:.3e}", r.note)
        for r in results
    ]  # fmt: skip
    print_table(title, ["module", "algo", "weight", ">rank", ">params", ">rel. error", "note"], rows, plain=plain)
    if results:
        worst = max(results, key=lambda r: r.error)
        mean = sum(r.error for r in results) / len(results)
        print(f"{len(results)} module(s); relative error ‖ΔW − ΔŴ‖/‖ΔW‖: mean {mean:.3e}, max {worst.error:.3e} ({worst.name})")


def print_report(report: AdapterReport, plain: bool = False, max_value: int = 100) -> None:
    """``lyco inspect``'s human-readable output."""
    ranks = sorted({m.rank for m in report.modules if m.rank is not None})
    alphas = sorted({m.alpha for m in report.modules if m.alpha is not None})
    lines = [
        ("path", report.path),
        ("format", report.format),
        ("convention", report.convention),
        ("producer", report.producer),
        ("algorithm(s)", ", ".join(report.algos) or "-"),
        ("modules", f"{len(report.modules)}"),
        ("ranks", ", ".join(map(str, ranks)) or "-"),
        ("alphas", ", ".join(f"{a:g}" for a in alphas) or "-"),
        ("scale rule", "; ".join(f"{rule} ({n})" for rule, n in report.rules.items()) or "-"),
        ("parameters", f"{report.num_params:,}"),
        ("dtypes", ", ".join(report.dtypes) or "-"),
        ("size on disk", f"{human_bytes(report.size_bytes)} ({report.size_bytes:,} bytes)"),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")
    if report.network_args:
        print(f"{'network args'.ljust(width)}  {report.network_args}")
    for i, (name, verdict) in enumerate(report.consumers.items()):  # per consumer: matched and applied as lyco does?
        print(f"{('consumers' if i == 0 else '').ljust(width)}  {name}: {verdict['summary']}")
    rows = [
        (m.name, m.algo + ("" if m.dora is None else f"+dora({m.dora})"), shape_str(m.weight_shape),
         "full" if m.rank is None else m.rank, "-" if m.alpha is None else f"{m.alpha:g}", f"{m.scale:g}", f"{m.num_params:,}", ",".join(m.dtypes))
        for m in report.modules
    ]  # fmt: skip
    cols = ["module", "algo", "weight", ">rank", ">alpha", ">scale", ">params", "dtype"]
    print_table(f"{len(rows)} module(s)", cols, rows, plain=plain)
    if report.metadata:
        meta = [(k, v if len(v) <= max_value else v[: max_value - 1] + "…") for k, v in report.metadata.items()]
        print_table("metadata", ["key", "value"], meta, plain=plain)
