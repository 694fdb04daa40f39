"""Adapter for the Hugging Face SigLIP image tower: ``SiglipVisionModel`` and
``SiglipForImageClassification`` (head: ``classifier``, on the mean of all tokens).

Parameter selection only: SigLIP has no [CLS] token (it pools by attention, ``head``, or by the
mean), so the [CLS]-attention token scores of the paper do not exist. The attention-pooling
``head`` of ``SiglipVisionModel`` is pretrained backbone, not a task head (like CLIP's
``visual_projection``): it is neither scored nor trained by ``train_head``.
"""

from __future__ import annotations

from torch import nn

from ._hf_common import HFVisionAdapter


class HFSiglipVisionAdapter(HFVisionAdapter):
    family = "hf-siglip-vision"
    description = ("Hugging Face SiglipVisionModel / SiglipForImageClassification (parameter selection "
                   "only: no [CLS] token)")

    _CLASSES = ("SiglipVisionModel", "SiglipForImageClassification")
    _BACKBONES = ("vision_model",)
    _PREFIX_TOKENS = 0  # no [CLS]
    tokens_unsupported = ("token selection scores tokens by [CLS] attention (eq. 8), and SigLIP has no "
                          "[CLS] token: it pools by attention or by the mean of all tokens")

    def patch_embedding(self, model: nn.Module) -> nn.Module | None:
        return self.backbone(model).embeddings.patch_embedding
