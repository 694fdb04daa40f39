"""Adapter for timm ``VisionTransformer`` (and subclasses such as DeiT ``VisionTransformerDistilled``)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from .base import ModelAdapter


class TimmViTAdapter(ModelAdapter):
    family = "timm-vit"
    description = "timm VisionTransformer (ViT, DeiT, DeiT distilled; CLS/register tokens, LayerScale, qk_norm)"
    block_name_pattern = re.compile(r"(?:^|\.)blocks\.(\d+)\.")

    def matches(self, model: nn.Module) -> bool:
        if not type(model).__module__.startswith("timm."):
            return False
        from timm.models.vision_transformer import VisionTransformer

        return isinstance(model, VisionTransformer)

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        return list(model.blocks)  # type: ignore[arg-type]

    def patch_embedding(self, model: nn.Module) -> nn.Module | None:
        return getattr(model.patch_embed, "proj", None)

    def heads(self, model: nn.Module) -> list[nn.Module]:
        heads = []
        for attr in ("head", "head_dist"):
            module = getattr(model, attr, None)
            if isinstance(module, nn.Module) and any(True for _ in module.parameters()):
                heads.append(module)
        return heads
