from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batches, make_hf_vit, make_timm_vit
from torch import nn

import trpts


def _brute_force_per_sample(model, batches, names):
    """Mean over samples of the squared single-sample gradient, one backward per sample."""
    model.eval()
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(params[n], dtype=torch.float32) for n in names}
    count = 0
    for x, y in batches:
        for i in range(len(y)):
            out = model(x[i : i + 1])
            out = out if torch.is_tensor(out) else out.logits
            grads = torch.autograd.grad(F.cross_entropy(out, y[i : i + 1]), [params[n] for n in names])
            for n, g in zip(names, grads, strict=True):
                sums[n] += g.float() ** 2
            count += 1
    return {n: s / count for n, s in sums.items()}


def test_scores_are_float32_finite_nonnegative_and_shaped(any_model, batches):
    fisher = trpts.compute_fisher(any_model, batches, progress=False)
    params = dict(any_model.named_parameters())
    assert list(fisher) == trpts.default_scored_parameters(any_model)
    for name, s in fisher.items():
        assert s.dtype == torch.float32
        assert s.shape == params[name].shape
        assert bool(torch.isfinite(s).all()) and float(s.min()) >= 0
    assert any(float(s.max()) > 0 for s in fisher.values())


@pytest.mark.parametrize("factory", [make_timm_vit, make_hf_vit])
def test_per_sample_equals_brute_force_loop(factory):
    model = factory()
    batches = make_batches(n_batches=2, batch_size=3)
    fisher = trpts.compute_fisher(model, batches, per_sample=True, chunk_size=2, progress=False)
    expected = _brute_force_per_sample(model, batches, list(fisher))
    for name in fisher:
        torch.testing.assert_close(fisher[name], expected[name], rtol=1e-4, atol=1e-9)


def test_microbatch_mode_is_sample_weighted_square_of_batch_mean_gradient(timm_vit):
    batches = [make_batches(1, 4, seed=3)[0], make_batches(1, 2, seed=4)[0]]  # unequal sizes
    fisher = trpts.compute_fisher(timm_vit, batches, progress=False)
    params = dict(timm_vit.named_parameters())
    expected = {n: torch.zeros_like(params[n]) for n in fisher}
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(timm_vit(x), y), [params[n] for n in fisher])
        for n, g in zip(fisher, grads, strict=True):
            expected[n] += len(y) * g**2
    for n in fisher:
        torch.testing.assert_close(fisher[n], expected[n] / 6, rtol=1e-5, atol=1e-12)


def test_microbatch_with_batch_size_one_equals_per_sample(timm_vit):
    batches = make_batches(n_batches=4, batch_size=1)
    a = trpts.compute_fisher(timm_vit, batches, progress=False)
    b = trpts.compute_fisher(timm_vit, batches, per_sample=True, progress=False)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-10)


def test_no_side_effects(timm_vit, batches):
    model = timm_vit
    model.train()
    model.blocks[0].eval()  # mixed modes must survive
    model.blocks[1].attn.qkv.weight.requires_grad_(False)  # a scored weight the user froze
    model.pos_embed.requires_grad_(False)
    for p in list(model.parameters())[:3]:
        p.grad = torch.full_like(p, 0.5)
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads_before = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    flags_before = {n: p.requires_grad for n, p in model.named_parameters()}
    modes_before = {n: m.training for n, m in model.named_modules()}
    for per_sample in (False, True):
        for train_mode in (False, True):
            trpts.compute_fisher(model, batches, per_sample=per_sample, train_mode=train_mode,
                                 progress=False)
    for n, p in model.named_parameters():
        assert torch.equal(p, params_before[n]), n
        if grads_before[n] is None:
            assert p.grad is None, n
        else:
            assert torch.equal(p.grad, grads_before[n]), n
        assert p.requires_grad == flags_before[n], n
    assert {n: m.training for n, m in model.named_modules()} == modes_before


def test_eval_mode_by_default_train_mode_switchable():
    model = make_timm_vit(drop_rate=0.5, drop_path_rate=0.5)
    batches = make_batches(2, 4)
    a = trpts.compute_fisher(model, batches, progress=False)
    b = trpts.compute_fisher(model, batches, progress=False)
    assert all(torch.equal(a[n], b[n]) for n in a)  # no dropout noise
    torch.manual_seed(0)
    c = trpts.compute_fisher(model, batches, train_mode=True, progress=False)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_hugging_face_dict_batches_and_logits_output(hf_vit):
    tuples = make_batches(2, 4)
    dicts = make_batches(2, 4, as_dict=True)
    a = trpts.compute_fisher(hf_vit, tuples, progress=False)
    b = trpts.compute_fisher(hf_vit, dicts, progress=False)
    assert list(a) == list(b)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_num_batches_limits_the_pass(timm_vit):
    consumed = []

    def stream():
        for i, batch in enumerate(make_batches(5, 2)):
            consumed.append(i)
            yield batch

    limited = trpts.compute_fisher(timm_vit, stream(), num_batches=2, progress=False)
    first_two = trpts.compute_fisher(timm_vit, make_batches(5, 2)[:2], progress=False)
    assert consumed == [0, 1]
    assert all(torch.equal(limited[n], first_two[n]) for n in limited)


