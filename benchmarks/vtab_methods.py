"""Methods, training and evaluation of the VTAB-1k-style benchmark (``benchmarks/vtab_mini.py``).

Every method trains a new head at ``head_lr`` and its own backbone parameters at ``lr`` with
AdamW (no weight decay), batch 32, linear warm-up over the first 10 % of the steps then cosine
decay to 0, no augmentation (VTAB-1k's protocol: resize and normalize only); the model after the
final epoch is evaluated. Head-only methods (linear probe, tokens only) train the head on
features extracted once from the frozen backbone, which is the same computation as training
the whole model with only the head trainable (the backbone has no dropout or drop-path here)
at a third of the cost.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
import vtab_data
from timm.data import resolve_data_config
from torch import nn

import trpts

HEAD_GRID = (3e-3, 1e-2, 3e-2)


@dataclass(frozen=True)
class Method:
    """One row of the table: ``kind`` says how the backbone trains, ``grid`` the backbone
    learning rates tried on validation (head-only methods: the head's), ``options`` the
    TR-PTS / GPS settings that differ from the run's defaults. An ablation has no grid: it
    runs at the rate chosen for its ``base`` method, so it changes one thing only; on the grid
    tasks, or on every task when ``every_task``. ``lr`` fixes the backbone rate instead (a
    row that tests one rate on every task, outside the validation protocol)."""

    kind: str  # head | full | bitfit | lora | gps | trpts | tokens
    grid: tuple[float, ...]
    options: dict[str, Any] = field(default_factory=dict)
    base: str | None = None
    every_task: bool = False
    lr: float | None = None

    @property
    def head_only(self) -> bool:
        return self.kind in ("head", "tokens")


SPARSE_GRID = (3e-5, 1e-4, 3e-4)
PT = "TR-PTS params + tokens"
P0 = "TR-PTS params + tokens (share_power 0)"  # the library's default allocation


def _ablation(**change: Any) -> Method:
    return Method("trpts", (), {"placement": "sparse", **change}, PT)


def _p0_ablation(**change: Any) -> Method:
    """A change to the default (share_power 0) run, at its rate, on every task: the rows that
    separate its gap to GPS-style into token selection, biases and scores."""
    return Method("trpts", (), {"share_power": 0.0, **change}, P0, every_task=True)


D1 = "share_power 0 + tokens at lr 1e-3 (GPS-style's rate)"  # the library's recipe (defaults and rates)


def _default_ablation(**change: Any) -> Method:
    """One change to the library's recipe (share_power 0, tokens, lr 1e-3), on every task."""
    return Method("trpts", (), {"placement": "sparse", "share_power": 0.0, **change}, D1, every_task=True, lr=1e-3)


METHODS: dict[str, Method] = {
    "linear probe": Method("head", HEAD_GRID),
    "full fine-tuning": Method("full", (1e-5, 3e-5, 1e-4)),
    "BitFit": Method("bitfit", (3e-4, 1e-3, 3e-3)),
    "LoRA r=8 (qkv, peft)": Method("lora", (1e-4, 3e-4, 1e-3)),
    "GPS-style": Method("gps", SPARSE_GRID),
    "TR-PTS params": Method("trpts", SPARSE_GRID),
    PT: Method("trpts", SPARSE_GRID, {"placement": "sparse"}),
    "TR-PTS tokens only": Method("tokens", HEAD_GRID, {"placement": "sparse"}),
    "TR-PTS params + tokens (dense)": Method("trpts", SPARSE_GRID, {"placement": "dense"}),
    "TR-PTS params + tokens (random)": Method("trpts", SPARSE_GRID, {"placement": "random"}),
    # variants with their own grid (run when named with --methods): eq. 4 tempered, C_l ~ w_l^p
    "TR-PTS params + tokens (share_power 0.5)": Method("trpts", SPARSE_GRID, {"placement": "sparse",
                                                                             "share_power": 0.5}),
    P0: Method("trpts", SPARSE_GRID, {"placement": "sparse", "share_power": 0.0}),
    # ablations (run when named with --methods): one setting changed from PT, at PT's rate
    "ablation: + biases": _ablation(biases=True),
    "ablation: Fisher after a linear-probe head": _ablation(probe_head=True),
    "ablation: per-sample Fisher": _ablation(per_sample=True),
    "ablation: unit=block": _ablation(unit="block"),
    "ablation: budget 0.69% (LoRA's count)": _ablation(budget=0.0069),
    "ablation: rho 0.5": _ablation(rho=0.5),
    "ablation: placement ties by Fisher share": _ablation(ties="share"),
    "ablation: placement ties to earlier blocks (the old default)": _ablation(ties="early"),
    "ablation: no patch-embedding entries": _ablation(no_patch_embed=True),
    "ablation: Fisher x w^2 (scale-invariant scores)": _ablation(times_w2=True),
    # share_power 0 without tokens; with the masked layers' biases too it is GPS-style's
    # selection (same K per neuron, same biases, same count) with Fisher scores instead of
    # |summed gradient|
    "share_power 0: no tokens": _p0_ablation(),
    "share_power 0: + biases, no tokens (GPS-style with Fisher scores)": _p0_ablation(biases=True),
    # C = 2 per neuron plus the masked layers' biases: exactly the default's count (C = 3, no biases)
    "share_power 0: C=2 + biases (the default's count)": _p0_ablation(placement="sparse", biases=True,
                                                                       budget=0.0039),
    # the default with GPS's scores (|mean gradient|, compute_fisher(score="gradient")) instead of Fisher
    "share_power 0: |gradient| scores + tokens": _p0_ablation(placement="sparse", score="gradient"),
    # GPS-style without the masked layers' biases: its entries alone (the default's count)
    "GPS-style, no biases": Method("gps", (), {"no_biases": True}, "GPS-style", every_task=True),
    # the default at GPS-style's rate on every task: is the learning rate the rest of the gap?
    D1: Method("trpts", (), {"placement": "sparse", "share_power": 0.0}, P0, every_task=True, lr=1e-3),
    # one change to that default (the library's recipe, lr 1e-3) on every task: the ablations
    "default: per-sample Fisher": _default_ablation(per_sample=True),
    "default: C=2 + biases (the same count)": _default_ablation(biases=True, budget=0.0039),
    "default: rho 0.5": _default_ablation(rho=0.5),
    # the "Fisher batches": scores from every training image (25 batches) instead of 8
    "default: Fisher on every training batch": _default_ablation(fisher_batches=None),
    # the "number of reducing blocks": twice the run's (3 -> 6 of 12 blocks), and none
    "default: twice the reducing blocks": _default_ablation(blocks_scale=2),
    "default: no tokens": Method("trpts", (), {"share_power": 0.0}, D1, every_task=True, lr=1e-3),
    # issue 18: the same selection with TS-PEFT's token gate (target: half the token updates skipped)
    "default + token gate (skip 0.5)": _default_ablation(gate=0.5),
    "default + token gate (skip 0.25)": _default_ablation(gate=0.25),
}


@dataclass(frozen=True)
class Settings:
    """What every run of one benchmark configuration shares (its results-file key)."""

    model: str
    weights: str | None
    img_size: int
    epochs: int
    batch_size: int
    sizes: tuple[int, int, int]
    budget: float
    rho: float
    token_blocks: int
    fisher_batches: int
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        weights = Path(self.weights).name if self.weights else "random-init"
        extra = "".join(f",{k}={v}" for k, v in sorted(self.model_kwargs.items()))
        return (f"{self.model}[{weights}{extra}]@{self.img_size}px,ep{self.epochs},bs{self.batch_size},"
                f"n{'/'.join(map(str, self.sizes))},budget{self.budget},rho{self.rho}x{self.token_blocks},"
                f"fisher{self.fisher_batches}")


def build_model(settings: Settings, num_classes: int, seed: int) -> nn.Module:
    """The timm model with a new ``num_classes`` head (initialised from ``seed``) and the
    pretrained weights of ``settings.weights`` (position embedding resampled to the resolution)."""
    torch.manual_seed(seed)
    model = timm.create_model(settings.model, pretrained=False, num_classes=num_classes,
                              img_size=settings.img_size, **settings.model_kwargs)
    if settings.weights:
        load_weights(model, Path(settings.weights))
    return model


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a timm-named checkpoint (safetensors or torch) into ``model``; the head is new."""
    from timm.layers import resample_abs_pos_embed

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    head = {n for n, _ in model.get_classifier().named_parameters(prefix="head")}
    state = {k: v for k, v in state.items() if k not in head}
    own = model.state_dict()
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
        grid = model.patch_embed.grid_size
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(grid), num_prefix_tokens=prefix)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - head:
        raise ValueError(f"{path} does not fit {type(model).__name__}: missing {sorted(set(missing) - head)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")


def normalizer(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    cfg = resolve_data_config({}, model=model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    return lambda x: (x - mean) / std


# ---- method setups -----------------------------------------------------------------------------
@dataclass
class Run:
    """One training run's inputs."""

    method: Method
    settings: Settings
    lr: float
    head_lr: float
    seed: int
    task: vtab_data.Task
    classes: int


def _groups(named: Iterable[tuple[str, nn.Parameter]], is_head: Callable[[str], bool], lr: float,
            head_lr: float) -> list[dict[str, Any]]:
    named = [(n, p) for n, p in named if p.requires_grad]
    body = [p for n, p in named if not is_head(n)]
    head = [p for n, p in named if is_head(n)]
    return [g for g in ({"params": body, "lr": lr}, {"params": head, "lr": head_lr}) if g["params"]]


def fisher_batches(model: nn.Module, run: Run) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first training batches of seed ``run.seed``'s order: the run's ``fisher_batches``
    of them, or the method's own count (``None``: every batch)."""
    x, y = run.task["train"]
    g = torch.Generator().manual_seed(run.seed)
    data = vtab_data.batches(x, y, run.settings.batch_size, normalize=normalizer(model), generator=g)
    n = run.method.options.get("fisher_batches", run.settings.fisher_batches)
    return list(data) if n is None else [b for _, b in zip(range(n), data, strict=False)]


def gps_selection(model: nn.Module, data: Iterable[tuple[torch.Tensor, torch.Tensor]], budget: float) -> trpts.Selection:
    """GPS-style selection: scores |sum over batches of the batch-mean gradient|, the top K
    inputs of every neuron with one K for all weights (K chosen so the total matches
    ``budget``, at least 1)."""
    names = trpts.default_scored_parameters(model)
    params = dict(model.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in names)
    grads = {n: torch.zeros_like(params[n]) for n in names}
    model.train()
    for xb, yb in data:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb), yb).backward()
        for n in names:
            grads[n] += params[n].grad
    model.zero_grad(set_to_none=True)
    for n, p in params.items():
        p.requires_grad_(flags[n])
    shapes = {n: (params[n].shape[0], params[n][0].numel()) for n in names}
    total = sum(r * f for r, f in shapes.values())
    k = max(1, round(budget * total / sum(r for r, _ in shapes.values())))
    matrices, indices = {}, {}
    for n in names:
        rows, fan_in = shapes[n]
        c = min(k, fan_in)
        scores = grads[n].abs().reshape(rows, fan_in)
        indices[n] = torch.topk(scores, c, dim=1, sorted=False).indices.sort(dim=1).values
        matrices[n] = trpts.MatrixAllocation(name=n, shape=tuple(params[n].shape), rows=rows, fan_in=fan_in,
                                             layer=n, block=None, share=0.0, connections=c)
    return trpts.Selection(indices, matrices, {"method": "gps-style uniform", "k": k})


