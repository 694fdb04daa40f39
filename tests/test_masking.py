from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import MODEL_FACTORIES, make_batches, make_hf_vit, make_timm_vit
from family_checks import record
from hypothesis import given, settings
from hypothesis import strategies as st

import trpts


def _logits(out):
    return out if torch.is_tensor(out) else out.logits


def _select(model, budget=0.05):
    fisher = trpts.compute_fisher(model, make_batches(2, 4), progress=False)
    return trpts.allocate_connections(fisher, budget=budget, model=model)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _train(model, optimizer, *, steps=3, accumulate=1, clip=None, autocast=False, seed=5):
    batches = make_batches(steps * accumulate, 4, seed=seed)
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        for micro in range(accumulate):
            x, y = batches[step * accumulate + micro]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = F.cross_entropy(_logits(model(x)), y) / accumulate
            loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()


def _assert_only_selected_moved(model, selection, handle, before):
    for name, p in model.named_parameters():
        if name in handle.masked:
            keep = selection[name]
            assert torch.equal(p.detach()[~keep], before[name][~keep]), f"frozen entries of {name} moved"
            moved = (p.detach()[keep] != before[name][keep]).float().mean().item()
            assert moved > 0.5, f"only {moved:.0%} of the selected entries of {name} moved"
        elif name in handle.full:
            assert not torch.equal(p.detach(), before[name]), f"{name} should train"
        else:
            assert torch.equal(p.detach(), before[name]), f"{name} should be frozen"


OPTIMIZERS = {
    "sgd-momentum-nesterov-wd": lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda groups: torch.optim.Adam(groups, lr=1e-2),
    "adamw-wd": lambda groups: torch.optim.AdamW(groups, lr=1e-2),
    "rmsprop-momentum": lambda groups: torch.optim.RMSprop(groups, lr=1e-3, momentum=0.5),
    "adamw-foreach-amsgrad": lambda groups: torch.optim.AdamW(groups, lr=1e-2, amsgrad=True, foreach=True),
}


@pytest.mark.parametrize("features", [
    dict(),
    dict(accumulate=2, clip=0.1, autocast=True),
], ids=["plain", "accum-clip-bf16"])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_frozen_entries_bit_identical_for_each_optimizer(opt, features):
    model = make_timm_vit()
    selection = _select(model)
    handle = trpts.apply_masks(model, selection, train_biases=True)
    optimizer = OPTIMIZERS[opt](handle.param_groups(weight_decay=0.1))
    before = _snapshot(model)
    _train(model, optimizer, **features)
    _assert_only_selected_moved(model, selection, handle, before)


@pytest.mark.parametrize("family", sorted(MODEL_FACTORIES))
def test_every_family_trains_only_selection_and_head(family):
    model = MODEL_FACTORIES[family]()
    selection = _select(model)
    handle = trpts.apply_masks(model, selection)
    before = _snapshot(model)
    _train(model, torch.optim.AdamW(handle.param_groups(weight_decay=0.05), lr=1e-2))
    _assert_only_selected_moved(model, selection, handle, before)
    head = trpts.models.get_adapter(model).head_parameters(model)
    assert set(handle.full) == set(head)


def test_weight_decay_on_masked_weights_raises_before_the_step():
    model = make_timm_vit()
    handle = trpts.apply_masks(model, _select(model))
    before = _snapshot(model)
    for optimizer in (torch.optim.AdamW(model.parameters(), lr=1e-2),  # default weight_decay=0.01
                      torch.optim.SGD(handle.parameters(), lr=0.1, weight_decay=1e-4)):
        x, y = make_batches(1, 4)[0]
        F.cross_entropy(model(x), y).backward()
        with pytest.raises(trpts.WeightDecayError, match="param_groups") as info:
            optimizer.step()
        assert isinstance(info.value, RuntimeError)
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        optimizer.zero_grad()
    handle.merge_and_unload()
    torch.optim.AdamW(model.parameters(), lr=1e-2)  # no check once removed
    x, y = make_batches(1, 4)[0]
    F.cross_entropy(model(x), y).backward()
    torch.optim.AdamW(model.parameters(), lr=1e-2).step()


