"""timm VisionTransformer (ViT, DeiT distilled, registers + LayerScale + qk-norm): the family checks."""

from __future__ import annotations

import pytest
from conftest import make_hf_vit, make_timm_vit
from family_checks import check_family, check_tokens

MODELS = {
    "vit": lambda: make_timm_vit(),
    "deit-distilled": lambda: make_timm_vit(model_name="deit_tiny_distilled_patch16_224"),
    "registers-layerscale-qknorm": lambda: make_timm_vit(init_values=1e-2, reg_tokens=2, qk_norm=True),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_family(name, tmp_path):
    check_family(MODELS[name], "timm-vit", tmp_path=tmp_path, other=make_hf_vit)
    check_tokens(MODELS[name])
