"""Hugging Face CLIP image tower (CLIPVisionModel, CLIPVisionModelWithProjection): parameter selection
in both storages, deltas, token selection pooled by [CLS]; visual_projection is frozen backbone."""

from __future__ import annotations

import pytest
import torch
from conftest import make_hf_vit
from family_checks import batches, check_family, check_tokens, feature_loss
from test_family_hf_deit import _select_merge
from torch.utils.flop_counter import FlopCounterMode

import trpts
from trpts.models import get_adapter


def make_clip(projection: bool = False, depth: int = 2):
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=depth,
                              num_attention_heads=2, intermediate_size=64, projection_dim=16)
    return (CLIPVisionModelWithProjection if projection else CLIPVisionModel)(config)


@pytest.mark.parametrize("projection", [False, True], ids=["vision", "with-projection"])
def test_clip_trains_saves_and_loads(projection, tmp_path):
    check_family(lambda: make_clip(projection), "hf-clip-vision", tmp_path=tmp_path, loss_fn=feature_loss,
                 train_head=False, other=make_hf_vit)


@pytest.mark.parametrize("projection", [False, True], ids=["vision", "with-projection"])
def test_clip_token_selection(projection):
    check_tokens(lambda: make_clip(projection))


def test_clip_names_and_the_visual_projection_is_frozen_backbone():
    layer = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
    for projection, prefix in [(False, ""), (True, "vision_model.")]:
        model = make_clip(projection)
        adapter = get_adapter(model)
        assert adapter.family == "hf-clip-vision" and adapter.heads(model) == []
        assert adapter.num_prefix_tokens(model) == 1
        assert trpts.default_scored_parameters(model) == [
            f"{prefix}embeddings.patch_embedding.weight",
            *(f"{prefix}encoder.layers.{i}.{m}.weight" for i in range(2) for m in layer)]
    selection = trpts.allocate_connections(trpts.compute_fisher(model, batches(n=1), loss_fn=feature_loss,
                                                                progress=False), budget=0.05)
    handle = trpts.apply_masks(model, selection, train_head=False)
    assert not model.visual_projection.weight.requires_grad
    handle.merge_and_unload()
    trpts.apply_masks(model, selection, train_head=False, extra_trainable=["visual_projection.weight"])
    assert model.visual_projection.weight.requires_grad  # opting in to tune it densely


def _reference(model, x, layers, rho):
    """CLIPVisionModel written out block by block (pre-LayerNorm, explicit attention)."""
    h = model.pre_layrnorm(model.embeddings(x))
    for i, layer in enumerate(model.encoder.layers):
        a = layer.self_attn
        y = layer.layer_norm1(h)
        b, n, _ = y.shape
        q, k, v = (proj(y).view(b, n, -1, a.head_dim).transpose(1, 2) for proj in (a.q_proj, a.k_proj, a.v_proj))
        attn = (q @ k.transpose(-1, -2) * a.scale).softmax(-1)
        h = h + a.out_proj((attn @ v).transpose(1, 2).reshape(b, n, -1))
        if i in layers:
            scores = (q[:, :, :1] @ k[:, :, 1:].transpose(-1, -2) * a.scale).softmax(-1).mean(1)[:, 0]
            h = _select_merge(h, scores, rho, 1)
        h = h + layer.mlp(layer.layer_norm2(h))
    return model.post_layernorm(h[:, 0])


def test_wrapped_clip_matches_hand_written_forward():
    model = make_clip(depth=3).eval()
    x = batches(n=1, batch_size=3)[0][0]
    with torch.no_grad():
        expected = _reference(model, x, [1, 2], 0.5)
        trpts.wrap_vit(model, rho=0.5, layers=[1, 2])
        out = model(x)
    assert out.last_hidden_state.shape == (3, 1 + 4 + 1, 32)
    torch.testing.assert_close(out.pooler_output, expected, rtol=1e-4, atol=1e-5)


def test_clip_analytic_flops_match_flop_counter():
    model = make_clip(projection=True).eval()
    model.set_attn_implementation("eager")  # FlopCounterMode does not count CPU SDPA
    trpts.wrap_vit(model, rho=0.5, layers=[0])
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    assert trpts.count_flops(model, (2, 3, 16, 16)) == counter.get_total_flops()


def test_clip_reducing_block_refuses_attention_masks():
    model = make_clip().eval()
    trpts.wrap_vit(model, rho=0.5, layers=[0])
    block, h = model.encoder.layers[0], torch.randn(2, 17, 32)
    for kwargs in ({"attention_mask": torch.zeros(2, 1, 17, 17)}, {"causal_attention_mask": torch.zeros(2, 1, 17, 17)}):
        with pytest.raises(trpts.TrptsValueError, match="attention mask"):
            block(h, **kwargs)