def test_flags_defaults_and_param_groups():
    model = make_timm_vit(depth=2, reg_tokens=1, init_values=0.1)
    selection = _select(model)
    handle = trpts.apply_masks(model, selection)
    params = dict(model.named_parameters())
    for name, p in params.items():
        assert p.requires_grad == (name in handle.masked or name in handle.full), name
    for frozen in ("cls_token", "reg_token", "pos_embed", "blocks.0.norm1.weight", "blocks.0.ls1.gamma",
                   "blocks.0.attn.qkv.bias", "norm.weight"):
        assert not params[frozen].requires_grad
    assert all(m.dtype == torch.bool for m in handle._frozen.values())
    groups = handle.param_groups(weight_decay=0.05, lr=0.1)
    assert [g["trpts_group"] for g in groups] == ["masked", "decay", "no_decay"]
    assert [g["weight_decay"] for g in groups] == [0.0, 0.05, 0.0]
    assert all(g["lr"] == 0.1 for g in groups)
    assert groups[1]["params"] == [params["head.weight"]]
    assert handle.num_selected == selection.num_selected
    assert handle.num_trainable == selection.num_selected + params["head.weight"].numel() + params["head.bias"].numel()
    assert 0 < handle.trainable_fraction < 0.5
    assert "active" in repr(handle)
    assert trpts.get_mask_handle(model) is handle


def test_remove_restores_flags_and_dense_gradients():
    model = make_hf_vit()
    model.vit.embeddings.cls_token.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with trpts.apply_masks(model, _select(model)) as handle:
        assert handle.active
    assert not handle.active and trpts.get_mask_handle(model) is None
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    x, y = make_batches(1, 4)[0]
    F.cross_entropy(model(x).logits, y).backward()
    grad = model.vit.layers[0].attention.q_proj.weight.grad
    assert bool((grad != 0).all())
    handle.merge_and_unload()  # idempotent


def test_failed_calls_leave_the_model_untouched():
    model = make_timm_vit()
    selection = _select(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    other = trpts.allocate_connections({"blocks.0.attn.qkv.weight": torch.rand(4, 4)})
    with pytest.raises(ValueError, match="shape"):
        trpts.apply_masks(model, other)
    with pytest.raises(KeyError, match="extra_trainable"):
        trpts.apply_masks(model, selection, extra_trainable=["nope"])
    with pytest.raises(KeyError, match="another model"):
        trpts.apply_masks(make_hf_vit(), selection)
    with pytest.raises(TypeError, match="Selection"):
        trpts.apply_masks(model, dict(selection))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert trpts.get_mask_handle(model) is None
    handle = trpts.apply_masks(model, selection)
    with pytest.raises(trpts.TrptsRuntimeError, match="already"):
        trpts.apply_masks(model, selection)
    handle.merge_and_unload()


def test_a_model_without_a_conventional_head_names_it_or_passes_train_head_false():
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    fisher = trpts.compute_fisher(model, [(torch.randn(8, 6), torch.randint(0, 2, (8,)))],
                                  params=["0.weight"], progress=False)
    selection = trpts.allocate_connections(fisher, c_min=2)
    with pytest.raises(trpts.TrptsValueError, match="train_head=False") as info:  # no head by convention
        trpts.apply_masks(model, selection)
    assert "extra_trainable" in str(info.value) and isinstance(info.value, ValueError)
    assert all(p.requires_grad for p in model.parameters())
    handle = trpts.apply_masks(model, selection, train_head=False, extra_trainable=["2.weight", "2.bias"])
    assert set(handle.full) == {"2.weight", "2.bias"} and set(handle.masked) == {"0.weight"}
    handle.merge_and_unload()
    named = trpts.apply_masks(model, selection, extra_trainable=["2.weight", "2.bias"])  # the head, named
    assert set(named.full) == {"2.weight", "2.bias"}


def test_torch_compile_matches_eager():
    results = []
    for compiled in (False, True):
        model = make_timm_vit()
        selection = _select(model)
        handle = trpts.apply_masks(model, selection)
        before = _snapshot(model)
        optimizer = torch.optim.Adam(handle.param_groups(), lr=1e-2)
        runner = torch.compile(model) if compiled else model
        _train(runner, optimizer, steps=3)
        _assert_only_selected_moved(model, selection, handle, before)
        results.append(_snapshot(model))
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-4, atol=1e-5)
    record(model, "torch.compile")


