"""Adapter for Hugging Face BEiT: ``BeitModel`` and ``BeitForImageClassification`` (LayerScale
``lambda_1`` / ``lambda_2``, optional relative position bias, mean pooling by default).

Parameter selection only for now: the relative position bias is built for the full token grid and
the default pooler averages the patch tokens, neither of which holds after tokens are merged.
"""

from __future__ import annotations

from torch import nn

from ._hf_common import HFVisionAdapter


class HFBeitAdapter(HFVisionAdapter):
    family = "hf-beit"
    description = ("Hugging Face BeitModel / BeitForImageClassification (parameter selection only: "
                   "relative position bias, mean pooling)")

    _CLASSES = ("BeitModel", "BeitForImageClassification")
    _BACKBONES = ("beit",)
    tokens_unsupported = ("token selection is not supported on Hugging Face BEiT yet: its relative position "
                          "bias is built for the full token grid and its pooler averages the patch tokens, "
                          "neither of which holds once tokens are merged")

    def patch_embedding(self, model: nn.Module) -> nn.Module | None:
        return self.backbone(model).embeddings.patch_embeddings.projection