def test_params_by_names_and_predicate_and_custom_loss(timm_vit, batches):
    only = trpts.compute_fisher(timm_vit, batches, params=["head.weight", "blocks.0.norm1.weight"],
                                progress=False)
    assert list(only) == ["head.weight", "blocks.0.norm1.weight"]
    pred = trpts.compute_fisher(timm_vit, batches, params=lambda n, p: n.startswith("blocks.1.mlp"),
                                progress=False)
    assert list(pred) == ["blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc1.bias",
                          "blocks.1.mlp.fc2.weight", "blocks.1.mlp.fc2.bias"]
    doubled = trpts.compute_fisher(timm_vit, batches, loss_fn=lambda o, t: 2 * F.cross_entropy(o, t),
                                   progress=False)
    plain = trpts.compute_fisher(timm_vit, batches, progress=False)
    for n in plain:
        torch.testing.assert_close(doubled[n], 4 * plain[n])


def test_float32_accumulation_for_bf16_model_and_autocast(batches):
    model = make_timm_vit().to(torch.bfloat16)
    bf_batches = [(x.to(torch.bfloat16), y) for x, y in batches]
    fisher = trpts.compute_fisher(model, bf_batches, progress=False)
    assert all(s.dtype == torch.float32 and bool(torch.isfinite(s).all()) for s in fisher.values())
    model32 = make_timm_vit()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fisher = trpts.compute_fisher(model32, batches, progress=False)
    assert all(s.dtype == torch.float32 for s in fisher.values())


@pytest.mark.parametrize("per_sample", [False, True])
def test_scores_device_holds_the_same_scores(timm_vit, batches, per_sample):
    """``scores_device`` moves every gradient to the accumulators' device one tensor at a time;
    the scores are those of the default placement, bit for bit (bf16 gradients included)."""
    kwargs = {"per_sample": per_sample, "chunk_size": 3, "progress": False}
    expected = trpts.compute_fisher(timm_vit, batches, **kwargs)
    got = trpts.compute_fisher(timm_vit, batches, scores_device="cpu", **kwargs)
    assert list(got) == list(expected)
    assert all(got[n].device.type == "cpu" and torch.equal(got[n], expected[n]) for n in expected)
    model = make_timm_vit().to(torch.bfloat16)
    bf_batches = [(x.to(torch.bfloat16), y) for x, y in batches]
    assert all(torch.equal(a, b) for a, b in zip(
        trpts.compute_fisher(model, bf_batches, **kwargs).values(),
        trpts.compute_fisher(model, bf_batches, scores_device=torch.device("cpu"), **kwargs).values(),
        strict=True))
    for bad in ("gpu7", "meta", 3.5):
        with pytest.raises(trpts.TrptsValueError, match="scores_device"):
            trpts.compute_fisher(timm_vit, batches, scores_device=bad, progress=False)


def test_compiled_model_names_have_no_prefix(timm_vit, batches):
    fisher = trpts.compute_fisher(torch.compile(timm_vit), batches, progress=False)
    assert list(fisher) == trpts.default_scored_parameters(timm_vit)


def test_progress_bar_can_be_turned_off(timm_vit, batches, capsys):
    trpts.compute_fisher(timm_vit, batches, progress=False)
    assert capsys.readouterr().err == ""
    trpts.compute_fisher(timm_vit, batches, progress=True)
    assert "trpts Fisher" in capsys.readouterr().err


