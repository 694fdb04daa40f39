"""Token selection on ViTs that do not pool the [CLS] token: timm ``global_pool='avg'`` (with and
without a class token), attention pooling (``'map'``, SigLIP without a class token) and no pooling
(``''``). Each token carries how many patches it stands for; the pooled feature must equal the
model's own pooling over the patches each token stands for, were they equal to it."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import IMG, make_batches, make_timm_eva, make_timm_vit
from family_checks import check_tokens
from hypothesis import given, settings
from hypothesis import strategies as st
from token_reference import expand_by_sizes, hand_forward, reference_scores

import trpts
from trpts._token_flow import TokenFlow, weighted_mean

POOLED = {  # id -> (timm kwargs, score)
    "avg-cls": (dict(global_pool="avg"), "cls"),
    "avg-cls-mean": (dict(global_pool="avg"), "mean"),
    "avg-no-cls": (dict(global_pool="avg", class_token=False), "mean"),
    "avg-registers": (dict(global_pool="avg", reg_tokens=2, init_values=0.1), "cls"),
    "avg-with-prefix": (dict(global_pool="avg", pool_include_prefix=True, reg_tokens=1), "cls"),
    "map-cls": (dict(global_pool="map"), "cls"),
    "map-with-prefix": (dict(global_pool="map", pool_include_prefix=True), "cls"),
    "siglip": (dict(model_name="vit_base_patch16_siglip_224"), "mean"),
}


def _make(kwargs, depth=3):
    return make_timm_vit(depth=depth, **kwargs).eval()


@pytest.mark.parametrize("kwargs, score", list(POOLED.values()), ids=list(POOLED))
def test_pooled_output_is_the_pool_over_the_patches_each_token_stands_for(kwargs, score):
    model = _make(kwargs)
    x = make_batches(1, 3)[0][0]
    layers, rho, p = [0, 2], 0.5, model.num_prefix_tokens
    with torch.no_grad():
        tokens, sizes = hand_forward(model, x, layers, rho, score, return_tokens=True)
        assert torch.equal(sizes.sum(1), torch.full((3,), float((IMG // 4) ** 2), dtype=torch.float64))
        assert bool((sizes[:, -1] > 1).all())  # the merged token of the last reduction
        expected = torch.cat([model.forward_head(expand_by_sizes(t, s, p)[None])
                              for t, s in zip(tokens, sizes, strict=True)])
        trpts.wrap_vit(model, rho=rho, layers=layers, score=score)
        assert trpts.get_token_config(model).score == score
        out = model(x)
        features = model.forward_features(x)
    torch.testing.assert_close(features, tokens.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(trpts.token_sizes(model), sizes.float())


def test_no_pooling_returns_every_token_and_their_sizes():
    model = _make(dict(global_pool=""))
    x = make_batches(1, 2)[0][0]
    with torch.no_grad():
        tokens, sizes = hand_forward(model, x, [1], 0.5, "mean", return_tokens=True)
        expected = model.forward_head(tokens)
        trpts.wrap_vit(model, rho=0.5, layers=[1])  # the head reads every token: "mean" by default
        assert trpts.get_token_config(model).score == "mean"
        out = model(x)
    assert out.shape == (2, 1 + 8 + 1, model.num_classes)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(trpts.token_sizes(model), sizes.float())
    trpts.wrap_vit(trpts.unwrap_vit(model), rho=1.0, layers=[1])
    with torch.no_grad():
        assert torch.equal(model(x), trpts.unwrap_vit(model)(x))  # rho = 1 is exact
        trpts.wrap_vit(model, rho=1.0, layers=[1])(x)
    assert trpts.token_sizes(model) is None  # nothing merged in that pass
    with pytest.raises(trpts.TrptsRuntimeError, match="not wrapped"):
        trpts.token_sizes(_make({}))


@pytest.mark.parametrize("kwargs", [dict(global_pool="avg"), dict(global_pool="avg", class_token=False),
                                    dict(global_pool="map"), dict(model_name="vit_base_patch16_siglip_224"),
                                    ], ids=["avg", "avg-no-cls", "map", "siglip"])
def test_rho_one_is_exact_and_samples_are_independent(kwargs):
    check_tokens(lambda: make_timm_vit(**kwargs))


@given(b=st.integers(1, 3), n=st.integers(2, 12), p=st.integers(0, 2), d=st.integers(1, 4),
       rhos=st.lists(st.sampled_from([0.2, 0.5, 0.7, 0.9]), min_size=1, max_size=3), seed=st.integers(0, 2**16))
@settings(deadline=None, max_examples=40)
def test_sizes_make_the_weighted_mean_the_mean_over_patches(b, n, p, d, rhos, seed):
    """With eq. 10's weights replaced by each token's size (plain averaging of patches), the
    size-weighted mean of the reduced tokens is the mean of the original patches, after any
    number of reductions; sizes stay whole patch counts and positions name the kept patches."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, p + n, d, generator=g, dtype=torch.float64)
    flow, x = TokenFlow(track_positions=True), x0
    for rho in rhos:
        reducer = trpts.TokenSelectMerge(rho, num_prefix_tokens=p)
        m = x.shape[1] - p
        sizes, positions = flow.current(b, m)
        sizes = torch.ones(b, m, dtype=torch.float64) if sizes is None else sizes.double()
        order = torch.rand(b, m, generator=g)  # which tokens are kept: arbitrary
        k = reducer.num_kept(x.shape[1])
        if k >= m:
            continue
        kept = order.argsort(1, descending=True)[:, :k].sort(1).values
        weights = sizes.scatter(1, kept, 0.0)  # merge weights proportional to size
        merged = torch.bmm((weights / weights.sum(1, keepdim=True)).unsqueeze(1), x[:, p:])
        x = torch.cat([x[:, :p], x[:, p:].gather(1, kept.unsqueeze(-1).expand(-1, -1, d)), merged], 1)
        flow.update(kept, m)
    sizes, positions = flow.current(b, x.shape[1] - p)
    if sizes is None:
        return
    torch.testing.assert_close(weighted_mean(x[:, p:], sizes.double()), x0[:, p:].mean(1))
    assert torch.equal(sizes.sum(1), torch.full((b,), float(n))) and torch.equal(sizes, sizes.round())
    assert bool((positions[:, -1] == -1).all())
    for i in range(b):
        patch = positions[i] >= 0  # kept original patches; -1: a merged token
        kept_patches = positions[i][patch].tolist()
        assert len(set(kept_patches)) == len(kept_patches) and all(0 <= j < n for j in kept_patches)
        assert torch.equal(sizes[i][patch], torch.ones(len(kept_patches)))
        torch.testing.assert_close(x[i, p:][patch], x0[i, p:][positions[i][patch]])