def trpts_selection(model: nn.Module, run: Run) -> trpts.Selection:
    """Fisher scores on the first training batches (eq. 2), then eq. 3-5."""
    opts = run.method.options
    head_state = None
    if opts.get("probe_head"):  # score with a head fitted on frozen features first
        head_state = {k: v.clone() for k, v in model.get_classifier().state_dict().items()}
        fit_head_on_features(model, run, run.head_lr)
    params = trpts.default_scored_parameters(model)
    if opts.get("no_patch_embed"):
        params = [n for n in params if not n.startswith("patch_embed.")]
    fisher = trpts.compute_fisher(model, fisher_batches(model, run), per_sample=bool(opts.get("per_sample")),
                                  params=params, progress=False, score=opts.get("score", "fisher"))
    if head_state is not None:
        model.get_classifier().load_state_dict(head_state)
    if opts.get("times_w2"):  # F w^2 is unchanged when LayerScale's gamma is folded into W
        named = dict(model.named_parameters())
        fisher = {n: f * named[n].detach().float() ** 2 for n, f in fisher.items()}
    return trpts.allocate_connections(fisher, budget=opts.get("budget", run.settings.budget),
                                      unit=opts.get("unit", "matrix"), share_power=opts.get("share_power", 1.0),
                                      model=model)


