"""Adapter for timm ``Beit`` (BEiT, BEiT v2): parameter selection only.

Every ``nn.Linear`` weight in the blocks (fused ``qkv`` with separate q/v biases, ``proj``, MLP)
and the patch projection are scored; relative position bias tables, LayerScale gammas and
biases stay frozen. The head (``get_classifier()``) is trained in full. Token selection is not
supported: the relative position bias is indexed by token position (merged tokens have none) and
the default head mean-pools the patch tokens.
"""

from __future__ import annotations

from ._timm_common import TimmBlocksAdapter

TOKENS_UNSUPPORTED = ("token selection is not supported for timm Beit models: the relative position bias "
                      "is indexed by token position, so merged tokens have no bias entry, and the default "
                      "head mean-pools the patch tokens. Parameter selection (compute_fisher, "
                      "allocate_connections, apply_masks, deltas) works")


class TimmBeitAdapter(TimmBlocksAdapter):
    family = "timm-beit"
    description = ("timm Beit (BEiT, BEiT v2; relative position bias, mean pooling): parameter "
                   "selection, both storages, deltas; no token selection (relative position bias)")
    _timm_class = "timm.models.beit:Beit"
    tokens_unsupported = TOKENS_UNSUPPORTED
