from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_timm_vit
from hypothesis import given
from hypothesis import strategies as st

import trpts
from trpts.allocation import Selection, _row_topk, _top_counts

# ---- strategies -------------------------------------------------------------------------


@st.composite
def fisher_dicts(draw, max_tensors=4):
    """Small score dicts with many ties (scores from a few levels) and some 4-D conv kernels."""
    n = draw(st.integers(1, max_tensors))
    levels = draw(st.lists(st.floats(0, 10, allow_nan=False, width=32), min_size=1, max_size=4))
    fisher = {}
    for i in range(n):
        rows, fan_in = draw(st.integers(1, 5)), draw(st.integers(1, 9))
        values = draw(st.lists(st.sampled_from(levels), min_size=rows * fan_in, max_size=rows * fan_in))
        t = torch.tensor(values, dtype=torch.float32).view(rows, fan_in)
        if i == 0 and fan_in % 2 == 0 and draw(st.booleans()):
            t = t.view(rows, fan_in // 2, 2, 1)  # a conv kernel [out, in, kh, kw]
        fisher[f"blocks.{i // 2}.w{i}.weight"] = t
    return fisher


top_percents = st.sampled_from([0.5, 1.0, 10.0, 25.0, 50.0, 100.0])

# ---- brute-force reference ----------------------------------------------------------------


def reference_shares(fisher, top_percent):
    """Eq. 3 by sorting every entry: (-score, tensor order, flat index)."""
    entries = []
    for t_i, (_, s) in enumerate(fisher.items()):
        for j, v in enumerate(s.reshape(-1).tolist()):
            entries.append((-v, t_i, j))
    entries.sort()
    k = max(1, math.ceil(top_percent / 100 * len(entries)))
    counts = [0] * len(fisher)
    for _, t_i, _ in entries[:k]:
        counts[t_i] += 1
    return {name: c / k for name, c in zip(fisher, counts, strict=True)}, k


def reference_connections(scale, shares, k, fan_ins, power=1.0):
    """Eq. 4 (tempered: the ratio to the power ``power``); a layer with no top-M entry counts
    as holding one (w = 1/k)."""
    wmin = max(min(shares.values()), 1 / k)
    return {n: min(max(1, math.floor(scale * (max(w, 1 / k) / wmin) ** power + 0.5)), fan_ins[n])
            for n, w in shares.items()}


def check_rows(fisher, selection):
    for name, s in fisher.items():
        info = selection.matrices[name]
        mask = selection[name]
        assert mask.dtype == torch.bool and mask.shape == s.shape
        s2, m2 = s.reshape(s.shape[0], -1), mask.reshape(s.shape[0], -1)
        assert 1 <= info.connections <= info.fan_in == s2.shape[1]
        assert m2.sum(1).tolist() == [info.connections] * s2.shape[0]
        for row, mrow in zip(s2.tolist(), m2.tolist(), strict=True):
            # the C_l highest scores, ties broken by lower column: a stable descending sort
            order = sorted(range(len(row)), key=lambda j: (-row[j], j))[: info.connections]
            assert sorted(order) == [j for j, keep in enumerate(mrow) if keep]


# ---- properties ---------------------------------------------------------------------------


@given(fisher=fisher_dicts(), top_percent=top_percents, c_min=st.sampled_from([0.5, 1, 2, 3.7]))
def test_rows_caps_and_eq4_proportions(fisher, top_percent, c_min):
    selection = trpts.allocate_connections(fisher, top_percent=top_percent, c_min=c_min, share_power=1)
    check_rows(fisher, selection)
    shares, k = reference_shares(fisher, top_percent)
    assert {n: m.share for n, m in selection.matrices.items()} == pytest.approx(shares)
    fan_ins = {n: m.fan_in for n, m in selection.matrices.items()}
    expected = reference_connections(c_min, shares, k, fan_ins)
    assert {n: m.connections for n, m in selection.matrices.items()} == expected
    assert selection.num_selected == sum(selection[n].sum().item() for n in selection)


@given(fisher=fisher_dicts(), top_percent=top_percents, c_min=st.sampled_from([0.5, 1, 2, 3.7]),
       power=st.sampled_from([0.0, 0.25, 0.5, 2.0]))
def test_share_power_tempers_eq4_and_zero_is_uniform(fisher, top_percent, c_min, power):
    selection = trpts.allocate_connections(fisher, top_percent=top_percent, c_min=c_min, share_power=power)
    check_rows(fisher, selection)
    shares, k = reference_shares(fisher, top_percent)
    fan_ins = {n: m.fan_in for n, m in selection.matrices.items()}
    assert {n: m.connections for n, m in selection.matrices.items()} == reference_connections(
        c_min, shares, k, fan_ins, power)
    assert selection.config["share_power"] == power
    if power == 0:  # GPS's uniform K: the same C everywhere the fan-in allows
        uniform = max(1, math.floor(c_min + 0.5))
        assert all(m.connections == min(uniform, m.fan_in) for m in selection.matrices.values())


def test_share_power_default_is_uniform_one_is_the_paper_and_the_budget_still_holds():
    g = torch.Generator().manual_seed(0)
    fisher = {f"blocks.{i}.w.weight": torch.rand(8, 16, generator=g) * (i + 1) ** 3 for i in range(4)}
    paper = trpts.allocate_connections(fisher, budget=0.25, share_power=1)
    flat = trpts.allocate_connections(fisher, budget=0.25)
    assert trpts.allocate_connections(fisher, budget=0.25, share_power=0.0).to_config() == flat.to_config()
    assert len({m.connections for m in flat.matrices.values()}) == 1  # uniform: 4 of 16 everywhere
    assert flat.num_selected == paper.num_selected == 128
    spread = [m.connections for m in paper.matrices.values()]
    assert spread == sorted(spread) and spread[0] < spread[-1]  # eq. 4 follows the shares


@given(fisher=fisher_dicts(), top_percent=top_percents, budget=st.floats(0.001, 1.0))
def test_budget_lands_closest_to_target(fisher, top_percent, budget):
    with pytest.warns(trpts.TrptsWarning) if budget * sum(s.numel() for s in fisher.values()) < sum(
            s.shape[0] for s in fisher.values()) else _nullcontext():
        selection = trpts.allocate_connections(fisher, top_percent=top_percent, budget=budget, share_power=1)
    check_rows(fisher, selection)
    shares, k = reference_shares(fisher, top_percent)
    fan_ins = {n: m.fan_in for n, m in selection.matrices.items()}
    rows = {n: m.rows for n, m in selection.matrices.items()}
    wmin = max(min(shares.values()), 1 / k)

    def total(scale):
        conns = reference_connections(scale, shares, k, fan_ins)
        return sum(rows[n] * conns[n] for n in conns)

    # every achievable total: at 0 and just past each rounding breakpoint of each layer
    achievable = {total(0.0)}
    for n, w in shares.items():
        r = max(w, 1 / k) / wmin
        achievable |= {total((j - 0.5) / r * (1 + 1e-9)) for j in range(1, fan_ins[n] + 2)}
    target = budget * selection.num_scored
    best = min(abs(a - target) for a in achievable)
    assert abs(selection.num_selected - target) <= best + 1e-9
    assert selection.num_selected in achievable


@given(fisher=fisher_dicts(), top_percent=top_percents)
def test_deterministic_and_round_trips(fisher, top_percent):
    a = trpts.allocate_connections(fisher, top_percent=top_percent, c_min=2)
    b = trpts.allocate_connections({n: s.clone() for n, s in fisher.items()}, top_percent=top_percent, c_min=2)
    assert a == b
    config = json.loads(json.dumps(a.to_config()))
    c = Selection.from_tensors(a.to_tensors(), config)
    assert c == a and c.config == a.config and c.matrices == a.matrices
    for n in a:
        assert torch.equal(a[n], c[n])
        assert torch.equal(a.flat_indices(n), a[n].reshape(-1).nonzero().squeeze(1))


@given(fisher=fisher_dicts(max_tensors=4), c_min=st.sampled_from([1, 2]))
def test_block_unit_shares_one_count_per_block(fisher, c_min):
    selection = trpts.allocate_connections(fisher, top_percent=50, c_min=c_min, unit="block", share_power=1)
    check_rows(fisher, selection)
    by_layer: dict[str, list] = {}
    for m in selection.matrices.values():
        assert m.layer == f"block.{m.block}"
        by_layer.setdefault(m.layer, []).append(m)
    uncapped = {}
    for layer, ms in by_layer.items():
        assert len({m.share for m in ms}) == 1
        for m in ms:
            if m.connections < m.fan_in:
                uncapped.setdefault(layer, set()).add(m.connections)
    assert all(len(v) == 1 for v in uncapped.values())
    assert sum(selection.block_counts.values()) == selection.num_selected


# ---- concrete cases --------------------------------------------------------------------


def test_layer_without_top_scores_counts_as_one_entry_not_division_by_zero():
    fisher = {"a.weight": torch.zeros(3, 8), "b.weight": torch.rand(3, 8) + 1}
    selection = trpts.allocate_connections(fisher, top_percent=10, c_min=1, share_power=1)  # k = 5, all in b
    assert selection.matrices["a.weight"].share == 0
    assert selection.matrices["a.weight"].connections == 1  # C_min
    assert selection.matrices["b.weight"].connections == 5  # 5 entries vs. 1: five times C_min


def test_ties_keep_lower_columns():
    selection = trpts.allocate_connections({"w": torch.ones(4, 10)}, c_min=3)
    assert selection.indices("w").tolist() == [[0, 1, 2]] * 4


@st.composite
def near_tied_scores(draw):
    """Scores a few ulps apart, exact ties and both signed zeros, in tensors of 1..40 entries."""
    up = [torch.tensor(draw(st.sampled_from([0.0, 1e-30, 1.0, 3.5e8])), dtype=torch.float32)]
    for _ in range(3):
        up.append(torch.nextafter(up[-1], torch.tensor(float("inf"))))
    pool = [float(v) for v in up] + [0.0, -0.0]
    n = draw(st.integers(1, 4))
    return {f"t{i}": torch.tensor(draw(st.lists(st.sampled_from(pool), min_size=1, max_size=40)),
                                  dtype=torch.float32).view(1, -1) for i in range(n)}


@given(scores=near_tied_scores(), data=st.data())
def test_global_top_counts_are_exact_in_any_chunking(scores, data):
    """Eq. 3's per-tensor counts equal a full sort's (ties: tensor order, then flat index),
    whatever the number of entries per histogram pass."""
    total = sum(s.numel() for s in scores.values())
    k = data.draw(st.integers(1, total))
    entries = sorted((-abs(v), t, j) for t, s in enumerate(scores.values()) for j, v in enumerate(s.view(-1).tolist()))
    expected = [0] * len(scores)
    for _, t, _ in entries[:k]:
        expected[t] += 1
    for chunk in (1, 2, 5, 1 << 18):
        assert list(_top_counts(scores, k, chunk).values()) == expected


def test_row_topk_resolves_ties_only_where_the_cth_and_next_are_equal():
    s = torch.tensor([[5.0, 1.0, 3.0, 3.0, 0.0],    # c-th (3.0) ties the next: lower column kept
                      [0.0, 2.0, 2.0, 9.0, 2.0],    # three 2.0s for one place
                      [4.0, 3.0, 2.0, 1.0, 0.0],    # no tie
                      [-0.0, 0.0, 0.0, -0.0, 1.0]])  # signed zeros tie
    assert _row_topk(s, 2).tolist() == [[0, 2], [1, 3], [0, 1], [0, 4]]
    assert _row_topk(s, 5).tolist() == [list(range(5))] * 4
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 4, (64, 33), generator=g).float()
    for c in (1, 7, 32):
        order = torch.tensor([sorted(sorted(range(33), key=lambda j, row=row: (-row[j], j))[:c])
                              for row in r.tolist()])
        assert torch.equal(_row_topk(r, c), order)


