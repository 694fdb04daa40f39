"""Cost of one training step: time and peak memory per method, against full fine-tuning.

For each model and method a fresh Python process builds the model (timm, random weights:
cost does not depend on the values), sets the method up, runs warm-up steps and then timed
steps of forward + cross-entropy + backward + AdamW step on a fixed random batch, and reports
the median step time and its peak memory. Processes for the methods alternate round by round,
and the table gives the median over rounds, as ratios against full fine-tuning measured in
the same run.

Methods: full fine-tuning; linear probe (head only: a floor); LoRA through ``peft`` (r = 8 on
``qkv``, head trained); TR-PTS parameters (``apply_masks``, budget 1 %) in the default hook
storage and in ``storage="sparse"``; each also with tokens (``wrap_vit``, rho = 0.7 in 3
blocks); the sparse fine-tuning peers in ``peft`` on the blocks' four linear layers, sized to
the TR-PTS selection's count: SHiRA (``r * (in + out)`` random entries per layer, r chosen so
the total is closest to the selection's) and Super-Tuning (largest-magnitude entries at
``sparsity = 1 - count / weights``); and TR-PTS parameters in sparse storage with the token gate
(``token_gate=0.5``). ``--bf16`` runs every step under bf16 autocast. ``--weights`` loads a
real checkpoint and ``--fisher-task`` scores Fisher on a ``vtab_mini`` task's images (for the
token gate, whose cost depends on how many input columns a real selection touches: 5-30 of 384
on real images, 60-220 on random ones). The TR-PTS
selection comes from ``compute_fisher`` on random data in the parent process, so the Fisher
pass does not count towards a worker's peak memory.

Peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps on a GPU (weights,
gradients, optimizer state, activations); on the CPU (Linux) the peak resident set size of the
worker from model creation to the end, minus its size after imports (the same plus allocator
slack), with the peak reset through ``/proc/self/clear_refs``. Sparse storage compiles its
gradient kernel before that baseline (compiler memory is not training memory).

    python benchmarks/training.py [--quick] [--models vit_small_patch16_224 ...] [--batches 8 32]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import report
from tqdm.auto import tqdm

import trpts

METHODS = ["full fine-tuning", "linear probe", "LoRA (peft r=8, qkv)", "SHiRA (peft)", "Super-Tuning (peft)",
           "TR-PTS params (hooks)", "TR-PTS params + tokens (hooks)", "TR-PTS params (sparse)",
           "TR-PTS params + tokens (sparse)", "TR-PTS params (sparse, token gate)"]
BLOCK_LINEARS = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"  # the peers' target modules
NOTES = {
    "TR-PTS params (hooks)": "dense weight gradients, then masked: no saving expected",
    "TR-PTS params + tokens (hooks)": "savings come from fewer tokens only",
    "TR-PTS params (sparse)": "no dense weight gradient, O(k) optimizer state",
    "TR-PTS params + tokens (sparse)": "",
    "TR-PTS params (sparse, token gate)": "token_gate=0.5: W0 x + S (dW x) per layer",
    "SHiRA (peft)": "r sized to the TR-PTS count",
    "Super-Tuning (peft)": "sparsity sized to the TR-PTS count",
}


def _load_selection(path: str) -> trpts.Selection:
    blob = torch.load(path, weights_only=True)
    return trpts.Selection.from_tensors(blob["tensors"], json.loads(blob["config"]))


def _peer(model: torch.nn.Module, method: str, count: int) -> torch.nn.Module:
    """SHiRA or Super-Tuning through ``peft`` on the blocks' linear layers, ``count`` entries."""
    import peft

    linears = [m for n, m in model.named_modules() if re.fullmatch(BLOCK_LINEARS, n)]
    if method.startswith("SHiRA"):
        r = max(1, round(count / sum(m.in_features + m.out_features for m in linears)))
        config = peft.ShiraConfig(r=r, target_modules=BLOCK_LINEARS, modules_to_save=["head"], random_seed=0)
    else:
        sparsity = 1 - count / sum(m.weight.numel() for m in linears)
        config = peft.SupertuningConfig(sparsity=sparsity, target_modules=BLOCK_LINEARS, modules_to_save=["head"])
    return peft.get_peft_model(model, config)


