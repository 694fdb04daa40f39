"""Layer-wise allocation of trainable connections (paper eq. 3-6).

1. Eq. 3: take the global top-M % of Fisher scores; layer ``l``'s share ``w_l`` is the
   fraction of that set that falls in ``l``.
2. Eq. 4: ``C_l = round(C_min * w_l / min(w))``, with the decisions documented in
   ``docs/method.md``: a layer holding none of the top-M % counts as holding one entry
   (``w_l = 1/|I_top|``, so ``min(w) > 0``), rounding is half-up, and ``1 <= C_l <= fan_in``.
3. Eq. 5: every output neuron (row of the weight; a conv kernel is ``[out, in*kh*kw]``)
   keeps its ``C_l`` highest-scoring input connections, ties broken by lower column.

``budget=`` solves eq. 4's scale for a target fraction of scored weights instead of
taking ``C_min`` as given.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._utils import canonical_name, fmt_count, unwrap_model
from .errors import TrptsKeyError, TrptsTypeError, TrptsValueError, TrptsWarning
from .models import GENERIC, block_index_from_name, find_adapter

__all__ = ["MatrixAllocation", "Selection", "allocate_connections"]

SELECTION_FORMAT = 1
Unit = Literal["matrix", "block"]


@dataclass(frozen=True)
class MatrixAllocation:
    """Allocation report for one scored weight tensor."""

    name: str
    shape: tuple[int, ...]
    rows: int  # output neurons
    fan_in: int  # input connections per neuron (in * kh * kw for a conv)
    layer: str  # the allocation unit it belongs to (its own name, or "block.<i>")
    block: int | None  # transformer block index, None outside the blocks
    share: float  # w_l of its layer (eq. 3)
    connections: int  # C_l after rounding and the 1..fan_in cap (eq. 4)

    @property
    def count(self) -> int:
        """Selected entries: ``rows * connections`` (eq. 6)."""
        return self.rows * self.connections


class Selection(Mapping[str, Tensor]):
    """Which entries of which weights are trainable: a read-only ``name -> bool mask`` mapping.

    Stored compactly as per-row column indices (``int64 [rows, C_l]``, sorted); masks
    (``torch.bool``, the parameter's shape, True = trainable) are built on access. The
    same object drives gradient masks (:func:`trpts.apply_masks`) or compact value
    vectors (:meth:`flat_indices`).
    """

    def __init__(self, indices: Mapping[str, Tensor], matrices: Mapping[str, MatrixAllocation],
                 config: Mapping[str, Any]):
        if set(indices) != set(matrices):
            raise TrptsValueError("indices and matrices must have the same keys")
        self._indices = {n: indices[n] for n in matrices}
        self._matrices = dict(matrices)
        self._config = dict(config)

    # ---- Mapping interface ------------------------------------------------------------
    def __getitem__(self, name: str) -> Tensor:
        if name not in self._matrices:
            raise TrptsKeyError(f"{name!r} is not in this selection (it has {len(self)} weights)")
        info = self._matrices[name]
        mask = torch.zeros(info.rows, info.fan_in, dtype=torch.bool)
        mask.scatter_(1, self._indices[name], True)
        return mask.view(info.shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self._matrices)

    def __len__(self) -> int:
        return len(self._matrices)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Selection):
            return NotImplemented
        return (self._matrices == other._matrices and all(
            torch.equal(self._indices[n], other._indices[n]) for n in self._matrices))

    __hash__ = None  # type: ignore[assignment]

    # ---- compact views -------------------------------------------------------------------
    def indices(self, name: str) -> Tensor:
        """Sorted selected columns of each row: ``int64 [rows, C_l]`` (a copy)."""
        return self._indices[name].clone()

    def flat_indices(self, name: str) -> Tensor:
        """Selected positions in ``param.view(-1)``: ``int64 [rows * C_l]``, ascending."""
        info = self._matrices[name]
        rows = torch.arange(info.rows, dtype=torch.int64).unsqueeze(1)
        return (rows * info.fan_in + self._indices[name]).view(-1)

    # ---- reports ------------------------------------------------------------------------
    @property
    def matrices(self) -> dict[str, MatrixAllocation]:
        """Per-weight report (shape, fan-in, layer, block, share ``w_l``, ``C_l``, count)."""
        return dict(self._matrices)

    @property
    def config(self) -> dict[str, Any]:
        """The settings the selection was made with (top_percent, unit, scale, budget, ...)."""
        return dict(self._config)

    @property
    def num_selected(self) -> int:
        return sum(m.count for m in self._matrices.values())

    @property
    def num_scored(self) -> int:
        return sum(m.rows * m.fan_in for m in self._matrices.values())

    @property
    def fraction(self) -> float:
        """Selected / scored weights."""
        return self.num_selected / max(1, self.num_scored)

    @property
    def block_counts(self) -> dict[int, int]:
        """Selected weights per transformer block (block index -> count), ascending index."""
        counts: dict[int, int] = {}
        for m in self._matrices.values():
            if m.block is not None:
                counts[m.block] = counts.get(m.block, 0) + m.count
        return dict(sorted(counts.items()))

    def sparsest_blocks(self, n: int, *, depth: int | None = None, densest: bool = False) -> list[int]:
        """The ``n`` blocks with the fewest selected weights (``densest``: the most), ascending.

        Ties go to the **later** block: at small budgets eq. 4 puts most blocks at its floor
        (one connection per neuron) and they tie, and reducing tokens in the first blocks,
        before their features form, cost 18 points of accuracy on a real DINOv2 ViT-S
        (CIFAR-10: blocks 0-2 48.6 %, blocks 7-9 67.2 %; ``docs/benchmarks.md``).
        ``depth`` counts blocks with no selected weight (0) as candidates.
        """
        counts = {i: 0 for i in range(depth)} if depth is not None else {}
        counts.update(self.block_counts)
        sign = -1 if densest else 1
        ranked = sorted(counts, key=lambda b: (sign * counts[b], -b))
        return sorted(ranked[:n])

    def __repr__(self) -> str:
        cfg = self._config
        how = (f"budget={cfg['budget']}" if cfg.get("budget") is not None
               else f"c_min={cfg.get('scale')}")
        lines = [
            f"Selection({len(self)} weights, {fmt_count(self.num_selected)} / "
            f"{fmt_count(self.num_scored)} entries trainable ({100 * self.fraction:.3f}%), "
            f"top_percent={cfg.get('top_percent')}, {how}, unit={cfg.get('unit')!r})",
        ]
        width = max((len(n) for n in self._matrices), default=4)
        lines.append(f"  {'weight':<{width}}  {'shape':>14}  {'w_l':>7}  {'C_l':>5}  {'selected':>10}")
        for m in self._matrices.values():
            shape = "x".join(map(str, m.shape))
            lines.append(f"  {m.name:<{width}}  {shape:>14}  {m.share:7.4f}  "
                         f"{m.connections:>5}  {fmt_count(m.count):>10}")
        return "\n".join(lines)

    # ---- serialization -------------------------------------------------------------------
    def to_tensors(self) -> dict[str, Tensor]:
        """Plain tensors for saving: ``{name: int32 [rows, C_l]}`` selected columns."""
        return {n: idx.to(torch.int32) for n, idx in self._indices.items()}

    def to_config(self) -> dict[str, Any]:
        """JSON-serializable description (format version, settings, per-weight report)."""
        return {
            "format": SELECTION_FORMAT,
            "settings": self._config,
            "matrices": [{**asdict(m), "shape": list(m.shape)} for m in self._matrices.values()],
        }

    @classmethod
    def from_delta(cls, path: str | os.PathLike[str]) -> Selection:
        """The selection a task delta was trained with (read and checked with
        :func:`trpts.read_delta`): equal to the one it was saved from. Older files without the
        per-weight report get ``layer`` = the weight's own name, ``block`` parsed from the name
        and ``share`` = 0. To resume training:
        ``load_delta(model, path); apply_masks(model, Selection.from_delta(path))``."""
        from .delta_format import read_delta, rows_fan_in

        meta, tensors = read_delta(path)
        matrices: dict[str, MatrixAllocation] = {}
        indices: dict[str, Tensor] = {}
        for name, info in meta["matrices"].items():
            rows, fan_in = rows_fan_in(info)
            block = info["block"] if "block" in info else block_index_from_name(name)
            matrices[name] = MatrixAllocation(name=name, shape=tuple(info["shape"]), rows=rows, fan_in=fan_in,
                                              layer=info.get("layer", name), block=block,
                                              share=float(info.get("share", 0.0)), connections=info["connections"])
            indices[name] = tensors[f"columns:{name}"].to(torch.int64)
        return cls(indices, matrices, meta.get("selection") or {})

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, Tensor], config: Mapping[str, Any]) -> Selection:
        """Inverse of :meth:`to_tensors` + :meth:`to_config` (lossless)."""
        if config.get("format") is None:
            raise TrptsValueError("config is not a Selection.to_config() (it has no 'format'); the "
                                  "selection of a delta file is trpts.Selection.from_delta(path)")
        if config.get("format") != SELECTION_FORMAT:
            raise TrptsValueError(
                f"unknown selection format {config.get('format')!r}; this trpts reads format "
                f"{SELECTION_FORMAT} (upgrade trpts to read newer files)"
            )
        matrices: dict[str, MatrixAllocation] = {}
        indices: dict[str, Tensor] = {}
        for entry in config["matrices"]:
            info = MatrixAllocation(**{**entry, "shape": tuple(entry["shape"])})
            name = info.name
            if name not in tensors:
                raise TrptsKeyError(f"selection tensors lack {name!r}")
            idx = tensors[name].to(torch.int64)
            if tuple(idx.shape) != (info.rows, info.connections):
                raise TrptsValueError(
                    f"indices of {name!r} have shape {tuple(idx.shape)}, expected "
                    f"({info.rows}, {info.connections})"
                )
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= info.fan_in):
                raise TrptsValueError(f"indices of {name!r} fall outside 0..{info.fan_in - 1}")
            if info.connections > 1 and not bool((idx[:, 1:] > idx[:, :-1]).all()):
                raise TrptsValueError(f"indices of {name!r} must be strictly increasing per row")
            matrices[name], indices[name] = info, idx
        extra = set(tensors) - set(matrices)
        if extra:
            raise TrptsKeyError(f"selection tensors {sorted(extra)[:5]} are not described in config")
        return cls(indices, matrices, config["settings"])


# ---- allocation -----------------------------------------------------------------------------

def _validate_scores(fisher: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, tuple[int, ...]]]:
    """Canonical names -> float32 ``[rows, fan_in]`` scores, and the original shapes."""
    if not isinstance(fisher, Mapping):
        raise TrptsTypeError(f"fisher must be a mapping name -> Tensor, got {type(fisher).__name__}")
    if not fisher:
        raise TrptsValueError("fisher is empty; pass the dict returned by trpts.compute_fisher")
    scores: dict[str, Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    for raw_name, s in fisher.items():
        name = canonical_name(str(raw_name))
        if not isinstance(s, Tensor):
            raise TrptsTypeError(f"fisher[{name!r}] must be a Tensor, got {type(s).__name__}")
        if not s.is_floating_point():
            raise TrptsTypeError(f"fisher[{name!r}] must be floating point, got {s.dtype}")
        if s.ndim < 2 or s.numel() == 0:
            raise TrptsValueError(
                f"fisher[{name!r}] has shape {tuple(s.shape)}; allocation selects input "
                "connections of weight matrices (2-D) or conv kernels (4-D). Drop it, or score "
                "weights only (compute_fisher's default)"
            )
        s32 = s.detach().to(torch.float32).reshape(s.shape[0], -1)
        lo, hi = torch.aminmax(s32)
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            raise TrptsValueError(
                f"fisher[{name!r}] contains NaN or inf; recompute the scores in float32 "
                "(compute_fisher accumulates in float32) or drop that weight"
            )
        if float(lo) < 0:
            raise TrptsValueError(
                f"fisher[{name!r}] has negative entries (min {float(lo):.3g}); Fisher scores are "
                "squared gradients and must be >= 0"
            )
        if name in scores:
            raise TrptsValueError(f"fisher has {name!r} twice (with and without a wrapper prefix)")
        scores[name] = s32.contiguous()
        shapes[name] = tuple(s.shape)
    return scores, shapes


_CHUNK = 1 << 18  # scores per histogram pass: the int32 temporaries stay in cache
_HIGH, _LOW = 1 << 15, 1 << 16  # buckets of the high 15 value bits, then of the low 16


def _bit_chunks(s: Tensor, chunk: int) -> Iterator[Tensor]:
    """Order-preserving int32 views of ``s`` (non-negative float32), ``chunk`` entries at a
    time, -0.0 folded into +0.0."""
    flat = s.reshape(-1)
    for start in range(0, flat.numel(), chunk):
        yield flat[start:start + chunk].view(torch.int32) & 0x7FFFFFFF


def _histograms(scores: Mapping[str, Tensor], chunk: int, bucket: int | None = None) -> dict[str, Tensor]:
    """Per tensor, int64 counts of the high 15 value bits (``bucket=None``, ``[2^15]``), or of
    the low 16 bits of the entries whose high bits equal ``bucket`` (``[2^16]``)."""
    hists: dict[str, Tensor] = {}
    for n, s in scores.items():
        hist = torch.zeros(_HIGH if bucket is None else _LOW, dtype=torch.int64, device=s.device)
        for b in _bit_chunks(s, chunk):
            if bucket is None:
                hist += torch.bincount(b >> 16, minlength=_HIGH)
            else:
                inside = b[(b >> 16) == bucket]
                if inside.numel():
                    hist += torch.bincount(inside & 0xFFFF, minlength=_LOW)
        hists[n] = hist.cpu()
    return hists


def _cut(hist: Tensor, k: int) -> tuple[int, int]:
    """The highest bin ``i`` with at least ``k`` entries at or above it, and how many of the
    ``k`` fall in bin ``i`` itself."""
    above = hist.flip(0).cumsum(0).flip(0)  # above[i] = entries in bins >= i
    i = int((above >= k).nonzero().max())
    return i, k - (int(above[i + 1]) if i + 1 < above.numel() else 0)


def _top_counts(scores: Mapping[str, Tensor], k: int, chunk: int = _CHUNK) -> dict[str, int]:
    """Per-tensor count of the global top-``k`` entries (eq. 3) in two chunked passes over the
    float bits, no sort and no full-size temporary: the high-bit histogram finds the bucket
    holding the threshold, the low-bit histogram of that bucket the exact threshold. Ties at
    the threshold go to tensors in order (then lower flat index): exact and deterministic."""
    high = _histograms(scores, chunk)
    bucket, need = _cut(sum(high.values()), k)
    low = _histograms({n: s for n, s in scores.items() if int(high[n][bucket])}, chunk, bucket)
    zeros = torch.zeros(_LOW, dtype=torch.int64)
    cut, _ = _cut(sum(low.values(), zeros), need)
    ties_left = k
    greater: dict[str, int] = {}
    for n in scores:
        lo = low.get(n, zeros)
        greater[n] = int(high[n][bucket + 1:].sum()) + int(lo[cut + 1:].sum())
        ties_left -= greater[n]
    counts: dict[str, int] = {}
    for n in scores:
        take = min(int(low.get(n, zeros)[cut]), ties_left)
        ties_left -= take
        counts[n] = greater[n] + take
    return counts


def _connections(scale: float, ratios: list[float], fan_ins: list[int]) -> list[int]:
    """Eq. 4 with half-up rounding and the 1..fan_in cap."""
    return [min(max(1, math.floor(scale * r + 0.5)), f) for r, f in zip(ratios, fan_ins, strict=True)]


def _solve_scale(target: float, ratios: list[float], fan_ins: list[int], rows: list[int]) -> float:
    """Scale s (eq. 4's C_min) whose total selected count lands closest to ``target``."""
    def total(s: float) -> int:
        return sum(r * c for r, c in zip(rows, _connections(s, ratios, fan_ins), strict=True))

    lo, hi = 0.0, max((f + 0.5) / r for f, r in zip(fan_ins, ratios, strict=True))
    if total(lo) >= target:
        return lo
    if total(hi) <= target:
        return hi
    for _ in range(200):  # invariant: total(lo) < target <= total(hi)
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if total(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi if total(hi) - target < target - total(lo) else lo


def _row_topk(s: Tensor, c: int) -> Tensor:
    """Sorted column indices of each row's ``c`` highest scores; ties -> lower column.

    One ``topk(c + 1)`` per row: a row has a tie to resolve only where its ``c``-th and
    ``(c + 1)``-th values are equal, and only those rows are compared in full."""
    rows, fan_in = s.shape
    if c >= fan_in:
        return torch.arange(fan_in, dtype=torch.int64).expand(rows, fan_in).contiguous()
    top = torch.topk(s, c + 1, dim=1)
    kth = top.values[:, c - 1:c]
    ambiguous = (top.values[:, c] == kth[:, 0]).nonzero().squeeze(1)
    idx = top.indices[:, :c].sort(dim=1).values
    if ambiguous.numel():  # more entries equal the c-th value than fit: keep lower columns
        sub, v = s[ambiguous], kth[ambiguous]
        gt, eq = sub > v, sub == v
        keep = gt | (eq & (eq.cumsum(1) <= c - gt.sum(1, keepdim=True)))
        idx[ambiguous] = keep.nonzero()[:, 1].view(-1, c)
    return idx.cpu()


def allocate_connections(
    fisher: Mapping[str, Tensor],
    *,
    top_percent: float = 1.0,
    c_min: float | None = None,
    budget: float | None = None,
    unit: Unit = "matrix",
    share_power: float = 0.0,
    model: nn.Module | None = None,
) -> Selection:
    """Choose the trainable connections from Fisher scores (paper eq. 3-5).

    Args:
        fisher: ``{name: scores}`` as returned by :func:`trpts.compute_fisher`; each value
            float, finite, ``>= 0``, 2-D ``[out, in]`` or 4-D conv ``[out, in, kh, kw]``.
        top_percent: M in eq. 3, in percent of all scored entries, ``(0, 100]``.
        c_min: C_min in eq. 4 (connections per neuron of the least important layer; may be
            fractional). Default 1. Mutually exclusive with ``budget``.
        budget: target fraction of scored weights to select, ``(0, 1]``, e.g. ``0.005``.
            Solves eq. 4's scale for the total closest to ``budget * num_scored`` (within
            one step of the step function), keeping eq. 4's proportions.
        unit: what a "layer" is: ``"matrix"`` (each weight tensor; default) or ``"block"``
            (all weights of a transformer block share one ``w_l`` and ``C_l``; weights
            outside the blocks stay their own layer).
        share_power: exponent p on eq. 4's ratio, ``C_l = C_min * (w_l / min w) ** p``;
            ``>= 0``. 1 is the paper's eq. 4 (pass it to reproduce TR-PTS exactly); 0, the
            default, gives every weight the same ``C`` with each neuron's top-``C`` Fisher
            entries (eq. 5) chosen per row, which measured far better on a real pretrained ViT
            (docs/benchmarks.md#real-backbone: eq. 4's shares there follow LayerScale's gains
            and the patch embedding's token sum, not the task). Eq. 3's shares are still
            reported in ``matrices``.
        model: optional; when given, names are checked against it and blocks are found by
            module identity instead of by name.

    Returns:
        A :class:`Selection`. Deterministic: identical scores give identical selections.
    """
    _check_allocation_args(top_percent=top_percent, c_min=c_min, budget=budget, unit=unit,
                           share_power=share_power)
    scores, shapes = _validate_scores(fisher)
    blocks = _block_map(scores, model)
    layer_of = {n: (f"block.{blocks[n]}" if unit == "block" and blocks[n] is not None else n)
                for n in scores}
    total_entries = sum(s.numel() for s in scores.values())
    layer_counts, k = _layer_top_counts(scores, layer_of, top_percent, total_entries)  # eq. 3
    shares = {layer: c / k for layer, c in layer_counts.items()}
    scale, conns = _matrix_connections(scores, layer_of, layer_counts, share_power=share_power,
                                       budget=budget, c_min=c_min, total_entries=total_entries)  # eq. 4
    selection = Selection(*_select_rows(scores, shapes, blocks, layer_of, shares, conns), {  # eq. 5
        "top_percent": float(top_percent), "unit": unit, "scale": scale, "share_power": float(share_power),
        "budget": None if budget is None else float(budget),
    })
    neurons = sum(s.shape[0] for s in scores.values())
    if budget is not None and budget * total_entries < neurons:
        warnings.warn(
            f"budget={budget} is below what eq. 4 allows (one connection per neuron = "
            f"{neurons / total_entries:.4%} of the scored weights); selected "
            f"{selection.fraction:.4%} instead", TrptsWarning, stacklevel=2)
    return selection


def _check_allocation_args(*, top_percent: float, c_min: float | None, budget: float | None, unit: str,
                           share_power: float) -> None:
    """Raise :class:`TrptsValueError` naming the first invalid argument of :func:`allocate_connections`."""
    if not (isinstance(top_percent, (int, float)) and 0 < top_percent <= 100):
        raise TrptsValueError(f"top_percent must be in (0, 100] (a percentage), got {top_percent!r}")
    if c_min is not None and budget is not None:
        raise TrptsValueError("pass either c_min or budget, not both")
    if budget is not None and not (isinstance(budget, (int, float)) and 0 < budget <= 1):
        raise TrptsValueError(
            f"budget must be a fraction in (0, 1] of the scored weights (0.005 = 0.5%), got {budget!r}"
        )
    if c_min is not None and not (isinstance(c_min, (int, float)) and c_min > 0):
        raise TrptsValueError(f"c_min must be > 0, got {c_min!r}")
    if unit not in ("matrix", "block"):
        raise TrptsValueError(f"unit must be 'matrix' or 'block', got {unit!r}")
    if not (isinstance(share_power, (int, float)) and not isinstance(share_power, bool)
            and math.isfinite(share_power) and share_power >= 0):
        raise TrptsValueError(f"share_power must be a finite number >= 0 (1 = eq. 4, 0 = uniform), "
                              f"got {share_power!r}")


def _layer_top_counts(scores: dict[str, Tensor], layer_of: Mapping[str, str], top_percent: float,
                      total_entries: int) -> tuple[dict[str, int], int]:
    """Eq. 3: how many of the global top-``top_percent`` % entries (``k`` of them) each layer
    holds. Returns ``({layer: count}, k)``."""
    k = max(1, math.ceil(top_percent / 100 * total_entries))
    layer_counts: dict[str, int] = {}
    for n, c in _top_counts(scores, k).items():
        layer_counts[layer_of[n]] = layer_counts.get(layer_of[n], 0) + c
    return layer_counts, k


def _matrix_connections(scores: dict[str, Tensor], layer_of: Mapping[str, str], layer_counts: Mapping[str, int],
                        *, share_power: float, budget: float | None, c_min: float | None,
                        total_entries: int) -> tuple[float, list[int]]:
    """Eq. 4: connections per row ``C`` of each matrix (in ``scores`` order) and the scale
    (C_min) they come from: ``c_min`` (default 1), or solved so the total meets ``budget``."""
    # C_l = scale * w_l / min(w) = scale * n_l / min(n). A layer holding none of the top-M %
    # counts as holding one entry (the estimate's resolution): no division by zero, and
    # exactly eq. 4 whenever every layer holds at least one.
    floor_count = max(1, min(layer_counts.values()))
    names = list(scores)
    ratios = [(max(layer_counts[layer_of[n]], 1) / floor_count) ** share_power for n in names]
    fan_ins = [scores[n].shape[1] for n in names]
    rows = [scores[n].shape[0] for n in names]
    if budget is not None:
        scale = _solve_scale(budget * total_entries, ratios, fan_ins, rows)
    else:
        scale = float(c_min) if c_min is not None else 1.0
    return scale, _connections(scale, ratios, fan_ins)


def _select_rows(scores: dict[str, Tensor], shapes: Mapping[str, tuple[int, ...]],
                 blocks: Mapping[str, int | None], layer_of: Mapping[str, str], shares: Mapping[str, float],
                 conns: list[int]) -> tuple[dict[str, Tensor], dict[str, MatrixAllocation]]:
    """Eq. 5: each row's top-``C`` columns (int64 ``[rows, C]``) and the per-matrix records."""
    selection_tensors: dict[str, Tensor] = {}
    matrices: dict[str, MatrixAllocation] = {}
    for n, c in zip(scores, conns, strict=True):
        selection_tensors[n] = _row_topk(scores[n], c)
        matrices[n] = MatrixAllocation(name=n, shape=shapes[n], rows=scores[n].shape[0],
                                       fan_in=scores[n].shape[1], layer=layer_of[n],
                                       block=blocks[n], share=shares[layer_of[n]], connections=c)
    return selection_tensors, matrices


def _block_map(scores: Mapping[str, Tensor], model: nn.Module | None) -> dict[str, int | None]:
    if model is None:
        return {n: block_index_from_name(n) for n in scores}
    base = unwrap_model(model)
    named = dict(base.named_parameters())
    unknown = [n for n in scores if n not in named]
    if unknown:
        raise TrptsKeyError(
            f"fisher names {unknown[:5]} are not parameters of {type(base).__name__}; "
            "compute the scores on this model"
        )
    for n, s in scores.items():
        if named[n].numel() != s.numel() or named[n].shape[0] != s.shape[0]:
            raise TrptsValueError(
                f"fisher[{n!r}] has {s.numel()} entries but the parameter has shape "
                f"{tuple(named[n].shape)}"
            )
    adapter = find_adapter(base)
    index = (adapter or GENERIC).block_index(base)
    return {n: index.get(n, block_index_from_name(n) if adapter is None else None) for n in scores}
