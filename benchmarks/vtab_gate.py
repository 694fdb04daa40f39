"""The token gate's part of the real-backbone report (``benchmarks/vtab_mini.py``): the library's
recipe with and without ``token_gate`` at the same selection and rate, the share of token
updates skipped (per task, per layer kind and block), and how the learned per-layer skip
shares relate to eq. 3's Fisher share of each weight."""

from __future__ import annotations

import re
import statistics
from typing import Any

import vtab_methods as vm
from common import table

UNGATED = vm.D1


def gated_methods() -> list[str]:
    """The token-gated variants of the library's recipe (rows of the report)."""
    return [m for m, method in vm.METHODS.items() if method.options.get("gate") is not None]
KINDS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


def _ranks(xs: list[float]) -> list[float]:
    order = sorted(range(len(xs)), key=xs.__getitem__)
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (ties averaged); ``None`` when either side is constant."""
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    if not sx or not sy:
        return None
    return sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True)) / (sx * sy)


def _runs(res: Any, method: str, task: str) -> list[dict[str, Any]]:
    lr = res.lr(method)
    runs = [res.run(task, method, lr, s) for s in range(res.args.seeds)] if lr is not None else []
    return [r for r in runs if r is not None]


def _quiet(run: dict[str, Any]) -> bool:
    """The run had the machine to itself (1-minute load average <= threads + 0.5)."""
    return "load" in run and run["load"] <= run["threads"] + 0.5


def _mean(xs: list[float]) -> float | None:
    return statistics.mean(xs) if xs else None


def _fmt(x: float | None, scale: float = 100.0, digits: int = 1) -> str:
    return "-" if x is None else f"{scale * x:.{digits}f}"


def task_rows(res: Any, method: str) -> list[dict[str, object]]:
    rows = []
    for task in res.args.tasks:
        gated, plain = _runs(res, method, task), _runs(res, UNGATED, task)
        if not gated:
            continue
        seeds = {r["seed"] for r in gated}
        paired = [r for r in plain if r["seed"] in seeds]
        skip = [statistics.mean(r["gate_skip_test"].values()) for r in gated]
        rho = [spearman(*zip(*[(r["fisher_share"][n], s) for n, s in r["gate_skip_test"].items()], strict=True))
               for r in gated]
        seconds = [g["train_s"] / p["train_s"] for g in gated for p in paired
                   if p["seed"] == g["seed"] and _quiet(g) and _quiet(p)]
        rows.append({
            "gate": f"skip {vm.METHODS[method].options['gate']:g}", "task": task, "seeds": len(gated),
            "ungated test %": _fmt(_mean([r["test"] for r in paired])),
            "gated test %": _fmt(_mean([r["test"] for r in gated])),
            "token updates skipped (test) %": _fmt(_mean(skip)),
            "Spearman(skip, eq. 3 share)": _fmt(_mean([x for x in rho if x is not None]), 1, 2),
            "train s gated / ungated": _fmt(_mean(seconds), 1, 2) + "x" if seconds else "-",
        })
    return rows


def layer_rows(res: Any, method: str) -> list[dict[str, object]]:
    """Mean skip share (test) per layer kind and block, over the tasks and seeds run."""
    skips: dict[tuple[str, int], list[float]] = {}
    for task in res.args.tasks:
        for r in _runs(res, method, task):
            for name, share in r["gate_skip_test"].items():
                hit = re.match(r"blocks\.(\d+)\.(.+)\.weight$", name)
                if hit:
                    skips.setdefault((hit.group(2), int(hit.group(1))), []).append(share)
    blocks = sorted({b for _, b in skips})
    return [{"layer": kind, **{str(b): _fmt(_mean(skips.get((kind, b), [])), 100, 0) for b in blocks}}
            for kind in KINDS if any(k == kind for k, _ in skips)]


def gate_report(res: Any) -> str:
    """Markdown for the gated runs in the results file ('' when there are none)."""
    methods = [m for m in gated_methods() if task_rows(res, m)]
    if not methods:
        return ""
    rows = [row for m in methods for row in task_rows(res, m)]
    lines = [
        f"Token gate (issue 18): `default + token gate (skip s)` against `{UNGATED}` at the same selection, rate "
        "and seeds (test accuracy after the final epoch; skip share of the test set's forward, mean over the gated "
        "layers; Spearman over the 48 gated weights between each one's skip share and its eq. 3 Fisher share; "
        "train seconds only where both runs had the machine to themselves; per-step cost: benchmarks/training.py):", "", table(rows)]
    for m in methods:
        lines += ["", f"`{m}`: share of token updates skipped (%, test set) per layer kind and block, mean over "
                  "the tasks and seeds above:", "", table(layer_rows(res, m))]
    return "\n".join(lines)