def test_dropped_model_and_handle_are_freed():
    import gc
    import weakref

    model = make_timm_vit()
    handle = trpts.apply_masks(model, _select(model))
    refs = weakref.ref(model), weakref.ref(handle)
    del model, handle
    gc.collect()
    assert refs[0]() is None and refs[1]() is None
    # and the (now dead) global hook does not disturb other optimizers
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, weight_decay=0.1)
    p.grad = torch.ones(3)
    opt.step()


# ---- param_groups(head_lr=...) ------------------------------------------------------------

def _group_layout(groups):
    return [(g["trpts_group"], g["weight_decay"], g.get("lr"), [id(p) for p in g["params"]]) for g in groups]


def _assert_partition(model, handle, groups):
    """Every trainable parameter of the model is in exactly one group; no frozen one is."""
    grouped = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(grouped) == len(set(grouped)), "a parameter is in two groups"
    assert set(grouped) == set(trainable) == {id(p) for p in handle.parameters()}
    assert all(g["params"] for g in groups), "empty group"


def _head_ids(model, handle):
    names = trpts.models.get_adapter(model).head_parameters(model)
    return {id(handle.full[n]) for n in names if n in handle.full}


@pytest.mark.parametrize("storage", ["hooks", "sparse"])
def test_head_lr_gives_the_head_its_own_groups(any_model, storage):
    model = any_model
    pos = next(n for n, p in model.named_parameters() if "pos" in n and p.ndim >= 2)  # a non-head matrix
    handle = trpts.apply_masks(model, _select(model), train_biases=True, extra_trainable=[pos], storage=storage)
    groups = handle.param_groups(weight_decay=0.05, lr=1e-4, head_lr=1e-2, betas=(0.9, 0.99))
    _assert_partition(model, handle, groups)
    first = "selected" if storage == "sparse" else "masked"
    assert [g["trpts_group"] for g in groups] == [first, "decay", "no_decay", "head", "head_no_decay"]
    assert any(p is handle.full[pos] for p in groups[1]["params"])
    head = _head_ids(model, handle)
    for g in groups:
        in_head = g["trpts_group"].startswith("head")
        assert all((id(p) in head) == in_head for p in g["params"]), g["trpts_group"]
        assert g["lr"] == (1e-2 if in_head else 1e-4) and g["betas"] == (0.9, 0.99)
    by_tag = {g["trpts_group"]: g for g in groups}
    assert by_tag["head"]["weight_decay"] == 0.05 and by_tag["head_no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in by_tag["head"]["params"])
    assert all(p.ndim < 2 for p in by_tag["head_no_decay"]["params"])
    assert {id(p) for p in by_tag["head"]["params"] + by_tag["head_no_decay"]["params"]} == head
    torch.optim.AdamW(groups)  # a valid optimizer (no parameter twice)
    handle.merge_and_unload()


@settings(max_examples=6)
@given(budget=st.sampled_from([0.04, 0.1, 0.3]), head_lr=st.floats(1e-6, 1.0),
       storage=st.sampled_from(["hooks", "sparse"]), biases=st.booleans(), hf=st.booleans())
def test_head_lr_groups_partition_the_trainable_parameters(budget, head_lr, storage, biases, hf):
    model = make_hf_vit() if hf else make_timm_vit()
    handle = trpts.apply_masks(model, _select(model, budget), train_biases=biases, storage=storage)
    groups = handle.param_groups(weight_decay=0.1, lr=3e-4, head_lr=head_lr)
    _assert_partition(model, handle, groups)
    head = _head_ids(model, handle)
    for g in groups:
        in_head = g["trpts_group"] in ("head", "head_no_decay")
        assert g["lr"] == (head_lr if in_head else 3e-4)
        assert all((id(p) in head) == in_head for p in g["params"])
    handle.merge_and_unload()


@pytest.mark.parametrize("storage", ["hooks", "sparse"])
def test_head_lr_none_keeps_the_previous_groups(storage):
    model = make_timm_vit()
    handle = trpts.apply_masks(model, _select(model), train_biases=True, storage=storage)
    plain = handle.param_groups(weight_decay=0.05, lr=0.1)
    assert _group_layout(handle.param_groups(weight_decay=0.05, lr=0.1, head_lr=None)) == _group_layout(plain)
    first = list(handle.values.values()) if storage == "sparse" else list(handle.masked.values())
    full = list(handle.full.values())
    expected = [("selected" if storage == "sparse" else "masked", 0.0, 0.1, [id(p) for p in first]),
                ("decay", 0.05, 0.1, [id(p) for p in full if p.ndim >= 2]),
                ("no_decay", 0.0, 0.1, [id(p) for p in full if p.ndim < 2])]
    assert _group_layout(plain) == expected
    handle.merge_and_unload()


@pytest.mark.parametrize("storage", ["hooks", "sparse"])
def test_head_lr_errors_change_nothing(storage):
    model = make_timm_vit()
    selection = _select(model)
    handle = trpts.apply_masks(model, selection, storage=storage)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = _group_layout(handle.param_groups(weight_decay=0.05, lr=1e-3))
    for bad in (0, -1e-3, float("nan"), float("inf"), "1e-2", True, torch.tensor(1e-2)):
        with pytest.raises(trpts.TrptsValueError, match="head_lr") as info:
            handle.param_groups(weight_decay=0.05, lr=1e-3, head_lr=bad)
        assert isinstance(info.value, ValueError)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert _group_layout(handle.param_groups(weight_decay=0.05, lr=1e-3)) == before
    same = handle.param_groups(lr=1e-3, head_lr=1e-3)  # head_lr equal to lr is fine
    assert all(g["lr"] == 1e-3 for g in same) and same[-1]["trpts_group"] == "head_no_decay"
    handle.merge_and_unload()

    handle = trpts.apply_masks(model, selection, train_head=False, storage=storage)
    with pytest.raises(trpts.TrptsValueError, match="train_head=True"):
        handle.param_groups(lr=1e-4, head_lr=1e-2)
    assert [g["trpts_group"] for g in handle.param_groups(lr=1e-4)] == [handle.param_groups()[0]["trpts_group"]]
    handle.merge_and_unload()
    # the head is derived from the model: trained through extra_trainable, it still counts
    handle = trpts.apply_masks(model, selection, train_head=False, extra_trainable=["head.weight"],
                               storage=storage)
    assert handle.param_groups(lr=1e-4, head_lr=1e-2)[-1]["trpts_group"] == "head"
    handle.merge_and_unload()


def test_head_lr_on_a_model_without_adapter_says_what_to_do():
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    fisher = trpts.compute_fisher(model, [(torch.randn(8, 6), torch.randint(0, 2, (8,)))],
                                  params=["0.weight"], progress=False)
    handle = trpts.apply_masks(model, trpts.allocate_connections(fisher, c_min=2), train_head=False,
                               extra_trainable=["2.weight", "2.bias"])
    with pytest.raises(trpts.TrptsValueError, match="drop head_lr"):
        handle.param_groups(lr=1e-4, head_lr=1e-2)
    handle.merge_and_unload()


def test_head_lr_after_the_model_is_gone_says_so():
    import gc

    model = make_timm_vit()
    handle = trpts.apply_masks(model, _select(model))
    del model
    gc.collect()
    with pytest.raises(trpts.TrptsRuntimeError, match="no longer exists"):
        handle.param_groups(lr=1e-4, head_lr=1e-2)


def _adamw_first_two_steps(family, storage, **group_options):
    """A real AdamW run: (max |change| of the head, of the selected entries) after step 1,
    the parameters before, the model and its handle after step 2."""
    model = MODEL_FACTORIES[family]()
    selection = _select(model)
    handle = trpts.apply_masks(model, selection, storage=storage)
    optimizer = torch.optim.AdamW(handle.param_groups(weight_decay=0.05, **group_options))
    head = trpts.models.get_adapter(model).head_parameters(model)
    before = _snapshot(model)
    selected = {n: handle.selected_values(n) for n in handle.masked}
    model.train()
    changes = None
    for x, y in make_batches(2, 4, seed=3):
        optimizer.zero_grad()
        F.cross_entropy(_logits(model(x)), y).backward()
        optimizer.step()
        if changes is None:
            params = dict(model.named_parameters())
            changes = (max((params[n].detach() - before[n]).abs().max().item() for n in head),
                       max((handle.selected_values(n) - selected[n]).abs().max().item() for n in selected))
    return changes, before, model, handle


@pytest.mark.parametrize("family", ["timm", "hf"])
@pytest.mark.parametrize("storage", ["hooks", "sparse"])
def test_head_lr_adamw_moves_the_head_100x_more_than_the_selected_entries(family, storage):
    (head_step, entry_step), before, model, handle = _adamw_first_two_steps(
        family, storage, lr=1e-4, head_lr=1e-2)
    # Adam's first step moves each entry by ~lr (|g| / (|g| + eps)); decay adds < 1e-3 of it here
    assert head_step == pytest.approx(1e-2, rel=1e-2)
    assert entry_step == pytest.approx(1e-4, rel=1e-2)
    (uniform_head, uniform_entry), *_ = _adamw_first_two_steps(family, storage, lr=1e-4)
    assert uniform_head == pytest.approx(1e-4, rel=1e-2)
    assert uniform_entry == pytest.approx(entry_step, rel=1e-4)
    assert head_step / uniform_head == pytest.approx(100, rel=2e-2)
    compact = {id(v) for v in getattr(handle, "values", {}).values()}
    for name, p in model.named_parameters():  # after two steps: only the selection and the head moved
        if name in handle.masked:
            keep = handle.selection[name]
            assert torch.equal(p.detach()[~keep], before[name][~keep]), f"frozen entries of {name} moved"
        elif name not in handle.full and id(p) not in compact:
            assert torch.equal(p.detach(), before[name]), f"{name} should be frozen"
    handle.merge_and_unload()


def test_weight_decay_check_follows_parameters_by_name_and_outlives_its_model():
    """The check finds masked weights by name at each step (so it sees parameters swapped in
    after apply_masks, as FSDP2 does); a handle whose model is gone checks nothing."""
    import gc

    model = make_timm_vit()
    fisher = {n: torch.rand(p.shape) for n, p in model.named_parameters() if n in trpts.default_scored_parameters(model)}
    handle = trpts.apply_masks(model, trpts.allocate_connections(fisher, budget=0.05))
    name = next(iter(handle.masked))
    swapped = torch.nn.Parameter(handle.masked[name].detach().clone())
    module = model.get_submodule(name.rpartition(".")[0])
    module.weight = swapped
    assert handle.masked[name] is swapped
    x, y = make_batches(1, 2)[0]
    F.cross_entropy(model(x), y).backward()
    assert swapped.grad is not None and bool((swapped.grad[~handle.selection[name]] == 0).all())  # re-hooked
    with pytest.raises(trpts.WeightDecayError, match=name.replace(".", r"\.")):
        torch.optim.AdamW([swapped], lr=1e-3, weight_decay=0.1).step()
    del model, module, x, y
    gc.collect()
    other = torch.nn.Parameter(torch.ones(3))
    other.grad = torch.ones(3)
    torch.optim.AdamW([other], lr=1e-3, weight_decay=0.1).step()  # no error from the orphaned handle
    assert handle.active
