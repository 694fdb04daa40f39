"""Two CPU processes (gloo): identical Fisher scores and selections, masked DDP training."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_batches, make_hf_vit, make_timm_vit

FACTORIES = {"timm": make_timm_vit, "hf": make_hf_vit}


def _worker(rank: int, world: int, init_file: str, out_dir: str, storage: str, family: str,
            cuda: bool = False) -> None:
    import trpts

    torch.set_num_threads(1)
    # CUDA: NCCL where every rank has its own GPU, else gloo (which also reduces CUDA tensors)
    backend = "nccl" if cuda and torch.cuda.device_count() >= world else "gloo"
    dev = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)

    def on_dev(batches: list) -> list:
        return [(x.to(dev), y.to(dev)) for x, y in batches]

    try:
        model = FACTORIES[family]().to(dev)  # same seed on every rank
        shard = on_dev(make_batches(2, 4, seed=10 + rank))  # different data on each rank
        fisher = trpts.compute_fisher(model, shard, progress=False)
        selection = trpts.allocate_connections(fisher, budget=0.05, model=model)
        handle = trpts.apply_masks(model, selection, storage=storage)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if cuda else None)
        # names never carry DDP's "module." prefix
        assert list(trpts.compute_fisher(ddp, shard[:1], progress=False)) == list(fisher)
        optimizer = torch.optim.AdamW(handle.param_groups(weight_decay=0.05), lr=1e-2)
        for x, y in on_dev(make_batches(3, 4, seed=20 + rank)):
            optimizer.zero_grad()
            out = ddp(x)
            F.cross_entropy(getattr(out, "logits", out), y).backward()
            optimizer.step()
        handle.merge_and_unload()  # sparse storage: writes the trained values into the weights
        before = {n: before[n] for n in dict(model.named_parameters())}
        frozen_ok = all(
            torch.equal(p.detach()[~selection[n]], before[n][~selection[n]]) if n in selection
            else (n in handle.full or torch.equal(p.detach(), before[n]))
            for n, p in model.named_parameters()
        )
        torch.save({"fisher": {n: f.cpu() for n, f in fisher.items()}, "indices": selection.to_tensors(),
                    "frozen_ok": frozen_ok, "params": {n: p.detach().cpu() for n, p in model.named_parameters()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("family, storage", [("timm", "hooks"), ("timm", "sparse"), ("hf", "sparse")])
def test_two_process_gloo_ddp(tmp_path, family, storage):
    _two_process_ddp(tmp_path, family, storage, cuda=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("storage", ["hooks", "sparse"])
def test_two_process_ddp_on_cuda(tmp_path, storage):
    """NCCL with a GPU per rank (gloo on one shared GPU); sparse storage uses the Triton kernel."""
    _two_process_ddp(tmp_path, "timm", storage, cuda=True)


def _two_process_ddp(tmp_path, family: str, storage: str, cuda: bool) -> None:
    world = 2
    make = FACTORIES[family]
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path), storage, family, cuda), nprocs=world,
             join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(world))
    assert list(r0["fisher"]) == list(r1["fisher"])
    for n in r0["fisher"]:
        assert torch.equal(r0["fisher"][n], r1["fisher"][n]), n
    for n in r0["indices"]:
        assert torch.equal(r0["indices"][n], r1["indices"][n]), n
    assert r0["frozen_ok"] and r1["frozen_ok"]
    assert set(r0["params"]) == set(dict(make().named_parameters()))
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n

    # The all-reduced scores are those of the union of both shards on one process.
    import trpts

    union = make_batches(2, 4, seed=10) + make_batches(2, 4, seed=11)
    single = trpts.compute_fisher(make(), union, progress=False)
    for n in single:
        torch.testing.assert_close(r0["fisher"][n], single[n], rtol=1e-4 if cuda else 1e-5, atol=1e-12)
    from family_checks import record

    record(make(), "DDP")
