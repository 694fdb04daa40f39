"""The demo task shared by the quickstart, the figures and ``benchmarks/accuracy.py``.

Real data that ships with scikit-learn: the 1,797 handwritten 8x8 digits, upscaled to 16x16
and pasted at a random place on a 32x32 canvas. A small real timm ViT (patch 4, so 64 patch
tokens + [CLS]; width 96, 4 blocks, fixed 2-D sin-cos position embedding as in MAE) is
pretrained on the **source task**, digit identity (10 classes) with a fresh random placement
every epoch, so the backbone learns strokes and learns to ignore where they are. The **target
task** asks the opposite: where is the digit? The label is the quarter of the canvas width the
digit's left edge falls in (4 classes, balanced). This is a miniature of VTAB's dSprites/loc,
where a linear probe gets 12.5 % and the paper's TR-PTS 87.7 %: the target needs features the
source task taught the backbone to discard.

Why a fixed sin-cos position embedding: with timm's default learned embedding (initialised
with std 0.02), position-invariant pretraining leaves it too faint to use. Adapting such a
backbone, even training every weight matrix but the embedding stayed at chance on the target
while full fine-tuning (which can grow the embedding) reached 81 %; real pretrained ViTs have
strong position embeddings, which a frozen sin-cos embedding imitates.

Everything is generated offline and deterministically from a seed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from timm.layers import build_sincos2d_pos_embed
from torch import Tensor, nn
from tqdm.auto import tqdm

CANVAS, DIGIT, PATCH = 32, 16, 4
NUM_POSITIONS = 4  # target classes: quarter of the horizontal offset range
CACHE_VERSION = "digits-canvas-v1"  # bump when the source model or its training changes
SPLIT = (1000, 300)  # target task: train, validation; the remaining 497 images are the test set


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/trpts`` (default ``~/.cache/trpts``): where the source model is kept."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trpts"


def digit_images() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as float32 (1797, 1, 16, 16) in [0, 1] and int64 labels 0-9."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=DIGIT, mode="bilinear", align_corners=False).clamp(0, 1)
    return x, torch.tensor(digits.target, dtype=torch.int64)


def place(digits: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Paste each (1, 16, 16) digit at a uniformly random offset on a blank 32x32 canvas.

    Returns float32 images (N, 3, 32, 32) in [-1, 1] and the int64 horizontal offsets (N,) in
    0..16.
    """
    n, span = len(digits), CANVAS - DIGIT + 1
    ox = torch.randint(0, span, (n,), generator=generator)
    oy = torch.randint(0, span, (n,), generator=generator)
    canvas = torch.zeros(n, 1, CANVAS, CANVAS)
    for i in range(n):
        canvas[i, :, oy[i] : oy[i] + DIGIT, ox[i] : ox[i] + DIGIT] = digits[i]
    return canvas.repeat(1, 3, 1, 1) * 2 - 1, ox


