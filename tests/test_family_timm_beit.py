"""timm Beit (relative position bias per block or shared, LayerScale, mean pooling): parameter
selection, both storages, deltas, token selection."""

from __future__ import annotations

import pytest
import torch
from conftest import make_hf_vit, make_timm_vit
from family_checks import check_family, check_tokens
from torch import nn

import trpts
from trpts.models import get_adapter


def make_beit(model_name: str = "beit_base_patch16_224", **kwargs) -> nn.Module:
    import timm

    torch.manual_seed(0)
    options = dict(pretrained=False, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                   mlp_ratio=2.0, num_classes=5)
    return timm.create_model(model_name, **{**options, **kwargs})


def make_beit_shared_bias() -> nn.Module:
    return make_beit("beitv2_base_patch16_224", use_rel_pos_bias=False, use_shared_rel_pos_bias=True)


@pytest.mark.parametrize("make, other", [(make_beit, make_timm_vit), (make_beit_shared_bias, make_hf_vit)],
                         ids=["beit", "beitv2-shared-bias"])
def test_beit_trains_saves_and_loads(make, other, tmp_path):
    check_family(make, "timm-beit", tmp_path=tmp_path, other=other)


def test_beit_scores_block_linears_and_patch_projection():
    model = make_beit()
    adapter = get_adapter(model)
    block = ["attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"]
    assert trpts.default_scored_parameters(model) == ["patch_embed.proj.weight",
                                                      *(f"blocks.{i}.{n}" for i in range(2) for n in block)]
    assert adapter.head_parameters(model) == ["head.weight", "head.bias"]
    assert adapter.block_index(model)["blocks.1.attn.relative_position_bias_table"] == 1
    shared = make_beit_shared_bias()
    assert "rel_pos_bias.relative_position_bias_table" not in get_adapter(shared).block_index(shared)
    bare = make_beit(num_classes=0)
    assert get_adapter(bare).heads(bare) == []


@pytest.mark.parametrize("make", [make_beit, make_beit_shared_bias], ids=["beit", "beitv2-shared-bias"])
def test_token_selection_on_beit(make):
    """rho = 1 exact, batch independence at rho < 1 (the bias reference is in test_tokens_pooling.py)."""
    check_tokens(make)
    assert get_adapter(make()).supports_tokens
