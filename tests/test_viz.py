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


def _selection(seed, budget=0.1):
    model = make_timm_vit(depth=3)
    g = torch.Generator().manual_seed(seed)
    fisher = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()
              if n in trpts.default_scored_parameters(model)}
    return trpts.allocate_connections(fisher, budget=budget, model=model)


def test_block_distribution_and_overlap():
    a, b = _selection(0), _selection(1)
    dist = trpts.block_distribution(a)
    assert sorted(dist) == [0, 1, 2]
    outside = a.matrices["patch_embed.proj.weight"].count / a.num_selected
    assert abs(sum(dist.values()) + outside - 1) < 1e-9
    assert trpts.selection_overlap(a, a) == 1.0
    ab = trpts.selection_overlap(a, b)
    assert ab == trpts.selection_overlap(b, a) and 0 < ab < 1
    masks = [(a[n] & b[n]).sum().item() for n in a]
    union = a.num_selected + b.num_selected - sum(masks)
    assert abs(ab - sum(masks) / union) < 1e-12  # Jaccard over the masks


def test_figure_5_and_7_plots(tmp_path):
    pytest.importorskip("matplotlib")
    sels = {"task a": _selection(0), "task b": _selection(1), "task c": _selection(2, budget=0.2)}
    fig5 = trpts.plot_block_distribution(sels, tmp_path / "fig5.png")
    fig7 = trpts.plot_selection_overlap(sels, tmp_path / "fig7.png")
    assert (tmp_path / "fig5.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "fig7.png").exists()
    assert len(fig5.axes[0].patches) == 3 * 3
    assert len(fig7.axes[0].texts) == 9
    with pytest.raises(ValueError, match="empty"):
        trpts.plot_selection_overlap({})