@given(b=st.integers(1, 2), h=st.integers(1, 3), n=st.integers(2, 20), p=st.integers(0, 2),
       chunk=st.sampled_from([1, 7, 1 << 24]), seed=st.integers(0, 2**16))
@settings(deadline=None, max_examples=30)
def test_mean_attention_matches_float64_reference_in_any_chunking(b, h, n, p, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, h, p + n, 4, generator=g), torch.randn(b, h, p + n, 4, generator=g)
    s = trpts.mean_attention(q, k, 0.5, p, chunk_elements=chunk * b * h * n)  # `chunk` query rows
    assert s.dtype == torch.float32 and s.shape == (b, n) and not s.requires_grad
    torch.testing.assert_close(s.double(), reference_scores(q, k, 0.5, p, "mean"), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(s.sum(-1), torch.ones(b))


@pytest.mark.parametrize("kwargs, score", [POOLED["avg-cls"], POOLED["siglip"]], ids=["avg", "siglip"])
def test_autocast_bf16_training_step(kwargs, score):
    model = _make(kwargs).train()
    x, y = make_batches(1, 4)[0]
    trpts.wrap_vit(model, rho=0.5, layers=[0, 2], score=score)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out.float(), y)
    loss.backward()
    assert out.dtype == torch.bfloat16 and math.isfinite(loss.item())
    assert model.blocks[0].attn.qkv.weight.grad is not None
    with torch.no_grad():
        ref = model.eval()(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    torch.testing.assert_close(low.float(), ref, rtol=0.1, atol=0.1)


def test_compiled_attention_pooled_model_matches_eager():
    model = _make(POOLED["siglip"][0])
    trpts.wrap_vit(model, rho=0.5, layers=[1, 2])
    x = make_batches(1, 2)[0][0]
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_score_travels_with_the_delta_and_unwrap_restores(tmp_path):
    model = _make(POOLED["siglip"][0])
    x, y = make_batches(1, 4)[0]
    selection = trpts.allocate_connections(trpts.compute_fisher(model, [(x, y)], progress=False), budget=0.05)
    trpts.wrap_vit(model, selection, rho=0.5, num_layers=1)
    trpts.apply_masks(model, selection)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-0.1)
    path = trpts.save_delta(model, tmp_path / "siglip.safetensors")
    with torch.no_grad():
        trained = model.eval()(x)
    target = _make(POOLED["siglip"][0])
    trpts.load_delta(target, path)
    assert trpts.get_token_config(target).score == "mean"
    with torch.no_grad():
        torch.testing.assert_close(target(x), trained)
    trpts.unwrap_vit(target)
    assert "pool" not in vars(target) and "_trpts_flow" not in vars(target)
    assert not target.blocks[0]._forward_pre_hooks


