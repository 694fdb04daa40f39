"""timm VisionTransformers that do not read the [CLS] token (``global_pool='avg'``, ``'max'``,
``'avgmax'``, ``''`` (the head on every token), and SigLIP-style ``global_pool='map'`` with an
attention-pool head) go through the timm-vit adapter: parameter selection, both storages, deltas.
Token selection on them is tested in test_tokens_pooling.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_CLASSES, make_hf_vit, make_timm_vit
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


def _per_token_loss(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """global_pool='': the head scores every token (``[B, N, classes]``); average the logits."""
    return F.cross_entropy(out.mean(1), targets)


OTHER_POOLS = {"": _per_token_loss, "max": None, "avgmax": None}  # global_pool -> loss_fn for compute_fisher
POOL_IDS = ["none", "max", "avgmax"]


@pytest.mark.parametrize("pool", list(OTHER_POOLS), ids=POOL_IDS)
def test_other_pools_train_save_and_load(pool, tmp_path):
    model = make_timm_vit(global_pool=pool)
    assert model.global_pool == pool
    tokens = 1 + (16 // 4) ** 2
    assert tuple(model(torch.randn(2, 3, 16, 16)).shape) == ((2, tokens, NUM_CLASSES) if pool == "" else
                                                              (2, NUM_CLASSES))
    assert trpts.default_scored_parameters(model) == SCORED
    assert get_adapter(model).head_parameters(model) == ["head.weight", "head.bias"]
    check_family(lambda: make_timm_vit(global_pool=pool), "timm-vit", tmp_path=tmp_path, loss_fn=OTHER_POOLS[pool])


def test_default_loss_on_per_token_logits_is_a_clear_error():
    model = make_timm_vit(global_pool="")  # logits for every token: (B, N, classes)
    with pytest.raises(trpts.TrptsValueError, match=r"\(batch, classes\).*loss_fn="):
        trpts.compute_fisher(model, [(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))], progress=False)
