"""Adapter for Hugging Face BEiT: ``BeitModel`` and ``BeitForImageClassification`` (LayerScale
``lambda_1`` / ``lambda_2``, optional relative position bias, mean pooling by default).

Parameter selection only for now: the relative position bias is built for the full token grid and
the default pooler averages the patch tokens, neither of which holds after tokens are merged.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from ._hf_common import HFVisionAdapter


class HFBeitAdapter(HFVisionAdapter):
    family = "hf-beit"
    description = ("Hugging Face BeitModel / BeitForImageClassification (parameter selection only: "
                   "relative position bias, mean pooling)")
    supports_tokens = False

    _CLASSES = ("BeitModel", "BeitForImageClassification")
    _BACKBONES = ("beit",)

    def patch_embedding(self, model: nn.Module) -> nn.Module | None:
        return self.backbone(model).embeddings.patch_embeddings.projection

    def check_token_support(self, model: nn.Module) -> None:
        raise UnsupportedModelError(
            f"token selection is not supported on {type(model).__name__} yet: BEiT's relative position "
            "bias is built for the full token grid and its pooler averages the patch tokens, neither "
            "of which holds once tokens are merged"
        )
