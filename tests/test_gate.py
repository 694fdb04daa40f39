"""Token-selective deltas (``apply_masks(..., token_gate=...)``, trpts/gate.py): the gated
forward and its gradients against a dense reference, threshold learning, deltas (format 3),
and every refusal."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batches, make_hf_vit, make_timm_vit
from hypothesis import given, settings
from hypothesis import strategies as st

import trpts
from trpts.delta_format import FORMAT_NAME, checksum, read_delta
from trpts.gate import GATE, SCALE
from trpts.sparse import VALUES


def _setup(make=make_timm_vit, gate=0.5, budget=0.05):
    model = make()
    batches = make_batches(as_dict=make is make_hf_vit)
    selection = trpts.allocate_connections(trpts.compute_fisher(model, batches, progress=False), budget=budget)
    handle = trpts.apply_masks(model, selection, storage="sparse", token_gate=gate)
    return model, handle, batches


def _loss(model, batch):
    if isinstance(batch, dict):
        return model(**batch).loss
    x, y = batch
    return F.cross_entropy(model(x), y)


def _train(model, handle, batches, steps=30, lr=1e-2):
    opt = torch.optim.AdamW(handle.param_groups(lr=lr, head_lr=lr))
    model.train()
    for i in range(steps):
        loss = _loss(model, batches[i % len(batches)])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _gated_modules(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, GATE)}


def _reference(module, x):
    """``W0 x + b + S (dW x)`` in plain dense autograd ops, with ``S`` from the module's threshold."""
    w0 = module.weight.detach()
    dw = torch.zeros_like(w0).view(-1)
    flat = (torch.arange(module.trpts_index.shape[0]).unsqueeze(1) * w0.shape[1] + module.trpts_index).view(-1)
    values = getattr(module, VALUES)
    dw = dw.index_put((flat,), values - module.trpts_original)
    base = F.linear(x, w0, module.bias)
    d = x @ dw.view_as(w0).t()
    ratio = d.detach().norm(dim=-1) / base.detach().norm(dim=-1).clamp(min=1e-12)
    keep = (ratio >= getattr(module, GATE) * getattr(module, SCALE)).unsqueeze(-1)
    return base + keep * d


# ---- settings -----------------------------------------------------------------------------


@given(skip=st.floats(0.0, 0.999))
def test_a_number_is_the_target_skip(skip):
    assert trpts.TokenGate.coerce(skip) == trpts.TokenGate(skip=skip)


@pytest.mark.parametrize("kwargs", [{"skip": 1.0}, {"skip": -0.1}, {"skip": float("nan")}, {"temperature": 0},
                                    {"step": -1.0}])
def test_bad_settings_are_value_errors(kwargs):
    with pytest.raises(trpts.TrptsValueError):
        trpts.TokenGate(**kwargs)


def test_bad_types_are_type_errors(timm_vit):
    with pytest.raises(trpts.TrptsTypeError):
        trpts.TokenGate(skip="half")
    selection = trpts.allocate_connections(trpts.compute_fisher(timm_vit, make_batches(), progress=False), budget=0.05)
    with pytest.raises(TypeError, match="token_gate"):
        trpts.apply_masks(timm_vit, selection, storage="sparse", token_gate="yes")


def test_needs_sparse_storage_and_leaves_the_model_untouched(timm_vit):
    selection = trpts.allocate_connections(trpts.compute_fisher(timm_vit, make_batches(), progress=False), budget=0.05)
    flags = [p.requires_grad for p in timm_vit.parameters()]
    with pytest.raises(ValueError, match="storage='sparse'"):
        trpts.apply_masks(timm_vit, selection, token_gate=0.5)
    assert trpts.get_mask_handle(timm_vit) is None
    assert [p.requires_grad for p in timm_vit.parameters()] == flags


# ---- the gated forward and its gradients ---------------------------------------------------