def test_cap_at_fan_in_and_proportions():
    big = torch.zeros(2, 100)
    big[0, :4] = 5.0
    fisher = {"small.weight": torch.full((2, 3), 10.0), "big.weight": big}
    # k = ceil(4.8% of 206) = 10: small holds 6, big 4 -> ratios 1.5 and 1
    selection = trpts.allocate_connections(fisher, top_percent=4.8, c_min=4, share_power=1)
    assert selection.matrices["small.weight"].share == pytest.approx(0.6)
    assert selection.matrices["big.weight"].connections == 4
    assert selection.matrices["small.weight"].connections == 3  # round(4 * 1.5) = 6, capped at fan-in
    assert bool(selection["small.weight"].all())


def test_block_counts_and_sparsest_blocks_on_a_real_model():
    model = make_timm_vit(depth=4)
    fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()
              if n in trpts.default_scored_parameters(model)}
    fisher["blocks.2.mlp.fc1.weight"] *= 100  # block 2 dense
    selection = trpts.allocate_connections(fisher, budget=0.05, model=model, share_power=1)
    counts = selection.block_counts
    assert set(counts) == {0, 1, 2, 3}
    assert max(counts, key=counts.get) == 2
    assert 2 not in selection.sparsest_blocks(2) and len(selection.sparsest_blocks(2)) == 2
    assert selection.matrices["patch_embed.proj.weight"].block is None
    text = repr(selection)
    assert "blocks.2.mlp.fc1.weight" in text and "budget=0.05" in text


