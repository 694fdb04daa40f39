"""The paper's fine-tuning protocol, shared by examples/vtab.py and examples/fgvc.py.

ViT-B/16 pretrained on ImageNet-21k, Adam with linear warm-up then cosine decay, 100 epochs,
TR-PTS = Fisher scores on the training split -> layer-wise allocation -> gradient masks ->
token selection in the blocks with the fewest selected weights. The final epoch's model is
evaluated (no best-epoch picking on the test set) and its task delta is saved.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import resolve_data_config
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from tqdm.auto import tqdm

import trpts

# Google's original ImageNet-21k ViT-B/16 ("ViT-B_16.npz"), the checkpoint VPT, NOAH, SPT and
# GPS fine-tune, and so the one the paper's comparisons assume. augreg_in21k is a stronger,
# later checkpoint (different numbers; pass --checkpoint to use it).
DEFAULT_CHECKPOINT = "vit_base_patch16_224.orig_in21k"


class ImageList(Dataset):
    """``(image, label)`` from ``(relative path, int label)`` pairs under ``root``; RGB."""

    def __init__(self, root: Path, items: Sequence[tuple[str, int]], transform: transforms.Compose):
        self.root, self.items, self.transform = Path(root), list(items), transform
        if not self.items:
            raise ValueError(f"no images listed for {root}")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        with Image.open(self.root / path) as img:
            return self.transform(img.convert("RGB")), label


def add_arguments(parser: argparse.ArgumentParser, lr: float, batch_size: int) -> None:
    """The options every harness shares (defaults: the paper's protocol)."""
    parser.add_argument("--data-root", type=Path, required=True, help="folder holding the dataset folders")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                        help="timm model name with pretrained tag (downloads unless cached or --weights)")
    parser.add_argument("--weights", type=Path, default=None, help="local weights (.safetensors/.pth) instead")
    parser.add_argument("--no-pretrained", action="store_true", help="random init (tests, smoke runs)")
    parser.add_argument("--model-kwargs", type=json.loads, default={}, help='e.g. \'{"depth": 2}\' (tests)')
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--warmup-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=lr, help="selected entries (and the head without --head-lr)")
    parser.add_argument("--head-lr", type=float, default=None,
                        help="the new head's own rate (the paper: one rate; on a real backbone the head "
                             "wants ~100x the entries' rate, see docs/benchmarks.md#real-backbone)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="head only (masked weights take none)")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--budget", type=float, default=0.005, help="share of ViT weights trained")
    parser.add_argument("--share-power", type=float, default=1.0,
                        help="eq. 4's exponent: 1 = the paper (default here), 0 = trpts' default (uniform C)")
    parser.add_argument("--train-biases", action="store_true",
                        help="also train the masked layers' biases (GPS does; the paper trains none)")
    parser.add_argument("--fisher-batches", type=int, default=8)
    parser.add_argument("--rho", type=float, default=0.7, help="tokens kept per reducing block")
    parser.add_argument("--token-blocks", type=int, default=3, help="reducing blocks (0: no token selection)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs"), help="results JSON and task delta go here")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def parse(doc: str, datasets: Sequence[str], splits: Sequence[str], argv: list[str] | None, *, lr: float,
          batch_size: int) -> tuple[argparse.Namespace, list[str]]:
    """Command line of a harness: ``--dataset`` (names or ``all``), ``--split`` and the shared
    options; returns the arguments and the dataset names to run."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", nargs="+", required=True, choices=[*datasets, "all"])
    parser.add_argument("--split", choices=list(splits), default="test")
    add_arguments(parser, lr=lr, batch_size=batch_size)
    args = parser.parse_args(argv)
    return args, list(datasets) if "all" in args.dataset else args.dataset


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The timm model with a new ``num_classes`` head; never downloads with ``--weights``."""
    kwargs = dict(num_classes=num_classes, img_size=args.img_size, **args.model_kwargs)
    if args.no_pretrained:
        return timm.create_model(args.checkpoint, pretrained=False, **kwargs)
    if args.weights is not None:
        return timm.create_model(args.checkpoint, pretrained=True, pretrained_cfg_overlay={"file": str(args.weights)},
                                 **kwargs)
    return timm.create_model(args.checkpoint, pretrained=True, **kwargs)


def normalization(model: nn.Module) -> transforms.Normalize:
    """The checkpoint's own mean/std (0.5/0.5 for the original in21k ViT)."""
    cfg = resolve_data_config({}, model=model)
    return transforms.Normalize(cfg["mean"], cfg["std"])


def _schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: bool) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def run(args: argparse.Namespace, name: str, model: nn.Module, train_set: Dataset, eval_set: Dataset,
        eval_split: str) -> dict[str, object]:
    """Fisher -> allocation -> masks -> tokens -> train ``args.epochs`` -> evaluate -> save delta."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    amp = args.amp and device.type == "cuda"
    model.to(device)
    g = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, args.batch_size, shuffle=True, drop_last=False, generator=g,
                              num_workers=args.workers, pin_memory=device.type == "cuda")
    eval_loader = DataLoader(eval_set, args.batch_size * 2, num_workers=args.workers)

    start = time.perf_counter()
    fisher = trpts.compute_fisher(model, train_loader, num_batches=args.fisher_batches, progress=args.progress)
    selection = trpts.allocate_connections(fisher, budget=args.budget, model=model, share_power=args.share_power)
    del fisher
    handle = trpts.apply_masks(model, selection, train_biases=args.train_biases)
    if args.token_blocks:
        trpts.wrap_vit(model, selection, rho=args.rho, num_layers=args.token_blocks)
    optimizer = torch.optim.Adam(handle.param_groups(weight_decay=args.weight_decay, lr=args.lr, head_lr=args.head_lr))
    steps_per_epoch = len(train_loader)
    scheduler = _schedule(optimizer, args.warmup_epochs * steps_per_epoch, args.epochs * steps_per_epoch)
    select_seconds = time.perf_counter() - start

    start = time.perf_counter()
    for _ in tqdm(range(args.epochs), desc=f"{name}: train", unit="epoch", disable=not args.progress):
        model.train()
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    train_seconds = time.perf_counter() - start
    acc = evaluate(model, eval_loader, device, amp)

    args.out.mkdir(parents=True, exist_ok=True)
    delta = trpts.save_delta(model, args.out / f"{name}.safetensors", name=name,
                             metadata={"eval_split": eval_split, "accuracy": acc})
    result = {
        "dataset": name, "eval_split": eval_split, "accuracy": acc, "final_loss": float(loss),
        "trained_values": handle.num_trainable, "selected_fraction": selection.fraction,
        "reducing_blocks": list(trpts.get_token_config(model).layers) if args.token_blocks else [],
        "select_seconds": select_seconds, "train_seconds": train_seconds, "delta": str(delta),
        "delta_bytes": delta.stat().st_size,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(f"{name}: {eval_split} accuracy {acc:.2%} after {args.epochs} epochs; {handle.num_trainable:,} "
          f"trained values ({selection.fraction:.3%} of ViT weights); delta {delta} "
          f"({delta.stat().st_size / 1024:.0f} KiB)")
    return result
