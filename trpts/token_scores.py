"""Token scores for the reducing step: which patch tokens a reducing block keeps (eq. 8 and the
scores that play its role where the [CLS] token is absent or not pooled).

Both scores are float32 rows over the non-prefix tokens that sum to 1, computed from the block's
own queries and keys (exactly as its attention uses them), with the prefix keys excluded and the
softmax renormalized over the patch keys.

- ``"cls"`` (eq. 8): the [CLS] query's attention, averaged over heads. O(N d) per head.
- ``"mean"``: the attention each token receives, averaged over every query and head. For models
  without a [CLS] token (SigLIP) or whose head averages the patch tokens. O(N^2 d) per head,
  computed in query chunks so no more than a chunk's ``(B, H, c, N)`` logits exist at once.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .errors import TrptsValueError

__all__ = ["SCORES", "Score", "cls_attention", "mean_attention", "token_scores"]

Score = Literal["cls", "mean"]
SCORES: tuple[str, ...] = ("cls", "mean")


def cls_attention(q_cls: Tensor, k: Tensor, scale: float, num_prefix_tokens: int) -> Tensor:
    """Eq. 8: the [CLS] query's attention over the non-prefix tokens, averaged over heads.

    Args:
        q_cls: ``(B, H, d)`` query of the [CLS] token (after any ``q_norm``).
        k: ``(B, H, N, d)`` keys of all tokens (after any ``k_norm``).
        scale: the block's own attention scale (usually ``d ** -0.5``).
        num_prefix_tokens: P; the first P keys are excluded and the softmax renormalized.

    Returns:
        ``(B, N - P)`` float32 scores; each row sums to 1. O(N*d) per head.
    """
    with torch.autocast(q_cls.device.type, enabled=False):
        logits = torch.einsum("bhd,bhnd->bhn", q_cls.float(), k[:, :, num_prefix_tokens:].float())
        return (logits * scale).softmax(dim=-1).mean(dim=1)


def mean_attention(q: Tensor, k: Tensor, scale: float, num_prefix_tokens: int, *,
                   chunk_elements: int = 1 << 24) -> Tensor:
    """The attention each non-prefix token receives, averaged over all ``N`` queries and heads.

    Args:
        q: ``(B, H, N, d)`` queries of all tokens; k: ``(B, H, N, d)`` keys (as the attention
            uses them). scale, num_prefix_tokens: as in :func:`cls_attention`.

    Returns:
        ``(B, N - P)`` float32 scores, each row summing to 1, without gradient (a merge weighted
        by them treats them as constants). The logits are built in query chunks of at most
        ``chunk_elements`` (default ``2**24``, 64 MiB) elements, never the whole ``(B, H, N, N)``.
    """
    b, h, n, _ = q.shape
    keys = k[:, :, num_prefix_tokens:].detach().float()
    chunk = max(1, chunk_elements // max(1, b * h * keys.shape[2]))
    total = keys.new_zeros(b, keys.shape[2])
    with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
        for start in range(0, n, chunk):
            logits = torch.einsum("bhqd,bhnd->bhqn", q[:, :, start:start + chunk].detach().float(), keys)
            total += (logits * scale).softmax(dim=-1).sum(dim=(1, 2))
    return total / (h * n)


def token_scores(score: str, q: Tensor, k: Tensor, scale: float, num_prefix_tokens: int) -> Tensor:
    """``(B, N - P)`` scores of kind ``score`` from a block's ``(B, H, N, d)`` queries and keys
    (for ``"cls"``, ``q`` may hold the [CLS] row only: ``(B, H, 1, d)``)."""
    if score == "cls":
        return cls_attention(q[:, :, 0], k, scale, num_prefix_tokens)
    if score == "mean":
        return mean_attention(q, k, scale, num_prefix_tokens)
    raise TrptsValueError(f"score must be one of {SCORES}, got {score!r}")


def check_score(score: object) -> None:
    """Raise a clear error unless ``score`` names a score kind (or ``"auto"``)."""
    if score != "auto" and score not in SCORES:
        raise TrptsValueError(f"score must be 'auto' or one of {SCORES}, got {score!r}")
