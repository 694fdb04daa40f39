"""FSDP2 (``fully_shard``) after ``apply_masks`` (hook storage), two CPU processes with gloo:
the same training as one process given both ranks' batches, frozen entries bit-identical, and
the same delta file; what cannot work sharded is refused clearly."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_batches, make_hf_vit, make_timm_vit

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no FSDP2 (fully_shard)", allow_module_level=True)

WORLD = 2


def _model(family):
    if family == "hf":
        return make_hf_vit(depth=2)
    return make_timm_vit(depth=2, embed_dim=33, num_heads=3)  # width 33: uneven shards on two ranks


def _blocks(model):
    from trpts.models import get_adapter

    return get_adapter(model).blocks(model)


def _logits(out):
    return out if torch.is_tensor(out) else out.logits


def _selection(model):
    import trpts

    g = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    fisher = {n: torch.rand(params[n].shape, generator=g) for n in trpts.default_scored_parameters(model)}
    return trpts.allocate_connections(fisher, budget=0.05, model=model)


def _batches(rank):
    return make_batches(2, 4, seed=30 + rank)


def _train(model, handle, batches):
    optimizer = torch.optim.AdamW(handle.param_groups(weight_decay=0.05), lr=1e-2)
    for x, y in batches:
        optimizer.zero_grad()
        F.cross_entropy(_logits(model(x)), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
    return optimizer


def _worker(rank: int, init_file: str, out_dir: str, family: str) -> None:
    from torch.distributed.fsdp import fully_shard

    import trpts

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model = _model(family)
        unsharded_fisher = trpts.compute_fisher(_model(family), _batches(rank), progress=False)
        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        fisher = trpts.compute_fisher(model, _batches(rank), progress=False)  # all-reduced: both ranks' batches
        try:
            trpts.compute_fisher(model, _batches(rank), per_sample=True, progress=False)
            per_sample_refusal = "not refused"
        except trpts.TrptsValueError as err:
            per_sample_refusal = str(err)
        model = _model(family)
        selection = _selection(model)
        handle = trpts.apply_masks(model, selection)
        for block in _blocks(model):
            fully_shard(block)
        fully_shard(model)
        _train(model, handle, _batches(rank))
        trpts.save_delta(model, os.path.join(out_dir, "sharded.safetensors"), name="task")
        refusals = {}
        for what, call in {
            "unload": handle.unload,
            "load_delta": lambda: trpts.load_delta(model, os.path.join(out_dir, "sharded.safetensors")),
        }.items():
            try:
                call()
                refusals[what] = "not refused"
            except trpts.TrptsRuntimeError as err:
                refusals[what] = str(err)
        sparse = _model(family)
        sparse_handle = trpts.apply_masks(sparse, _selection(sparse), storage="sparse")
        for block in _blocks(sparse):
            fully_shard(block)
        fully_shard(sparse)
        optimizer = _train(sparse, sparse_handle, _batches(rank))
        trpts.save_delta(sparse, os.path.join(out_dir, "sparse-sharded.safetensors"), name="task")
        k = {n: v.shape[0] for n, v in sparse_handle.values.items()}  # the global length
        state = [optimizer.state[v]["exp_avg"].to_local().numel() for v in sparse_handle.values.values()]
        sparse_local = {"k": sum(k.values()), "adam_state_local": sum(state),
                        "sharded": all(trpts._sharding.is_sharded(v) for v in sparse_handle.values.values())}
        saved = sparse.state_dict()
        sparse.load_state_dict(saved)  # a sharded checkpoint round trip (raw weight + values)
        sparse_local["state_keys"] = sorted(k for k in saved if k.endswith("trpts_values"))
        for what, call in {"sparse merge_and_unload": sparse_handle.merge_and_unload,
                           "sparse plain state_dict": lambda: sparse.load_state_dict(
                               {k: v for k, v in saved.items() if not k.endswith("trpts_values")}, strict=False)}.items():
            try:
                call()
                refusals[what] = "not refused"
            except trpts.TrptsRuntimeError as err:
                refusals[what] = str(err)
        params = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
        handle.merge_and_unload()
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        if rank == 0:
            torch.save({"params": params, "refusals": refusals, "flags": flags, "fisher": fisher, "sparse": sparse_local,
                        "unsharded_fisher": unsharded_fisher, "per_sample_refusal": per_sample_refusal},
                       os.path.join(out_dir, "rank0.pt"))
    finally:
        dist.destroy_process_group()


def _same_delta(path, reference):
    """Same metadata (FSDP's class FSDP<Name> looked through), same columns, values equal up to
    the float rounding of a different reduction order."""
    import trpts

    meta_s, tensors_s = trpts.read_delta(path)
    meta_1, tensors_1 = trpts.read_delta(reference)
    assert meta_s["fingerprint"] == meta_1["fingerprint"] and sorted(tensors_s) == sorted(tensors_1)
    for key in ("family", "architecture", "identity", "heads", "full"):
        assert meta_s[key] == meta_1[key], key
    for k, t in tensors_1.items():
        if k.startswith("columns:"):
            assert torch.equal(tensors_s[k], t), k
        else:
            torch.testing.assert_close(tensors_s[k], t, rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("family", ["timm", "hf"])
def test_fully_shard_after_apply_masks_trains_like_one_process(tmp_path, family):
    import trpts

    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), family), nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "rank0.pt")

    original = _model(family)
    single = copy.deepcopy(original)
    selection = _selection(single)
    handle = trpts.apply_masks(single, selection)
    both = [(torch.cat([x0, x1]), torch.cat([y0, y1])) for (x0, y0), (x1, y1) in zip(_batches(0), _batches(1),
                                                                                      strict=True)]
    _train(single, handle, both)
    trpts.save_delta(single, tmp_path / "single.safetensors", name="task")

    before = dict(original.named_parameters())
    for n, p in single.named_parameters():
        sharded = got["params"][n]
        if n in selection:  # frozen entries bit-identical, trained ones as one process trains them
            assert torch.equal(sharded[~selection[n]], before[n].detach()[~selection[n]]), n
            assert bool((sharded[selection[n]] != before[n].detach()[selection[n]]).all()), n
        torch.testing.assert_close(sharded, p.detach(), rtol=1e-4, atol=1e-5, msg=n)
    _same_delta(tmp_path / "sharded.safetensors", tmp_path / "single.safetensors")

    # sparse storage: the same training (its delta equals one process's), O(k) optimizer state
    # split over the ranks, the compact vectors in a sharded checkpoint
    single_sparse = copy.deepcopy(original)
    _train(single_sparse, trpts.apply_masks(single_sparse, selection, storage="sparse"), both)
    trpts.save_delta(single_sparse, tmp_path / "sparse-single.safetensors", name="task")
    _same_delta(tmp_path / "sparse-sharded.safetensors", tmp_path / "sparse-single.safetensors")
    _same_delta(tmp_path / "sparse-sharded.safetensors", tmp_path / "single.safetensors")  # as the hooks train
    sparse = got["sparse"]
    assert sparse["sharded"] and sparse["k"] == selection.num_selected
    assert sparse["adam_state_local"] <= sparse["k"] // WORLD + len(sparse["state_keys"])
    assert len(sparse["state_keys"]) == len(selection)

    # Fisher on the sharded model: one process's scores over both ranks' batches (and the
    # unsharded model on the same processes gives them too: the all-reduce is the same)
    reference = trpts.compute_fisher(_model(family), _batches(0) + _batches(1), progress=False)
    assert list(got["fisher"]) == list(reference)
    for n, f in reference.items():
        assert not trpts._sharding.is_sharded(got["fisher"][n])
        torch.testing.assert_close(got["fisher"][n], f, rtol=1e-4, atol=1e-12, msg=n)
        torch.testing.assert_close(got["unsharded_fisher"][n], f, rtol=1e-4, atol=1e-12, msg=n)
    assert "per_sample" in got["per_sample_refusal"]
    for what, message in got["refusals"].items():
        assert "fully_shard" in message, (what, message)
    assert got["flags"] == {n: p.requires_grad for n, p in original.named_parameters()}  # restored
