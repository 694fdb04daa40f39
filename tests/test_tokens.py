from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import IMG, MODEL_FACTORIES, make_batches, make_hf_vit, make_timm_vit
from hypothesis import given
from hypothesis import strategies as st
from token_reference import hand_forward, loop_select_merge

import trpts


def _logits(out):
    return out if torch.is_tensor(out) else out.logits


# ---- TokenSelectMerge against a loop implementation of eq. 9-11 ------------------------------


@given(b=st.integers(1, 3), n=st.integers(1, 12), p=st.integers(0, 3), d=st.integers(1, 5),
       rho=st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9, 1.0]), seed=st.integers(0, 2**16), ties=st.booleans())
def test_token_select_merge_matches_loop(b, n, p, d, rho, seed, ties):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, p + n, d, generator=g)
    scores = torch.randint(0, 3, (b, n), generator=g).float() if ties else torch.rand(b, n, generator=g)
    scores = scores.softmax(-1)
    tsm = trpts.TokenSelectMerge(rho, num_prefix_tokens=p)
    out, kept = tsm(x, scores, return_indices=True)
    expected = loop_select_merge(x, scores, rho, p)
    assert out.shape == expected.shape
    assert out.shape[1] == tsm.output_tokens(p + n)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    k = max(1, math.floor(rho * n))
    assert kept.shape == (b, min(k, n)) and bool((kept[:, 1:] > kept[:, :-1]).all())
    if k >= n:
        assert out is x  # rho = 1: nothing to merge, output is the input


def test_gradients_flow_to_kept_merged_tokens_and_scores():
    x = torch.randn(2, 1 + 6, 4, requires_grad=True)
    logits = torch.randn(2, 6, requires_grad=True)
    out = trpts.TokenSelectMerge(0.5)(x, logits.softmax(-1))
    out.square().sum().backward()
    assert bool((x.grad[:, 1:].abs().sum(-1) > 0).all())  # every patch token: kept or merged
    assert bool((logits.grad.abs() > 0).any())


def test_float32_merge_under_autocast():
    x = torch.randn(2, 9, 8).to(torch.bfloat16)
    scores = torch.rand(2, 8).softmax(-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = trpts.TokenSelectMerge(0.5)(x, scores)
    ref = loop_select_merge(x.float(), scores, 0.5, 1)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=1e-2, atol=1e-2)
    q, k = torch.randn(2, 2, 4).to(torch.bfloat16), torch.randn(2, 2, 9, 4).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = trpts.cls_attention(q, k, 0.5, 1)
    assert s.dtype == torch.float32 and torch.allclose(s.sum(-1), torch.ones(2))


# ---- wrapped models ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(MODEL_FACTORIES))
def test_rho_one_equals_unwrapped_for_every_family(family):
    model = MODEL_FACTORIES[family]().eval()
    x = make_batches(1, 3)[0][0]
    ref = _logits(model(x))
    keys = list(model.state_dict())
    assert trpts.wrap_vit(model, rho=1.0, layers=[0, 1]) is model
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(_logits(model(x)), ref, rtol=0, atol=0)




