"""Adapter for the Hugging Face SigLIP image tower: ``SiglipVisionModel`` (pooled by its
attention-pooling ``head``) and ``SiglipForImageClassification`` (``classifier`` on the mean of all
tokens).

The attention-pooling ``head`` of ``SiglipVisionModel`` is pretrained backbone, not a task head
(like CLIP's ``visual_projection``): it is neither scored nor trained by ``train_head``.

Token selection: SigLIP has no [CLS] token, so tokens are scored by the attention they receive
from every query (``score="mean"``) and the top k of all N are kept. The attention pool adds
``log(size)`` to its logits and the classifier's mean is size-weighted (docs/tokens.md), through
forward hooks.
"""

from __future__ import annotations

from torch import nn

from ._hf_common import HFVisionTokenAdapter, log_size_attention_pool, size_weighted_classifier
from .base import BlockForward, Removable
from .hf_clip import _reducing_layer_forward


class HFSiglipVisionAdapter(HFVisionTokenAdapter):
    family = "hf-siglip-vision"
    description = ("Hugging Face SiglipVisionModel / SiglipForImageClassification (no [CLS] token: "
                   "token selection by mean attention)")

    _CLASSES = ("SiglipVisionModel", "SiglipForImageClassification")
    _BACKBONES = ("vision_model",)
    _PREFIX_TOKENS = 0  # no [CLS]
    _LAYERS = ("SiglipEncoderLayer",)
    _ATTENTION = "self_attn"
    _PARTS = ("layer_norm1", "layer_norm2", "mlp")

    def patch_embedding(self, model: nn.Module) -> nn.Module | None:
        return self.backbone(model).embeddings.patch_embedding

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 0

    def token_scores(self, model: nn.Module) -> tuple[str, ...]:
        return ("mean",)

    def reducing_forward(self, block: nn.Module) -> BlockForward:
        return _reducing_layer_forward  # SiglipEncoderLayer is CLIP's layer

    def patch_pooling(self, model: nn.Module) -> list[Removable]:
        flow, backbone = model._trpts_flow, self.backbone(model)
        undo = []
        head = getattr(backbone, "head", None) if getattr(backbone, "use_head", False) else None
        if head is not None:
            undo += log_size_attention_pool(head.attention, flow)
        if isinstance(getattr(model, "classifier", None), nn.Module):
            undo += size_weighted_classifier(backbone, model.classifier, flow, 0)
        return undo

    def pool_flops(self, model: nn.Module, num_tokens: int, reduced: bool) -> int:
        """Adds the attention pool's key / value projections and products over every token, and
        the size-weighted mean of a reduced pass."""
        flops = super().pool_flops(model, num_tokens, reduced)
        backbone = self.backbone(model)
        head = getattr(backbone, "head", None) if getattr(backbone, "use_head", False) else None
        if head is not None:
            width = head.attention.embed_dim
            flops += 2 * width * width + 2 * num_tokens * 2 * width * width  # in_proj: q (1 token), k and v
            flops += 4 * num_tokens * width  # q k^T and A v for the one probe
        if reduced and isinstance(getattr(model, "classifier", None), nn.Module):
            flops += 2 * num_tokens * backbone.config.hidden_size
        return flops
