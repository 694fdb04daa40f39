"""The paper's figures from the library, on real data: Figure 5 (share of each task's selected
weights per block), Figure 6 (patches kept by token selection) and Figure 7 (overlap between
tasks' selections).

Uses the quickstart's source model (digits 0-4; trained and cached by examples/quickstart.py,
or trained here on first use) and four tasks on scikit-learn's digits: digits 5-9, digits 0-4,
parity, and low (0-4) vs high (5-9). Each task gets Fisher scores and a 1 % selection; Figure 6
places token selection in the two blocks with the fewest selected weights of the digits 5-9 task.

    pip install ".[examples]" && python examples/figures.py --out-dir docs/images
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import quickstart as qs
import torch

import trpts


def main(argv: list[str] | None = None) -> list[Path]:
    default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trpts"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("."), help="where to write the PNGs")
    parser.add_argument("--budget", type=float, default=0.01, help="selection budget per task")
    parser.add_argument("--rho", type=float, default=0.5, help="select rate of each reducing block")
    parser.add_argument("--source-epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(default_cache))
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    source = qs.pretrained_backbone(args)
    everything = qs.load_digits(range(0, 10), args.seed)
    tasks = {  # name -> (train images, train labels, classes)
        "digits 5-9": (*qs.load_digits(range(5, 10), args.seed)[:2], 5),
        "digits 0-4": (*qs.load_digits(range(0, 5), args.seed)[:2], 5),
        "parity": (everything[0], everything[1] % 2, 2),
        "low vs high": (everything[0], (everything[1] >= 5).long(), 2),
    }
    selections = {}
    for name, (x, y, classes) in tasks.items():
        model = qs.fresh_target_model(source, classes, args.seed)
        fisher = trpts.compute_fisher(model, list(qs.batches(x, y, 64)), progress=args.progress)
        selections[name] = trpts.allocate_connections(fisher, budget=args.budget, model=model)
    out = args.out_dir
    written = [out / "block_distribution.png", out / "selection_overlap.png", out / "kept_tokens.png"]
    trpts.plot_block_distribution(selections, written[0])
    trpts.plot_selection_overlap(selections, written[1])
    model = qs.fresh_target_model(source, 5, args.seed)
    trpts.wrap_vit(model, selections["digits 5-9"], rho=args.rho, num_layers=2)
    target = qs.load_digits(range(5, 10), args.seed)
    images = torch.stack([target[2][(target[3] == c).nonzero()[0, 0]] for c in range(4)])
    trpts.plot_kept_tokens(model, images, written[2])
    for name, sel in selections.items():
        print(f"{name:<12} selected per block {sel.block_counts}")
    print(f"reducing blocks for Figure 6: {trpts.get_token_config(model).layers}; wrote "
          + ", ".join(str(p) for p in written))
    return written


if __name__ == "__main__":
    main()