def test_starts_as_the_plain_model_and_gates_only_linears():
    model, handle, batches = _setup()
    plain = make_timm_vit().eval()
    x = batches[0][0]
    assert torch.equal(model.eval()(x), plain(x))  # g_l = 0 and dW = 0: every token kept, nothing changed
    gated = _gated_modules(model)
    assert gated and all(isinstance(m, torch.nn.Linear) for m in gated.values())
    assert "patch_embed.proj.weight" in handle.selection.matrices and "patch_embed.proj" not in gated


@settings(max_examples=12)
@given(seed=st.integers(0, 50), tau=st.floats(0.0, 3.0))
def test_forward_and_gradients_match_a_dense_reference(seed, tau):
    model, _handle, _batches = _setup()
    torch.manual_seed(seed)
    module = model.blocks[1].mlp.fc1
    with torch.no_grad():
        values = getattr(module, VALUES)
        values.add_(torch.randn_like(values) * 0.3)
        getattr(module, SCALE).fill_(1.0)
        getattr(module, GATE).fill_(tau)
    x = torch.randn(3, 7, module.in_features, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    module.eval()  # fixed threshold
    out, ref = module(x), _reference(module, x_ref)
    assert torch.allclose(out, ref, atol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, values), g)
    grads_ref = torch.autograd.grad(ref, (x_ref, values), g)
    for a, b in zip(grads, grads_ref, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_training_gradients_match_the_reference_and_move_the_threshold():
    model, _handle, _batches = _setup()
    module = model.blocks[0].attn.qkv
    with torch.no_grad():
        values = getattr(module, VALUES)
        values.add_(torch.randn_like(values) * 0.3)
    module.train()
    x = torch.randn(2, 5, module.in_features, requires_grad=True)
    out = module(x)  # sets the ratio scale from this batch
    ref = _reference(module, x)
    g = torch.randn_like(out)
    before = getattr(module, GATE).clone()
    got = torch.autograd.grad(out, (x, values), g)
    assert not torch.equal(getattr(module, GATE), before)  # the backward took a threshold step
    with torch.no_grad():
        getattr(module, GATE).copy_(before)
    want = torch.autograd.grad(ref, (x, values), g)
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_training_reaches_the_target_skip_and_keeps_frozen_entries_exact():
    model, handle, batches = _setup(gate=trpts.TokenGate(skip=0.5))
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if n in handle.masked}
    trpts.token_gate_stats(model, reset=True)
    _train(model, handle, batches, steps=120, lr=3e-3)
    stats = trpts.token_gate_stats(model)
    assert set(stats) == {f"{n}.weight" for n in _gated_modules(model)}
    skipped = sum(stats.values()) / len(stats)
    assert 0.2 < skipped < 0.8, stats
    assert len({round(v, 3) for v in stats.values()}) > 1  # layers learn their own shares
    thresholds = handle.thresholds()
    assert all(float(t) >= 0 for t in thresholds.values()) and any(float(t) > 0 for t in thresholds.values())
    named = dict(model.named_parameters())
    for n in stats:  # gated weights are never written: pretrained everywhere
        assert torch.equal(named[n], weights[n])
    patch = handle.selection["patch_embed.proj.weight"]  # the ungated conv: only its selected entries moved
    assert torch.equal(named["patch_embed.proj.weight"][~patch], weights["patch_embed.proj.weight"][~patch])
    assert trpts.token_gate_stats(model, reset=True) == stats and trpts.token_gate_stats(model) == {}


def test_training_is_deterministic():
    runs = []
    for _ in range(2):
        model, handle, batches = _setup()
        _train(model, handle, batches, steps=15)
        runs.append({n: t.clone() for n, t in handle.thresholds().items()})
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


def test_no_pressure_learns_thresholds_from_the_loss_only():
    model, handle, batches = _setup(gate=0.0)
    _train(model, handle, batches, steps=20)
    assert all(torch.isfinite(t) and float(t) >= 0 for t in handle.thresholds().values())


