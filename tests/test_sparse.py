"""Sparse storage (apply_masks(storage="sparse")): compact trainable vectors, sparse weight
gradients, the same training trajectory as the hook mode."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import IMG, MODEL_FACTORIES, make_batches, make_hf_vit, make_timm_vit
from family_checks import record
from hypothesis import given
from hypothesis import strategies as st

import trpts
import trpts.sparse as sp
from trpts.sparse import sparse_weight_grad


def _selection(model, budget=0.05):
    fisher = trpts.compute_fisher(model, make_batches(2), progress=False)
    return trpts.allocate_connections(fisher, budget=budget, model=model)


def _train(model, handle, batches, opt="adamw", autocast=False):
    if opt == "adamw":
        optimizer = torch.optim.AdamW(handle.param_groups(weight_decay=0.05, lr=1e-2))
    else:
        optimizer = torch.optim.SGD(handle.param_groups(weight_decay=0.01, lr=0.1, momentum=0.9, nesterov=True))
    model.train()
    for x, y in batches:
        optimizer.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(_logits(model, x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(handle.parameters(), 1.0)
        optimizer.step()
    return optimizer


def _logits(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("kernel", ["eager", "compiled", "native"])
@given(tokens=st.integers(1, 40), rows=st.integers(1, 12), fan_in=st.integers(1, 20), seed=st.integers(0, 99),
       data=st.data())
def test_sparse_weight_grad_equals_dense_gradient_at_selected_entries(kernel, tokens, rows, fan_in, seed, data):
    conns = data.draw(st.integers(1, fan_in))
    g = torch.Generator().manual_seed(seed)
    x, dy = torch.randn(tokens, fan_in, generator=g), torch.randn(tokens, rows, generator=g)
    index = torch.stack([torch.randperm(fan_in, generator=g)[:conns].sort().values for _ in range(rows)])
    dense = (dy.double().t() @ x.double()).gather(1, index)
    sp.set_sparse_kernel(kernel)
    try:
        got = sparse_weight_grad(x, dy, index)
    finally:
        sp.set_sparse_kernel("auto")
    torch.testing.assert_close(got.double(), dense, rtol=1e-5, atol=1e-5)


def test_row_blocks_give_the_same_result(monkeypatch):
    sp.set_sparse_kernel("eager")
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(50, 30, generator=g), torch.randn(50, 20, generator=g)
    index = torch.stack([torch.randperm(30, generator=g)[:4].sort().values for _ in range(20)])
    whole = sparse_weight_grad(x, dy, index)
    monkeypatch.setattr(sp, "_CHUNK_ELEMENTS", 50 * 4 * 3)  # 3 rows per block
    assert torch.equal(sparse_weight_grad(x, dy, index), whole)
    sp.set_sparse_kernel("auto")


@given(tokens=st.integers(0, 200), rows=st.integers(1, 40), fan_in=st.integers(1, 70), threads=st.integers(1, 3),
       seed=st.integers(0, 99), data=st.data())
def test_native_kernel_tiles_threads_and_strides(tokens, rows, fan_in, threads, seed, data):
    """Token counts around the 64-token tile, 1-3 threads, strided rows: always the dense result."""
    from trpts._native import native_sddmm

    conns = data.draw(st.integers(0, fan_in))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, fan_in + 3, generator=g)[:, 3:]  # row stride != fan_in
    dy = torch.randn(tokens, rows, generator=g)
    index = torch.stack([torch.randperm(fan_in, generator=g)[:conns] for _ in range(rows)])
    dense = (dy.double().t() @ x.double()).gather(1, index)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = native_sddmm(x, dy, index)
        again = native_sddmm(x, dy, index)
    finally:
        torch.set_num_threads(before)
    assert got.dtype == torch.float32 and got.shape == (rows, conns)
    assert torch.equal(got, again)  # deterministic for a given thread count
    torch.testing.assert_close(got.double(), dense, rtol=1e-5, atol=1e-5)


def test_native_kernel_rejects_out_of_range_index():
    from trpts._native import native_sddmm

    with pytest.raises(trpts.TrptsError, match=r"outside \[0, 4\)"):
        native_sddmm(torch.randn(3, 4), torch.randn(3, 2), torch.tensor([[0, 4], [1, 2]]))


def test_auto_falls_back_with_a_warning_when_no_compiler(monkeypatch, tmp_path):
    """No C compiler: 'native' raises a clear error, 'auto' warns once and still computes."""
    import trpts._native as nat

    monkeypatch.setattr(nat, "_lib", None)
    monkeypatch.setattr(nat, "_error", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing cached there
    monkeypatch.setenv("TRPTS_CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(sp, "_broken", set())
    x, dy, index = torch.randn(9, 6), torch.randn(9, 4), torch.tensor([[0, 1], [2, 3], [4, 5], [1, 3]])
    dense = (dy.t() @ x).gather(1, index)
    sp.set_sparse_kernel("native")
    try:
        with pytest.raises(nat.NativeKernelUnavailable, match="no-such-cc"):
            sparse_weight_grad(x, dy, index)
        sp.set_sparse_kernel("auto")
        with pytest.warns(trpts.TrptsWarning, match="native sparse-gradient kernel is unavailable"):
            got = sparse_weight_grad(x, dy, index)
        torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)
        assert "native" in sp._broken
    finally:
        sp.set_sparse_kernel("auto")
    assert not list(tmp_path.rglob("*.so"))


def test_native_kernel_is_cached_per_source(monkeypatch, tmp_path):
    """Built once into the cache directory (atomically), then reused without compiling."""
    import trpts._native as nat

    monkeypatch.setattr(nat, "_lib", None)
    monkeypatch.setattr(nat, "_error", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    nat._load()
    built = sorted(p.name for p in (tmp_path / "trpts" / "kernels").iterdir())
    assert len([n for n in built if n.endswith(".so")]) == 1 and not [n for n in built if n.endswith(".tmp")]
    monkeypatch.setattr(nat, "_lib", None)

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(nat.subprocess, "run", no_compiling)
    nat._load()
    assert sorted(p.name for p in (tmp_path / "trpts" / "kernels").iterdir()) == built


def test_bad_kernel_name():
    with pytest.raises(ValueError, match="'auto', 'native', 'triton', 'compiled' or 'eager'"):
        sp.set_sparse_kernel("cuda")


# Run in a fresh interpreter: TRPTS_SPARSE_KERNEL is read when trpts is imported.
_KERNEL_ENV_SCRIPT = """
import json, torch
import trpts, trpts.sparse as sp
from trpts._native import NativeKernelUnavailable
x, dy, index = torch.randn(9, 6), torch.randn(9, 4), torch.tensor([[0, 1], [2, 3], [4, 5], [1, 3]])
dense = (dy.t() @ x).gather(1, index)
out = {}
def attempt(key, fn):
    try:
        out[key] = ["ok", fn()]
    except Exception as err:
        out[key] = [type(err).__name__, str(err), isinstance(err, trpts.TrptsValueError)]
