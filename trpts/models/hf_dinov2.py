"""Adapter for Hugging Face DINOv2: ``Dinov2Model`` / ``Dinov2ForImageClassification`` and
``Dinov2WithRegistersModel`` / ``Dinov2WithRegistersForImageClassification`` (LayerScale, register
tokens).

Token selection: the register tokens follow [CLS] and are prefix tokens, never merged. The bare
models are pooled by [CLS]; the ``...ForImageClassification`` classifiers read [CLS] and the mean of
the patch tokens, which becomes the size-weighted mean (a forward hook on the classifier,
docs/tokens.md).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .._utils import model_type
from ._hf_common import HFVisionTokenAdapter, refuse_masks, size_weighted_classifier
from .base import BlockForward, Removable, scores_for


def _reducing_layer_forward(self: nn.Module, hidden_states: Tensor, attention_mask: Tensor | None = None,
                            **kwargs: Any) -> Tensor:
    """transformers 5.x ``Dinov2Layer.forward`` (also ``Dinov2WithRegistersLayer``) with the token
    reduction before the MLP."""
    refuse_masks(attention_mask, kwargs)
    residual = hidden_states
    hidden_states = self.norm1(hidden_states)
    hidden_states, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
    hidden_states = self.layer_scale1(hidden_states)
    hidden_states = self.drop_path(hidden_states) + residual
    hidden_states = self._trpts_tokens.reduce(hidden_states)
    residual = hidden_states
    hidden_states = self.norm2(hidden_states)
    hidden_states = self.mlp(hidden_states)
    hidden_states = self.layer_scale2(hidden_states)
    return self.drop_path(hidden_states) + residual


class HFDinov2Adapter(HFVisionTokenAdapter):
    family = "hf-dinov2"
    description = ("Hugging Face Dinov2Model / Dinov2ForImageClassification and the WithRegisters "
                   "variants (LayerScale, register tokens; [CLS] + size-weighted patch mean)")

    _CLASSES = ("Dinov2Model", "Dinov2ForImageClassification",
                "Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification")
    _BACKBONES = ("dinov2", "dinov2_with_registers")
    _LAYERS = ("Dinov2Layer", "Dinov2WithRegistersLayer")
    _PARTS = ("norm1", "layer_scale1", "drop_path", "norm2", "mlp", "layer_scale2")

    def patch_embedding(self, model: nn.Module) -> nn.Module | None:
        return self.backbone(model).embeddings.patch_embeddings.projection

    def token_scores(self, model: nn.Module) -> tuple[str, ...]:
        return scores_for(True, not model_type(model).__name__.endswith("ForImageClassification"))

    def patch_pooling(self, model: nn.Module) -> list[Removable]:
        if not model_type(model).__name__.endswith("ForImageClassification"):
            return []  # the bare models are pooled by [CLS]
        return size_weighted_classifier(self.backbone(model), model.classifier, model._trpts_flow,
                                        self.num_prefix_tokens(model))

    def pool_flops(self, model: nn.Module, num_tokens: int, reduced: bool) -> int:
        flops = super().pool_flops(model, num_tokens, reduced)
        if reduced and model_type(model).__name__.endswith("ForImageClassification"):
            flops += 2 * (num_tokens - self.num_prefix_tokens(model)) * self.backbone(model).config.hidden_size
        return flops

    def num_prefix_tokens(self, model: nn.Module) -> int:
        registers = getattr(self.backbone(model).embeddings, "register_tokens", None)
        return 1 + (int(registers.shape[1]) if registers is not None else 0)  # [CLS], registers

    def reducing_forward(self, block: nn.Module) -> BlockForward:
        return _reducing_layer_forward