def _status_mib(field: str) -> float:
    """``VmRSS`` (current) or ``VmHWM`` (peak) resident set size of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> float:
    """Reset the process's peak RSS (Linux ``clear_refs``); return the current RSS in MiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mib("VmRSS")


def _build(model_name: str, img: int, num_classes: int, weights: str | None = None) -> torch.nn.Module:
    import timm

    model = timm.create_model(model_name, pretrained=False, img_size=img, num_classes=num_classes)
    if weights:  # real weights: the selection (and so the token gate's column count) is a real one
        from vtab_methods import load_weights

        load_weights(model, Path(weights))
    return model


def worker(args: argparse.Namespace) -> None:
    """One method, one process: print a JSON line with step times and peak memory."""
    device = torch.device(args.device)
    if "sparse" in args.method:  # compile the sparse-gradient kernel first: not training memory
        from trpts.sparse import sparse_weight_grad

        sparse_weight_grad(torch.randn(7, 5, device=device), torch.randn(7, 3, device=device),
                           torch.tensor([[0, 2], [1, 3], [2, 4]], device=device))
    base_rss = _reset_peak_rss() if device.type == "cpu" else 0.0
    torch.manual_seed(0)
    model = _build(args.model, args.img, args.num_classes, args.weights).to(device)
    method = args.method
    if method == "linear probe":
        model.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
    elif method.startswith("LoRA"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["qkv"], modules_to_save=["head"]))
    elif method.endswith("(peft)"):
        model = _peer(model, method, _load_selection(args.selection).num_selected)
    elif method.startswith("TR-PTS"):
        selection = _load_selection(args.selection)
        handle = trpts.apply_masks(model, selection, storage="sparse" if "sparse" in method else "hooks",
                                   token_gate=0.5 if "token gate" in method else None)
        if "tokens" in method:
            trpts.wrap_vit(model, selection, rho=args.rho, num_layers=args.token_blocks)
    params = [p for p in model.parameters() if p.requires_grad]
    if method.startswith("TR-PTS"):
        optimizer = torch.optim.AdamW(handle.param_groups(weight_decay=0.0, lr=1e-4))
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.img, args.img, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g).to(device)
    model.train()

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [step() for _ in range(args.steps)]
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _status_mib("VmHWM") - base_rss)
    trained = handle.num_trainable if method.startswith("TR-PTS") else sum(p.numel() for p in params)
    print(json.dumps({"times": times, "peak_mib": peak, "trained": trained}))


