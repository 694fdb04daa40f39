"""CUDA checks; skipped where no GPU is present (CI never has one)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_batches, make_timm_vit

import trpts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("per_sample", [False, True])
def test_fisher_scores_on_the_cpu_for_a_cuda_model(per_sample):
    dev = torch.device("cuda")
    model = make_timm_vit(depth=2).to(dev)
    data = [(x.to(dev), y.to(dev)) for x, y in make_batches(3, 4)]
    kwargs = {"per_sample": per_sample, "progress": False}
    on_gpu = trpts.compute_fisher(model, data, **kwargs)
    on_cpu = trpts.compute_fisher(model, data, scores_device="cpu", **kwargs)
    assert all(v.device.type == "cpu" for v in on_cpu.values())
    for n, v in on_gpu.items():
        torch.testing.assert_close(on_cpu[n], v.cpu(), rtol=1e-6, atol=0)


def test_fisher_allocation_and_masks_on_cuda():
    dev = torch.device("cuda")
    model = make_timm_vit(depth=4).to(dev)
    data = [(x.to(dev), y.to(dev)) for x, y in make_batches(4, 8)]
    fisher = trpts.compute_fisher(model, data, progress=False)
    assert all(v.device.type == "cuda" and v.dtype == torch.float32 for v in fisher.values())
    selection = trpts.allocate_connections(fisher, budget=0.02, model=model)
    on_cpu = trpts.allocate_connections({k: v.cpu() for k, v in fisher.items()}, budget=0.02, model=model)
    assert selection == on_cpu  # same selection on any device

    handle = trpts.apply_masks(model, selection)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(handle.param_groups(weight_decay=0.05), lr=1e-3, fused=True)
    for x, y in data:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    for n, p in model.named_parameters():
        if n in selection:
            keep = selection[n].to(dev)
            assert torch.equal(p[~keep], before[n][~keep]), n
            assert bool((p[keep] != before[n][keep]).any()), n


def test_model_moved_to_cuda_after_apply_masks():
    model = make_timm_vit()
    selection = trpts.allocate_connections(trpts.compute_fisher(model, make_batches(), progress=False),
                                           budget=0.05)
    handle = trpts.apply_masks(model, selection)  # masks on the CPU
    model.cuda()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.Adam(handle.param_groups(), lr=1e-2)
    x, y = make_batches(1, 4)[0]
    F.cross_entropy(model(x.cuda()), y.cuda()).backward()
    optimizer.step()
    for n, p in model.named_parameters():
        if n in selection:
            keep = selection[n].cuda()
            assert torch.equal(p[~keep], before[n][~keep]), n


def test_per_sample_matches_batches_of_one_on_cuda():
    model = make_timm_vit().cuda()
    x, y = make_batches(1, 6)[0]
    x, y = x.cuda(), y.cuda()
    exact = trpts.compute_fisher(model, [(x, y)], per_sample=True, chunk_size=4, progress=False)
    ones = trpts.compute_fisher(model, [(x[i : i + 1], y[i : i + 1]) for i in range(6)], progress=False)
    for n in exact:
        torch.testing.assert_close(exact[n], ones[n], rtol=1e-3, atol=1e-9)


def test_token_selection_on_cuda_bf16():
    model = make_timm_vit(depth=3, init_values=0.1, reg_tokens=1).cuda().eval()
    x = make_batches(1, 4)[0][0].cuda()
    with torch.no_grad():
        dense = model(x)
        trpts.wrap_vit(model, rho=1.0, layers=[0, 1, 2])
        assert torch.equal(model(x), dense)
        trpts.unwrap_vit(model)
        trpts.wrap_vit(model, rho=0.5, layers=[0, 2])
        with torch.autocast("cuda", dtype=torch.bfloat16):
            a, b = model(x), model(x)
            alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
    assert torch.equal(a, b)  # deterministic selection on the GPU
    torch.testing.assert_close(alone, a, rtol=2e-2, atol=2e-2)


def test_deltas_on_cuda(tmp_path):
    import copy

    backbone = make_timm_vit(depth=3).cuda().eval()
    x = make_batches(1, 3)[0][0].cuda()

    def trained(seed, classes):
        model = copy.deepcopy(backbone)
        model.reset_classifier(classes)
        model.cuda()
        g = torch.Generator().manual_seed(seed)
        fisher = {n: torch.rand(p.shape, generator=g) for n, p in model.named_parameters()
                  if n in trpts.default_scored_parameters(model)}
        selection = trpts.allocate_connections(fisher, budget=0.1, model=model)
        trpts.wrap_vit(model, selection, rho=0.5, num_layers=1)
        handle = trpts.apply_masks(model, selection)
        optimizer = torch.optim.AdamW(handle.param_groups(weight_decay=0.01), lr=1e-2)
        for xb, _ in make_batches(2, 4, seed=seed):
            loss = F.cross_entropy(model(xb.cuda()), torch.randint(0, classes, (4,), generator=g).cuda())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return model.eval()

    tasks = {"a": trained(1, 4), "b": trained(2, 6)}
    model = copy.deepcopy(backbone)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = {}
    for name, t in tasks.items():
        trpts.load_delta(model, trpts.save_delta(t, tmp_path / f"{name}.safetensors"))
        with torch.no_grad():
            first[name] = model(x)
            assert torch.equal(first[name], t(x))
    for name in ("a", "b", None, "a"):
        trpts.activate_delta(model, name)
        if name is not None:
            with torch.no_grad():
                assert torch.equal(model(x), first[name])
    trpts.activate_delta(model, None)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # a delta made on the CPU loads onto a CUDA copy of the same backbone
    cpu_backbone = copy.deepcopy(backbone).cpu()
    cpu_task = copy.deepcopy(cpu_backbone)
    selection = trpts.allocate_connections({n: torch.rand(p.shape) for n, p in cpu_task.named_parameters()
                                            if n in trpts.default_scored_parameters(cpu_task)}, budget=0.1)
    handle = trpts.apply_masks(cpu_task, selection)
    with torch.no_grad():
        for n in selection:
            dict(cpu_task.named_parameters())[n].view(-1)[selection.flat_indices(n)] += 1.0
    trpts.load_delta(model, trpts.save_delta(cpu_task, tmp_path / "cpu.safetensors", handle=handle))
    params = dict(model.named_parameters())
    for n, p in cpu_task.named_parameters():
        assert torch.equal(params[n].cpu(), p.detach()), n


def test_sparse_storage_on_cuda_kernels_agree_and_trajectory_matches_hooks():
    import copy

    import trpts.sparse as sp

    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(300, 64, generator=g).to(dev), torch.randn(300, 48, generator=g).to(dev)
    index = torch.stack([torch.randperm(64, generator=g)[:5].sort().values for _ in range(48)]).to(dev)
    reference = (dy.double().t() @ x.double()).gather(1, index)
    results = {}
    for kind in ("auto", "triton", "compiled", "eager"):  # auto = triton, compiled = torch.compile's Triton
        sp.set_sparse_kernel(kind)
        results[kind] = sp.sparse_weight_grad(x, dy, index)
    sp.set_sparse_kernel("triton")
    bf16 = sp.sparse_weight_grad(x.bfloat16(), dy.t().contiguous().t().bfloat16(), index)  # strided, low precision
    again = sp.sparse_weight_grad(x.bfloat16(), dy.t().contiguous().t().bfloat16(), index)
    sp.set_sparse_kernel("auto")
    for got in results.values():
        torch.testing.assert_close(got.double(), reference, rtol=1e-5, atol=1e-4)
    assert torch.equal(results["auto"], results["triton"]) and torch.equal(bf16, again)
    rounded = (dy.bfloat16().double().t() @ x.bfloat16().double()).gather(1, index)
    torch.testing.assert_close(bf16.double(), rounded, rtol=1e-5, atol=1e-4)

    hooks_model = make_timm_vit(depth=4).to(dev)
    data = [(x.to(dev), y.to(dev)) for x, y in make_batches(4, 8)]
    selection = trpts.allocate_connections(trpts.compute_fisher(hooks_model, data, progress=False), budget=0.02)
    sparse_model = copy.deepcopy(hooks_model)
    h1 = trpts.apply_masks(hooks_model, selection)
    h2 = trpts.apply_masks(sparse_model, selection, storage="sparse")
    for model, handle in ((hooks_model, h1), (sparse_model, h2)):
        optimizer = torch.optim.AdamW(handle.param_groups(weight_decay=0.05, lr=1e-3))
        for xb, yb in data:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    for name in h2.masked:
        torch.testing.assert_close(h2.selected_values(name), h1.selected_values(name), rtol=1e-4, atol=1e-5)
        assert sparse_model.get_parameter(name).grad is None



def test_sparse_storage_whole_path_on_cuda_bf16(tmp_path):
    from sparse_checks import check_whole_sparse_path

    check_whole_sparse_path(torch.device("cuda"), tmp_path, compile_too=True)


def test_forward_tasks_on_cuda(tmp_path):
    """Mixed-task batches on the GPU in bf16 (both linear paths): every sample equals its task
    activated alone (activate_delta drops autocast's cached casts, so the references are fresh)."""
    import copy

    dev = torch.device("cuda")
    backbone = make_timm_vit(depth=2).to(dev).eval()
    params = dict(backbone.named_parameters())
    for i in range(3):
        model = copy.deepcopy(backbone)
        fisher = {n: torch.rand(params[n].shape, device=dev) for n in trpts.default_scored_parameters(model)}
        for f in fisher.values():  # t1 Fisher-like (few input columns): the W0 x + dW x path
            if i == 1 and f.ndim == 2:
                f[:, : max(2, f.shape[1] // 10)] += 1.0
        handle = trpts.apply_masks(model, trpts.allocate_connections(fisher, budget=0.05, model=model))
        with torch.no_grad():
            for p in handle.parameters():
                p.add_(0.05 * torch.randn_like(p))
        trpts.save_delta(model, tmp_path / f"t{i}.safetensors", name=f"t{i}")
    for i in range(3):
        trpts.load_delta(backbone, tmp_path / f"t{i}.safetensors")
    x = torch.randn(6, 3, 16, 16, device=dev)
    tasks = ["t0", "t2", None, "t1", "t2", "t0"]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = trpts.forward_tasks(backbone, x, tasks)
        for i, t in enumerate(tasks):
            trpts.activate_delta(backbone, t)
            with torch.no_grad():
                torch.testing.assert_close(out[i], backbone(x)[i], rtol=2e-2, atol=2e-2)



def test_token_gate_trains_under_bf16_and_its_delta_loads_on_cuda(tmp_path):
    dev = torch.device("cuda")
    model = make_timm_vit(depth=2).to(dev)
    data = [(x.to(dev), y.to(dev)) for x, y in make_batches(3, 8)]
    selection = trpts.allocate_connections(trpts.compute_fisher(model, data, progress=False), budget=0.05)
    handle = trpts.apply_masks(model, selection, storage="sparse", token_gate=0.5)
    optimizer = torch.optim.AdamW(handle.param_groups(lr=1e-2, head_lr=1e-2))
    for _ in range(10):
        for x, y in data:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    stats = trpts.token_gate_stats(model)
    assert stats and all(0 <= v <= 1 for v in stats.values())
    assert all(t.device.type == "cuda" and torch.isfinite(t) for t in handle.thresholds().values())
    model.eval()
    x = data[0][0]
    want = model(x)
    path = trpts.save_delta(model, tmp_path / "gated.safetensors")
    backbone = make_timm_vit(depth=2).to(dev).eval()
    trpts.load_delta(backbone, path)
    assert torch.equal(backbone(x), want)
