"""Adapter for the Hugging Face CLIP image tower: ``CLIPVisionModel`` and
``CLIPVisionModelWithProjection`` (pre-LayerNorm ``pre_layrnorm``, pooled by [CLS] + ``post_layernorm``).

``visual_projection`` maps the pooled [CLS] into CLIP's joint image-text space. It is pretrained and
shared with the text tower's space, so it is treated as part of the backbone, not as a task head:
it is neither scored (it is outside the blocks) nor trained by ``train_head``, and ``heads()`` is
empty; pass ``extra_trainable=["visual_projection.weight"]`` to ``apply_masks`` to tune it densely.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ._hf_common import HFVisionTokenAdapter, refuse_masks
from .base import BlockForward


def _reducing_layer_forward(self: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None,
                            **kwargs: Any) -> Tensor:
    """transformers 5.x ``CLIPEncoderLayer.forward`` with the token reduction before the MLP."""
    refuse_masks(attention_mask, kwargs)
    residual = hidden_states
    hidden_states = self.layer_norm1(hidden_states)
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask, **kwargs)
    hidden_states = residual + hidden_states
    hidden_states = self._trpts_tokens.reduce(hidden_states)
    residual = hidden_states
    hidden_states = self.layer_norm2(hidden_states)
    hidden_states = self.mlp(hidden_states)
    return residual + hidden_states


class HFCLIPVisionAdapter(HFVisionTokenAdapter):
    family = "hf-clip-vision"
    description = ("Hugging Face CLIPVisionModel / CLIPVisionModelWithProjection (no head; "
                   "visual_projection is frozen backbone)")

    _CLASSES = ("CLIPVisionModel", "CLIPVisionModelWithProjection")
    _BACKBONES = ("vision_model",)
    _HEADS = ()  # visual_projection is pretrained backbone (see the module docstring)
    _LAYERS = ("CLIPEncoderLayer",)
    _ATTENTION = "self_attn"
    _PARTS = ("layer_norm1", "layer_norm2", "mlp")

    def patch_embedding(self, model: nn.Module) -> nn.Module | None:
        return self.backbone(model).embeddings.patch_embedding

    def reducing_forward(self, block: nn.Module) -> BlockForward:
        return _reducing_layer_forward
