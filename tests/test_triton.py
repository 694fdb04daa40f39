"""The Triton sparse-gradient kernel, run by Triton's interpreter (TRITON_INTERPRET=1) on the
CPU: the same kernel source a GPU compiles, checked against float64 dense dY^T X."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batches, make_timm_vit
from hypothesis import given, settings
from hypothesis import strategies as st

import trpts
import trpts._triton as tr
import trpts.sparse as sp

pytest.importorskip("triton")


@pytest.fixture(scope="module", autouse=True)
def interpret():
    """Every test here runs the kernel in Triton's interpreter unless it unsets the variable."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def _strided(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` [T, n], stored row-major, column-major or with gaps."""
    if layout == "transposed":  # column-major: stride (1, T)
        return t.t().contiguous().t()
    if layout == "gaps":  # every other column of a wider tensor: stride (2n + 2, 2)
        wide = torch.zeros(t.shape[0], 2 * t.shape[1] + 2, dtype=t.dtype)
        wide[:, 1:-1:2] = t
        return wide[:, 1:-1:2]
    return t


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@settings(max_examples=30, deadline=None)
@given(tokens=st.sampled_from([1, 2, 31, 32, 33, 64, 65, 97]), rows=st.integers(1, 40), fan_in=st.integers(1, 24),
       dtype=st.sampled_from(sorted(DTYPES)), x_layout=st.sampled_from(["row", "transposed", "gaps"]),
       dy_layout=st.sampled_from(["row", "transposed", "gaps"]), index_dtype=st.sampled_from([torch.int32, torch.int64]),
       seed=st.integers(0, 99), data=st.data())
def test_triton_kernel_equals_float64_dense_at_selected_entries(tokens, rows, fan_in, dtype, x_layout,
                                                                 dy_layout, index_dtype, seed, data):
    """Token counts around the 32-token tile, rows around the 16-row tile, C = 1 .. fan-in,
    any strides, bf16 / fp16 / fp32 inputs: float32 accumulation of the dense result."""
    conns = data.draw(st.integers(1, fan_in))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, fan_in, generator=g).to(DTYPES[dtype])
    dy = torch.randn(tokens, rows, generator=g).to(DTYPES[dtype])
    index = torch.stack([torch.randperm(fan_in, generator=g)[:conns] for _ in range(rows)])
    dense = (dy.double().t() @ x.double()).gather(1, index)  # of the rounded inputs: only the sum's error remains
    got = tr.triton_sddmm(_strided(x, x_layout), _strided(dy, dy_layout), index.to(index_dtype))
    assert got.dtype == torch.float32 and got.shape == (rows, conns)
    bound = (dy.double().abs().t() @ x.double().abs()).gather(1, index)
    assert ((got.double() - dense).abs() <= 1e-6 * bound + 1e-6).all()
    assert torch.equal(tr.triton_sddmm(_strided(x, x_layout), _strided(dy, dy_layout), index.to(index_dtype)), got)


@pytest.mark.parametrize("target", [1, 3, 1000])
def test_token_splits_are_summed_to_the_same_result(monkeypatch, target):
    """Splitting the tokens over more programs (few rows, many tokens) changes only the order
    of float32 additions; each configuration is deterministic."""
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(200, 12, generator=g), torch.randn(200, 5, generator=g)
    index = torch.stack([torch.randperm(12, generator=g)[:3] for _ in range(5)])
    monkeypatch.setattr(tr, "_TARGET_PROGRAMS", target)
    splits = tr.launch_config(200, 5, 3)[3]
    assert splits == min(7, target)  # 7 tiles of 32 tokens
    got = tr.triton_sddmm(x, dy, index)
    torch.testing.assert_close(got.double(), (dy.double().t() @ x.double()).gather(1, index), rtol=1e-5, atol=1e-5)
    assert torch.equal(tr.triton_sddmm(x, dy, index), got)


def test_empty_inputs():
    assert torch.equal(tr.triton_sddmm(torch.randn(0, 4), torch.randn(0, 3), torch.zeros(3, 2, dtype=torch.long)),
                       torch.zeros(3, 2))
    assert tr.triton_sddmm(torch.randn(5, 4), torch.randn(5, 3), torch.zeros(3, 0, dtype=torch.long)).shape == (3, 0)