def test_bf16_autocast_trains():
    model, handle, batches = _setup()
    opt = torch.optim.AdamW(handle.param_groups(lr=1e-2, head_lr=1e-2))
    for x, y in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(v.grad).all() for v in handle.values.values() if v.grad is not None)
        opt.step()
    assert all(torch.isfinite(t) for t in handle.thresholds().values())


def test_hf_model_trains_gated():
    model, handle, batches = _setup(make=make_hf_vit)
    _train(model, handle, batches, steps=10)
    assert trpts.token_gate_stats(model) and handle.thresholds()


# ---- lifecycle and checkpoints ------------------------------------------------------------


def test_merge_is_refused_and_unload_restores_exactly():
    model, handle, batches = _setup()
    x = batches[0][0]
    want = make_timm_vit().eval()(x)
    _train(model, handle, batches, steps=5)
    model.eval()
    trained = model(x)
    with handle.disable_adapter():  # the change is values - pretrained: zero inside
        assert torch.equal(model(x), want)
    assert torch.equal(model(x), trained)
    with pytest.raises(trpts.TrptsRuntimeError, match="cannot be merged"):
        handle.merge_and_unload()
    assert handle.active and _gated_modules(model)
    handle.unload()
    assert not _gated_modules(model) and not any("trpts" in k for k in model.state_dict())
    assert torch.equal(model.eval()(x), want)


def test_state_dict_holds_the_raw_change_and_thresholds_and_resumes_exactly():
    model, handle, batches = _setup()
    _train(model, handle, batches, steps=10)
    state = model.state_dict()
    assert {k for k in state if "trpts" in k} >= {f"blocks.0.attn.qkv.{k}" for k in (VALUES, GATE, SCALE)}
    other, _, _ = _setup()
    other.load_state_dict(state)
    x = batches[0][0]
    assert torch.equal(other.eval()(x), model.eval()(x))


# ---- deltas -------------------------------------------------------------------------------


def test_delta_round_trip_is_exact_and_switches(tmp_path):
    model, handle, batches = _setup()
    _train(model, handle, batches, steps=20)
    x = batches[0][0]
    want = model.eval()(x)
    path = trpts.save_delta(model, tmp_path / "gated.safetensors")
    meta, tensors = read_delta(path)
    assert meta["format_version"] == 3 and meta["gate"]["skip"] == 0.5
    assert sorted(meta["gate"]["matrices"]) == sorted(handle.thresholds())
    for n, tau in handle.thresholds().items():
        assert torch.equal(tensors[f"threshold:{n}"], tau)
    backbone = make_timm_vit().eval()
    plain = backbone(x)
    trpts.load_delta(backbone, path, name="a")
    assert torch.equal(backbone(x), want)
    stats = trpts.token_gate_stats(backbone)
    assert stats and all(0 <= v <= 1 for v in stats.values())
    trpts.load_delta(backbone, path, name="b")  # a second gated task over the first one's gates
    assert torch.equal(backbone(x), want)
    trpts.activate_delta(backbone, None)
    assert torch.equal(backbone(x), plain) and trpts.token_gate_stats(backbone) == {}
    trpts.activate_delta(backbone, "a")
    assert torch.equal(backbone(x), want)
    with pytest.raises(ValueError, match="token-gated"):
        trpts.forward_tasks(backbone, x, ["a"] * len(x))
    with pytest.raises(ValueError, match="token-gated"):
        trpts.merge_delta(backbone, path)
    assert torch.equal(backbone(x), want) and trpts.loaded_deltas(backbone) == ["a", "b"]
    with pytest.raises(RuntimeError, match="token-gated"):
        trpts.apply_masks(backbone, handle.selection, storage="sparse")
    assert trpts.get_mask_handle(backbone) is None and torch.equal(backbone(x), want)


