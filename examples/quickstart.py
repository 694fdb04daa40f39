"""trpts quickstart: TR-PTS against a linear probe and full fine-tuning, offline on a CPU.

Real data (scikit-learn's handwritten digits, pasted at random places on a 32x32 canvas) and a
real timm ViT (patch 4, width 96, 4 blocks). See examples/digits_task.py for the task:

1. source task: the ViT learns digit identity wherever the digit is (trained once, ~1 min,
   then cached in ~/.cache/trpts);
2. target task: *where* is the digit (4 horizontal positions)? A feature the source task
   taught the backbone to ignore. Four methods train for the same epochs: linear probe (new
   head only), full fine-tuning, TR-PTS parameters only (Fisher-selected 1 % of the weights +
   head) and TR-PTS parameters + tokens (also keeps 70 % of the tokens in 2 blocks).

Prints a table (test accuracy, trained values, training time, size of the file a task needs),
then reloads the saved TR-PTS delta onto a fresh copy of the backbone and checks that its
predictions match the trained model's exactly.

    pip install ".[examples]" && python examples/quickstart.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits_task as task

import trpts

# Learning rates picked on the validation split by benchmarks/accuracy.py (docs/benchmarks.md).
LR = {"linear probe": 1e-1, "full fine-tuning": 3e-3, "TR-PTS": 1e-1}


def file_size(path: Path) -> str:
    size = path.stat().st_size
    return f"{size / 1024:.1f} KiB" if size < 2**20 else f"{size / 2**20:.2f} MiB"


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.01, help="fraction of scored weights TR-PTS trains")
    parser.add_argument("--rho", type=float, default=0.7, help="share of tokens kept by each reducing block")
    parser.add_argument("--token-blocks", type=int, default=2, help="number of reducing blocks")
    parser.add_argument("--epochs", type=int, default=10, help="target-task epochs per method")
    parser.add_argument("--source-epochs", type=int, default=20, help="pretraining epochs (source task)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(task.default_cache_dir()), help="where the source model is cached")
    parser.add_argument("--no-cache", action="store_true", help="always pretrain, never read/write the cache")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    source = task.pretrained_backbone(args.cache_dir, seed=args.seed, epochs=args.source_epochs,
                                      use_cache=not args.no_cache, progress=args.progress)
    data = task.position_task(args.seed)
    (x, y), test = data["train"], data["test"]
    fit = dict(seed=args.seed, progress=args.progress)
    out = Path(tempfile.mkdtemp(prefix="trpts-quickstart-"))
    rows: list[dict[str, object]] = []
    total = sum(p.numel() for p in source.parameters())

    # 1. Linear probe: only the new head trains; the task's file is the head.
    model = task.target_model(source, task.NUM_POSITIONS, args.seed)
    head = list(model.get_classifier().parameters())
    model.requires_grad_(False)
    model.get_classifier().requires_grad_(True)
    seconds = task.train(model, torch.optim.AdamW(head, lr=LR["linear probe"], weight_decay=0.0), x, y,
                         args.epochs, desc="linear probe", **fit)
    save_file({k: v.contiguous() for k, v in model.get_classifier().state_dict().items()}, out / "head.safetensors")
    rows.append(dict(method="linear probe", acc=task.accuracy(model, *test), trained=sum(p.numel() for p in head),
                     seconds=seconds, file=file_size(out / "head.safetensors")))

    # 2. Full fine-tuning: the task's file is the whole model.
    model = task.target_model(source, task.NUM_POSITIONS, args.seed)
    trained = [p for p in model.parameters() if p.requires_grad]
    seconds = task.train(model, torch.optim.AdamW(trained, lr=LR["full fine-tuning"], weight_decay=0.05), x, y,
                         args.epochs, desc="full fine-tuning", **fit)
    save_file(model.state_dict(), out / "full.safetensors")
    rows.append(dict(method="full fine-tuning", acc=task.accuracy(model, *test),
                     trained=sum(p.numel() for p in trained), seconds=seconds, file=file_size(out / "full.safetensors")))

    # 3-4. TR-PTS: Fisher scores -> layer-wise allocation -> gradient masks (-> token selection).
    for with_tokens in (False, True):
        model = task.target_model(source, task.NUM_POSITIONS, args.seed)
        t0 = time.perf_counter()
        fisher = trpts.compute_fisher(model, list(task.batches(x, y)), num_batches=None, progress=args.progress)
        selection = trpts.allocate_connections(fisher, budget=args.budget, model=model)
        handle = trpts.apply_masks(model, selection)
        if with_tokens:
            trpts.wrap_vit(model, selection, rho=args.rho, num_layers=args.token_blocks)
        select_seconds = time.perf_counter() - t0
        before = {n: p.detach().clone() for n, p in model.named_parameters() if n in selection}
        optimizer = torch.optim.AdamW(handle.param_groups(weight_decay=0.0, lr=LR["TR-PTS"]))
        name = "TR-PTS params + tokens" if with_tokens else "TR-PTS params"
        seconds = task.train(model, optimizer, x, y, args.epochs, desc=name, **fit)
        frozen_ok = all(torch.equal(p.detach()[~selection[n]], before[n][~selection[n]])
                        for n, p in model.named_parameters() if n in selection)
        path = trpts.save_delta(model, out / f"{'both' if with_tokens else 'params'}.safetensors", name="position")
        rows.append(dict(method=name, acc=task.accuracy(model, *test), trained=handle.num_trainable,
                         seconds=seconds + select_seconds, file=file_size(path)))

    # The delta is all a task needs: load it onto a fresh copy of the backbone.
    expected = task.predict(model, test[0])
    fresh = task.target_model(source, 10, args.seed)  # any head: the delta brings its own
    trpts.load_delta(fresh, path)
    reloaded = task.predict(fresh, test[0])

    print(f"\nTarget task: digit position on a 32x32 canvas ({task.NUM_POSITIONS} classes, {len(y)} train / "
          f"{len(test[1])} test images), {args.epochs} epochs per method; backbone pretrained on digit identity.\n")
    print(f"{'method':<24} {'test acc':>9} {'trained values':>15} {'% of model':>11} {'train time':>11} "
          f"{'task file':>10}")
    for r in rows:
        print(f"{r['method']:<24} {r['acc']:>9.1%} {r['trained']:>15,} {r['trained'] / total:>11.2%} "
              f"{r['seconds']:>10.1f}s {r['file']:>10}")
    counts = trpts.token_counts(model, (1, 3, task.CANVAS, task.CANVAS))
    print(f"\nTR-PTS selected {selection.num_selected:,} of {selection.num_scored:,} scored weights "
          f"({selection.fraction:.2%}); per block: {selection.block_counts}")
    size = (1, 3, task.CANVAS, task.CANVAS)
    print(f"Tokens leaving each block with token selection: {[n for _, n in counts]} (forward FLOPs "
          f"{trpts.count_flops(model, size) / 1e6:.1f}M vs {trpts.count_flops(source, size) / 1e6:.1f}M dense)")
    print(f"Entries TR-PTS did not select are bit-identical to the pretrained backbone: "
          f"{'yes' if frozen_ok else 'NO'}")
    same = torch.equal(expected, reloaded)
    print(f"Delta reloaded onto a fresh backbone ({path.name}, {file_size(path)}): predictions identical: "
          f"{'yes' if same else 'NO'}")
    print(f"Files in {out}; total time {time.perf_counter() - start:.0f} s.")
    return rows


if __name__ == "__main__":
    main()
