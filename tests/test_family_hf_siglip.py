"""Hugging Face SigLIP image tower (SiglipVisionModel, SiglipForImageClassification): parameter
selection in both storages and deltas; token selection is refused (no [CLS] token)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_timm_vit
from family_checks import check_family, feature_loss

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
        assert adapter.family == "hf-siglip-vision" and not adapter.supports_tokens
        assert trpts.default_scored_parameters(model) == [
            f"{prefix}embeddings.patch_embedding.weight",
            *(f"{prefix}encoder.layers.{i}.{m}.weight" for i in range(2) for m in layer)]
        # the attention-pooling head is pretrained backbone: neither scored nor a task head
        assert adapter.head_parameters(model) == (["classifier.weight", "classifier.bias"] if classifier else [])


@pytest.mark.parametrize("classifier", [False, True], ids=["vision", "classifier"])
def test_siglip_token_selection_is_refused_clearly(classifier):
    model = make_siglip(classifier)
    with pytest.raises(trpts.UnsupportedModelError, match=r"no \[CLS\] token") as info:
        trpts.wrap_vit(model, rho=0.5, layers=[0])
    message = str(info.value)
    assert "hf-siglip-vision" in message and "hf-deit" in message and "hf-clip-vision" in message
    assert "  - hf-siglip-vision" not in message  # not listed among the token families
    assert trpts.get_token_config(model) is None