def test_wrapper_prefixes_are_stripped():
    selection = trpts.allocate_connections({"module._orig_mod.blocks.0.fc.weight": torch.rand(2, 4)})
    assert list(selection) == ["blocks.0.fc.weight"]


def test_budget_below_minimum_warns_and_gives_one_per_neuron():
    with pytest.warns(trpts.TrptsWarning, match="below"):
        selection = trpts.allocate_connections({"w": torch.rand(4, 10)}, budget=0.01)
    assert selection.num_selected == 4


@pytest.mark.parametrize("bad, kwargs, exc, match", [
    ({}, {}, ValueError, "empty"),
    ({"w": torch.tensor([[1.0, float("nan")]])}, {}, ValueError, "NaN or inf"),
    ({"w": torch.tensor([[1.0, float("inf")]])}, {}, ValueError, "NaN or inf"),
    ({"w": torch.tensor([[1.0, -1.0]])}, {}, ValueError, "negative"),
    ({"b": torch.ones(3)}, {}, ValueError, "2-D"),
    ({"w": torch.ones(2, 2, dtype=torch.int64)}, {}, TypeError, "floating"),
    ({"w": [[1.0]]}, {}, TypeError, "Tensor"),
    ({"w": torch.ones(2, 2)}, {"budget": 0.0}, ValueError, "budget"),
    ({"w": torch.ones(2, 2)}, {"budget": 1.5}, ValueError, "budget"),
    ({"w": torch.ones(2, 2)}, {"top_percent": 0}, ValueError, "top_percent"),
    ({"w": torch.ones(2, 2)}, {"top_percent": 101}, ValueError, "top_percent"),
    ({"w": torch.ones(2, 2)}, {"budget": 0.5, "c_min": 1}, ValueError, "not both"),
    ({"w": torch.ones(2, 2)}, {"c_min": 0}, ValueError, "c_min"),
    ({"w": torch.ones(2, 2)}, {"unit": "layer"}, ValueError, "unit"),
    ({"w": torch.ones(2, 2)}, {"share_power": -0.5}, ValueError, "share_power"),
    ({"w": torch.ones(2, 2)}, {"share_power": float("nan")}, ValueError, "share_power"),
    ({"w": torch.ones(2, 2)}, {"share_power": True}, ValueError, "share_power"),
])
def test_bad_input(bad, kwargs, exc, match):
    with pytest.raises(exc, match=match) as info:
        trpts.allocate_connections(bad, **kwargs)
    assert isinstance(info.value, trpts.TrptsError)


