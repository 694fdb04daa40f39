from __future__ import annotations

import pytest
import torch
from conftest import make_batches, make_hf_vit, make_timm_vit

import trpts


def test_kept_patches_follow_tokens_through_blocks():
    model = make_timm_vit(depth=3)
    trpts.wrap_vit(model, rho=0.5, layers=[0, 2])
    x = make_batches(1, 2)[0][0]
    with trpts.record_kept_tokens(model) as rec:
        model.eval()(x)
    masks = trpts.kept_patches(model, x)
    assert sorted(masks) == [0, 2] and masks[0].shape == (2, 4, 4)
    assert masks[0].sum(dim=(1, 2)).tolist() == [8, 8]  # 8 of 16 patches kept after block 0
    # block 2 keeps floor(0.5 * 9) = 4 of 8 patches + 1 merged token: at most 4 original patches
    assert bool((masks[2].sum(dim=(1, 2)) <= 4).all())
    assert bool((masks[2] <= masks[0]).all())  # a patch merged once never comes back
    first = rec[0][0][0].tolist()
    assert [i for i, keep in enumerate(masks[0][0].view(-1).tolist()) if keep] == first


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    model = make_hf_vit(depth=2)
    trpts.wrap_vit(model, rho=0.5, layers=[0, 1])
    path = tmp_path / "fig" / "kept.png"
    fig = trpts.plot_kept_tokens(model, make_batches(1, 2)[0][0], path, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 2 * 3
    assert not list(path.parent.glob("*.tmp"))


def test_requires_a_wrapped_model():
    with pytest.raises(trpts.TrptsRuntimeError, match="wrap_vit"):
        trpts.kept_patches(make_timm_vit(), torch.zeros(1, 3, 16, 16))