def _fisher_batches(model: torch.nn.Module, task: str, img: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """8 batches of 32 training images of a ``vtab_mini`` task (as its runs score them)."""
    import vtab_data
    from vtab_methods import normalizer

    data = vtab_data.DEFAULT_DATA if vtab_data.DEFAULT_DATA.exists() else None
    x, y = vtab_data.load_task(task, data=data, size=img, sizes=(800, 200, 2000))["train"]
    g = torch.Generator().manual_seed(0)
    return [b for _, b in zip(range(8), vtab_data.batches(x, y, 32, normalize=normalizer(model), generator=g),
                              strict=False)]


def _selection_file(model_name: str, img: int, num_classes: int, budget: float, tmp: Path,
                    weights: str | None = None, share_power: float = 1.0, fisher_task: str | None = None) -> Path:
    """Fisher on two random batches (or a real task's images) -> allocation; saved for the workers."""
    torch.manual_seed(0)
    model = _build(model_name, img, num_classes, weights)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, img, img, generator=g), torch.randint(0, num_classes, (4,), generator=g))
               for _ in range(2)] if fisher_task is None else _fisher_batches(model, fisher_task, img)
    fisher = trpts.compute_fisher(model, batches, num_batches=None, progress=False)
    selection = trpts.allocate_connections(fisher, budget=budget, model=model, share_power=share_power)
    path = tmp / f"{model_name}.pt"
    torch.save({"tensors": selection.to_tensors(), "config": json.dumps(selection.to_config())}, path)
    return path


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="vit_tiny at 32 px, 2 steps, 1 round (seconds)")
    parser.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS, metavar="METHOD")
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--batches", nargs="+", type=int, default=[8], help="batch sizes")
    parser.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per process (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="processes per method (median over rounds)")
    parser.add_argument("--budget", type=float, default=0.01)
    parser.add_argument("--share-power", type=float, default=1.0, help="allocate_connections' (1: the paper's eq. 4)")
    parser.add_argument("--weights", default=None, help="timm-named checkpoint to load (default: random weights)")
    parser.add_argument("--fisher-task", default=None, help="score Fisher on this vtab_mini task's training "
                        "images (e.g. cifar10) instead of random data: a real selection's column spread")
    parser.add_argument("--rho", type=float, default=0.7)
    parser.add_argument("--token-blocks", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast in every step")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--selection", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    if args.quick:
        args.models, args.img, args.steps, args.warmup, args.rounds = ["vit_tiny_patch16_224"], 32, 2, 1, 1
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        bar = tqdm(total=len(args.models) * len(args.batches) * len(args.methods) * args.rounds,
                   desc="worker processes", disable=args.no_progress)
        for model_name in args.models:
            selection = _selection_file(model_name, args.img, args.num_classes, args.budget, Path(tmpdir),
                                        args.weights, args.share_power, args.fisher_task)
            for batch in args.batches:
                runs: dict[str, list[dict[str, object]]] = {m: [] for m in args.methods}
                for _ in range(args.rounds):
                    for method in args.methods:
                        cmd = [sys.executable, __file__, "--worker", "--model", model_name, "--method", method,
                               "--selection", str(selection), "--img", str(args.img), "--batch", str(batch),
                               "--steps", str(args.steps), "--warmup", str(args.warmup), "--rho", str(args.rho),
                               "--token-blocks", str(args.token_blocks), "--num-classes", str(args.num_classes),
                               "--device", args.device, *(["--bf16"] if args.bf16 else []),
                               *(["--weights", str(args.weights)] if args.weights else [])]
                        done = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
                        if done.returncode != 0:
                            raise RuntimeError(f"worker {model_name} / {method} failed:\n{done.stderr}")
                        runs[method].append(json.loads(done.stdout.strip().splitlines()[-1]))
                        bar.update()
                summary = {m: (statistics.median(statistics.median(r["times"]) for r in rs),
                               statistics.median(r["peak_mib"] for r in rs), rs[0]["trained"])
                           for m, rs in runs.items()}
                ref_time, ref_mem, _ = summary.get("full fine-tuning", next(iter(summary.values())))
                lora = summary.get("LoRA (peft r=8, qkv)")
                for method, (t, mem, trained) in summary.items():
                    rows.append({"model": model_name, "batch": batch, "method": method,
                                 "trained values": f"{trained:,}", "step time": f"{t * 1000:.0f} ms",
                                 "time vs full": f"{t / ref_time:.2f}x",
                                 "time vs LoRA": f"{t / lora[0]:.2f}x" if lora else "",
                                 "peak memory": f"{mem:.0f} MiB", "memory vs full": f"{mem / ref_mem:.2f}x",
                                 "memory vs LoRA": f"{mem / lora[1]:.2f}x" if lora else "",
                                 "note": NOTES.get(method, "")})
        bar.close()
    settings = {"device": args.device, "bf16": args.bf16, "img": args.img, "optimizer": "AdamW",
                "steps": args.steps, "rounds": args.rounds, "budget": args.budget, "share_power": args.share_power,
                "weights": Path(args.weights).name if args.weights else "random",
                "fisher data": args.fisher_task or "random",
                "tokens": f"rho {args.rho} in {args.token_blocks} blocks"}
    return report("Training step cost", "training.py", argv, settings, rows, args.json)


if __name__ == "__main__":
    main()
