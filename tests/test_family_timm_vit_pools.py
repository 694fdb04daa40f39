"""timm VisionTransformers that do not read the [CLS] token (``global_pool='avg'``, and SigLIP-style
``global_pool='map'`` with an attention-pool head) go through the timm-vit adapter: parameter
selection, both storages, deltas; token selection is refused with the reason."""

from __future__ import annotations

import pytest
import torch
from conftest import make_hf_vit, make_timm_vit
from family_checks import check_family
from torch import nn

import trpts
from trpts.models import get_adapter

BLOCK = ["attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"]
SCORED = ["patch_embed.proj.weight", *(f"blocks.{i}.{n}" for i in range(2) for n in BLOCK)]


def make_avg() -> nn.Module:
    return make_timm_vit(global_pool="avg")


def make_siglip() -> nn.Module:
    return make_timm_vit(model_name="vit_base_patch16_siglip_224")  # class_token=False, global_pool='map'


@pytest.mark.parametrize("make, other", [(make_avg, make_hf_vit), (make_siglip, make_hf_vit)], ids=["avg", "map"])
def test_pooled_vits_train_save_and_load(make, other, tmp_path):
    check_family(make, "timm-vit", tmp_path=tmp_path, other=other)


def test_pooled_vits_score_the_blocks_and_train_the_head():
    for model in (make_avg(), make_siglip()):
        assert trpts.default_scored_parameters(model)[:len(SCORED)] == SCORED
        assert get_adapter(model).head_parameters(model) == ["head.weight", "head.bias"]
    assert trpts.default_scored_parameters(make_avg()) == SCORED
    siglip = make_siglip()
    assert siglip.global_pool == "map" and siglip.attn_pool is not None
    pool = [n for n in trpts.default_scored_parameters(siglip) if n.startswith("attn_pool.")]
    assert pool and pool == [f"{n}.weight" for n, m in siglip.attn_pool.named_modules(prefix="attn_pool")
                             if isinstance(m, nn.Linear)]  # the pretrained attention pool is scored


@pytest.mark.parametrize("make, reason", [(make_avg, "global_pool='avg'"), (make_siglip, "no class token"),
                                          (lambda: make_timm_vit(global_pool="map"), "global_pool='map'")],
                         ids=["avg", "siglip-map", "cls-map"])
def test_token_selection_on_pooled_vits_says_why(make, reason):
    model = make()
    selection = trpts.allocate_connections(trpts.compute_fisher(
        model, [(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))], progress=False))
    with pytest.raises(trpts.TrptsValueError, match=reason):
        trpts.wrap_vit(model, selection)
    assert all(not hasattr(b, "_trpts_tokens") for b in model.blocks)
