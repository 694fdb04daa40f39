"""Tiny real models (pretrained=False, small dims) and data for the test suite."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("trpts", deadline=None, max_examples=40, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "trpts"))
torch.set_num_threads(min(2, torch.get_num_threads()))

IMG = 16
NUM_CLASSES = 5


def make_timm_vit(depth: int = 2, **kwargs):
    import timm

    torch.manual_seed(0)
    options = dict(pretrained=False, img_size=IMG, patch_size=4, embed_dim=32, depth=depth,
                   num_heads=2, mlp_ratio=2.0, num_classes=NUM_CLASSES)
    options.update(kwargs)
    name = options.pop("model_name", "vit_tiny_patch16_224")
    return timm.create_model(name, **options)


def make_hf_vit(depth: int = 2, classifier: bool = True):
    from transformers import ViTConfig, ViTForImageClassification, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(image_size=IMG, patch_size=4, hidden_size=32, num_hidden_layers=depth,
                       num_attention_heads=2, intermediate_size=64, num_labels=NUM_CLASSES)
    return ViTForImageClassification(config) if classifier else ViTModel(config)


def make_batches(n_batches: int = 3, batch_size: int = 4, seed: int = 1, as_dict: bool = False):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        x = torch.randn(batch_size, 3, IMG, IMG, generator=g)
        y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
        batches.append({"pixel_values": x, "labels": y} if as_dict else (x, y))
    return batches


MODEL_FACTORIES = {
    "timm": lambda: make_timm_vit(),
    "timm-layerscale-reg-qknorm": lambda: make_timm_vit(init_values=1e-2, reg_tokens=2, qk_norm=True),
    "timm-deit-distilled": lambda: make_timm_vit(model_name="deit_tiny_distilled_patch16_224"),
    "hf": lambda: make_hf_vit(),
}


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def any_model(request):
    return MODEL_FACTORIES[request.param]()


@pytest.fixture
def timm_vit():
    return make_timm_vit()


@pytest.fixture
def hf_vit():
    return make_hf_vit()


@pytest.fixture
def batches():
    return make_batches()
