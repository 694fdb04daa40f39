"""What the tokens of a wrapped model stand for during one forward pass.

After a reducing block, a kept token stands for the patches it stood for before, and the merged
token for all the patches of the tokens it fused. :class:`TokenFlow` carries, per sample:

- ``sizes``: ``(B, n)`` float32, how many original patches each non-prefix token represents
  (read by size-weighted mean pooling and by attention pooling, see :func:`weighted_mean` and
  :func:`log_sizes`);
- ``positions``: ``(B, n)`` int64, the original patch index of each non-prefix token, ``-1`` for a
  merged token (read by families whose attention depends on position: RoPE, relative position
  bias). Tracked only when the family asks for it.

One flow per wrapped model, shared by its reducing blocks; it is reset when the first block
starts a forward pass. ``None`` fields mean no reduction has happened yet in this pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["TokenFlow", "gather_pair_bias", "gather_table_bias", "log_sizes", "pool_by_size", "weighted_mean"]


@dataclass
class TokenFlow:
    track_positions: bool = False
    sizes: Tensor | None = None
    positions: Tensor | None = None
    output: Tensor | None = None  # the backbone's output tokens, for heads that need them

    def reset(self, *_: Any) -> None:
        """Forget the previous pass (a forward pre-hook of the first block)."""
        self.sizes = self.positions = self.output = None

    def current(self, batch: int, n: int) -> tuple[Tensor | None, Tensor | None]:
        """``(sizes, positions)`` for ``n`` non-prefix tokens of ``batch`` samples, or ``None``
        where no reduction happened yet in this pass (every token is one patch at its place)."""
        if self.sizes is None or self.sizes.shape != (batch, n):
            return None, None
        return self.sizes, self.positions

    def update(self, kept: Tensor, n: int) -> None:
        """Record a reduction of ``n`` non-prefix tokens to the ``kept`` ones ``(B, k)`` (ascending
        positions among the ``n``) plus one merged token, appended last."""
        b = kept.shape[0]
        sizes, positions = self.current(b, n)
        if sizes is None:
            sizes = torch.ones(b, n, device=kept.device, dtype=torch.float32)
        kept_sizes = sizes.gather(1, kept)
        merged = (sizes.sum(1) - kept_sizes.sum(1)).unsqueeze(1)
        self.sizes = torch.cat([kept_sizes, merged], dim=1)
        if self.track_positions:
            if positions is None:
                positions = torch.arange(n, device=kept.device).expand(b, n)
            self.positions = torch.cat([positions.gather(1, kept), kept.new_full((b, 1), -1)], dim=1)

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles carry no tensors of a pass
        return {"track_positions": self.track_positions, "sizes": None, "positions": None, "output": None}


def weighted_mean(tokens: Tensor, sizes: Tensor) -> Tensor:
    """``(B, D)`` mean of ``(B, n, D)`` tokens, each weighted by the patches it stands for
    (at least float32 accumulation, returned in ``tokens``' dtype)."""
    with torch.autocast(tokens.device.type, enabled=False):
        acc = torch.promote_types(tokens.dtype, torch.float32)
        weights = (sizes / sizes.sum(1, keepdim=True)).unsqueeze(1).to(acc)
        return torch.bmm(weights, tokens.to(acc)).squeeze(1).to(tokens.dtype)


def log_sizes(sizes: Tensor) -> Tensor:
    """``(B, 1, 1, n)`` additive attention bias ``log(size)``: attending to a token that stands for
    ``s`` patches weighs it like ``s`` identical patches (proportional attention)."""
    return sizes.log()[:, None, None, :]


def pool_by_size(x: Tensor, sizes: Tensor, num_prefix_tokens: int, *, include_prefix: bool,
                 attn_pool: nn.Module | None = None) -> Tensor:
    """A model's mean or attention pooling of ``(B, N, D)`` tokens, as over the patches each token
    stands for: the size-weighted mean, or ``attn_pool(tokens, attn_mask=log(size))`` (a module
    taking an additive ``attn_mask``, like timm's ``AttentionPoolLatent``). ``include_prefix``:
    whether the pooling reads the prefix tokens too (each stands for itself)."""
    if include_prefix:
        sizes = torch.cat([sizes.new_ones(sizes.shape[0], num_prefix_tokens), sizes], dim=1)
    tokens = x if include_prefix else x[:, num_prefix_tokens:]
    if attn_pool is not None:
        return attn_pool(tokens, attn_mask=log_sizes(sizes).to(x.dtype))
    return weighted_mean(tokens, sizes)


def _pairs(positions: Tensor, num_prefix_tokens: int, m: int) -> tuple[Tensor, Tensor]:
    """``(B, n * n)`` flat indices into an ``(M, M)`` table of each token pair's original places,
    and the ``(B, n)`` merged-token flags (prefix first)."""
    b, p = positions.shape[0], num_prefix_tokens
    prefix = torch.arange(p, device=positions.device).expand(b, p)
    index = torch.cat([prefix, p + positions.clamp_min(0)], dim=1)  # (B, n)
    merged = torch.cat([torch.zeros_like(prefix, dtype=torch.bool), positions < 0], dim=1)
    return (index[:, :, None] * m + index[:, None, :]).flatten(1), merged


def _zero_merged(out: Tensor, merged: Tensor) -> Tensor:
    return out.masked_fill(merged[:, None, :, None] | merged[:, None, None, :], 0.0)


def gather_pair_bias(bias: Tensor, positions: Tensor, num_prefix_tokens: int) -> Tensor:
    """A token-pair attention bias (relative position bias) at the tokens of a reduced pass.

    Args:
        bias: ``(H, M, M)`` or ``(1 or B, H, M, M)`` over the unreduced sequence (prefix first).
        positions: ``(B, n - P)`` original patch index of each non-prefix token, -1 if merged.
        num_prefix_tokens: P.

    Returns:
        ``(B, H, n, n)``: rows and columns of each token's original place; 0 in the rows and
        columns of merged tokens (they have no single position).
    """
    m = bias.shape[-1]
    pairs, merged = _pairs(positions, num_prefix_tokens, m)
    flat = bias.reshape(-1, bias.shape[-3], m * m)  # (1 or B, H, M * M)
    if flat.shape[0] == 1:  # one table for the batch: one indexing, no (B, H, n, M) intermediate
        out = flat[0][:, pairs].transpose(0, 1)
    else:
        out = flat.gather(2, pairs[:, None, :].expand(-1, flat.shape[1], -1))
    return _zero_merged(out.reshape(positions.shape[0], -1, merged.shape[1], merged.shape[1]), merged)


def gather_table_bias(table: Tensor, index: Tensor, positions: Tensor, num_prefix_tokens: int) -> Tensor:
    """``gather_pair_bias`` of the bias ``table[index]`` (a relative position table ``(D, H)`` and its
    ``(M, M)`` index), without building the ``(H, M, M)`` bias of the unreduced sequence."""
    m = index.shape[-1]
    pairs, merged = _pairs(positions, num_prefix_tokens, m)
    out = table[index.reshape(-1)[pairs]]  # (B, n * n, H)
    n = merged.shape[1]
    return _zero_merged(out.permute(0, 2, 1).reshape(positions.shape[0], -1, n, n), merged)
