from __future__ import annotations

import pytest
import torch
from conftest import IMG, MODEL_FACTORIES
from torch.utils.flop_counter import FlopCounterMode

import trpts


def _explicit_attention(model):
    """Switch to the attention's explicit-matmul path: FlopCounterMode does not count CPU SDPA."""
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")


def _measured(model, size):
    """FlopCounterMode's count of one forward (gradients on: the counter's module tracker cannot
    follow timm's AttentionPoolLatent expanding its latent under no_grad)."""
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(*size))
    return counter.get_total_flops()


@pytest.mark.parametrize("family", sorted(MODEL_FACTORIES))
@pytest.mark.parametrize("wrap", [None, dict(rho=0.5, layers=[0]), dict(rho=0.3, layers=[0, 1])],
                         ids=["dense", "one-block", "two-blocks"])
def test_analytic_flops_match_flop_counter(family, wrap):
    model = MODEL_FACTORIES[family]().eval()
    _explicit_attention(model)
    if wrap:
        trpts.wrap_vit(model, **wrap)
    size = (2, 3, IMG, IMG)
    assert trpts.count_flops(model, size) == _measured(model, size)


def _check_scores(model, scores):
    """count_flops equals FlopCounterMode dense and wrapped with every score in ``scores``."""
    size = (2, 3, IMG, IMG)
    assert trpts.count_flops(model, size) == _measured(model, size)
    for score in scores:
        trpts.wrap_vit(model, rho=0.5, layers=[0, 2], score=score)
        assert trpts.count_flops(model, size) == _measured(model, size)
        trpts.unwrap_vit(model)


def test_token_counts_and_savings():
    model = MODEL_FACTORIES["timm"]()
    dense = trpts.count_flops(model, (1, 3, IMG, IMG))
    trpts.wrap_vit(model, rho=0.5, layers=[0])
    assert trpts.token_counts(model, (3, IMG, IMG)) == [(17, 10), (10, 10)]  # 1 + 8 kept + 1 merged
    assert trpts.count_flops(model, (3, IMG, IMG)) < dense
    with pytest.raises(ValueError, match="input_size"):
        trpts.count_flops(model, (IMG, IMG))


@pytest.mark.parametrize("kwargs", [dict(global_pool="avg"), dict(global_pool="avg", class_token=False),
                                    dict(global_pool="map"), dict(model_name="vit_base_patch16_siglip_224"),
                                    dict(global_pool=""), dict(global_pool="avg", pool_include_prefix=True),
                                    dict(global_pool="map", pool_include_prefix=True)],
                         ids=["avg", "avg-no-cls", "map", "siglip", "none", "avg-with-prefix", "map-with-prefix"])
def test_analytic_flops_match_on_pooled_vits_for_every_score(kwargs):
    """Attention pooling, the size-weighted mean, a head on every token and both token scores
    are counted as FlopCounterMode counts them."""
    from conftest import make_timm_vit

    model = make_timm_vit(depth=3, **kwargs).eval()
    _explicit_attention(model)
    _check_scores(model, ("cls", "mean") if model.cls_token is not None else ("mean",))


@pytest.mark.parametrize("name, kwargs", [("eva02_tiny_patch14_224", dict(global_pool="token")),
                                          ("eva02_tiny_patch14_224", dict()),
                                          ("eva02_base_patch14_224", dict(global_pool="map")),
                                          ("eva02_tiny_patch14_224", dict(global_pool=""))],
                         ids=["token", "avg", "separate-qkv-map", "none"])
def test_analytic_flops_match_on_eva(name, kwargs):
    from conftest import make_timm_eva

    model = make_timm_eva(name, **kwargs)
    _explicit_attention(model)
    _check_scores(model, ("cls", "mean"))


@pytest.mark.parametrize("kwargs", [dict(), dict(global_pool="token", use_shared_rel_pos_bias=True),
                                    dict(global_pool="")], ids=["avg", "token-shared-bias", "none"])
def test_analytic_flops_match_on_beit(kwargs):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=IMG, patch_size=4, embed_dim=32,
                              depth=3, num_heads=2, num_classes=5, **kwargs).eval()
    _explicit_attention(model)
    _check_scores(model, ("cls", "mean"))


@pytest.mark.parametrize("which", ["siglip-vision", "siglip-classifier", "dinov2-classifier", "dinov2-reg-classifier",
                                   "beit-mean-pool", "beit-classifier-bias"])
def test_analytic_flops_match_on_hugging_face_pooled_models(which):
    from test_family_hf_beit import make_beit
    from test_family_hf_dinov2 import make_dinov2
    from test_family_hf_siglip import make_siglip

    model = {"siglip-vision": lambda: make_siglip(False), "siglip-classifier": lambda: make_siglip(True),
             "dinov2-classifier": lambda: make_dinov2("cls", depth=3),
             "dinov2-reg-classifier": lambda: make_dinov2("reg-cls", depth=3),
             "beit-mean-pool": lambda: make_beit(False),
             "beit-classifier-bias": lambda: make_beit(True, use_relative_position_bias=True,
                                                       use_shared_relative_position_bias=True)}[which]().eval()
    _explicit_attention(model)
    size = (2, 3, IMG, IMG)
    assert trpts.count_flops(model, size) == _measured(model, size)
    trpts.wrap_vit(model, rho=0.5, layers=[0, 1])
    assert trpts.count_flops(model, size) == _measured(model, size)


def test_patch_count_of_string_paddings():
    from trpts.flops import _patches

    assert _patches(torch.nn.Conv2d(3, 4, 4, stride=4, padding="valid"), 16, 12) == 4 * 3
    assert _patches(torch.nn.Conv2d(3, 4, 3, padding="same"), 10, 12) == 120