attempt("grad", lambda: torch.allclose(sp.sparse_weight_grad(x, dy, index), dense, atol=1e-5))
attempt("query", sp.get_sparse_kernel)
sp.set_sparse_kernel("eager")
attempt("after_set", sp.get_sparse_kernel)
attempt("grad_after_set", lambda: torch.allclose(sp.sparse_weight_grad(x, dy, index), dense, atol=1e-5))
print(json.dumps(out))
"""


def _run_with_kernel_env(value: str, tmp_path) -> dict:
    env = dict(os.environ, TRPTS_SPARSE_KERNEL=value, XDG_CACHE_HOME=str(tmp_path),
               TRPTS_CC=str(tmp_path / "no-such-cc"))  # no cached or buildable native kernel
    done = subprocess.run([sys.executable, "-c", _KERNEL_ENV_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr  # importing trpts never fails on the variable
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_bad_kernel_env_fails_at_first_use_not_at_import(tmp_path):
    """A typo in TRPTS_SPARSE_KERNEL: import works, the first kernel choice names the variable,
    and set_sparse_kernel overrides it."""
    out = _run_with_kernel_env("bogus", tmp_path)
    for key in ("grad", "query"):
        kind, message, is_value_error = out[key]
        assert kind == "TrptsValueError" and is_value_error, out
        for part in ("TRPTS_SPARSE_KERNEL", "'bogus'", "'auto'", "'native'", "'triton'", "'compiled'", "'eager'", "unset"):
            assert part in message, (part, message)
    assert out["after_set"] == ["ok", "eager"]
    assert out["grad_after_set"] == ["ok", True]


@pytest.mark.parametrize("value", ["native", "eager"])
def test_valid_kernel_env_is_honoured(value, tmp_path):
    out = _run_with_kernel_env(value, tmp_path)
    assert out["query"] == ["ok", value]
    if value == "native":  # honoured as 'native': no compiler is an error, not the 'auto' fallback
        assert out["grad"][0] == "NativeKernelUnavailable" and "no-such-cc" in out["grad"][1], out
    else:
        assert out["grad"] == ["ok", True]
    assert out["grad_after_set"] == ["ok", True]


@pytest.mark.parametrize("family", sorted(MODEL_FACTORIES))
@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_same_trajectory_as_hook_mode(family, opt):
    hooks_model = MODEL_FACTORIES[family]()
    selection = _selection(hooks_model)
    sparse_model = copy.deepcopy(hooks_model)
    pretrained = {n: p.detach().clone() for n, p in hooks_model.named_parameters()}
    h1 = trpts.apply_masks(hooks_model, selection)
    h2 = trpts.apply_masks(sparse_model, selection, storage="sparse")
    assert isinstance(h2, trpts.SparseMaskHandle) and h2.storage == "sparse"
    batches = make_batches(4, 4, seed=5)
    _train(hooks_model, h1, batches, opt)
    _train(sparse_model, h2, batches, opt)
    # Only the selected entries of a weight are ever written (with the values, at each forward).
    for name in h2.masked:
        frozen = ~selection[name]
        w = sparse_model.get_parameter(name).detach()
        assert torch.equal(w[frozen], pretrained[name][frozen]), name
        # Only the summation order of the selected entries' gradients differs (dense GEMM vs
        # gathered row sums): float32 rounding, amplified a little by Adam's normalization.
        torch.testing.assert_close(h2.selected_values(name), h1.selected_values(name), rtol=1e-4, atol=1e-5)
    for name in h1.full:
        torch.testing.assert_close(sparse_model.get_parameter(name), hooks_model.get_parameter(name),
                                   rtol=1e-4, atol=1e-5)
    x = batches[0][0]
    sparse_model.eval(), hooks_model.eval()
    torch.testing.assert_close(_logits(sparse_model, x), _logits(hooks_model, x), rtol=1e-4, atol=1e-4)
    h2.merge_and_unload()
    for name in h2.masked:  # merged: frozen entries bit-identical, selected entries trained
        frozen = ~selection[name]
        w = sparse_model.get_parameter(name).detach()
        assert torch.equal(w[frozen], pretrained[name][frozen]), name
        assert not torch.equal(w[~frozen], pretrained[name][~frozen]), name
    assert set(dict(sparse_model.named_parameters())) == set(pretrained)


def test_memory_no_dense_grad_and_optimizer_state_is_o_k():
    model = make_timm_vit()
    selection = _selection(model)
    handle = trpts.apply_masks(model, selection, storage="sparse")
    optimizer = _train(model, handle, make_batches(2, 4, seed=3))
    for name in handle.masked:
        w = model.get_parameter(name)
        assert w.grad is None and not w.requires_grad and w not in optimizer.state
        assert handle.values[name].shape == (selection.matrices[name].count,)
        assert handle.values[name].grad is not None
    state_values = sum(t.numel() for s in optimizer.state.values() for t in s.values() if t.ndim > 0)
    assert state_values == 2 * handle.num_trainable  # Adam: exp_avg + exp_avg_sq, nothing dense
    assert handle.num_trainable < 0.2 * handle.num_total
    assert handle.num_total == sum(p.numel() for p in make_timm_vit().parameters())


def test_state_dict_is_the_plain_models_and_loading_refreshes_values():
    model = make_timm_vit()
    selection = _selection(model)
    plain_keys = list(model.state_dict())
    handle = trpts.apply_masks(model, selection, storage="sparse")
    _train(model, handle, make_batches(2, 4, seed=3))
    sd = model.state_dict()
    assert list(sd) == plain_keys
    x = make_batches(1)[0][0]
    model.eval()
    expected = model(x)
    fresh = make_timm_vit()
    fresh.load_state_dict(sd)  # a plain model loads it and predicts the same
    torch.testing.assert_close(fresh.eval()(x), expected, rtol=0, atol=0)
    # Loading a plain checkpoint into the sparse model refreshes the values (strict).
    other = make_timm_vit(depth=2)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(model(x), other.eval()(x), rtol=1e-5, atol=1e-5)
    handle.merge_and_unload()


def test_delta_round_trip_from_sparse_storage(tmp_path):
    model = make_timm_vit()
    selection = _selection(model)
    handle = trpts.apply_masks(model, selection, storage="sparse")
    _train(model, handle, make_batches(3, 4, seed=3))
    path = trpts.save_delta(model, tmp_path / "task.safetensors")
    x = make_batches(1)[0][0]
    model.eval()
    expected = model(x)
    backbone = make_timm_vit()
    trpts.load_delta(backbone, path)
    assert torch.equal(backbone.eval()(x), expected)


def test_gradient_accumulation_matches_one_big_batch():
    torch.manual_seed(0)
    model = make_timm_vit(drop_rate=0.0)
    selection = _selection(model)
    handle = trpts.apply_masks(model, selection, storage="sparse")
    (x, y), = make_batches(1, 8, seed=4)
    model.eval()
    F.cross_entropy(model(x), y).backward()
    whole = {n: v.grad.clone() for n, v in handle.values.items()}
    for v in handle.parameters():
        v.grad = None
    for i in (0, 4):
        (F.cross_entropy(model(x[i:i + 4]), y[i:i + 4]) / 2).backward()
    for n, v in handle.values.items():
        torch.testing.assert_close(v.grad, whole[n], rtol=1e-4, atol=1e-6)


def test_bf16_autocast_gradients_close_to_hook_mode_and_frozen_exact():
    hooks_model = make_timm_vit()
    selection = _selection(hooks_model)
    sparse_model = copy.deepcopy(hooks_model)
    pretrained = {n: p.detach().clone() for n, p in hooks_model.named_parameters()}
    trpts.apply_masks(hooks_model, selection)
    h2 = trpts.apply_masks(sparse_model, selection, storage="sparse")
    (x, y), = make_batches(1, 8, seed=6)
    for model in (hooks_model, sparse_model):
        with torch.autocast("cpu", torch.bfloat16):
            F.cross_entropy(model(x), y).backward()
    for name in h2.masked:
        info = selection.matrices[name]
        dense = hooks_model.get_parameter(name).grad.reshape(info.rows, info.fan_in)
        expected = dense.gather(1, selection.indices(name))
        got = h2.values[name].grad.view(info.rows, info.connections)
        assert got.dtype == torch.float32
        # the hook mode's weight gradient is a bf16 GEMM (rounded to bf16); ours sums in fp32
        torch.testing.assert_close(got, expected, rtol=2e-2, atol=1e-2 * float(expected.abs().max()))
    _train(sparse_model, h2, make_batches(2, 4, seed=6), autocast=True)
    for name in h2.masked:
        frozen = ~selection[name]
        assert torch.equal(sparse_model.get_parameter(name).detach()[frozen], pretrained[name][frozen])


@pytest.mark.parametrize("make", [make_timm_vit, make_hf_vit], ids=["timm", "hf"])
def test_torch_compile_matches_eager(make):
    """Sparse storage and token selection compile as one graph (``fullgraph=True``: no graph
    break, so no host synchronization either; what CUDA graphs need) and train as in eager."""
    eager = make()
    selection = _selection(eager)
    compiled_src = copy.deepcopy(eager)
    h1 = trpts.apply_masks(eager, selection, storage="sparse")
    h2 = trpts.apply_masks(compiled_src, selection, storage="sparse")
    for m in (eager, compiled_src):
        trpts.wrap_vit(m, selection, rho=0.5, layers=[0, 1])
    compiled = torch.compile(compiled_src, backend="aot_eager", fullgraph=True)
    batches = make_batches(2, 4, seed=7)
    _train(eager, h1, batches)
    _train(compiled, h2, batches)
    for name in h1.values:
        torch.testing.assert_close(h2.values[name], h1.values[name], rtol=1e-5, atol=1e-6)
    record(eager, "torch.compile")


def test_with_token_selection():
    model = make_timm_vit()
    selection = _selection(model)
    reference = copy.deepcopy(model)
    handle = trpts.apply_masks(model, selection, storage="sparse")
    trpts.wrap_vit(model, selection, rho=1.0, num_layers=1)
    x = make_batches(1)[0][0]
    assert torch.equal(model.eval()(x), reference.eval()(x))  # rho=1 and untrained values: exact
    trpts.unwrap_vit(model)
    trpts.wrap_vit(model, selection, rho=0.5, num_layers=1)
    _train(model, handle, make_batches(2, 4, seed=8))
    assert all(v.grad is not None for v in handle.values.values())


def test_hf_dict_batches_and_remove_restores_modules():
    model = make_hf_vit()
    selection = _selection(model)
    handle = trpts.apply_masks(model, selection, storage="sparse")
    modules = {n: model.get_submodule(n.rsplit(".", 1)[0]) for n in handle.masked}
    assert all("forward" in vars(m) for m in modules.values())
    x, y = make_batches(1)[0]
    optimizer = torch.optim.AdamW(handle.param_groups(lr=1e-2))
    model(pixel_values=x, labels=y).loss.backward()
    optimizer.step()
    handle.merge_and_unload()
    handle.merge_and_unload()  # idempotent
    for m in modules.values():
        assert "forward" not in vars(m) and not hasattr(m, "trpts_values") and not hasattr(m, "trpts_index")
    assert all(p.requires_grad for p in model.parameters())
    assert trpts.get_mask_handle(model) is None


def test_bad_storage_and_unsupported_module_leave_model_untouched():
    model = make_timm_vit()
    selection = _selection(model)
    with pytest.raises(ValueError, match="storage must be 'hooks' or 'sparse'"):
        trpts.apply_masks(model, selection, storage="dense")
    conv = model.patch_embed.proj
    conv.padding = (1, 1)  # no longer a non-overlapping patch embedding
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(TypeError, match="storage='hooks'"):
        trpts.apply_masks(model, selection, storage="sparse")
    assert [p.requires_grad for p in model.parameters()] == flags
    assert "forward" not in vars(conv) and trpts.get_mask_handle(model) is None
    assert all("forward" not in vars(m) for m in model.modules())


def _saved_storages(model, autocast=False):
    """Storages autograd keeps for backward after one forward (parameters and buffers
    excluded): ``{data_ptr: (nbytes, dtype, shape)}``, each storage once however often it is
    saved. Read from the graph (``_saved_*`` of built-in nodes, ``saved_tensors`` of custom
    functions), not through saved-tensor hooks, under which sparse storage saves its inputs."""
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    found = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in params:
            found[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), t.dtype, tuple(t.shape))
        elif isinstance(t, (tuple, list)):
            for item in t:
                add(item)

    x, y = make_batches(1, 4)[0]
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        loss = F.cross_entropy(_logits(model, x), y)
    stack, seen = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        if hasattr(node, "saved_tensors") and not hasattr(node, "variable"):  # custom Function
            add(node.saved_tensors)
        for attr in dir(node):
            if attr.startswith("_saved_"):
                add(getattr(node, attr))
        stack.extend(fn for fn, _ in node.next_functions)
    loss.backward()
    return found


def _hooks_and_sparse(family="timm"):
    hooks_model = MODEL_FACTORIES[family]()
    selection = _selection(hooks_model)
    sparse_model = copy.deepcopy(hooks_model)
    trpts.apply_masks(hooks_model, selection)
    trpts.apply_masks(sparse_model, selection, storage="sparse")
    return hooks_model, sparse_model


@pytest.mark.parametrize("family", ["timm", "hf"])
def test_inputs_autograd_already_keeps_are_recomputed_not_saved(family):
    """The inputs of qkv and fc1 (LayerNorm outputs) and of fc2 (GELU output) are rebuilt in
    backward from what LayerNorm and GELU save anyway: hook mode saves exactly those bytes more."""
    hooks_model, sparse_model = _hooks_and_sparse(family)
    hooks, sparse = _saved_storages(hooks_model), _saved_storages(sparse_model)
    tokens = 4 * ((IMG // 4) ** 2 + 1)  # batch 4, 16 patches + [CLS]
    dim, hidden, depth = 32, 64, 2
    per_block = (2 * tokens * dim + tokens * hidden) * 4  # float32 LN outputs (qkv, fc1) + GELU output (fc2)
    assert sum(b for b, _, _ in hooks.values()) - sum(b for b, _, _ in sparse.values()) == depth * per_block


def test_autocast_saves_activations_in_low_precision_like_hook_mode():
    """Under autocast PyTorch's linear saves the bf16 copy of its input; sparse storage must not
    keep float32 activations hook mode does not keep (that would double their memory)."""
    hooks_model, sparse_model = _hooks_and_sparse()
    hooks = _saved_storages(hooks_model, autocast=True)
    sparse = _saved_storages(sparse_model, autocast=True)

    def float32(found):
        return sorted(shape for _, dtype, shape in found.values() if dtype == torch.float32)

    assert float32(sparse) == float32(hooks)
    assert sum(b for b, _, _ in sparse.values()) < sum(b for b, _, _ in hooks.values())


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    """timm's activation checkpointing (saved-tensor hooks / re-entrant recomputation) with
    sparse storage: the inputs are then saved through the checkpoint, never looked up through
    grad_fn, and the gradients equal those of the plain run."""
    from timm.layers import set_reentrant_ckpt, use_reentrant_ckpt

    plain = make_timm_vit()
    selection = _selection(plain)
    ckpt = copy.deepcopy(plain)
    h1 = trpts.apply_masks(plain, selection, storage="sparse")
    h2 = trpts.apply_masks(ckpt, selection, storage="sparse")
    ckpt.set_grad_checkpointing(True)
    x, y = make_batches(1, 4)[0]
    x.requires_grad_(reentrant)  # re-entrant checkpointing needs an input that requires grad
    before = use_reentrant_ckpt()
    set_reentrant_ckpt(reentrant)
    try:
        for model in (plain, ckpt):
            model.train()
            F.cross_entropy(model(x), y).backward()
    finally:
        set_reentrant_ckpt(before)
    for a, b in zip(h1.parameters(), h2.parameters(), strict=True):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)


def test_in_place_weight_sync_semantics():
    """Values are written into W's selected entries at each forward: two forwards before one
    backward are fine, a backward after the values changed is refused (as for any parameter),
    inference mode works, and only selected entries ever change."""
    model = make_timm_vit()
    selection = _selection(model)
    pretrained = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = trpts.apply_masks(model, selection, storage="sparse")
    x, y = make_batches(1, 4)[0]
    loss = F.cross_entropy(model(x), y) + F.cross_entropy(model(x.flip(-1)), y)
    loss.backward()  # two graphs over the same weights, one backward
    assert all(v.grad is not None for v in handle.values.values())
    optimizer = torch.optim.SGD(handle.parameters(), lr=0.5)
    optimizer.step()
    state = model.state_dict()  # before the next forward: shows the new values
    for name, v in handle.values.items():
        info = selection.matrices[name]
        got = state[name].reshape(info.rows, -1).gather(1, selection.indices(name))
        assert torch.equal(got, v.detach().view(info.rows, -1)), name
    stale = F.cross_entropy(model(x), y)
    optimizer.step()  # values change between this forward and its backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.backward()
    with torch.inference_mode():
        out = model(x)
    assert out.shape == (4, 5)
    for name in handle.masked:
        frozen = ~selection[name]
        assert torch.equal(model.get_parameter(name).detach()[frozen], pretrained[name][frozen]), name
    final = {name: v.detach().clone() for name, v in handle.values.items()}
    handle.merge_and_unload()
    assert final
    for name, v in final.items():
        info = selection.matrices[name]
        w = model.get_parameter(name).detach().reshape(info.rows, -1)
        assert torch.equal(w.gather(1, selection.indices(name)), v.view(info.rows, -1)), name
