"""The paper's figures from the library, on real data: Figure 5 (share of each task's selected
weights per block), Figure 6 (patches kept by token selection) and Figure 7 (overlap between
tasks' selections).

Uses the quickstart's source model (digit identity on a 32x32 canvas; see
examples/digits_task.py; trained and cached on first use) and four target tasks on the same
images: digit position (the quickstart's task), digit identity, parity, and low (0-4) vs high
(5-9). Each task gets Fisher scores and a 5 % selection (at 1 % this small model gets one
connection per neuron almost everywhere, which makes a flat Figure 5); Figure 6 places token selection in
the two blocks with the fewest selected weights of the position task.

    pip install ".[examples]" && python examples/figures.py --out-dir docs/images
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits_task as task

import trpts


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("."), help="where to write the PNGs")
    parser.add_argument("--budget", type=float, default=0.05, help="selection budget per task")
    parser.add_argument("--rho", type=float, default=0.5, help="select rate of each reducing block")
    parser.add_argument("--source-epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(task.default_cache_dir()))
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    source = task.pretrained_backbone(args.cache_dir, seed=args.seed, epochs=args.source_epochs,
                                      use_cache=not args.no_cache, progress=args.progress)
    position = task.position_task(args.seed)
    x, digit = task.identity_task(args.seed)["train"]
    tasks = {  # name -> (train images, train labels, classes)
        "position": (*position["train"], task.NUM_POSITIONS),
        "digit": (x, digit, 10),
        "parity": (x, digit % 2, 2),
        "low vs high": (x, (digit >= 5).long(), 2),
    }
    selections = {}
    for name, (images, labels, classes) in tasks.items():
        model = task.target_model(source, classes, args.seed)
        fisher = trpts.compute_fisher(model, list(task.batches(images, labels)), num_batches=None,
                                       progress=args.progress)
        selections[name] = trpts.allocate_connections(fisher, budget=args.budget, model=model,
                                                      share_power=1)  # the paper's eq. 4, as its figures
    out = args.out_dir
    written = [out / "block_distribution.png", out / "selection_overlap.png", out / "kept_tokens.png"]
    trpts.plot_block_distribution(selections, written[0])
    trpts.plot_selection_overlap(selections, written[1])
    model = task.target_model(source, task.NUM_POSITIONS, args.seed)
    trpts.wrap_vit(model, selections["position"], rho=args.rho, num_layers=2)
    test_x, test_y = position["test"]
    images = torch.stack([test_x[(test_y == c).nonzero()[0, 0]] for c in range(task.NUM_POSITIONS)])
    trpts.plot_kept_tokens(model, images, written[2])
    for name, sel in selections.items():
        print(f"{name:<12} selected per block {sel.block_counts}")
    print(f"reducing blocks for Figure 6: {trpts.get_token_config(model).layers}; wrote "
          + ", ".join(str(p) for p in written))
    return written


if __name__ == "__main__":
    main()