def test_scores_for_another_model_are_rejected():
    model = make_timm_vit()
    with pytest.raises(KeyError, match="not parameters"):
        trpts.allocate_connections({"nope.weight": torch.rand(2, 2)}, model=model)
    with pytest.raises(ValueError, match="entries"):
        trpts.allocate_connections({"blocks.0.attn.qkv.weight": torch.rand(2, 2)}, model=model)


def test_selection_is_read_only_and_rejects_bad_files():
    selection = trpts.allocate_connections({"w": torch.rand(3, 5)}, c_min=2)
    with pytest.raises(TypeError):
        selection["w"] = torch.ones(3, 5, dtype=torch.bool)  # type: ignore[index]
    config = selection.to_config()
    with pytest.raises(ValueError, match="format"):
        Selection.from_tensors(selection.to_tensors(), {**config, "format": 99})
    with pytest.raises(ValueError, match="outside"):
        Selection.from_tensors({"w": torch.full((3, 2), 7, dtype=torch.int32)}, config)
    with pytest.raises(KeyError):
        Selection.from_tensors({}, config)


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _selection_with_block_counts(counts: list[int]) -> trpts.Selection:
    """One 4 x 8 matrix per block whose rows each keep ``counts[b] // 4`` connections."""
    indices, matrices = {}, {}
    for b, count in enumerate(counts):
        name, c = f"blocks.{b}.fc.weight", count // 4
        indices[name] = torch.arange(c).expand(4, c).contiguous()
        matrices[name] = trpts.MatrixAllocation(name=name, shape=(4, 8), rows=4, fan_in=8, layer=name, block=b,
                                                share=0.0, connections=c)
    return trpts.Selection(indices, matrices, {})