@pytest.mark.parametrize("kwargs", [{}, dict(init_values=0.1, reg_tokens=2, qk_norm=True)], ids=["plain", "ls-reg-qk"])
def test_wrapped_timm_matches_hand_written_forward(kwargs):
    model = make_timm_vit(depth=3, **kwargs).eval()
    x = make_batches(1, 3)[0][0]
    layers, rho = [0, 2], 0.5
    with torch.no_grad():
        expected = hand_forward(model, x, layers, rho)
        trpts.wrap_vit(model, rho=rho, layers=layers)
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["timm", "hf"])
def test_batch_independence(family):
    model = MODEL_FACTORIES[family]().eval()
    trpts.wrap_vit(model, rho=0.5, layers=[0, 1])
    x = make_batches(1, 4)[0][0]
    with torch.no_grad():
        together = _logits(model(x))
        alone = torch.cat([_logits(model(x[i : i + 1])) for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_training_with_masks_and_tokens_under_autocast():
    model = make_timm_vit(depth=3)
    selection = trpts.allocate_connections(trpts.compute_fisher(model, make_batches(), progress=False),
                                           budget=0.05, model=model)
    trpts.wrap_vit(model, selection, rho=0.5, num_layers=2)
    assert trpts.get_token_config(model).layers == tuple(selection.sparsest_blocks(2))
    handle = trpts.apply_masks(model, selection)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(handle.param_groups(weight_decay=0.05), lr=1e-2)
    model.train()
    for x, y in make_batches(3, 4):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for n, p in model.named_parameters():
        if n in selection:
            keep = selection[n]
            assert torch.equal(p.detach()[~keep], before[n][~keep])
            assert bool((p.detach()[keep] != before[n][keep]).any())


def test_torch_compile_matches_eager():
    model = make_timm_vit(depth=3).eval()
    trpts.wrap_vit(model, rho=0.5, layers=[1, 2])
    x = make_batches(1, 4)[0][0]
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)


def test_merged_tokens_are_ordinary_tokens_later_and_kept_tokens_are_recorded():
    model = make_hf_vit(depth=2).eval()
    trpts.wrap_vit(model, rho=0.5, layers=[0, 1])
    with trpts.record_kept_tokens(model) as kept:
        model(make_batches(1, 2)[0][0])
    n = (IMG // 4) ** 2  # 16 patches
    assert kept[0][0].shape == (2, n // 2)  # 8 kept + 1 merged = 9 non-prefix tokens
    assert kept[1][0].shape == (2, (n // 2 + 1) // 2)  # floor(0.5 * 9) = 4; the merged token competes
    assert int(kept[1][0].max()) <= n // 2


def test_unwrap_restores_and_deepcopy_carries_the_wrapping():
    import copy

    model = make_timm_vit().eval()
    x = make_batches(1, 2)[0][0]
    ref = model(x)
    trpts.wrap_vit(model, rho=0.5, layers=[1])
    reduced = model(x)
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(x), reduced)
    trpts.unwrap_vit(model)
    assert trpts.get_token_config(model) is None
    assert "forward" not in vars(model.blocks[1]) and not model.blocks[1].attn.q_norm._forward_hooks
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    torch.testing.assert_close(clone(x), reduced)  # the copy is independent


def test_placements():
    model = make_timm_vit(depth=4)
    fisher = {n: torch.rand(p.shape) for n, p in model.named_parameters()
              if n in trpts.default_scored_parameters(model)}
    for i in (1, 3):
        for n in fisher:
            if n.startswith(f"blocks.{i}."):
                fisher[n] *= 50
    selection = trpts.allocate_connections(fisher, budget=0.1, model=model, share_power=1)  # eq. 4
    assert trpts.get_token_config(trpts.wrap_vit(model, selection, num_layers=2)).layers == (0, 2)
    assert trpts.get_token_config(model).layers == tuple(selection.sparsest_blocks(2))
    trpts.unwrap_vit(model)
    assert trpts.get_token_config(trpts.wrap_vit(model, selection, num_layers=2, placement="dense")).layers == (1, 3)
    trpts.unwrap_vit(model)
    a = trpts.get_token_config(trpts.wrap_vit(model, num_layers=2, placement="random", seed=3))
    trpts.unwrap_vit(model)
    b = trpts.get_token_config(trpts.wrap_vit(model, num_layers=2, placement="random", seed=3))
    assert a == b and len(a.layers) == 2 and a.placement == "random"


def test_bad_input_leaves_model_untouched():
    model = make_timm_vit(depth=2)
    x = make_batches(1, 2)[0][0]
    ref = model.eval()(x)
    for kwargs, exc, match in [
        (dict(rho=0.0, layers=[0]), ValueError, "rho"),
        (dict(rho=1.5, layers=[0]), ValueError, "rho"),
        (dict(rho=0.5, layers=[2]), ValueError, "layers"),
        (dict(rho=0.5, layers=[]), ValueError, "layers"),
        (dict(rho=0.5, num_layers=5, placement="random"), ValueError, "num_layers"),
        (dict(rho=0.5, num_layers=1), ValueError, "needs a selection"),
        (dict(rho=0.5, num_layers=1, placement="middle"), ValueError, "placement"),
    ]:
        with pytest.raises(exc, match=match) as info:
            trpts.wrap_vit(model, **kwargs)
        assert isinstance(info.value, trpts.TrptsError)
        assert trpts.get_token_config(model) is None
    with pytest.raises(trpts.UnsupportedModelError, match="timm-vit"):
        trpts.wrap_vit(torch.nn.Sequential(torch.nn.Linear(2, 2)), layers=[0])
    for pool in ("avgmax", "max"):
        with pytest.raises(ValueError, match=r"global_pool in \['', 'avg', 'map', 'token'\]"):
            trpts.wrap_vit(make_timm_vit(global_pool=pool), layers=[0])
    with pytest.raises(ValueError, match="score must be 'auto' or one of"):
        trpts.wrap_vit(model, layers=[0], score="max")
    with pytest.raises(ValueError, match=r"score='cls' is not available.*needs a \[CLS\] token"):
        trpts.wrap_vit(make_timm_vit(class_token=False, global_pool="avg"), layers=[0], score="cls")
    trpts.wrap_vit(model, rho=0.5, layers=[0])
    with pytest.raises(trpts.TrptsRuntimeError, match="already wrapped"):
        trpts.wrap_vit(model, rho=0.5, layers=[1])
    trpts.unwrap_vit(model)
    with pytest.raises(trpts.TrptsRuntimeError, match="not wrapped"):
        trpts.unwrap_vit(model)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        trpts.TokenSelectMerge(0.5, num_prefix_tokens=-1)
    with pytest.raises(ValueError, match="scores"):
        trpts.TokenSelectMerge(0.5)(torch.randn(1, 5, 2), torch.rand(1, 5))


def test_unrecognized_block_type_is_refused_before_patching():
    from timm.models.vision_transformer import ResPostBlock

    model = make_timm_vit(depth=2, block_fn=ResPostBlock).eval()
    x = make_batches(1, 2)[0][0]
    ref = model(x)
    with pytest.raises(ValueError, match="ResPostBlock") as info:
        trpts.wrap_vit(model, rho=0.5, layers=[0, 1])
    assert isinstance(info.value, trpts.TrptsError)
    assert trpts.get_token_config(model) is None
    assert all("forward" not in vars(b) and not b.attn.q_norm._forward_hooks for b in model.blocks)
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)