def test_cpu_tensors_without_the_interpreter_get_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    sp.set_sparse_kernel("triton")
    try:
        with pytest.raises(tr.TritonKernelUnavailable, match=r"CUDA tensors .* or TRITON_INTERPRET=1"):
            sp.sparse_weight_grad(torch.randn(3, 4), torch.randn(3, 2), torch.tensor([[0], [3]]))
    finally:
        sp.set_sparse_kernel("auto")
    assert isinstance(tr.TritonKernelUnavailable("x"), RuntimeError)


def test_auto_keeps_the_native_kernel_on_the_cpu(monkeypatch):
    """'auto' never picks the (slow) interpreter for CPU tensors."""
    def no_triton(*args):
        raise AssertionError("the Triton kernel ran for CPU tensors under 'auto'")

    monkeypatch.setattr(sp, "triton_sddmm", no_triton)
    x, dy, index = torch.randn(9, 6), torch.randn(9, 4), torch.tensor([[0, 1], [2, 3], [4, 5], [1, 3]])
    torch.testing.assert_close(sp.sparse_weight_grad(x, dy, index), (dy.t() @ x).gather(1, index),
                               rtol=1e-5, atol=1e-5)


def test_sparse_storage_trains_like_hooks_with_the_triton_kernel():
    """The whole sparse path with the Triton kernel (interpreted): the hook mode's trajectory,
    frozen entries bit-identical, no dense weight gradient."""
    hooks_model = make_timm_vit(depth=2)
    data = make_batches(2, 4)
    selection = trpts.allocate_connections(trpts.compute_fisher(hooks_model, data, progress=False), budget=0.05,
                                           model=hooks_model)
    sparse_model = copy.deepcopy(hooks_model)
    before = copy.deepcopy(hooks_model.state_dict())
    h1 = trpts.apply_masks(hooks_model, selection)
    h2 = trpts.apply_masks(sparse_model, selection, storage="sparse")
    sp.set_sparse_kernel("triton")
    try:
        for model, handle in ((hooks_model, h1), (sparse_model, h2)):
            optimizer = torch.optim.AdamW(handle.param_groups(lr=1e-2))
            for xb, yb in data:
                optimizer.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                optimizer.step()
    finally:
        sp.set_sparse_kernel("auto")
    for name in h2.masked:
        torch.testing.assert_close(h2.selected_values(name), h1.selected_values(name), rtol=1e-4, atol=1e-6)
        assert sparse_model.get_parameter(name).grad is None
    merged = h2.merge_and_unload()
    for name in selection:
        frozen = torch.ones(before[name].numel(), dtype=torch.bool)
        frozen[selection.flat_indices(name)] = False
        assert torch.equal(merged.state_dict()[name].view(-1)[frozen], before[name].view(-1)[frozen]), name


def test_interpreter_chosen_after_triton_was_imported_gets_a_clear_error():
    """TRITON_INTERPRET=1 set once triton is imported cannot take effect: say so, not crash."""
    import os
    import subprocess
    import sys

    script = ("import os, torch, triton\n"
              "os.environ['TRITON_INTERPRET'] = '1'\n"
              "import trpts._triton as tr\n"
              "try:\n"
              "    tr.triton_sddmm(torch.ones(2, 3), torch.ones(2, 2), torch.zeros(2, 1, dtype=torch.long))\n"
              "except tr.TritonKernelUnavailable as err:\n"
              "    print(err)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "set after triton was imported" in done.stdout and "before the first import" in done.stdout


def test_whole_sparse_path_with_the_triton_kernel_in_bf16(tmp_path):
    """bf16 autocast, gradient accumulation, deltas: the CUDA test's checks, interpreted."""
    from sparse_checks import check_whole_sparse_path

    sp.set_sparse_kernel("triton")
    try:
        check_whole_sparse_path(torch.device("cpu"), tmp_path, compile_too=False, depth=2)
    finally:
        sp.set_sparse_kernel("auto")
