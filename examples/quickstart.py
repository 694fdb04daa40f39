"""trpts quickstart: Fisher scores -> layer-wise allocation -> masked fine-tuning, offline on a CPU.

Real data that ships with scikit-learn (the 8x8 handwritten digits, upscaled to 16x16) and a
real timm ViT (4 blocks, width 128):

1. source task: pretrain the ViT on digits 0-4 (cached in the user cache directory, so
   later runs skip it);
2. target task: digits 5-9 with a new head, trained three ways for the same epochs:
   linear probe (head only), TR-PTS (Fisher-selected weights + head) and full fine-tuning.

Prints test accuracy, the share of trained values and training time per method, and checks
that every weight entry TR-PTS did not select is bit-identical to the pretrained one.

    pip install ".[examples]" && python examples/quickstart.py
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

import trpts

CACHE_VERSION = "quickstart-v1"  # bump when the source model or its training changes


def load_digits(classes: range, seed: int) -> tuple[torch.Tensor, ...]:
    """Images (N, 3, 16, 16) in [-1, 1] and labels 0..len(classes)-1, split 60/40 (stratified)."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    digits = sk_digits()
    keep = [i for i, t in enumerate(digits.target) if t in classes]
    x = torch.tensor(digits.images[keep], dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(digits.target[keep] - classes.start, dtype=torch.int64)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.4, random_state=seed, stratify=y)
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def make_model(num_classes: int) -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4,
                             embed_dim=128, depth=4, num_heads=4, mlp_ratio=2.0, num_classes=num_classes)


def batches(x: torch.Tensor, y: torch.Tensor, size: int, generator: torch.Generator | None = None):
    order = torch.randperm(len(y), generator=generator) if generator is not None else torch.arange(len(y))
    for i in range(0, len(y), size):
        j = order[i : i + size]
        yield x[j], y[j]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, data: tuple[torch.Tensor, ...], epochs: int,
          seed: int, desc: str, progress: bool) -> float:
    x, y = data[0], data[1]
    g = torch.Generator().manual_seed(seed)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    start = time.perf_counter()
    model.train()
    for _ in tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=False):
        for xb, yb in batches(x, y, 64, g):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        sched.step()
    return time.perf_counter() - start


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())


def pretrained_backbone(args: argparse.Namespace) -> nn.Module:
    """Source model trained on digits 0-4, cached under the user cache directory."""
    cache = Path(args.cache_dir) / f"{CACHE_VERSION}-seed{args.seed}.pt"
    model = make_model(5)
    if cache.exists() and not args.no_cache:
        model.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
        print(f"source model: loaded from {cache}")
        return model
    src = load_digits(range(0, 5), args.seed)
    torch.manual_seed(args.seed)
    model = make_model(5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    seconds = train(model, optimizer, src, args.source_epochs, args.seed, "pretrain (digits 0-4)", args.progress)
    print(f"source model: digits 0-4, test accuracy {accuracy(model, src[2], src[3]):.1%} "
          f"({seconds:.0f} s)")
    if not args.no_cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, cache)  # atomic
    return model


def fresh_target_model(source: nn.Module, num_classes: int, seed: int) -> nn.Module:
    model = make_model(5)
    model.load_state_dict(source.state_dict())
    torch.manual_seed(seed)
    model.reset_classifier(num_classes)  # the new task's head
    return model


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trpts"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.01, help="fraction of scored weights TR-PTS trains")
    parser.add_argument("--epochs", type=int, default=30, help="target-task epochs per method")
    parser.add_argument("--source-epochs", type=int, default=30, help="pretraining epochs (source task)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(default_cache), help="where the source model is cached")
    parser.add_argument("--no-cache", action="store_true", help="always pretrain, never read/write the cache")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    source = pretrained_backbone(args)
    target = load_digits(range(5, 10), args.seed)
    train_data = list(batches(target[0], target[1], 64))
    rows: list[dict[str, object]] = []

    # 1. Linear probe: only the new head trains.
    model = fresh_target_model(source, 5, args.seed)
    head = list(model.get_classifier().parameters())
    for p in model.parameters():
        p.requires_grad_(any(p is h for h in head))
    seconds = train(model, torch.optim.AdamW(head, lr=1e-2, weight_decay=0.0), target, args.epochs,
                    args.seed, "linear probe", args.progress)
    rows.append(dict(method="linear probe", acc=accuracy(model, target[2], target[3]),
                     trained=sum(p.numel() for p in head), seconds=seconds))
    total = sum(p.numel() for p in model.parameters())

    # 2. TR-PTS: Fisher scores -> layer-wise allocation -> gradient masks, in a plain loop.
    model = fresh_target_model(source, 5, args.seed)
    start = time.perf_counter()
    fisher = trpts.compute_fisher(model, train_data, progress=args.progress)
    selection = trpts.allocate_connections(fisher, budget=args.budget, model=model)
    handle = trpts.apply_masks(model, selection)
    select_seconds = time.perf_counter() - start
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(handle.param_groups(weight_decay=0.0, lr=1e-2))
    seconds = train(model, optimizer, target, args.epochs, args.seed, "TR-PTS", args.progress)
    frozen_ok = all(torch.equal(p.detach()[~selection[n]], before[n][~selection[n]])
                    for n, p in model.named_parameters() if n in selection)
    rows.append(dict(method=f"TR-PTS (budget {args.budget:g})", acc=accuracy(model, target[2], target[3]),
                     trained=handle.num_trainable, seconds=seconds + select_seconds))

    # 3. Full fine-tuning.
    model_full = fresh_target_model(source, 5, args.seed)
    seconds = train(model_full, torch.optim.AdamW(model_full.parameters(), lr=1e-3, weight_decay=0.05),
                    target, args.epochs, args.seed, "full fine-tuning", args.progress)
    rows.append(dict(method="full fine-tuning", acc=accuracy(model_full, target[2], target[3]),
                     trained=total, seconds=seconds))

    print(f"\nTarget task: digits 5-9 ({len(target[1])} train / {len(target[3])} test images, 16x16), "
          f"{args.epochs} epochs each, backbone pretrained on digits 0-4.\n")
    print(f"{'method':<22} {'test acc':>9} {'trained values':>16} {'% of model':>11} {'time':>8}")
    for r in rows:
        print(f"{r['method']:<22} {r['acc']:>9.1%} {r['trained']:>16,} {r['trained'] / total:>11.2%} "
              f"{r['seconds']:>7.1f}s")
    print(f"\nTR-PTS selected {selection.num_selected:,} of {selection.num_scored:,} scored weights "
          f"({selection.fraction:.2%}); per block: {selection.block_counts}")
    print(f"Entries TR-PTS did not select are bit-identical to the pretrained backbone: "
          f"{'yes' if frozen_ok else 'NO'}")
    handle.remove()
    return rows


if __name__ == "__main__":
    main()
