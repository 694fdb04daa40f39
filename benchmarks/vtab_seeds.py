"""The seed part of the real-backbone report (``benchmarks/vtab_mini.py``): each method's mean
over all tasks per seed, on test and on validation, and its paired difference from the
library's recipe. The per-task spreads of the main table mix task difficulty with seed noise;
the spread of the all-task mean over seeds is what says whether an order between two methods
is clear, and validation is what the protocol lets choose (the test set never does)."""

from __future__ import annotations

import statistics
from typing import Any

import vtab_methods as vm
from common import table

REFERENCE = vm.D1  # the library's recipe: defaults, tokens, entries at 1e-3


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def complete_seeds(res: Any, method: str) -> dict[int, dict[str, dict[str, float]]]:
    """``{seed: {task: run}}`` for the seeds on which ``method`` finished every task at its
    chosen rate (``res``: a ``vtab_mini.Results``)."""
    lr = res.lr(method)
    if lr is None:
        return {}
    out = {}
    for seed in range(res.args.seeds):
        runs = {t: res.run(t, method, lr, seed) for t in res.args.tasks}
        if all(runs.values()):
            out[seed] = runs
    return out


def _mean(runs: dict[str, dict[str, float]], key: str) -> float:
    return statistics.mean(r[key] for r in runs.values())


def _paired(mine: dict[int, dict], ref: dict[int, dict], key: str) -> str:
    """Mean difference over the (task, seed) pairs both have, and how many of them ``mine`` leads."""
    diffs = [mine[s][t][key] - ref[s][t][key] for s in mine.keys() & ref.keys() for t in mine[s]]
    if not diffs:
        return "-"
    return f"{100 * statistics.mean(diffs):+.2f} ({sum(d > 0 for d in diffs)}/{len(diffs)})"


def seed_report(res: Any, methods: list[str]) -> str:
    """Markdown: the per-seed all-task means of every method with at least two complete seeds
    (test, validation in brackets), their mean +- std, and the paired difference from
    :data:`REFERENCE` (points, with the pairs ahead); ``""`` when no method qualifies."""
    ref = complete_seeds(res, REFERENCE)
    rows: list[dict[str, object]] = []
    for m in methods:
        seeds = complete_seeds(res, m)
        if len(seeds) < 2:
            continue
        means = {s: {k: _mean(runs, k) for k in ("test", "val")} for s, runs in seeds.items()}
        row: dict[str, object] = {"method": m}
        for s in range(res.args.seeds):
            row[f"seed {s}"] = f"{_pct(means[s]['test'])} ({_pct(means[s]['val'])})" if s in means else "-"
        for key, label in (("test", "test"), ("val", "validation")):
            xs = [mean[key] for mean in means.values()]
            row[f"{label} mean ± std"] = f"{_pct(statistics.mean(xs))} ± {_pct(statistics.stdev(xs))}"
        for key, label in (("test", "test"), ("val", "validation")):
            row[f"{label} − recipe (pairs ahead)"] = "reference" if m == REFERENCE else _paired(seeds, ref, key)
        rows.append(row)
    if not rows:
        return ""
    return "\n".join([
        f"Mean over the {len(res.args.tasks)} tasks per seed, for the methods with at least two complete seeds "
        f"(test %, validation % in brackets), and the paired difference from `{REFERENCE}` (the library's "
        "recipe) over the (task, seed) pairs both finished, in points, with how many pairs the method leads. "
        "Only validation may choose between rows:", "", table(rows)])
