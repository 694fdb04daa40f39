"""Mixed-task batches (trpts.forward_tasks): every sample equals its task activated alone."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import IMG, make_hf_vit, make_timm_eva, make_timm_vit
from hypothesis import given, settings
from hypothesis import strategies as st

import trpts

FAMILIES = {
    "timm-vit": make_timm_vit,
    "timm-deit-distilled": functools.partial(make_timm_vit, model_name="deit_tiny_distilled_patch16_224"),
    "timm-eva02": make_timm_eva,
    "hf-vit": make_hf_vit,
}
# classes, seed, trained biases, Fisher-like selection (in few input columns: the W0 x + dW x path)
TASKS = {"t5": (5, 0, False, False), "t3": (3, 1, True, False), "t7": (7, 2, False, False), "c4": (4, 3, True, True)}


def _logits(out):
    return out if torch.is_tensor(out) else out.logits


def train_task(backbone, *, classes, seed, biases=False, extra=(), budget=0.05, tokens=None, few_columns=False,
               skip=()):
    """A fine-tuned copy of ``backbone`` with a new ``classes``-way head: random-score
    selection, masks, two AdamW steps at a large rate (so every trained value moves).
    ``few_columns``: scores 1000x larger in 1/10 of each linear weight's input columns, as real
    Fisher scores are (a few input channels carry most of the activation energy)."""
    model = copy.deepcopy(backbone)
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(classes)
    else:
        model.classifier = torch.nn.Linear(model.classifier.in_features, classes)
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    fisher = {n: torch.rand(params[n].shape, generator=g) for n in trpts.default_scored_parameters(model)
              if n not in skip}
    for f in fisher.values():
        if few_columns and f.ndim == 2:
            f[:, torch.randperm(f.shape[1], generator=g)[:max(2, f.shape[1] // 10)]] *= 1000
    selection = trpts.allocate_connections(fisher, budget=budget, model=model)
    handle = trpts.apply_masks(model, selection, train_biases=biases, extra_trainable=extra)
    optimizer = torch.optim.AdamW(handle.param_groups(weight_decay=0.0), lr=3e-2)
    model.train()
    for _ in range(2):
        x = torch.randn(4, 3, IMG, IMG, generator=g)
        loss = F.cross_entropy(_logits(model(x)), torch.randint(0, classes, (4,), generator=g))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    if tokens is not None:
        trpts.wrap_vit(model, rho=tokens[0], layers=tokens[1])
    return model.eval()


@functools.cache
def _files(family, tmp):
    backbone = FAMILIES[family]().eval()
    paths = {}
    for name, (classes, seed, biases, few) in TASKS.items():
        path = f"{tmp}/{family}-{name}.safetensors"
        trained = train_task(backbone, classes=classes, seed=seed, biases=biases, few_columns=few)
        trpts.save_delta(trained, path, name=name)
        paths[name] = path
    return backbone, paths


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return str(tmp_path_factory.mktemp("mixed"))


@pytest.fixture(autouse=True, params=["add", "split"])
def linear_path(request, monkeypatch):
    """Every test runs with few-column changes added to one backbone matmul (what calls with
    small task groups do) and with per-group matmul blocks (large groups)."""
    from trpts import mixed

    monkeypatch.setattr(mixed, "_ADD_BELOW_ROWS", 10**9 if request.param == "add" else 0)
    return request.param


def loaded(family, tmp, names=tuple(TASKS)):
    backbone, paths = _files(family, tmp)
    model = copy.deepcopy(backbone)
    for n in names:
        trpts.load_delta(model, paths[n])
    return model


def alone(model, x, task):
    """The outputs of the whole batch with ``task`` activated (the reference)."""
    trpts.activate_delta(model, task)
    with torch.no_grad():
        return _logits(model(x))


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(model, saved):
    now = model.state_dict()
    return list(now) == list(saved) and all(torch.equal(now[k], saved[k]) for k in saved)


@settings(max_examples=12, deadline=None)
@given(family=st.sampled_from(sorted(FAMILIES)),
       tasks=st.lists(st.sampled_from([*TASKS, None]), min_size=1, max_size=9),
       seed=st.integers(0, 100))
def test_every_sample_equals_its_task_alone(tmp, family, tasks, seed):
    """For any mix and order (the plain backbone too), each sample's logits equal those of its
    task activated alone, cut to that task's classes: rtol = atol = 1e-5, the float32 rounding
    of a matmul over a different number of rows (the weights themselves are identical)."""
    model = loaded(family, tmp)
    trpts.activate_delta(model, "t3")
    before = state(model)
    x = torch.randn(len(tasks), 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))
    out = trpts.forward_tasks(model, x, tasks)
    assert same_state(model, before) and trpts.loaded_deltas(model) == list(TASKS)
    assert model.__dict__["_trpts_state"].deltas.active == "t3"
    reference = {t: alone(model, x, t) for t in set(tasks)}
    for i, t in enumerate(tasks):
        classes = TASKS[t][0] if t is not None else 5
        assert out[i].shape == (classes,)
        torch.testing.assert_close(out[i], reference[t][i], rtol=1e-5, atol=1e-5)


def test_tasks_differ_and_trained_norms_are_applied_per_sample(tmp):
    """A task that also trains the final LayerNorm (used through F.layer_norm) is exact too,
    and the tasks really give different outputs (the check above is not vacuous)."""
    backbone = make_timm_vit().eval()
    path = f"{tmp}/norm.safetensors"
    trpts.save_delta(train_task(backbone, classes=5, seed=9, extra=["norm.weight", "norm.bias"]), path, name="n")
    model = copy.deepcopy(backbone)
    trpts.load_delta(model, path)
    trpts.load_delta(model, _files("timm-vit", tmp)[1]["t5"])
    x = torch.randn(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(0))
    tasks = ["n", "t5", None, "n"]
    out = trpts.forward_tasks(model, x, tasks)
    for i, t in enumerate(tasks):
        torch.testing.assert_close(out[i], alone(model, x, t)[i], rtol=1e-5, atol=1e-5)
    assert (out[0] - alone(model, x, "t5")[0]).abs().max() > 1e-3
    assert (out[1] - alone(model, x, None)[1]).abs().max() > 1e-3


def test_bf16_autocast(tmp):
    """Under autocast every group computes with its own weights (the region's cached bf16 copies
    of the backbone's are dropped after each write), in both linear paths."""
    model = loaded("timm-vit", tmp)
    x = torch.randn(6, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    tasks = ["t7", "c4", "t5", "t7", None, "t3"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = trpts.forward_tasks(model, x, tasks)
    reference = {}
    for t in set(tasks):  # each in its own region: autocast caches its casts of the weights per region
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reference[t] = alone(model, x, t)
    for i, t in enumerate(tasks):
        assert out[i].dtype == torch.bfloat16
        torch.testing.assert_close(out[i], reference[t][i], rtol=2e-2, atol=2e-2)



def test_switching_tasks_inside_one_autocast_region(tmp):
    """activate_delta inside an autocast region: the next forward uses the new task's weights,
    not the region's cached bf16 copies of the previous ones."""
    model = loaded("timm-vit", tmp)
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(4))
    fresh = {}
    for t in ("t5", "c4"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fresh[t] = alone(model, x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first, second = alone(model, x, "t5"), alone(model, x, "c4")
    assert torch.equal(first, fresh["t5"]) and torch.equal(second, fresh["c4"])

def test_token_settings_shared_or_not(tmp):
    """Tasks that select tokens alike share one pass; different settings (another rho and block,
    none at all for the backbone) run as one pass per setting: every sample still equals its
    task alone, and the model keeps its active task's token selection."""
    backbone = make_timm_vit(depth=3).eval()
    paths = {}
    for name, seed, tokens in (("a", 0, (0.5, [1])), ("b", 1, (0.5, [1])), ("c", 2, (0.7, [2])),
                               ("d", 3, None)):
        paths[name] = f"{tmp}/tok-{name}.safetensors"
        trpts.save_delta(train_task(backbone, classes=5, seed=seed, tokens=tokens), paths[name], name=name)
    model = copy.deepcopy(backbone)
    for p in paths.values():
        trpts.load_delta(model, p)
    trpts.activate_delta(model, "a")
    before = state(model)
    x = torch.randn(7, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    for tasks in (["a", "b", "b", "a", "a", "b", "b"], ["c", "a", None, "d", "b", "c", "a"]):
        out = trpts.forward_tasks(model, x, tasks)
        reference = {t: alone(model, x, t) for t in set(tasks)}
        trpts.activate_delta(model, "a")
        for i, t in enumerate(tasks):
            torch.testing.assert_close(out[i], reference[t][i], rtol=1e-5, atol=1e-5)
        assert same_state(model, before)
        assert trpts.get_token_config(model).layers == (1,) and trpts.get_token_config(model).rho == 0.5
    assert (reference["c"][0] - reference["d"][0]).abs().max() > 1e-3


def test_bad_calls_are_refused_before_anything_runs(tmp):
    model = loaded("timm-vit", tmp, names=("t5", "t3"))
    before = state(model)
    x = torch.randn(3, 3, IMG, IMG)
    with pytest.raises(trpts.TrptsKeyError, match="'nope'"):
        trpts.forward_tasks(model, x, ["t5", "nope", None])
    with pytest.raises(KeyError):  # the built-in it subclasses
        trpts.forward_tasks(model, x, ["t5", "t3", "t7"])
    with pytest.raises(trpts.TrptsValueError, match="one task name"):
        trpts.forward_tasks(model, x, ["t5", "t3"])
    with pytest.raises(trpts.TrptsTypeError, match="sequence"):
        trpts.forward_tasks(model, x, "t5")
    with pytest.raises(trpts.TrptsTypeError, match="batch tensor"):
        trpts.forward_tasks(model, [x], ["t5", "t3", None])
    with pytest.raises(trpts.TrptsValueError, match="no delta is loaded"):
        trpts.forward_tasks(make_timm_vit(), x, [None, None, None])
    assert same_state(model, before)
    trpts.activate_delta(model, None)
    trpts.apply_masks(model, trpts.Selection.from_delta(_files("timm-vit", tmp)[1]["t5"]))
    with pytest.raises(trpts.TrptsRuntimeError, match="being trained"):
        trpts.forward_tasks(model, x, ["t5", "t3", None])


def test_a_changed_tensor_used_elsewhere_is_an_error_that_leaves_the_model_as_it_was(tmp):
    """A task that trained the position embedding (added to the tokens, not a linear's weight)
    cannot be applied per sample: a clear error, the model restored."""
    backbone = make_timm_vit().eval()
    path = f"{tmp}/pos.safetensors"
    trpts.save_delta(train_task(backbone, classes=5, seed=4, extra=["pos_embed"]), path, name="pos")
    model = copy.deepcopy(backbone)
    trpts.load_delta(model, _files("timm-vit", tmp)[1]["t7"])
    trpts.load_delta(model, path)
    before = state(model)
    x = torch.randn(2, 3, IMG, IMG)
    with pytest.raises(trpts.TrptsValueError, match=r"'pos_embed'.*activate_delta"):
        trpts.forward_tasks(model, x, ["t7", "pos"])
    assert same_state(model, before)
    assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 5
    out = trpts.forward_tasks(model, x, ["t7", "t7"])  # still usable
    torch.testing.assert_close(out[1], alone(model, x, "t7")[1], rtol=1e-5, atol=1e-5)



def test_few_column_changes_add_to_one_backbone_matmul(tmp):
    """Fisher-like deltas (entries in few input columns) and a bias-only change run as one
    backbone matmul plus each group's change over its columns (``W0 x + dW x``); mixed with a
    delta spread over all columns (its rows recomputed with its values written in), every sample
    still equals its task alone. The ``W0 x + dW x`` path is really taken (it caches the change
    of every few-column linear weight)."""
    from trpts import mixed

    backbone = make_timm_vit().eval()
    model = copy.deepcopy(backbone)
    files = _files("timm-vit", tmp)[1]
    trpts.load_delta(model, files["c4"])
    trpts.load_delta(model, files["t7"])
    bias_only = train_task(backbone, classes=5, seed=5, extra=["blocks.1.mlp.fc2.bias"], few_columns=True,
                           skip=["blocks.1.mlp.fc2.weight"])
    with torch.no_grad():
        bias_only.blocks[1].mlp.fc2.bias += 0.5
    path = f"{tmp}/bias-only.safetensors"
    trpts.save_delta(bias_only, path, name="b")
    trpts.load_delta(model, path)
    assert "blocks.1.mlp.fc2.weight" not in trpts.Selection.from_delta(path)
    x = torch.randn(6, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    tasks = ["c4", "t7", "b", None, "c4", "b"]
    before = set(mixed._COLUMNS)
    out = trpts.forward_tasks(model, x, tasks)
    linears = [n for n in trpts.Selection.from_delta(files["c4"]) if ".attn." in n or ".mlp." in n]
    compact = sum(v is not None for k, v in mixed._COLUMNS.items() if k not in before)
    assert compact >= len(linears) + 7  # each few-column change found (and, under "add", applied)
    for i, t in enumerate(tasks):
        torch.testing.assert_close(out[i], alone(model, x, t)[i], rtol=1e-5, atol=1e-5)
