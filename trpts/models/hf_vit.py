"""Adapter for Hugging Face ``ViTModel`` / ``ViTForImageClassification``.

Handles both module layouts: transformers 4.x-5.8 (``vit.encoder.layer[i]``) and
5.9+ (``vit.layers[i]``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from .base import ModelAdapter


class HFViTAdapter(ModelAdapter):
    family = "hf-vit"
    description = "Hugging Face ViTModel / ViTForImageClassification (transformers 4.x and 5.x layouts)"
    block_name_pattern = re.compile(r"(?:^|\.)(?:encoder\.layer|layers)\.(\d+)\.")

    _CLASSES = ("ViTModel", "ViTForImageClassification")

    def matches(self, model: nn.Module) -> bool:
        return type(model).__module__.startswith("transformers.") and type(model).__name__ in self._CLASSES

    @staticmethod
    def _backbone(model: nn.Module) -> nn.Module:
        return model.vit if hasattr(model, "vit") else model

    def blocks(self, model: nn.Module) -> Sequence[nn.Module]:
        vit = self._backbone(model)
        if hasattr(vit, "layers"):  # transformers >= 5.9
            return list(vit.layers)
        return list(vit.encoder.layer)  # transformers 4.x - 5.8

    def patch_embedding(self, model: nn.Module) -> nn.Module | None:
        return self._backbone(model).embeddings.patch_embeddings.projection

    def heads(self, model: nn.Module) -> list[nn.Module]:
        head = getattr(model, "classifier", None)
        return [head] if isinstance(head, nn.Module) and any(True for _ in head.parameters()) else []
