"""Cost of TR-PTS parameter selection.

1. ``compute_fisher`` (microbatch and per-sample modes) against a plain forward + backward
   over the same data (the cost of one epoch of training steps without the optimizer).
   Goal: microbatch mode <= 1.2x.
2. ``allocate_connections(budget=0.005)`` on random scores of the shapes of ViT-B, ViT-L and
   ViT-H (86M, 303M, 630M scored weights; meta-device models, so no weights are built): time
   and peak memory as a multiple of the scores themselves (Linux: ``VmHWM`` after resetting
   it through ``/proc/self/clear_refs``). Goals on a 2-core CPU: ViT-B <= 1 s, ViT-H <= 8 s,
   peak <= 1.5x the scores; cost linear in the number of scores.

Usage::

    python benchmarks/selection.py                # Fisher on vit_small @ 224 px; ViT-B/L/H allocation
    python benchmarks/selection.py --skip-fisher  # allocation only
    python benchmarks/selection.py --quick        # seconds; run by the test suite
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, report

import trpts


def fisher_vs_backward(model_name: str, img: int, batch: int, batches: int, repeats: int,
                       progress: bool, device: str, **model_kwargs) -> list[dict[str, object]]:
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, img_size=img, num_classes=10,
                              **model_kwargs).to(device).eval()
    data = [(torch.randn(batch, 3, img, img, device=device), torch.randint(0, 10, (batch,), device=device))
            for _ in range(batches)]

    def plain() -> None:
        for x, y in data:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    runs = {"forward+backward (baseline)": plain,
            "compute_fisher (microbatch)": lambda: trpts.compute_fisher(model, data, num_batches=None, progress=False),
            "compute_fisher (per_sample)": lambda: trpts.compute_fisher(model, data, num_batches=None, per_sample=True,
                                                                        chunk_size=batch, progress=False)}
    results = {}
    for name, fn in tqdm(runs.items(), desc="fisher", disable=not progress, leave=False):
        results[name] = median_seconds(fn, repeats)[0]
    base = results["forward+backward (baseline)"]
    return [{"what": name, "model": f"{model_name} @ {img}px", "data": f"{batches} x {batch}",
             "median s": f"{t:.3f}", "vs baseline": f"{t / base:.2f}x"} for name, t in results.items()]


def _rss_mib(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process in MiB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def allocation(model_name: str, repeats: int, budget: float) -> dict[str, object]:
    """Median time and peak memory (x the scores) of ``allocate_connections(budget=...)`` on
    random scores of ``model_name``'s scored weights."""
    with torch.device("meta"):
        shapes_model = timm.create_model(model_name, pretrained=False)
    names = trpts.default_scored_parameters(shapes_model)
    shapes = dict(shapes_model.named_parameters())
    g = torch.Generator().manual_seed(0)
    fisher = {n: torch.rand(shapes[n].shape, generator=g).pow_(4) for n in names}
    entries = sum(s.numel() for s in fisher.values())
    t, _ = median_seconds(lambda: trpts.allocate_connections(fisher, budget=budget), repeats)
    gc.collect()
    peak = "n/a"
    before = _rss_mib("VmRSS")
    if before is not None and _reset_peak():
        trpts.allocate_connections(fisher, budget=budget)
        extra = max(0.0, _rss_mib("VmHWM") - before)
        peak = f"{1 + extra * 2**20 / (4 * entries):.2f}x"
    return {"what": f"allocate_connections (budget={budget})", "model": model_name,
            "data": f"{entries / 1e6:.1f}M scores", "median s": f"{t:.3f}",
            "vs baseline": f"peak {peak} the scores"}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and few repeats (seconds)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm model for the Fisher timing")
    parser.add_argument("--batch", type=int, default=8, help="batch size for the Fisher timing")
    parser.add_argument("--batches", type=int, default=4, help="batches per Fisher pass")
    parser.add_argument("--skip-fisher", action="store_true", help="time the allocation only")
    parser.add_argument("--alloc-models", nargs="+", default=None,
                        help="timm models whose scored shapes the allocation is timed on "
                             "(default: vit_base/large/huge)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    progress = not args.no_progress
    repeats = args.repeats or (1 if args.quick else 5)
    rows = []
    if not args.skip_fisher:
        rows += (fisher_vs_backward("vit_tiny_patch16_224", 32, 4, 2, repeats, progress, args.device,
                                    patch_size=8, depth=2) if args.quick else
                 fisher_vs_backward(args.model, 224, args.batch, args.batches, repeats, progress, args.device))
    models = args.alloc_models or (["vit_tiny_patch16_224"] if args.quick else
                                   ["vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224"])
    budget = 0.01 if args.quick else 0.005
    rows += [allocation(m, repeats, budget) for m in tqdm(models, desc="allocation", disable=not progress,
                                                          leave=False)]
    settings = {"device": args.device, "repeats": repeats}
    return report("trpts selection benchmark", "selection.py", argv, settings, rows, args.json)


if __name__ == "__main__":
    main()
