"""Accuracy of TR-PTS against the methods users would pick instead, on one task, one protocol.

Task: the quickstart's (examples/digits_task.py): a small timm ViT pretrained on digit identity
(scikit-learn's digits at random places on a 32x32 canvas) is adapted to *where* the digit is
(4 classes; 1,000 train / 300 validation / 497 test images). Offline, CPU, ~20 min.

Methods (the paper's Tables 4 and 5 plus the usual baselines), all with AdamW, batch 64, the
same epochs, per-step cosine decay after a 5 % warm-up:

- linear probe (new head only); full fine-tuning (weight decay 0.05); BitFit (biases + head);
  LoRA through ``peft`` (r = 8, alpha 8, on ``qkv``, head trained);
- GPS-style: the same number of weights as TR-PTS, but a uniform K connections per neuron from
  |sum of batch gradients| scores, biases of the masked layers trained (GPS's recipe);
- TR-PTS parameters only (Fisher, eq. 3-5, ``budget``); TR-PTS tokens only (linear probe +
  token selection in the blocks TR-PTS would choose, as in the paper's Table 4); TR-PTS parameters + tokens with the reducing
  blocks placed sparse (the paper's choice), dense or random (Table 5).

Protocol: the learning rate of each method is picked from its grid by validation accuracy on
seed 0; then every seed (new placement/split of the target data, head initialisation and data
order; the source model stays the seed-0 one) trains with that rate and reports test accuracy
after the final epoch (not the best epoch).

    python benchmarks/accuracy.py [--quick] [--seeds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import digits_task as task
from common import report
from vtab_methods import gps_selection

import trpts

Setup = Callable[[nn.Module, tuple[torch.Tensor, torch.Tensor], float, int], tuple[nn.Module, torch.optim.Optimizer, int]]

GRIDS = {  # learning-rate grid per method family
    "head": [3e-3, 1e-2, 3e-2, 1e-1],
    "full": [3e-4, 1e-3, 3e-3, 1e-2],
    "lora": [1e-3, 3e-3, 1e-2, 3e-2],
    "sparse": [1e-2, 3e-2, 1e-1, 3e-1],
}


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _only(model: nn.Module, keep: Callable[[str, nn.Parameter], bool]) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(keep(n, p))


def make_methods(budget: float, rho: float, token_blocks: int) -> dict[str, tuple[str, Setup]]:
    """``{method: (grid name, setup(model, train data, lr, seed) -> (model, optimizer, trained))}``."""

    def linear(model, data, lr, seed, tokens=False):
        if tokens:  # placed where the Fisher selection is sparsest, but only the head trains
            fisher = trpts.compute_fisher(model, list(task.batches(*data)), num_batches=None, progress=False)
            selection = trpts.allocate_connections(fisher, budget=budget, model=model, share_power=1)  # eq. 4
            trpts.wrap_vit(model, selection, rho=rho, num_layers=token_blocks)
        _only(model, lambda n, p: n.startswith("head."))
        params = _trainable(model)
        return model, torch.optim.AdamW(params, lr=lr, weight_decay=0.0), sum(p.numel() for p in params)

    def full(model, data, lr, seed):
        params = _trainable(model)
        return model, torch.optim.AdamW(params, lr=lr, weight_decay=0.05), sum(p.numel() for p in params)

    def bitfit(model, data, lr, seed):
        _only(model, lambda n, p: n.startswith("head.") or (n.endswith(".bias") and p.ndim == 1))
        params = _trainable(model)
        return model, torch.optim.AdamW(params, lr=lr, weight_decay=0.0), sum(p.numel() for p in params)

    def lora(model, data, lr, seed):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"], modules_to_save=["head"]))
        params = _trainable(model)
        return model, torch.optim.AdamW(params, lr=lr, weight_decay=0.0), sum(p.numel() for p in params)

    def gps(model, data, lr, seed):
        selection = gps_selection(model, list(task.batches(*data)), budget)
        handle = trpts.apply_masks(model, selection, train_biases=True)
        return model, torch.optim.AdamW(handle.param_groups(weight_decay=0.0, lr=lr)), handle.num_trainable

    def tr_pts(model, data, lr, seed, placement=None):
        fisher = trpts.compute_fisher(model, list(task.batches(*data)), num_batches=None, progress=False)
        selection = trpts.allocate_connections(fisher, budget=budget, model=model, share_power=1)  # eq. 4
        handle = trpts.apply_masks(model, selection)
        if placement is not None:
            trpts.wrap_vit(model, selection, rho=rho, num_layers=token_blocks, placement=placement, seed=seed)
        return model, torch.optim.AdamW(handle.param_groups(weight_decay=0.0, lr=lr)), handle.num_trainable

    return {
        "linear probe": ("head", linear),
        "full fine-tuning": ("full", full),
        "BitFit": ("head", bitfit),
        "LoRA (peft, r=8, qkv)": ("lora", lora),
        "GPS-style (uniform K, |grad|)": ("sparse", gps),
        "TR-PTS params only": ("sparse", tr_pts),
        "TR-PTS tokens only": ("head", lambda m, d, lr, s: linear(m, d, lr, s, tokens=True)),
        "TR-PTS params + tokens (sparse)": ("sparse", lambda m, d, lr, s: tr_pts(m, d, lr, s, "sparse")),
        "TR-PTS params + tokens (dense)": ("sparse", lambda m, d, lr, s: tr_pts(m, d, lr, s, "dense")),
        "TR-PTS params + tokens (random)": ("sparse", lambda m, d, lr, s: tr_pts(m, d, lr, s, "random")),
    }


def run_once(setup: Setup, source: nn.Module, data: dict[str, tuple[torch.Tensor, torch.Tensor]], lr: float,
             seed: int, epochs: int) -> dict[str, float]:
    model = task.target_model(source, task.NUM_POSITIONS, seed)
    torch.manual_seed(seed)
    model, optimizer, trained = setup(model, data["train"], lr, seed)
    task.train(model, optimizer, *data["train"], epochs, seed=seed, progress=False)
    return {"val": task.accuracy(model, *data["val"]), "test": task.accuracy(model, *data["test"]),
            "trained": trained}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 epoch, 1 seed, 1 learning rate (a smoke test)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0.01, help="share of scored weights (TR-PTS, GPS-style)")
    parser.add_argument("--rho", type=float, default=0.7, help="tokens kept per reducing block")
    parser.add_argument("--token-blocks", type=int, default=2, help="reducing blocks")
    parser.add_argument("--methods", nargs="+", default=None, help="subset of methods (names as in the table)")
    parser.add_argument("--source-epochs", type=int, default=20)
    parser.add_argument("--cache-dir", default=str(task.default_cache_dir()))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    epochs, seeds = (1, 1) if args.quick else (args.epochs, args.seeds)
    source_epochs = 1 if args.quick else args.source_epochs
    torch.manual_seed(0)
    source = task.pretrained_backbone(args.cache_dir, epochs=source_epochs, progress=not args.no_progress)
    methods = make_methods(args.budget, args.rho, args.token_blocks)
    unknown = set(args.methods or ()) - set(methods)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {list(methods)}")
    chosen = {k: v for k, v in methods.items() if args.methods is None or k in args.methods}
    datasets = {s: task.position_task(s) for s in range(seeds)}
    jobs = sum(1 if args.quick else len(GRIDS[g]) + seeds - 1 for g, _ in chosen.values())
    bar = tqdm(total=jobs, desc="training runs", disable=args.no_progress)
    rows = []
    for name, (grid_name, setup) in chosen.items():
        grid = GRIDS[grid_name][1:2] if args.quick else GRIDS[grid_name]
        tuning = {}
        for lr in grid:  # validation accuracy on seed 0 picks the learning rate
            tuning[lr] = run_once(setup, source, datasets[0], lr, 0, epochs)
            bar.update()
        best = max(grid, key=lambda lr: (tuning[lr]["val"], -lr))
        results = [tuning[best]]
        for seed in range(1, seeds):
            results.append(run_once(setup, source, datasets[seed], best, seed, epochs))
            bar.update()
        tests = [r["test"] for r in results]
        std = statistics.stdev(tests) if len(tests) > 1 else 0.0
        rows.append({
            "method": name,
            "trained values": f"{results[0]['trained']:,}",
            "lr grid (val acc, seed 0)": ", ".join(f"{lr:g}: {tuning[lr]['val']:.1%}" for lr in grid),
            "lr": f"{best:g}",
            "test acc": f"{100 * statistics.mean(tests):.1f} +- {100 * std:.1f}",
            "per seed": " / ".join(f"{100 * t:.1f}" for t in tests),
        })
    bar.close()
    settings = {"task": "digit position, 4 classes", "epochs": epochs, "seeds": seeds, "budget": args.budget,
                "rho": args.rho, "token blocks": args.token_blocks}
    return report("Accuracy on the digits position task", "accuracy.py", argv, settings, rows, args.json)


if __name__ == "__main__":
    main()
