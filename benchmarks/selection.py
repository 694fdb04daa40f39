"""Cost of TR-PTS parameter selection.

1. ``compute_fisher`` (microbatch and per-sample modes) against a plain forward + backward
   over the same data (the cost of one epoch of training steps without the optimizer).
   Goal: microbatch mode <= 1.2x.
2. ``allocate_connections`` on ViT-B-sized scores (86M entries). Goal: <= 2 s on a 2-core CPU.

Usage::

    python benchmarks/selection.py            # vit_small_patch16_224 @ 224 px, ViT-B allocation
    python benchmarks/selection.py --quick    # seconds; run by the test suite
"""

from __future__ import annotations

import argparse
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


def allocation(model_name: str, repeats: int, budget: float) -> list[dict[str, object]]:
    with torch.device("meta"):
        shapes_model = timm.create_model(model_name, pretrained=False)
    names = trpts.default_scored_parameters(shapes_model)
    shapes = dict(shapes_model.named_parameters())
    g = torch.Generator().manual_seed(0)
    fisher = {n: torch.rand(shapes[n].shape, generator=g).pow_(4) for n in names}
    entries = sum(s.numel() for s in fisher.values())
    rows = []
    for label, kwargs in (("budget", {"budget": budget}), ("c_min", {"c_min": 2})):
        t, _ = median_seconds(lambda kw=kwargs: trpts.allocate_connections(fisher, **kw), repeats)
        rows.append({"what": f"allocate_connections ({label})", "model": model_name,
                     "data": f"{entries / 1e6:.1f}M scores", "median s": f"{t:.3f}",
                     "vs baseline": "goal <= 2 s"})
    return rows


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model and few repeats (seconds)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm model for the Fisher timing")
    parser.add_argument("--batch", type=int, default=8, help="batch size for the Fisher timing")
    parser.add_argument("--batches", type=int, default=4, help="batches per Fisher pass")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    progress = not args.no_progress
    if args.quick:
        repeats = args.repeats or 1
        rows = fisher_vs_backward("vit_tiny_patch16_224", 32, 4, 2, repeats, progress, args.device,
                                  patch_size=8, depth=2)
        rows += allocation("vit_tiny_patch16_224", repeats, budget=0.01)
    else:
        repeats = args.repeats or 5
        rows = fisher_vs_backward(args.model, 224, args.batch, args.batches, repeats, progress, args.device)
        rows += allocation("vit_base_patch16_224", repeats, budget=0.005)
    settings = {"device": args.device, "repeats": repeats}
    return report("trpts selection benchmark", "selection.py", argv, settings, rows, args.json)


if __name__ == "__main__":
    main()
