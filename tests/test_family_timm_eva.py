"""timm Eva (EVA-02 with fused or separate q/k/v, SwiGLU MLPs, RoPE; post-norm blocks; an
attention-pool head): parameter selection, both storages, deltas, token selection."""

from __future__ import annotations

import pytest
import torch
from conftest import make_hf_vit, make_timm_vit
from family_checks import check_family, check_tokens
from torch import nn

import trpts
from trpts.models import get_adapter


def make_eva(model_name: str = "eva02_tiny_patch14_224", **kwargs) -> nn.Module:
    import timm

    torch.manual_seed(0)
    options = dict(pretrained=False, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    return timm.create_model(model_name, **{**options, **kwargs})


FACTORIES = {
    "fused-qkv-glu": lambda: make_eva(),
    "separate-qkv-swiglu": lambda: make_eva("eva02_base_patch14_224"),  # qkv_fused=False, scale_mlp=True
    "post-norm": lambda: make_eva(use_post_norm=True),
    "map-pool": lambda: make_eva(global_pool="map"),
}


@pytest.mark.parametrize("name, other", [("fused-qkv-glu", make_timm_vit), ("separate-qkv-swiglu", make_hf_vit),
                                         ("post-norm", None), ("map-pool", None)])
def test_eva_trains_saves_and_loads(name, other, tmp_path):
    check_family(FACTORIES[name], "timm-eva", tmp_path=tmp_path, other=other)


def test_eva_scores_block_linears_patch_and_attention_pool():
    block = ["attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"]
    fused = make_eva()
    adapter = get_adapter(fused)
    assert fused.rope is not None  # RoPE is on (EVA-02)
    assert trpts.default_scored_parameters(fused) == ["patch_embed.proj.weight",
                                                      *(f"blocks.{i}.{n}" for i in range(2) for n in block)]
    assert adapter.head_parameters(fused) == ["head.weight", "head.bias"]
    assert "blocks.0.attn.q_bias" in adapter.block_index(fused)  # biases belong to their block (not scored)
    separate = make_eva("eva02_base_patch14_224")
    block = ["attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "attn.proj.weight",
             "mlp.fc1_g.weight", "mlp.fc1_x.weight", "mlp.fc2.weight"]
    assert trpts.default_scored_parameters(separate) == ["patch_embed.proj.weight",
                                                         *(f"blocks.{i}.{n}" for i in range(2) for n in block)]
    pooled = make_eva(global_pool="map")
    pool = [f"attn_pool.{n}.weight" for n in ("q", "kv", "proj", "mlp.fc1", "mlp.fc2")]
    assert trpts.default_scored_parameters(pooled)[-5:] == pool
    assert not set(pool) & set(get_adapter(pooled).block_index(pooled))
    assert get_adapter(pooled).head_parameters(pooled) == ["head.weight", "head.bias"]
    bare = make_eva(num_classes=0)
    assert get_adapter(bare).heads(bare) == []


@pytest.mark.parametrize("name", list(FACTORIES))
def test_token_selection_on_eva(name):
    """rho = 1 exact, batch independence at rho < 1 (the RoPE reference is in test_tokens_pooling.py)."""
    check_tokens(FACTORIES[name])
    assert get_adapter(FACTORIES[name]()).supports_tokens
