"""Adapter for timm ``Eva`` (EVA, EVA-02, Perception Encoder): parameter selection only.

Blocks are ``EvaBlock`` / ``EvaBlockPostNorm`` with fused ``qkv`` or separate ``q_proj`` /
``k_proj`` / ``v_proj`` and (SwiGLU) MLPs; every ``nn.Linear`` weight in them is scored, plus
the patch projection and, for ``global_pool='map'``, the pretrained attention pool's linear
weights. The head (``get_classifier()``) is trained in full. Token selection is not supported:
rotary position embeddings are applied per token inside attention, so merged tokens have no
position to rotate by.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from ..errors import UnsupportedModelError
from .base import ModelAdapter, pool_linear_weights
from .generic import conventional_heads

TOKENS_UNSUPPORTED = ("token selection is not supported for timm Eva models yet: rotary position "
                      "embeddings (RoPE) are applied per token inside attention, so a merged token has no "
                      "single position. Parameter selection (compute_fisher, allocate_connections, "
                      "apply_masks, deltas) works; token selection needs a timm VisionTransformer or a "
                      "Hugging Face ViT")


class TimmEvaAdapter(ModelAdapter):
    family = "timm-eva"
    description = ("timm Eva (EVA, EVA-02, PE; fused or separate q/k/v, SwiGLU, RoPE): parameter "
                   "selection, both storages, deltas; no token selection (RoPE)")
    block_name_pattern = re.compile(r"(?:^|\.)blocks\.(\d+)\.")

    def matches(self, model: nn.Module) -> bool:
        if not type(model).__module__.startswith("timm."):
            return False
        from timm.models.eva import Eva

        return isinstance(model, Eva)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return list(model.blocks)  # type: ignore[arg-type]

    def patch_embedding(self, model: nn.Module) -> nn.Module | None:
        return getattr(model.patch_embed, "proj", None)

    def heads(self, model: nn.Module) -> list[nn.Module]:
        return conventional_heads(model)

    def scored_parameters(self, model: nn.Module) -> list[str]:
        return pool_linear_weights(model, super().scored_parameters(model))

    def check_token_support(self, model: nn.Module) -> None:
        raise UnsupportedModelError(TOKENS_UNSUPPORTED)
