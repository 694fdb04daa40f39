"""Hugging Face BEiT (BeitModel, BeitForImageClassification): parameter selection in both storages
and deltas (LayerScale, relative position bias); token selection with the bias gathered per token."""

from __future__ import annotations

import pytest
import torch
from conftest import make_hf_vit
from family_checks import batches, check_family, check_tokens, feature_loss

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
        assert adapter.family == "hf-beit" and adapter.supports_tokens
        assert trpts.default_scored_parameters(model) == [
            f"{prefix}embeddings.patch_embeddings.projection.weight",
            *(f"{prefix}layers.{i}.{m}.weight" for i in range(2) for m in layer)]
        assert adapter.head_parameters(model) == (["classifier.weight", "classifier.bias"] if classifier else [])
        assert adapter.block_index(model)[f"{prefix}layers.1.lambda_1"] == 1


TOKEN_CASES = {"bare-mean-pool": (False, {}), "classifier-own-bias": (True, {"use_relative_position_bias": True}),
               "shared-bias-cls-pool": (False, {"use_shared_relative_position_bias": True, "use_mean_pooling": False}),
               "both-biases-layerscale": (True, {"use_relative_position_bias": True,
                                                 "use_shared_relative_position_bias": True,
                                                 "layer_scale_init_value": 0.5})}


@pytest.mark.parametrize("classifier, kwargs", list(TOKEN_CASES.values()), ids=list(TOKEN_CASES))
def test_beit_token_selection_matches_a_reference_with_gathered_bias(classifier, kwargs):
    from token_reference import hf_beit_hand_forward

    check_tokens(lambda: make_beit(classifier, **kwargs))
    model = make_beit(classifier, num_hidden_layers=3, **kwargs).eval()
    model.set_attn_implementation("eager")
    with torch.no_grad():  # zero-initialized bias tables: make them matter
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_()
    x = batches(n=1, batch_size=3)[0][0]
    with torch.no_grad():
        dense = model(pixel_values=x)
        out_of = (lambda o: o.logits) if classifier else (lambda o: o.pooler_output)
        torch.testing.assert_close(hf_beit_hand_forward(model, x, [], 0.5), out_of(dense), rtol=1e-4, atol=1e-5)
        trpts.wrap_vit(model, rho=0.5, layers=[0, 1])  # mean pooler: "mean" scores by default
        score = trpts.get_token_config(model).score
        assert score == ("mean" if model.config.use_mean_pooling else "cls")
        expected = hf_beit_hand_forward(model, x, [0, 1], 0.5, score)
        out = out_of(model(pixel_values=x))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    trpts.unwrap_vit(model)
    with torch.no_grad():
        assert torch.equal(out_of(model(pixel_values=x)), out_of(dense))
    adapter = get_adapter(model)
    assert all(not b.attention._forward_pre_hooks for b in adapter.blocks(model))


def test_beit_refuses_interpolated_positions_with_token_selection():
    model = make_beit(True, use_relative_position_bias=True)
    trpts.wrap_vit(model, rho=0.5, layers=[0])
    with pytest.raises(trpts.TrptsValueError, match="interpolate_pos_encoding"):
        model(pixel_values=batches(n=1, batch_size=2)[0][0], interpolate_pos_encoding=True)