def test_bad_input(timm_vit, batches):
    with pytest.raises(trpts.TrptsValueError, match="no samples"):
        trpts.compute_fisher(timm_vit, [], progress=False)
    with pytest.raises(ValueError, match="pixel_values"):
        trpts.compute_fisher(timm_vit, [{"image": 1}], progress=False)
    with pytest.raises(TypeError, match="batch"):
        trpts.compute_fisher(timm_vit, [torch.zeros(2, 3, 16, 16)], progress=False)
    with pytest.raises(KeyError, match="not parameters"):
        trpts.compute_fisher(timm_vit, batches, params=["nope.weight"], progress=False)
    with pytest.raises(trpts.TrptsTypeError, match="single string"):
        trpts.compute_fisher(timm_vit, batches, params="head.weight", progress=False)
    with pytest.raises(trpts.TrptsValueError, match="num_batches"):
        trpts.compute_fisher(timm_vit, batches, num_batches=0, progress=False)
    with pytest.raises(trpts.TrptsValueError, match="params=") as info:  # nothing to score by default
        trpts.compute_fisher(nn.Conv1d(3, 2, 1), [(torch.zeros(1, 3, 4), torch.zeros(1, dtype=torch.long))],
                             progress=False)
    assert "Conv1d" in str(info.value)
    # any module works: every nn.Linear weight by default, or explicit names
    assert list(trpts.compute_fisher(nn.Linear(3, 2), [(torch.ones(2, 3), torch.tensor([0, 1]))],
                                     progress=False)) == ["weight"]
    fisher = trpts.compute_fisher(nn.Linear(3, 2), [(torch.ones(2, 3), torch.tensor([0, 1]))],
                                  params=["weight"], progress=False)
    assert fisher["weight"].shape == (2, 3)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("targets, error, match", [
    (torch.tensor([0.0, 1.0, 2.0, 1.0]), trpts.TrptsTypeError, "int64 class indices"),  # float labels
    (torch.tensor([0, 1, 2, 1], dtype=torch.int32), trpts.TrptsTypeError, r"y\.long\(\)"),
    (torch.tensor([True, False, True, True]), trpts.TrptsTypeError, "int64"),
    (torch.tensor([[0], [1], [2], [1]]), trpts.TrptsTypeError, r"y\.view\(-1\)"),  # (B, 1)
    (torch.tensor(1), trpts.TrptsTypeError, "shape \\(batch,\\)"),
    ([0, 1, 2, 1], trpts.TrptsTypeError, "list"),
    (torch.tensor([0, 1, 2]), trpts.TrptsValueError, "do not match"),  # wrong batch size
    (torch.tensor([0, 1, 2, 9]), trpts.TrptsValueError, r"0\.\.4"),  # out of range
])
def test_malformed_batches_are_clear_errors_and_leave_the_model(per_sample, targets, error, match):
    from conftest import make_timm_vit

    model = make_timm_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(error, match=match):
        trpts.compute_fisher(model, [(torch.randn(4, 3, 16, 16), targets)], per_sample=per_sample,
                             progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == [p.requires_grad for p in model.parameters()]


def test_probability_targets_work_with_the_default_loss():
    from conftest import make_timm_vit

    model = make_timm_vit()
    soft = torch.softmax(torch.randn(4, 5), dim=1)
    fisher = trpts.compute_fisher(model, [(torch.randn(4, 3, 16, 16), soft)], progress=False)
    assert all(bool((f >= 0).all()) and f.dtype == torch.float32 for f in fisher.values())


def test_gradient_score_is_the_magnitude_of_the_mean_gradient(timm_vit):
    """score="gradient" (GPS's): |sum_b n_b g_b| / N in microbatch mode, |mean_i g_i| per sample:
    both equal the magnitude of the full-data mean gradient."""
    batches = [make_batches(1, 4, seed=3)[0], make_batches(1, 2, seed=4)[0]]  # unequal sizes
    micro = trpts.compute_fisher(timm_vit, batches, score="gradient", progress=False)
    exact = trpts.compute_fisher(timm_vit, batches, score="gradient", per_sample=True, progress=False)
    params = dict(timm_vit.named_parameters())
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    grads = torch.autograd.grad(F.cross_entropy(timm_vit(x), y), [params[n] for n in micro])
    fisher = trpts.compute_fisher(timm_vit, batches, progress=False)
    for n, g in zip(micro, grads, strict=True):
        torch.testing.assert_close(micro[n], g.abs(), rtol=1e-4, atol=1e-8)  # sums cancel near 0
        torch.testing.assert_close(exact[n], g.abs(), rtol=1e-4, atol=1e-8)
        assert micro[n].dtype == torch.float32 and not torch.equal(micro[n], fisher[n])
    with pytest.raises(trpts.TrptsValueError, match="score must be"):
        trpts.compute_fisher(timm_vit, batches, score="hessian", progress=False)


def test_default_reads_a_few_batches_and_none_reads_all(timm_vit):
    drawn = []

    def loader(n):
        for i, batch in enumerate(make_batches(n_batches=n, batch_size=2, seed=5)):
            drawn.append(i)
            yield batch

    trpts.compute_fisher(timm_vit, loader(20), progress=False)
    assert len(drawn) == 16  # not a whole epoch
    drawn.clear()
    trpts.compute_fisher(timm_vit, loader(20), num_batches=None, progress=False)
    assert len(drawn) == 20
