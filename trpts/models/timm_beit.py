"""Adapter for timm ``Beit`` (BEiT, BEiT v2): parameter selection only.

Every ``nn.Linear`` weight in the blocks (fused ``qkv`` with separate q/v biases, ``proj``, MLP)
and the patch projection are scored; relative position bias tables, LayerScale gammas and
biases stay frozen. The head (``get_classifier()``) is trained in full. Token selection is not
supported: the relative position bias is indexed by token position (merged tokens have none) and
the default head mean-pools the patch tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from ..errors import UnsupportedModelError
from .base import ModelAdapter
from .generic import conventional_heads

TOKENS_UNSUPPORTED = ("token selection is not supported for timm Beit models: the relative position bias "
                      "is indexed by token position, so merged tokens have no bias entry, and the default "
                      "head mean-pools the patch tokens. Parameter selection (compute_fisher, "
                      "allocate_connections, apply_masks, deltas) works; token selection needs a timm "
                      "VisionTransformer or a Hugging Face ViT")


class TimmBeitAdapter(ModelAdapter):
    family = "timm-beit"
    description = ("timm Beit (BEiT, BEiT v2; relative position bias, mean pooling): parameter "
                   "selection, both storages, deltas; no token selection (relative position bias)")
    block_name_pattern = re.compile(r"(?:^|\.)blocks\.(\d+)\.")

    def matches(self, model: nn.Module) -> bool:
        if not type(model).__module__.startswith("timm."):
            return False
        from timm.models.beit import Beit

        return isinstance(model, Beit)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return list(model.blocks)  # type: ignore[arg-type]

    def patch_embedding(self, model: nn.Module) -> nn.Module | None:
        return getattr(model.patch_embed, "proj", None)

    def heads(self, model: nn.Module) -> list[nn.Module]:
        return conventional_heads(model)

    def check_token_support(self, model: nn.Module) -> None:
        raise UnsupportedModelError(TOKENS_UNSUPPORTED)