@pytest.mark.parametrize("pool", ["max", "avgmax"])
def test_unsupported_pools_are_refused_before_anything_is_patched(pool):
    model = make_timm_vit(global_pool=pool)
    with pytest.raises(trpts.TrptsValueError, match="global_pool in") as info:
        trpts.wrap_vit(model, layers=[0])
    assert f"global_pool={pool!r}" in str(info.value) and isinstance(info.value, ValueError)
    assert "pool" not in vars(model) and "_trpts_flow" not in vars(model)
    assert not hasattr(model.blocks[0], "_trpts_tokens") and not model.blocks[0]._forward_pre_hooks


def check_against_reference(model, reference, score, layers=(0, 1), rho=0.5):
    """The wrapped model against ``reference`` (a block-by-block reference): rho = 1 exact, the
    final tokens (a wrong position row moves them by ~1e-3 here, the tiny logits far less), the
    logits of the model's own head over the tokens repeated by their sizes, batch independence;
    unwrapping restores the dense model."""
    x, p = make_batches(1, 3)[0][0], model.num_prefix_tokens
    with torch.no_grad():
        dense = model(x)
        torch.testing.assert_close(reference(model, x, [], rho), dense, rtol=1e-4, atol=1e-5)
        tokens, sizes = reference(model, x, list(layers), rho, score, return_tokens=True)
        expected = torch.cat([model.forward_head(expand_by_sizes(t, s, p)[None])
                              for t, s in zip(tokens, sizes, strict=True)])
        trpts.wrap_vit(model, rho=1.0, layers=layers, score=score)
        assert torch.equal(model(x), dense)
        trpts.wrap_vit(trpts.unwrap_vit(model), rho=rho, layers=layers, score=score)
        out, features = model(x), model.forward_features(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(features, tokens.float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone, out, rtol=1e-5, atol=1e-5)
    trpts.unwrap_vit(model)
    with torch.no_grad():
        assert torch.equal(model(x), dense)


# ---- EVA-02: rotary position embedding ----------------------------------------------------------
EVA = {  # id -> (timm model, kwargs, score)
    "eva02-cls": ("eva02_tiny_patch14_224", dict(global_pool="token"), "cls"),
    "eva02-avg": ("eva02_tiny_patch14_224", dict(), "mean"),
    "eva02-separate-qkv-avg-cls": ("eva02_base_patch14_224", dict(), "cls"),
    "eva02-post-norm": ("eva02_tiny_patch14_224", dict(use_post_norm=True, global_pool="token"), "cls"),
    "eva02-map": ("eva02_tiny_patch14_224", dict(global_pool="map"), "cls"),
    "eva02-no-cls": ("eva02_tiny_patch14_224", dict(class_token=False), "mean"),
}


def make_eva(name, kwargs):
    return make_timm_eva(name, **kwargs)


@pytest.mark.parametrize("name, kwargs, score", list(EVA.values()), ids=list(EVA))
def test_eva_matches_a_block_by_block_reference_with_rope_at_original_positions(name, kwargs, score):
    from token_reference import eva_hand_forward

    model = make_eva(name, kwargs)
    check_against_reference(model, eva_hand_forward, score)
    assert all(not b.attn._forward_pre_hooks for b in model.blocks) and "pool" not in vars(model)


def test_eva_compiles_and_trains_under_autocast():
    model = make_eva(*EVA["eva02-avg"][:2]).train()
    x, y = make_batches(1, 4)[0]
    trpts.wrap_vit(model, rho=0.5, layers=[0, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    assert math.isfinite(loss.item()) and model.blocks[0].attn.qkv.weight.grad is not None
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-4, atol=1e-5)


def test_eva_refuses_what_it_cannot_reduce():
    for kwargs, match in [(dict(patch_drop_rate=0.5), "patch dropout"), (dict(global_pool="avgmax"), "global_pool")]:
        model = make_eva("eva02_tiny_patch14_224", kwargs)
        with pytest.raises(trpts.TrptsValueError, match=match):
            trpts.wrap_vit(model, layers=[0])
        assert trpts.get_token_config(model) is None and "_trpts_flow" not in vars(model)


# ---- BEiT: relative position bias ---------------------------------------------------------------
BEIT = {  # id -> (kwargs, score)
    "beit-avg": (dict(), "cls"),
    "beit-avg-mean": (dict(), "mean"),
    "beit-token-layerscale": (dict(global_pool="token", init_values=0.1), "cls"),
    "beit-shared-bias": (dict(use_abs_pos_emb=True, use_rel_pos_bias=False, use_shared_rel_pos_bias=True), "cls"),
    "beit-both-biases": (dict(use_shared_rel_pos_bias=True), "cls"),
}


def make_beit(kwargs, depth=3):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=IMG, patch_size=4, embed_dim=32,
                              depth=depth, num_heads=2, num_classes=5, **kwargs).eval()
    with torch.no_grad():  # timm initialises the bias tables to zero: make them matter
        for m in model.modules():
            if hasattr(m, "relative_position_bias_table") and m.relative_position_bias_table is not None:
                m.relative_position_bias_table.normal_()
    return model


@pytest.mark.parametrize("kwargs, score", list(BEIT.values()), ids=list(BEIT))
@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
def test_beit_matches_a_block_by_block_reference_with_gathered_bias(kwargs, score, fused):
    from token_reference import beit_hand_forward

    model = make_beit(kwargs)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = fused
    check_against_reference(model, beit_hand_forward, score)
    assert all("forward" not in vars(b.attn) and "_trpts_relpos" not in vars(b.attn) for b in model.blocks)


def test_beit_trains_under_autocast_and_compiles():
    model = make_beit({}).train()
    x, y = make_batches(1, 4)[0]
    trpts.wrap_vit(model, rho=0.5, layers=[0, 2])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
    loss.backward()
    assert math.isfinite(loss.item()) and model.blocks[0].attn.relative_position_bias_table.grad is not None
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["timm-eva", "timm-beit", "hf-siglip", "hf-beit", "hf-dinov2"])
def test_a_deep_copy_carries_positions_and_pooling_independently(family):
    """Hooks and patches hold the model's token flow: a copy gets its own, so unwrapping the
    original leaves the copy reducing, and unwrapping the copy restores it."""
    import copy

    from test_family_hf_beit import make_beit as make_hf_beit
    from test_family_hf_dinov2 import make_dinov2
    from test_family_hf_siglip import make_siglip

    make = {"timm-eva": make_timm_eva, "timm-beit": lambda: make_beit({}),
            "hf-siglip": lambda: make_siglip(True), "hf-beit": lambda: make_hf_beit(True, use_relative_position_bias=True),
            "hf-dinov2": lambda: make_dinov2("cls")}[family]
    model = make().eval()
    x = make_batches(1, 2)[0][0]

    def out(m):
        o = m(x)
        return o if torch.is_tensor(o) else o.logits

    with torch.no_grad():
        dense = out(model)
        reduced = out(trpts.wrap_vit(model, rho=0.5, layers=[0, 1]))
        clone = copy.deepcopy(model)
        trpts.unwrap_vit(model)
        torch.testing.assert_close(out(clone), reduced)
        torch.testing.assert_close(out(trpts.unwrap_vit(clone)), dense)
        assert torch.equal(out(model), dense)


@given(b=st.integers(1, 3), h=st.integers(1, 2), p=st.integers(0, 2), n=st.integers(1, 6), batched=st.booleans(),
       seed=st.integers(0, 2**16))
@settings(deadline=None, max_examples=30)
def test_gather_pair_bias_matches_a_loop(b, h, p, n, batched, seed):
    from token_reference import pair_bias_loop

    from trpts._token_flow import gather_pair_bias

    g = torch.Generator().manual_seed(seed)
    m = p + 6
    bias = torch.randn(b if batched else 1, h, m, m, generator=g)
    positions = torch.stack([torch.randperm(6, generator=g)[:n] for _ in range(b)])
    positions[:, -1] = -1  # a merged token
    out = gather_pair_bias(bias if batched or seed % 2 else bias[0], positions, p)
    for i in range(b):
        expected = pair_bias_loop(bias[i if batched else 0], [positions[i].tolist()], p)[0]
        torch.testing.assert_close(out[i], expected)