def position_label(ox: Tensor) -> Tensor:
    """Offsets 0..16 -> 4 classes: 0-4, 5-8, 9-12, 13-16."""
    return torch.clamp(ox * NUM_POSITIONS // (CANVAS - DIGIT + 1), max=NUM_POSITIONS - 1)


def _placed_splits(seed: int, by_position: bool) -> dict[str, tuple[Tensor, Tensor]]:
    digits, identity = digit_images()
    g = torch.Generator().manual_seed(1000 + seed)
    x, ox = place(digits, g)
    y = position_label(ox) if by_position else identity
    order = torch.randperm(len(y), generator=g)
    a, b = SPLIT[0], SPLIT[0] + SPLIT[1]
    parts = {"train": order[:a], "val": order[a:b], "test": order[b:]}
    return {k: (x[i], y[i]) for k, i in parts.items()}


def position_task(seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """Target task splits ``{"train", "val", "test"}`` -> (images, position labels).

    Every digit image appears once, at a random place; the split is a seeded permutation.
    """
    return _placed_splits(seed, by_position=True)


def identity_task(seed: int = 0) -> dict[str, tuple[Tensor, Tensor]]:
    """The same images and splits as :func:`position_task`, labelled by digit identity."""
    return _placed_splits(seed, by_position=False)


def make_model(num_classes: int) -> nn.Module:
    """The demo ViT (timm ``VisionTransformer``, 311k parameters) with a fixed sin-cos position
    embedding (frozen, like MAE's)."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=CANVAS, patch_size=PATCH,
                              embed_dim=96, depth=4, num_heads=2, mlp_ratio=2.0, num_classes=num_classes)
    with torch.no_grad():
        model.pos_embed.zero_()
        model.pos_embed[0, 1:] = build_sincos2d_pos_embed([CANVAS // PATCH] * 2, 96)
    model.pos_embed.requires_grad_(False)
    return model


def batches(x: Tensor, y: Tensor, size: int = 64,
            generator: torch.Generator | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """Mini-batches in order, or shuffled with ``generator``."""
    order = torch.randperm(len(y), generator=generator) if generator is not None else torch.arange(len(y))
    for i in range(0, len(y), size):
        j = order[i : i + size]
        yield x[j], y[j]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, epochs: int, *,
          seed: int = 0, batch_size: int = 64, desc: str = "train", progress: bool = True,
          reshuffle: Callable[[], Tensor] | None = None) -> float:
    """Plain loop with per-step cosine decay after a 5 % linear warm-up; returns seconds.

    ``reshuffle``, if given, returns new images ``x`` before every epoch (a fresh placement).
    """
    g = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(y) // batch_size)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min((s + 1) / warmup, 0.5 * (
        1 + torch.cos(torch.tensor(torch.pi * min(s, steps) / steps)).item())))
    start = time.perf_counter()
    model.train()
    for _ in tqdm(range(epochs), desc=desc, unit="epoch", disable=not progress, leave=False):
        if reshuffle is not None:
            x = reshuffle()
        for xb, yb in batches(x, y, batch_size, g):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            sched.step()
    return time.perf_counter() - start


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """Logits (N, classes) in eval mode."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Top-1 accuracy in [0, 1]."""
    return float((predict(model, x).argmax(1) == y).float().mean())


def pretrained_backbone(cache_dir: Path | str | None = None, *, seed: int = 0, epochs: int = 20,
                        use_cache: bool = True, progress: bool = True) -> nn.Module:
    """The source model (digit identity, random placement), trained once and cached.

    The cache file is keyed by :data:`CACHE_VERSION`, the seed and the epochs, and written
    atomically; ``use_cache=False`` neither reads nor writes it.
    """
    cache = Path(cache_dir or default_cache_dir()) / f"{CACHE_VERSION}-seed{seed}-ep{epochs}.pt"
    model = make_model(10)
    if use_cache and cache.exists():
        model.load_state_dict(torch.load(cache, map_location="cpu", weights_only=True))
        print(f"source model: loaded from {cache}")
        return model
    digits, labels = digit_images()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = make_model(10)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3,
                                  weight_decay=0.05)
    # a fresh placement every epoch: where the digit is carries no label
    seconds = train(model, optimizer, digits, labels, epochs, seed=seed, desc="pretrain (digit identity)",
                    progress=progress, reshuffle=lambda: place(digits, g)[0])
    test = identity_task(seed)["test"]
    print(f"source model: digit identity at random places, {accuracy(model, *test):.1%} on held-out "
          f"placements ({seconds:.0f} s, {epochs} epochs)")
    if use_cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, cache)  # atomic
    return model


def target_model(source: nn.Module, num_classes: int, seed: int = 0) -> nn.Module:
    """A copy of the source model with a new, seeded head for the target task."""
    model = make_model(10)
    model.load_state_dict(source.state_dict())
    torch.manual_seed(seed)
    model.reset_classifier(num_classes)
    return model
