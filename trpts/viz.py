"""Figures from the library (matplotlib is an optional extra: ``pip install "trpts[viz]"``).

- :func:`kept_patches`: which original patches each reducing block still holds as tokens.
- :func:`plot_kept_tokens`: the paper's Figure 6, kept patches over the input image.
- :func:`block_distribution` / :func:`plot_block_distribution`: Figure 5, the share of each
  task's selected weights per transformer block.
- :func:`selection_overlap` / :func:`plot_selection_overlap`: Figure 7, the overlap between
  tasks' selections as a heatmap.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ._utils import atomic_write, unwrap_model
from .allocation import Selection
from .errors import TrptsRuntimeError, TrptsValueError
from .models import get_adapter
from .tokens import get_token_config, record_kept_tokens

__all__ = [
    "block_distribution",
    "kept_patches",
    "plot_block_distribution",
    "plot_kept_tokens",
    "plot_selection_overlap",
    "selection_overlap",
]


def _grid(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    conv = get_adapter(model).patch_embedding(model)
    return height // conv.stride[0], width // conv.stride[1]


@torch.no_grad()
def kept_patches(model: nn.Module, images: Tensor) -> dict[int, Tensor]:
    """Run ``images`` ``(B, C, H, W)`` through a model wrapped by :func:`~trpts.wrap_vit` and
    return, per reducing block, a bool mask ``(B, grid_h, grid_w)``: True where the original
    patch is still its own token after that block (not merged). Runs in eval mode."""
    base = unwrap_model(model)
    config = get_token_config(base)
    if config is None:
        raise TrptsRuntimeError("kept_patches needs a model wrapped by trpts.wrap_vit")
    if images.ndim != 4:
        raise TrptsValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    grid_h, grid_w = _grid(base, images.shape[-2], images.shape[-1])
    was_training = base.training
    base.eval()
    try:
        with record_kept_tokens(base) as records:
            base(images)
    finally:
        base.train(was_training)
    b = images.shape[0]
    ids = torch.arange(grid_h * grid_w, device=images.device).expand(b, -1)  # token -> patch id
    masks: dict[int, Tensor] = {}
    num_patches = grid_h * grid_w
    for block in sorted(records):
        ids = ids.gather(1, records[block][0])
        slots = torch.where(ids >= 0, ids, num_patches)  # merged tokens (-1) go to a spare slot
        mask = torch.zeros(b, num_patches + 1, dtype=torch.bool, device=images.device).scatter_(1, slots, True)
        masks[block] = mask[:, :num_patches].view(b, grid_h, grid_w).cpu()
        ids = torch.cat([ids, torch.full((b, 1), -1, device=ids.device)], dim=1)  # the merged token
    return masks


def block_distribution(selection: Selection) -> dict[int, float]:
    """Figure 5's quantity: the fraction of the selection's weights in each transformer block
    (block index -> fraction; weights outside the blocks, such as the patch embedding, are
    left out, so the fractions sum to at most 1)."""
    total = max(1, selection.num_selected)
    return {block: count / total for block, count in selection.block_counts.items()}


def selection_overlap(a: Selection, b: Selection) -> float:
    """Figure 7's overlap rate: ``|A ∩ B| / |A ∪ B|`` (Jaccard) over the selected entries of the
    two selections (entries of weights only one of them scores count in the union)."""
    inter = 0
    for name in set(a) & set(b):
        inter += int(torch.isin(a.flat_indices(name), b.flat_indices(name)).sum())
    union = a.num_selected + b.num_selected - inter
    return inter / union if union else 1.0


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError('trpts plots need matplotlib: pip install "trpts[viz]"') from err
    return plt


def _save(fig: Any, path: str | os.PathLike[str] | None) -> None:
    """Write ``fig`` as PNG atomically when ``path`` is given."""
    if path is not None:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))


def plot_block_distribution(selections: Mapping[str, Selection],
                            path: str | os.PathLike[str] | None = None) -> Any:
    """Figure 5: per task (bars of one colour), the share of its selected weights per block."""
    if not selections:
        raise TrptsValueError("selections is empty; pass {task name: Selection}")
    plt = _pyplot()
    dists = {name: block_distribution(sel) for name, sel in selections.items()}
    blocks = sorted({b for d in dists.values() for b in d})
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(blocks) * max(1, len(dists)) ** 0.5), 3.2))
    width = 0.8 / len(dists)
    for i, (name, dist) in enumerate(dists.items()):
        ax.bar([b + (i - (len(dists) - 1) / 2) * width for b in blocks], [dist.get(b, 0.0) for b in blocks],
               width=width, label=name)
    ax.set_xticks(blocks)
    ax.set_xlabel("transformer block")
    ax.set_ylabel("share of selected weights")
    ax.legend(fontsize="small")
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_selection_overlap(selections: Mapping[str, Selection],
                           path: str | os.PathLike[str] | None = None) -> Any:
    """Figure 7: heatmap of :func:`selection_overlap` between every pair of tasks."""
    if not selections:
        raise TrptsValueError("selections is empty; pass {task name: Selection}")
    plt = _pyplot()
    names = list(selections)
    grid = torch.tensor([[selection_overlap(selections[a], selections[b]) for b in names] for a in names])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(names), 1.0 + 0.8 * len(names)))
    image = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center",
                    color="white" if grid[i, j] > 0.6 else "black", fontsize="small")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    _save(fig, path)
    return fig


def plot_kept_tokens(model: nn.Module, images: Tensor, path: str | os.PathLike[str] | None = None, *,
                     mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                     dim: float = 0.25) -> Any:
    """Figure 6: for each image (row), the input and, per reducing block (column), the patches
    still kept as their own tokens; merged patches are dimmed to ``dim`` brightness.

    Args:
        model: wrapped by :func:`~trpts.wrap_vit`.
        images: ``(B, C, H, W)`` model inputs.
        path: write a PNG here (atomically) when given.
        mean, std: the input normalization, to show the images in their original colours.

    Returns:
        The matplotlib ``Figure``.
    """
    plt = _pyplot()
    masks = kept_patches(model, images)
    shown = images.detach().float().cpu()
    if mean is not None and std is not None:
        shown = shown * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    lo = shown.amin(dim=(1, 2, 3), keepdim=True)
    hi = shown.amax(dim=(1, 2, 3), keepdim=True)
    shown = ((shown - lo) / (hi - lo).clamp_min(1e-8)).permute(0, 2, 3, 1)
    if shown.shape[-1] == 1:
        shown = shown.expand(-1, -1, -1, 3)
    blocks = sorted(masks)
    rows, cols = shown.shape[0], 1 + len(blocks)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows), squeeze=False)
    height, width = shown.shape[1:3]
    for r in range(rows):
        axes[r][0].imshow(shown[r].numpy())
        axes[r][0].set_title("input" if r == 0 else "")
        for c, block in enumerate(blocks, start=1):
            mask = masks[block][r].float()
            up = mask.repeat_interleave(height // mask.shape[0], 0).repeat_interleave(width // mask.shape[1], 1)
            light = dim + (1 - dim) * up[..., None]
            axes[r][c].imshow((shown[r] * light).numpy())
            if r == 0:
                axes[r][c].set_title(f"after block {block}\n{int(mask.sum())}/{mask.numel()} kept")
    for ax in fig.axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    _save(fig, path)
    return fig
