"""Adapter for timm ``Eva`` (EVA, EVA-02, Perception Encoder): parameter selection only.

Blocks are ``EvaBlock`` / ``EvaBlockPostNorm`` with fused ``qkv`` or separate ``q_proj`` /
``k_proj`` / ``v_proj`` and (SwiGLU) MLPs; every ``nn.Linear`` weight in them is scored, plus
the patch projection and, for ``global_pool='map'``, the pretrained attention pool's linear
weights. The head (``get_classifier()``) is trained in full. Token selection is not supported:
rotary position embeddings are applied per token inside attention, so merged tokens have no
position to rotate by.
"""

from __future__ import annotations

from torch import nn

from ._timm_common import TimmBlocksAdapter
from .base import pool_linear_weights

TOKENS_UNSUPPORTED = ("token selection is not supported for timm Eva models yet: rotary position "
                      "embeddings (RoPE) are applied per token inside attention, so a merged token has no "
                      "single position. Parameter selection (compute_fisher, allocate_connections, "
                      "apply_masks, deltas) works")


class TimmEvaAdapter(TimmBlocksAdapter):
    family = "timm-eva"
    description = ("timm Eva (EVA, EVA-02, PE; fused or separate q/k/v, SwiGLU, RoPE): parameter "
                   "selection, both storages, deltas; no token selection (RoPE)")
    _timm_class = "timm.models.eva:Eva"
    tokens_unsupported = TOKENS_UNSUPPORTED

    def scored_parameters(self, model: nn.Module) -> list[str]:
        return pool_linear_weights(model, super().scored_parameters(model))
