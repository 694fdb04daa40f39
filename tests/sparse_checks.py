"""The whole sparse-storage path on one device, shared by tests/test_cuda.py (natively) and
tests/test_triton.py (the same Triton kernel, interpreted on the CPU)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from conftest import make_batches, make_timm_vit

import trpts


def check_whole_sparse_path(dev: torch.device, tmp_path: Path, compile_too: bool, depth: int = 4) -> None:
    """Sparse storage under bf16 autocast: frozen entries bit-identical, gradient
    accumulation = one big batch, (``compile_too``) ``torch.compile`` = eager, deltas saved on
    ``dev`` load on the CPU and move back unchanged."""
    model = make_timm_vit(depth=depth).to(dev)
    data = [(x.to(dev), y.to(dev)) for x, y in make_batches(4, 8)]
    selection = trpts.allocate_connections(trpts.compute_fisher(model, data, progress=False), budget=0.03,
                                           model=model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def grads(m: torch.nn.Module, batches: list) -> list[torch.Tensor]:
        h = trpts.apply_masks(m, selection, storage="sparse")
        for x, y in batches:
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                (F.cross_entropy(m(x), y) * x.shape[0] / 16).backward()
        return [p.grad.clone() for p in h.parameters()]

    big = [(torch.cat([data[0][0], data[1][0]]), torch.cat([data[0][1], data[1][1]]))]
    for acc, one in zip(grads(copy.deepcopy(model), data[:2]), grads(copy.deepcopy(model), big), strict=True):
        torch.testing.assert_close(acc, one, rtol=2e-2, atol=1e-4)

    handles, models = [], []
    for wrap in [lambda m: m] + ([torch.compile] if compile_too else []):
        m = copy.deepcopy(model)
        h = trpts.apply_masks(m, selection, storage="sparse")
        optimizer = torch.optim.AdamW(h.param_groups(lr=1e-3, head_lr=1e-2))
        run = wrap(m)
        for x, y in data:
            optimizer.zero_grad()
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                F.cross_entropy(run(x), y).backward()
            optimizer.step()
        handles.append(h)
        models.append(m)
    for name in handles[0].masked:
        for other in handles[1:]:
            torch.testing.assert_close(other.selected_values(name), handles[0].selected_values(name),
                                       rtol=2e-2, atol=1e-3)
    path = trpts.save_delta(models[0], tmp_path / "task.safetensors", handle=handles[0])
    handles[0].merge_and_unload()
    trained = {n: p.detach().clone() for n, p in models[0].named_parameters()}
    for n in selection:
        keep = selection[n].to(dev)
        assert torch.equal(trained[n][~keep], before[n][~keep]), n
        assert bool((trained[n][keep] != before[n][keep]).any()), n
    on_cpu = copy.deepcopy(model).cpu()
    trpts.load_delta(on_cpu, path)
    back = on_cpu.to(dev)
    for n, p in back.named_parameters():
        assert torch.equal(p, trained[n]), n
