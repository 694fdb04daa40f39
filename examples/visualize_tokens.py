"""Figure 6 from the library: which patches TR-PTS token selection keeps, block by block.

Uses the quickstart's source model (digits 0-4; trained and cached by examples/quickstart.py,
or trained here on first use), scores it on digits 5-9, places token selection in the two
blocks with the fewest selected weights (sparse insertion) and draws the kept patches.

    pip install ".[examples]" && python examples/visualize_tokens.py --out docs/images/kept_tokens.png
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import quickstart as qs
import torch

import trpts


def main(argv: list[str] | None = None) -> Path:
    default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trpts"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("kept_tokens.png"), help="PNG to write")
    parser.add_argument("--rho", type=float, default=0.5, help="select rate of each reducing block")
    parser.add_argument("--num-layers", type=int, default=2, help="reducing blocks (sparsest first)")
    parser.add_argument("--source-epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=str(default_cache))
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument("--no-progress", dest="progress", action="store_false")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model = qs.fresh_target_model(qs.pretrained_backbone(args), 5, args.seed)
    target = qs.load_digits(range(5, 10), args.seed)
    fisher = trpts.compute_fisher(model, list(qs.batches(target[0], target[1], 64)), progress=args.progress)
    selection = trpts.allocate_connections(fisher, budget=0.01, model=model)
    trpts.wrap_vit(model, selection, rho=args.rho, num_layers=args.num_layers)
    images = torch.stack([target[2][(target[3] == c).nonzero()[0, 0]] for c in range(4)])
    trpts.plot_kept_tokens(model, images, args.out)
    print(f"reducing blocks {trpts.get_token_config(model).layers} (block counts {selection.block_counts}); "
          f"wrote {args.out}")
    return args.out


if __name__ == "__main__":
    main()
