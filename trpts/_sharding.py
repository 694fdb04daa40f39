"""FSDP2 (``torch.distributed.fsdp.fully_shard``) support: what is sharded, gathering only the
selected values of a sharded weight, and the clear refusals for what trpts cannot do there."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .errors import TrptsRuntimeError

__all__ = ["full_value", "gather_selected", "gathered_weights", "is_sharded", "refuse_sharded"]


def is_sharded(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (a parameter sharded by FSDP2's ``fully_shard``)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def refuse_sharded(params: Iterable[Tensor], what: str) -> None:
    """Raise :class:`TrptsRuntimeError` if any of ``params`` is sharded by ``fully_shard``."""
    if any(is_sharded(p) for p in params):
        raise TrptsRuntimeError(
            f"{what} is not supported on a model sharded with fully_shard (FSDP2): it rewrites or reads whole "
            "weights. Do it before fully_shard, or save_delta (which works sharded) and load the delta "
            "onto an unsharded model")


def full_value(p: Tensor) -> Tensor:
    """The whole tensor: a sharded parameter is gathered from every rank (a collective)."""
    return p.full_tensor() if is_sharded(p) else p


def gather_selected(p: Tensor, columns: Tensor) -> Tensor:
    """``p.reshape(rows, fan_in).gather(1, columns)`` for a weight sharded by rows (FSDP2's
    ``Shard(0)``): each rank gathers its own rows' entries and only ``[rows, C]`` values cross
    ranks (a collective: every rank must call it)."""
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    if tuple(p.placements) != (Shard(0),):
        raise TrptsRuntimeError(f"trpts reads sharded weights split by rows (fully_shard's default Shard(0)); "
                                f"got placements {tuple(p.placements)}")
    rows, c = columns.shape
    local_columns = distribute_tensor(columns.to(p.device), p.device_mesh, [Shard(0)]).to_local()
    local = p.to_local().reshape(-1, p.numel() // rows).gather(1, local_columns)
    return DTensor.from_local(local, p.device_mesh, [Shard(0)], shape=torch.Size((rows, c)),
                              stride=(c, 1)).full_tensor()


@contextmanager
def gathered_weights(model: nn.Module, names: list[str], sharded: bool) -> Iterator[dict[str, Tensor] | None]:
    """Inside the block, a dict that each forward fills with the whole (gathered) tensor each
    named parameter's module computes with under ``fully_shard``; ``None`` when not ``sharded``."""
    if not sharded:
        yield None
        return
    weights: dict[str, Tensor] = {}
    handles = []
    for name in names:
        path, _, attr = name.rpartition(".")

        def capture(module: nn.Module, args: object, name: str = name, attr: str = attr) -> None:
            weights[name] = getattr(module, attr)

        handles.append(model.get_submodule(path).register_forward_pre_hook(capture))
    try:
        yield weights
    finally:
        for h in handles:
            h.remove()
