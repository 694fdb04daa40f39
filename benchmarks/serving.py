"""Serving many tasks from one backbone: mixed-task batches.

Throughput of one batch whose samples belong to T tasks (T in 1, 4, 16, 64; sample i uses
task i mod T), against a single-task batch of the same size (the reference, 1.00x: one delta
activated, a plain forward), for:

- ``trpts.forward_tasks``: one forward pass, each sample with its own delta and head;
- sequential ``activate_delta`` + one forward per task on that task's samples;
- PEFT's mixed-adapter LoRA batches (``model(x, adapter_names=...)``, r = 8 on ``qkv``, the head
  in ``modules_to_save``), T adapters loaded.

Goal: a mixed batch of 16 tasks at >= 0.8x the single-task batch, and faster than PEFT's mixed
LoRA batch. Random weights and fake-trained deltas: speed does not depend on the values, but
``forward_tasks`` does depend on where the entries sit. Real Fisher selections put each linear
layer's entries in few input columns (a pretrained DINOv2 ViT-S at 0.5 %: 5-30 of 384 or 1,536),
which ``forward_tasks`` applies as ``W0 x + dW x``; ``--columns`` (default 0.04) draws each
delta's scores that way, ``--columns 1`` spreads them uniformly (the per-task matmul path).
Every configuration runs once per round, rounds interleaved, medians reported.

Usage::

    python benchmarks/serving.py                     # vit_base_patch16_224 @ 224 px, batch 64, CPU
    python benchmarks/serving.py --device cuda --dtype bfloat16 --batch 256
    python benchmarks/serving.py --quick             # tiny model, seconds; run by the test suite
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, timed

import trpts


def make_deltas(model: torch.nn.Module, count: int, budget: float, columns: float, folder: Path,
                progress: bool) -> list[str]:
    """Save ``count`` fake-trained deltas of ``model`` (random-score selections, moved entries and
    a new head each); the model is left as it was. ``columns`` < 1: each linear weight's scores
    are raised in that fraction of its input columns (its own random ones per delta), as real
    Fisher scores are, so the selection lands there."""
    names = trpts.default_scored_parameters(model)
    params = dict(model.named_parameters())
    paths = []
    for i in tqdm(range(count), desc="deltas", disable=not progress, leave=False):
        g = torch.Generator().manual_seed(i)
        fisher = {n: torch.rand(params[n].shape, generator=g) for n in names}
        for f in fisher.values():
            if columns < 1 and f.ndim == 2:
                f[:, torch.randperm(f.shape[1], generator=g)[:max(1, round(columns * f.shape[1]))]] += 1.0
        handle = trpts.apply_masks(model, trpts.allocate_connections(fisher, budget=budget, model=model))
        with torch.no_grad():
            for name in handle.selection:
                idx = handle.selection.flat_indices(name).to(params[name].device)
                params[name].view(-1)[idx] += 0.01 * torch.randn(idx.numel(), generator=g).to(params[name])
            for p in handle.full.values():
                p.add_(0.01 * torch.randn(p.shape, generator=g).to(p))
        paths.append(str(trpts.save_delta(model, folder / f"task{i}.safetensors", name=f"task{i}")))
        handle.unload()
    return paths


def lora_model(model: torch.nn.Module, count: int) -> torch.nn.Module:
    """``model`` with ``count`` LoRA adapters (r = 8 on qkv, head in modules_to_save), B non-zero."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=8, target_modules=["qkv"], modules_to_save=["head"])
    peft_model = get_peft_model(model, config, adapter_name="task0")
    for i in range(1, count):
        peft_model.add_adapter(f"task{i}", config)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    return peft_model.eval()


def configurations(model: torch.nn.Module, peft_model: torch.nn.Module | None, x: torch.Tensor,
                   counts: list[int]) -> dict[str, Callable[[], object]]:
    """Every configuration to time, as a no-argument call."""
    batch = x.shape[0]

    def single() -> object:
        trpts.activate_delta(model, "task0")
        return model(x)

    runs: dict[str, Callable[[], object]] = {"single-task batch (reference)": single}
    for t in counts:
        tasks = [f"task{i % t}" for i in range(batch)]
        runs[f"trpts forward_tasks, T={t}"] = lambda tasks=tasks: trpts.forward_tasks(model, x, tasks)
        if t > 1:
            def sequential(t: int = t) -> object:
                outs = []
                for i in range(t):
                    trpts.activate_delta(model, f"task{i}")
                    outs.append(model(x[i::t]))
                return outs
            runs[f"trpts sequential activate_delta, T={t}"] = sequential
        if peft_model is not None:
            runs[f"PEFT mixed LoRA r=8, T={t}"] = lambda tasks=tasks: peft_model(x, adapter_names=tasks)
    return runs


def measure(runs: dict[str, Callable[[], object]], rounds: int, batch: int, progress: bool) -> list[dict[str, object]]:
    """Median seconds per configuration over interleaved rounds (one warm-up round first)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for r in tqdm(range(rounds + 1), desc="rounds", disable=not progress, leave=False):
            for name, fn in runs.items():
                t = timed(fn)
                if r:
                    times[name].append(t)
    ref = statistics.median(times["single-task batch (reference)"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"configuration": name, "median s": f"{med:.3f}", "images/s": f"{batch / med:.1f}",
                     "vs single-task batch": f"{ref / med:.2f}x",
                     "runs": " ".join(f"{t:.3f}" for t in ts)})
    return rows


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 4, 16, 64], help="task counts T per batch")
    parser.add_argument("--budget", type=float, default=0.005, help="each delta's fraction of scored weights")
    parser.add_argument("--columns", type=float, default=0.04,
                        help="fraction of each linear weight's input columns a delta's entries sit in (Fisher-like); "
                             "1 spreads them uniformly")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (medians), after one warm-up")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT LoRA baseline")
    parser.add_argument("--quick", action="store_true", help="tiny model, small batch (seconds)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)
    progress = not args.no_progress
    kwargs: dict[str, object] = {}
    if args.quick:
        args.model, args.img, args.batch, args.tasks, args.rounds = "vit_tiny_patch16_224", 32, 8, [1, 2, 4], 1
        kwargs = {"patch_size": 8, "depth": 2}
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, img_size=args.img, num_classes=10, **kwargs)
    model = model.to(args.device, dtype).eval()
    with tempfile.TemporaryDirectory() as tmp:
        for path in make_deltas(model, max(args.tasks), args.budget, args.columns, Path(tmp), progress):
            trpts.load_delta(model, path)
    peft_model = None
    if not args.no_peft:
        import copy

        plain = copy.deepcopy(model)
        for name in trpts.loaded_deltas(plain):
            trpts.remove_delta(plain, name)
        peft_model = lora_model(plain, max(args.tasks))
    x = torch.randn(args.batch, 3, args.img, args.img, device=args.device, dtype=dtype)
    rows = measure(configurations(model, peft_model, x, args.tasks), args.rounds, args.batch, progress)
    settings = {"model": f"{args.model} @ {args.img}px", "batch": args.batch, "budget": args.budget,
                "columns": args.columns, "device": args.device, "dtype": args.dtype, "rounds": args.rounds}
    return report("trpts serving benchmark: mixed-task batches", "serving.py", argv, settings, rows, args.json)


if __name__ == "__main__":
    main()
