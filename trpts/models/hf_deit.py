"""Adapter for Hugging Face DeiT: ``DeiTModel``, ``DeiTForImageClassification`` and
``DeiTForImageClassificationWithTeacher`` (transformers 5.x layout for token selection).

The encoder starts with [CLS] and the distillation token (2 prefix tokens, never merged); the
heads read token 0 (``classifier`` / ``cls_classifier``) and token 1 (``distillation_classifier``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ._hf_common import HFVisionTokenAdapter, refuse_masks
from .base import BlockForward


def _reducing_layer_forward(self: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None,
                            **kwargs: Any) -> Tensor:
    """transformers 5.x ``DeiTLayer.forward`` with the token reduction before the MLP."""
    refuse_masks(attention_mask, kwargs)
    residual = hidden_states
    hidden_states = self.layernorm_before(hidden_states)
    hidden_states, _ = self.attention(hidden_states, attention_mask, **kwargs)
    hidden_states = self.dropout(hidden_states)
    hidden_states = hidden_states + residual
    hidden_states = self._trpts_tokens.reduce(hidden_states)
    residual = hidden_states
    hidden_states = self.layernorm_after(hidden_states)
    hidden_states = self.mlp(hidden_states)
    hidden_states = self.dropout(hidden_states)
    return hidden_states + residual


class HFDeiTAdapter(HFVisionTokenAdapter):
    family = "hf-deit"
    description = ("Hugging Face DeiTModel / DeiTForImageClassification / "
                   "DeiTForImageClassificationWithTeacher ([CLS] + distillation token)")

    _CLASSES = ("DeiTModel", "DeiTForImageClassification", "DeiTForImageClassificationWithTeacher")
    _BACKBONES = ("deit",)
    _HEADS = ("classifier", "cls_classifier", "distillation_classifier")
    _LAYERS = ("DeiTLayer",)
    _PARTS = ("layernorm_before", "dropout", "layernorm_after", "mlp")

    def patch_embedding(self, model: nn.Module) -> nn.Module | None:
        return self.backbone(model).embeddings.patch_embeddings.projection

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 2  # [CLS], distillation

    def reducing_forward(self, block: nn.Module) -> BlockForward:
        return _reducing_layer_forward