@given(levels=st.lists(st.integers(1, 3), min_size=1, max_size=12), data=st.data())
def test_sparsest_blocks_take_the_fewest_and_break_ties_towards_later_blocks(levels, data):
    counts = [4 * v for v in levels]
    n = data.draw(st.integers(1, len(counts)))
    selection = _selection_with_block_counts(counts)
    for densest in (False, True):
        chosen = selection.sparsest_blocks(n, densest=densest)
        assert chosen == sorted(chosen) and len(set(chosen)) == n
        key = (lambda b: -counts[b]) if densest else (lambda b: counts[b])
        for b in chosen:
            for other in set(range(len(counts))) - set(chosen):
                assert key(b) < key(other) or (key(b) == key(other) and b > other)


def test_sparse_placement_on_floor_ties_picks_the_latest_floor_blocks():
    """At a small budget most blocks sit at eq. 4's floor and tie: the later ones are chosen."""
    model = make_timm_vit(depth=6)
    fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()
              if n in trpts.default_scored_parameters(model)}
    for n in fisher:
        if n.startswith("blocks.5."):
            fisher[n] *= 1000  # block 5 takes the budget above the floor
    selection = trpts.allocate_connections(fisher, budget=0.05, model=model, share_power=1)
    counts = selection.block_counts
    assert len({counts[b] for b in range(5)}) == 1 and counts[5] > counts[0]  # blocks 0-4 tie at the floor
    assert selection.sparsest_blocks(3) == [2, 3, 4]
    assert selection.sparsest_blocks(2, densest=True) == [4, 5]
    assert selection.sparsest_blocks(7, depth=7) == [0, 1, 2, 3, 4, 5, 6]  # an empty block 6 counts 0
    assert selection.sparsest_blocks(1, depth=7) == [6]
