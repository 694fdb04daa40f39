"""Figures from the library (matplotlib is an optional extra: ``pip install "trpts[viz]"``).

- :func:`kept_patches`: which original patches each reducing block still holds as tokens.
- :func:`plot_kept_tokens`: the paper's Figure 6, kept patches over the input image.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ._utils import unwrap_model
from .errors import TrptsRuntimeError, TrptsValueError
from .models import get_adapter
from .tokens import get_token_config, record_kept_tokens

__all__ = ["kept_patches", "plot_kept_tokens"]


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
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError('plot_kept_tokens needs matplotlib: pip install "trpts[viz]"') from err
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
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png.tmp")
        os.close(fd)
        try:
            fig.savefig(tmp, format="png", dpi=120)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return fig