def sparse_layers(selection: trpts.Selection, n: int, ties: str) -> list[int]:
    """The ``n`` blocks with the fewest selected weights, ties broken by the block's summed
    Fisher share ``w_l`` (``"share"``, least first) or towards earlier blocks (``"early"``,
    trpts' rule before the default became later blocks)."""
    share: dict[int, float] = {}
    for m in selection.matrices.values():
        if m.block is not None:
            share[m.block] = share.get(m.block, 0.0) + m.share
    counts = selection.block_counts
    tie = (lambda b: share[b]) if ties == "share" else (lambda b: b)
    return sorted(sorted(counts, key=lambda b: (counts[b], tie(b)))[:n])


def setup(model: nn.Module, run: Run) -> tuple[nn.Module, torch.optim.Optimizer | None, int, dict[str, Any]]:
    """Make ``model`` train as ``run.method`` says: ``(model, optimizer or None for head-only
    methods, trained values, extra facts for the results file)``."""
    kind, opts, s = run.method.kind, run.method.options, run.settings
    info: dict[str, Any] = {}
    if kind in ("head", "tokens"):
        if kind == "tokens":
            selection = trpts_selection(model, run)
            trpts.wrap_vit(model, selection, rho=s.rho, num_layers=s.token_blocks, placement=opts["placement"])
            info["token_layers"] = list(trpts.get_token_config(model).layers)
        return model, None, sum(p.numel() for p in model.get_classifier().parameters()), info
    if kind == "full":
        return model, torch.optim.AdamW(_groups(model.named_parameters(), lambda n: n.startswith("head."),
                                                run.lr, run.head_lr), weight_decay=0.0), _count(model), info
    if kind == "bitfit":
        for n, p in model.named_parameters():
            p.requires_grad_(n.startswith("head.") or (n.endswith(".bias") and p.ndim == 1))
        return model, torch.optim.AdamW(_groups(model.named_parameters(), lambda n: n.startswith("head."),
                                                run.lr, run.head_lr), weight_decay=0.0), _count(model), info
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"], modules_to_save=["head"]))
        groups = _groups(model.named_parameters(), lambda n: "lora_" not in n, run.lr, run.head_lr)
        return model, torch.optim.AdamW(groups, weight_decay=0.0), _count(model), info
    if kind == "gps":
        selection = gps_selection(model, fisher_batches(model, run), s.budget)
        handle = trpts.apply_masks(model, selection, train_biases=not opts.get("no_biases"), storage="sparse")
    else:
        selection = trpts_selection(model, run)
        handle = trpts.apply_masks(model, selection, train_biases=bool(opts.get("biases")), storage="sparse",
                                   token_gate=opts.get("gate"))
        if "placement" in opts:
            blocks = s.token_blocks * opts.get("blocks_scale", 1)
            trpts.wrap_vit(model, selection, rho=opts.get("rho", s.rho), num_layers=blocks,
                           placement=opts["placement"], seed=run.seed, score=opts.get("token_score", "auto"),
                           layers=sparse_layers(selection, blocks, opts["ties"]) if "ties" in opts else None)
            info["token_layers"] = list(trpts.get_token_config(model).layers)
    info["block_counts"] = {str(k): v for k, v in selection.block_counts.items()}
    if opts.get("gate") is not None:  # eq. 3's Fisher share per weight, to compare with the learned skip shares
        info["fisher_share"] = {n: m.share for n, m in selection.matrices.items()}
    optimizer = torch.optim.AdamW(handle.param_groups(lr=run.lr, head_lr=run.head_lr), weight_decay=0.0)
    return model, optimizer, handle.num_trainable, info


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- training and evaluation -------------------------------------------------------------------
def schedule(optimizer: torch.optim.Optimizer, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 10 % of the steps, then cosine decay to 0 (per step)."""
    warmup = max(1, total // 10)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, run: Run) -> None:
    x, y = run.task["train"]
    s = run.settings
    sched = schedule(optimizer, s.epochs * math.ceil(len(x) / s.batch_size))
    g = torch.Generator().manual_seed(run.seed + 1)
    norm = normalizer(model)
    model.train()
    for _ in range(s.epochs):
        for xb, yb in vtab_data.batches(x, y, s.batch_size, normalize=norm, generator=g):
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sched.step()


@torch.no_grad()
def accuracy(model: nn.Module, split: vtab_data.Split, batch_size: int = 128) -> float:
    model.eval()
    norm = normalizer(model)
    correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in vtab_data.batches(*split, batch_size,
                                                                                        normalize=norm))
    return correct / max(1, len(split[1]))


@torch.no_grad()
def features(model: nn.Module, split: vtab_data.Split, batch_size: int = 128) -> torch.Tensor:
    """Pre-logits features ``[N, D]`` float32 of the frozen backbone (eval mode)."""
    model.eval()
    norm = normalizer(model)
    return torch.cat([model.forward_head(model.forward_features(xb), pre_logits=True)
                      for xb, _ in vtab_data.batches(*split, batch_size, normalize=norm)])


def fit_head_on_features(model: nn.Module, run: Run, lr: float,
                         feats: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Train ``model``'s head alone on frozen features with the benchmark's schedule."""
    feats = feats or {"train": features(model, run.task["train"])}
    head, y = model.get_classifier(), run.task["train"][1]
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    s = run.settings
    sched = schedule(optimizer, s.epochs * math.ceil(len(y) / s.batch_size))
    g = torch.Generator().manual_seed(run.seed + 1)
    for _ in range(s.epochs):
        order = torch.randperm(len(y), generator=g)
        for start in range(0, len(y), s.batch_size):
            idx = order[start:start + s.batch_size]
            loss = F.cross_entropy(head(feats["train"][idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sched.step()
    return feats


# ---- one run, with its cost ---------------------------------------------------------------------
def _peak_rss_mib(reset: bool = False) -> float | None:
    """Peak resident memory of this process (Linux VmHWM) in MiB; ``reset`` restarts it."""
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
        return kib / 1024
    except (OSError, StopIteration, ValueError):
        return None


def _sig(seconds: float) -> float:
    """Seconds to 4 significant digits: a quick run's few milliseconds stay above zero."""
    return float(f"{seconds:.4g}")


def execute(run: Run) -> dict[str, Any]:
    """Set up, train and evaluate one run; accuracies, trained values, seconds and peak memory
    (CUDA: ``max_memory_allocated``; CPU: peak RSS of the training phase alone), and the
    machine's 1-minute load average after training (above the thread count: the timing was
    shared with other work)."""
    cuda = torch.cuda.is_available()
    model = build_model(run.settings, run.classes, run.seed)
    total = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    model, optimizer, trained, info = setup(model, run)
    setup_s = time.perf_counter() - start
    _peak_rss_mib(reset=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if optimizer is None:
        feats = fit_head_on_features(model, run, run.lr)  # head-only methods: the grid is the head's
        train_s = time.perf_counter() - start
        peak = _peak_rss_mib()
        head = model.get_classifier()
        val, test = (float((head(features(model, run.task[s])).argmax(1) == run.task[s][1]).float().mean())
                     for s in ("val", "test"))
        del feats
    else:
        train(model, optimizer, run)
        train_s = time.perf_counter() - start
        peak = _peak_rss_mib()
        train_skip = trpts.token_gate_stats(model, reset=True)
        val = accuracy(model, run.task["val"])
        trpts.token_gate_stats(model, reset=True)
        test = accuracy(model, run.task["test"])
        if train_skip:  # token-gated: the share of token updates skipped per layer
            info["gate_skip_train"] = train_skip
            info["gate_skip_test"] = trpts.token_gate_stats(model)
            info["gate_thresholds"] = {n: float(t) for n, t in trpts.get_mask_handle(model).thresholds().items()}
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**20
    return {"val": val, "test": test, "trained": int(trained), "total": int(total), "setup_s": _sig(setup_s),
            "train_s": _sig(train_s), "peak_mib": None if peak is None else round(peak, 1),
            "load": round(os.getloadavg()[0], 2), "threads": torch.get_num_threads(), **info}
