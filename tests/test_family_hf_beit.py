"""Hugging Face BEiT (BeitModel, BeitForImageClassification): parameter selection in both storages
and deltas (LayerScale, relative position bias); token selection is refused with its reason."""

from __future__ import annotations

import pytest
import torch
from conftest import make_hf_vit
from family_checks import check_family, feature_loss

import trpts
from trpts.models import get_adapter


def make_beit(classifier: bool = True, **kwargs):
    from transformers import BeitConfig, BeitForImageClassification, BeitModel

    torch.manual_seed(0)
    options = dict(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, num_labels=5)
    options.update(kwargs)
    return (BeitForImageClassification if classifier else BeitModel)(BeitConfig(**options))


@pytest.mark.parametrize("classifier, kwargs", [(False, {}), (True, {}), (True, {"use_relative_position_bias": True})],
                         ids=["bare", "classifier", "relative-position-bias"])
def test_beit_trains_saves_and_loads(classifier, kwargs, tmp_path):
    check_family(lambda: make_beit(classifier, **kwargs), "hf-beit", tmp_path=tmp_path,
                 loss_fn=None if classifier else feature_loss, train_head=classifier, other=make_hf_vit)


def test_beit_names_and_heads():
    layer = ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj", "mlp.fc1", "mlp.fc2")
    for classifier, prefix in [(False, ""), (True, "beit.")]:
        model = make_beit(classifier, use_relative_position_bias=True)
        adapter = get_adapter(model)
        assert adapter.family == "hf-beit" and not adapter.supports_tokens
        assert trpts.default_scored_parameters(model) == [
            f"{prefix}embeddings.patch_embeddings.projection.weight",
            *(f"{prefix}layers.{i}.{m}.weight" for i in range(2) for m in layer)]
        assert adapter.head_parameters(model) == (["classifier.weight", "classifier.bias"] if classifier else [])
        assert adapter.block_index(model)[f"{prefix}layers.1.lambda_1"] == 1


@pytest.mark.parametrize("classifier", [False, True], ids=["bare", "classifier"])
def test_beit_token_selection_is_refused_clearly(classifier):
    model = make_beit(classifier)
    with pytest.raises(trpts.UnsupportedModelError, match="relative position bias") as info:
        trpts.wrap_vit(model, rho=0.5, layers=[0])
    assert "hf-beit" in str(info.value) and "hf-dinov2" in str(info.value)
    assert trpts.get_token_config(model) is None
