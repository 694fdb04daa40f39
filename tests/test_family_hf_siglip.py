"""Hugging Face SigLIP image tower (SiglipVisionModel, SiglipForImageClassification): parameter
selection in both storages and deltas; token selection by mean attention (no [CLS] token), with the
attention pool and the classifier's mean reading token sizes."""

from __future__ import annotations

import pytest
import torch
from conftest import make_timm_vit
from family_checks import batches, check_family, check_tokens, feature_loss
from token_reference import expand_by_sizes

import trpts
from trpts.models import get_adapter

VISION = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=64)


def make_siglip(classifier: bool = False):
    import transformers as tf

    torch.manual_seed(0)
    if classifier:
        text = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                    bos_token_id=None, eos_token_id=None, pad_token_id=None)
        return tf.SiglipForImageClassification(tf.SiglipConfig(vision_config=VISION, text_config=text, num_labels=5))
    return tf.SiglipVisionModel(tf.SiglipVisionConfig(**VISION))


@pytest.mark.parametrize("classifier", [False, True], ids=["vision", "classifier"])
def test_siglip_trains_saves_and_loads(classifier, tmp_path):
    check_family(lambda: make_siglip(classifier), "hf-siglip-vision", tmp_path=tmp_path,
                 loss_fn=None if classifier else feature_loss, train_head=classifier, other=make_timm_vit)


def test_siglip_names_and_heads():
    layer = ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
    for classifier, prefix in [(False, ""), (True, "vision_model.")]:
        model = make_siglip(classifier)
        adapter = get_adapter(model)
        assert adapter.family == "hf-siglip-vision" and adapter.supports_tokens
        assert trpts.default_scored_parameters(model) == [
            f"{prefix}embeddings.patch_embedding.weight",
            *(f"{prefix}encoder.layers.{i}.{m}.weight" for i in range(2) for m in layer)]
        # the attention-pooling head is pretrained backbone: neither scored nor a task head
        assert adapter.head_parameters(model) == (["classifier.weight", "classifier.bias"] if classifier else [])


@pytest.mark.parametrize("classifier", [False, True], ids=["vision", "classifier"])
def test_siglip_token_selection_pools_over_the_patches_tokens_stand_for(classifier):
    """rho = 1 exact and batch independence; at rho < 1 the pooled output equals the model's own
    pooling over the tokens repeated by their sizes (attention pool: log(size) on its logits)."""
    check_tokens(lambda: make_siglip(classifier))
    model = make_siglip(classifier).eval()
    backbone = get_adapter(model).backbone(model)
    x = batches(n=1, batch_size=3)[0][0]
    trpts.wrap_vit(model, rho=0.5, layers=[0, 1])
    assert trpts.get_token_config(model).score == "mean" and trpts.get_token_config(model).num_prefix_tokens == 0
    with torch.no_grad():
        out = model(pixel_values=x)
        tokens = backbone(pixel_values=x).last_hidden_state
        sizes = trpts.token_sizes(model)
        expanded = [expand_by_sizes(t, s, 0)[None] for t, s in zip(tokens, sizes, strict=True)]
        if classifier:
            pooled = torch.cat([e.mean(1) for e in expanded])
            expected = torch.nn.functional.linear(pooled, model.classifier.weight, model.classifier.bias)
            got = out.logits
        else:
            expected = torch.cat([backbone.head(e) for e in expanded])  # no mask: sizes do not match e
            got = out.pooler_output
    assert tokens.shape[1] == 4 + 1 and bool((sizes[:, -1] > 1).all())  # 16 -> 8 + 1 -> 4 + 1
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(trpts.TrptsValueError, match="score='cls' is not available"):
        trpts.wrap_vit(make_siglip(classifier), layers=[0], score="cls")
    trpts.unwrap_vit(model)
    assert not backbone._forward_hooks and not backbone.head.attention._forward_pre_hooks
