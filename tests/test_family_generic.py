"""The generic path: models trpts has no family adapter for (timm Swin and ConvNeXt, a plain
PyTorch module) get parameter selection, both storages and deltas; token selection says which
families it supports."""

from __future__ import annotations

import pytest
import torch
from conftest import make_timm_vit
from family_checks import check_family, feature_loss
from torch import nn

import trpts
from trpts.models import get_adapter


def make_swin() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=16, patch_size=2,
                             window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=5)


def make_convnext() -> nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("convnext_atto", pretrained=False, conv_mlp=False, dims=(8, 16, 24, 32), depths=(1, 1, 1, 1),
                             num_classes=5)


class Plain(nn.Module):
    """A hand-written encoder: no timm, no transformers; its head is a top-level ``fc``."""

    def __init__(self, with_head: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Linear(3 * 16 * 16, 24)
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(24), nn.Linear(24, 24), nn.GELU())
                                    for _ in range(3))
        self.fc = nn.Linear(24, 5) if with_head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x.flatten(1))
        for layer in self.layers:
            h = h + layer(h)
        return self.fc(h) if self.fc is not None else h


def make_vit32() -> nn.Module:
    """A timm ViT (family timm-vit) for 32x32 images: the other family for ConvNeXt's check."""
    return make_timm_vit(img_size=32)


@pytest.mark.parametrize("make, img, other", [(make_swin, 16, Plain), (make_convnext, 32, make_vit32),
                                              (Plain, 16, make_swin)],
                         ids=["timm-swin", "timm-convnext", "plain"])
def test_generic_models_train_save_and_load(make, img, other, tmp_path):
    if make is make_convnext:  # its refused delta comes from another family, not another generic model
        assert get_adapter(other()).family == "timm-vit"
    check_family(make, "generic", tmp_path=tmp_path, img=img, other=other)


def test_generic_scores_every_linear_but_the_head_and_finds_blocks():
    model = Plain()
    adapter = get_adapter(model)
    assert adapter.family == "generic"
    assert trpts.default_scored_parameters(model) == ["stem.weight", *(f"layers.{i}.1.weight" for i in range(3))]
    assert adapter.head_parameters(model) == ["fc.weight", "fc.bias"]
    assert adapter.block_index(model) == {f"layers.{i}.{k}": i for i in range(3)
                                          for k in ("0.weight", "0.bias", "1.weight", "1.bias")}
    swin = make_swin()
    assert "head.fc.weight" not in trpts.default_scored_parameters(swin)
    assert get_adapter(swin).head_parameters(swin) == ["head.fc.weight", "head.fc.bias"]


def test_a_bare_module_without_head_needs_train_head_false_and_loss_fn_sees_the_raw_output(tmp_path):
    model = Plain(with_head=False)
    seen = []

    def loss(out, y):
        seen.append(type(out))
        return feature_loss(out, y)

    data = [(torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,)))]
    selection = trpts.allocate_connections(trpts.compute_fisher(model, data, loss_fn=loss, progress=False),
                                           budget=0.1)
    assert seen == [torch.Tensor]
    with pytest.raises(trpts.TrptsValueError, match="extra_trainable") as info:
        trpts.apply_masks(model, selection)
    assert isinstance(info.value, ValueError)
    assert all(p.requires_grad for p in model.parameters())  # the failed call changed nothing
    handle = trpts.apply_masks(model, selection, train_head=False)
    assert handle.num_trainable == selection.num_selected
    check_family(lambda: Plain(with_head=False), "generic", tmp_path=tmp_path, loss_fn=feature_loss,
                 train_head=False)


def test_token_selection_names_the_families_that_support_it():
    selection = trpts.allocate_connections(trpts.compute_fisher(Plain(), [(torch.randn(2, 3, 16, 16),
                                                                           torch.tensor([0, 1]))], progress=False))
    with pytest.raises(trpts.UnsupportedModelError, match="timm-vit") as info:
        trpts.wrap_vit(Plain(), selection)
    assert "hf-vit" in str(info.value) and "generic" in str(info.value)
    assert isinstance(info.value, TypeError)