def test_ungated_deltas_have_no_gate_and_format_2_files_still_load(tmp_path):
    model = make_timm_vit()
    batches = make_batches()
    selection = trpts.allocate_connections(trpts.compute_fisher(model, batches, progress=False), budget=0.05)
    handle = trpts.apply_masks(model, selection, storage="sparse")
    _train(model, handle, batches, steps=3)
    x = batches[0][0]
    want = model.eval()(x)
    meta, tensors = read_delta(trpts.save_delta(model, tmp_path / "plain.safetensors"))
    assert meta["format_version"] == 3 and meta["gate"] is None
    _write_version(tmp_path / "v2.safetensors", {k: v for k, v in meta.items() if k != "gate"}, tensors, 2)
    assert read_delta(tmp_path / "v2.safetensors")[0]["format_version"] == 2
    backbone = make_timm_vit().eval()
    trpts.load_delta(backbone, tmp_path / "v2.safetensors")
    assert torch.equal(backbone(x), want)


def _write_version(path, meta, tensors, version):
    """A delta file claiming format ``version`` (write_delta_file always writes the current one)."""
    from safetensors.torch import save_file

    text = json.dumps(dict(meta, format_version=version), separators=(",", ":"))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"format": FORMAT_NAME, "trpts": text, "checksum": checksum(text, tensors)})
    return path


def _rewrite(tmp_path, change):
    model, handle, batches = _setup()
    _train(model, handle, batches, steps=3)
    meta, tensors = read_delta(trpts.save_delta(model, tmp_path / "g.safetensors"))
    version = change(meta, tensors) or 3
    return _write_version(tmp_path / "bad.safetensors", meta, tensors, version)


@pytest.mark.parametrize("problem", ["v2 with a gate", "negative", "unknown matrix", "missing tensor", "not float32"])
def test_malformed_gates_are_refused(tmp_path, problem):
    def change(meta, tensors):
        name = meta["gate"]["matrices"][0]
        if problem == "v2 with a gate":
            return 2
        if problem == "negative":
            tensors[f"threshold:{name}"] = torch.tensor(-1.0)
        elif problem == "unknown matrix":
            meta["gate"]["matrices"].append("nope.weight")
        elif problem == "missing tensor":
            del tensors[f"threshold:{name}"]
        else:
            tensors[f"threshold:{name}"] = tensors[f"threshold:{name}"].double()

    path = _rewrite(tmp_path, change)
    with pytest.raises(trpts.DeltaFormatError):
        read_delta(path)


def test_a_gated_delta_needs_plain_linears_where_it_gates(tmp_path):
    model, _handle, _batches = _setup()
    path = trpts.save_delta(model, tmp_path / "g.safetensors")
    backbone = make_timm_vit().eval()
    module = backbone.blocks[0].attn.qkv
    module.forward = lambda x: F.linear(x, module.weight, module.bias)  # someone else's patch
    with pytest.raises(TypeError, match="patched forward"):
        trpts.load_delta(backbone, path)
    assert trpts.loaded_deltas(backbone) == []


def test_cli_info_shows_thresholds(tmp_path, capsys):
    from trpts.cli import main

    model, handle, batches = _setup()
    _train(model, handle, batches, steps=3)
    path = trpts.save_delta(model, tmp_path / "g.safetensors")
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "token gate      " in out and "threshold" in out and f"target skip {0.5:g}" in out




def test_torch_compile_runs_the_gate_eagerly_and_matches():
    results = []
    for compiled in (False, True):
        model, handle, batches = _setup()
        run = torch.compile(model) if compiled else model
        opt = torch.optim.SGD(handle.parameters(), lr=0.1)
        for x, y in batches[:2]:
            loss = F.cross_entropy(run(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        results.append((run.eval()(batches[0][0]).detach(), handle.thresholds(), trpts.token_gate_stats(model)))
    (out, tau, stats), (out_c, tau_c, stats_c) = results
    assert torch.allclose(out, out_c, atol=1e-5) and stats == stats_c
    assert all(torch.allclose(tau[n], tau_c[n], atol=1e-6) for n in tau)
