"""Hugging Face ViTModel / ViTForImageClassification: the family checks."""

from __future__ import annotations

from conftest import make_hf_vit, make_timm_vit
from family_checks import check_family, check_tokens, feature_loss


def test_classification_model(tmp_path):
    check_family(make_hf_vit, "hf-vit", tmp_path=tmp_path, other=make_timm_vit)
    check_tokens(make_hf_vit)


def test_bare_backbone_with_the_users_loss(tmp_path):
    def bare():
        return make_hf_vit(classifier=False)

    check_family(bare, "hf-vit", tmp_path=tmp_path, loss_fn=feature_loss, train_head=False, other=make_timm_vit)
    check_tokens(bare)
