"""Shared helpers for the benchmark scripts: timing medians and a machine description."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def timed(fn: Callable[[], object]) -> float:
    """Wall time of one ``fn()`` call, synchronizing CUDA before and after."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    times = [timed(fn) for _ in range(repeats)]
    return statistics.median(times), times


def report(title: str, script: str, argv: Sequence[str] | None, settings: dict[str, object],
           rows: list[dict[str, object]], json_path: Path | None) -> dict[str, object]:
    """Print the machine, settings and table; write everything as JSON when asked."""
    result = {"machine": machine(), **settings,
              "command": f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv),
              "rows": rows}
    print(f"# {title}\n{result['machine']} | " + " | ".join(f"{k} {v}" for k, v in settings.items()) + "\n")
    print(table(rows))
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
    return result


def machine() -> str:
    """One line: CPU/GPU, core count, torch version."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return (f"{device}, {torch.get_num_threads()} threads, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def table(rows: list[dict[str, object]]) -> str:
    """A plain-text table (also valid Markdown) of dict rows."""
    cols = list(rows[0])
    cells = [[str(r[c]).replace("|", "\\|") for c in cols] for r in rows]  # a "|" in a cell is text
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])
