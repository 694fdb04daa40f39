"""Speed of token selection (``trpts.wrap_vit``) against the dense model, next to the FLOP count.

For each model and each (rho, number of reducing blocks): inference throughput (batch 32),
latency (batch 1) and a training step (forward + backward) of the wrapped model against the
dense one, in one process, both on the same attention kernel (SDPA). Dense and wrapped runs
alternate round by round; the table gives medians of the per-round ratios. ``--compile MODE``
runs both through ``torch.compile(mode=MODE, fullgraph=True)`` (one graph per input shape),
the documented way to remove the reducing blocks' per-kernel launch overhead.
The goal: measured speed-up >= 0.9 x the speed-up the FLOP ratio predicts.

Usage::

    python benchmarks/tokens.py                      # vit_small + vit_base, full grid (GPU-sized)
    python benchmarks/tokens.py --models vit_small_patch16_224 --rhos 0.7 0.5 --blocks 1 3
    python benchmarks/tokens.py --quick              # seconds; run by the test suite
    python benchmarks/tokens.py --models vit_small_patch16_224:global_pool=avg \
        vit_base_patch16_siglip_224 eva02_small_patch14_224 beit_base_patch16_224   # issue #16's families
    python benchmarks/tokens.py --bf16 --batch 256 --train-batch 64 --models vit_base_patch16_224 \
        --compile max-autotune                       # the issue #15 goal on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import report, timed

import trpts

LAYERS = {1: [3], 2: [3, 6], 3: [3, 6, 9]}  # evenly spaced reducing blocks (as in EViT)


def model_spec(spec: str) -> tuple[str, dict[str, object]]:
    """``"name"`` or ``"name:key=value,..."`` (timm ``create_model`` options; ints, floats, booleans
    and strings) -> ``(name, options)``."""
    name, _, rest = spec.partition(":")
    options: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        key, _, text = item.partition("=")
        value: object = {"true": True, "false": False}.get(text.lower(), text)
        for cast in (int, float):
            try:
                value = cast(text)
                break
            except ValueError:
                pass
        options[key] = value
    return name, options


def bench_model(name: str, args: argparse.Namespace, bar: tqdm) -> list[dict[str, object]]:
    """Dense and wrapped runs alternate round by round (wrapping is cheap), so slow drift of a
    shared machine cancels out of the per-round ratios, whose medians are reported."""
    torch.manual_seed(0)
    arch, options = model_spec(name)
    kwargs = dict(img_size=32, patch_size=4, depth=4, embed_dim=64, num_heads=2) if args.quick else {}
    model = timm.create_model(arch, pretrained=False, **{"num_classes": 1000, **kwargs, **options}).to(args.device)
    img = 32 if args.quick else 224
    x_tp = torch.randn(args.batch, 3, img, img, device=args.device)
    x_lat = x_tp[:1]
    x_tr, y_tr = x_tp[: args.train_batch], torch.randint(0, 1000, (args.train_batch,), device=args.device)
    amp = torch.autocast(args.device, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    layers = {1: [1], 2: [1, 2], 3: [1, 2, 3]} if args.quick else LAYERS

    def compiled(m: torch.nn.Module) -> torch.nn.Module:
        if args.compile == "none":
            return m
        # every model instance x input shape x train/eval is its own graph of the same forward
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        return torch.compile(m, mode=None if args.compile == "default" else args.compile, fullgraph=True,
                             dynamic=False)

    def one_round(m: torch.nn.Module, run: torch.nn.Module) -> dict[str, float]:
        """``m``: the module (train/eval, grads), ``run``: what is called (``m`` or compiled)."""

        def infer(x: torch.Tensor) -> None:
            with torch.inference_mode(), amp:
                run(x)

        def train() -> None:
            m.zero_grad(set_to_none=True)
            with amp:
                loss = F.cross_entropy(run(x_tr), y_tr)
            loss.backward()

        m.eval()
        tp, lat = timed(lambda: infer(x_tp)), timed(lambda: infer(x_lat))
        m.train()
        return {"tp": tp, "lat": lat, "train": float("nan") if args.skip_train else timed(train)}

    dense_flops = trpts.count_flops(model, (1, 3, img, img))
    dense_tokens = trpts.token_counts(model, (3, img, img))[-1][1]
    dense_run = compiled(model)
    one_round(model, dense_run)  # warm-up (and compilation) of the dense model
    rows, dense_all = [], []
    for rho in args.rhos:
        for n_blocks in args.blocks:
            wrapped_model = trpts.wrap_vit(copy.deepcopy(model), rho=rho, layers=layers[n_blocks])
            score = trpts.get_token_config(wrapped_model).score
            flops = trpts.count_flops(wrapped_model, (1, 3, img, img))
            tokens = trpts.token_counts(wrapped_model, (3, img, img))[-1][1]
            wrapped_run = compiled(wrapped_model)
            one_round(wrapped_model, wrapped_run)  # warm-up (and compilation) of the wrapped shapes
            dense, wrapped = [], []
            for _ in range(args.repeats):
                dense.append(one_round(model, dense_run))
                wrapped.append(one_round(wrapped_model, wrapped_run))
            del wrapped_model, wrapped_run
            dense_all += dense
            ratio = {k: statistics.median(d[k] / w[k] for d, w in zip(dense, wrapped, strict=True))
                     for k in ("tp", "lat", "train")}
            flop_gain = dense_flops / flops
            rows.append({
                "model": name, "score": score, "rho": f"{rho:g}", "blocks": str(layers[n_blocks]), "tokens out": tokens,
                "GFLOPs/img": f"{flops / 1e9:.2f}", "FLOP speed-up": f"{flop_gain:.3f}x",
                "img/s (batch)": f"{args.batch / statistics.median(w['tp'] for w in wrapped):.1f}",
                "speed-up": f"{ratio['tp']:.3f}x", "speed-up / FLOP speed-up": f"{ratio['tp'] / flop_gain:.2f}",
                "latency ms (b=1)": f"{1e3 * statistics.median(w['lat'] for w in wrapped):.1f}",
                "latency speed-up": f"{ratio['lat']:.3f}x", "train step speed-up": f"{ratio['train']:.3f}x",
                "train / FLOP speed-up": f"{ratio['train'] / flop_gain:.2f}",
            })
            bar.update()
    dense_row = {
        "model": name, "score": "-", "rho": "dense", "blocks": "-", "tokens out": dense_tokens,
        "GFLOPs/img": f"{dense_flops / 1e9:.2f}", "FLOP speed-up": "1.000x",
        "img/s (batch)": f"{args.batch / statistics.median(d['tp'] for d in dense_all):.1f}",
        "speed-up": "1.000x", "speed-up / FLOP speed-up": "1.00",
        "latency ms (b=1)": f"{1e3 * statistics.median(d['lat'] for d in dense_all):.1f}",
        "latency speed-up": "1.000x", "train step speed-up": "1.000x", "train / FLOP speed-up": "1.00",
    }
    return [dense_row, *rows]


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model, few configs (seconds)")
    parser.add_argument("--models", nargs="+", default=None,
                        help="timm names, with create_model options as name:key=value,... (default: "
                             "vit_small_patch16_224 vit_base_patch16_224)")
    parser.add_argument("--rhos", nargs="+", type=float, default=[0.9, 0.7, 0.5])
    parser.add_argument("--blocks", nargs="+", type=int, default=[1, 2, 3], choices=[1, 2, 3],
                        help="numbers of reducing blocks (at blocks 3 / 3,6 / 3,6,9)")
    parser.add_argument("--batch", type=int, default=32, help="batch size for throughput")
    parser.add_argument("--train-batch", type=int, default=None, help="batch for the training step (default: --batch)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    parser.add_argument("--bf16", action="store_true", help="run under bfloat16 autocast")
    parser.add_argument("--skip-train", action="store_true", help="inference only (train columns: nan)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", default="none", choices=["none", "default", "max-autotune", "reduce-overhead"],
                        help="torch.compile both models with this mode (fullgraph, static shapes)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.rhos, args.blocks = args.models or ["vit_tiny_patch16_224"], [0.5], [1, 2]
        args.batch, args.repeats = 4, 1
    args.models = args.models or ["vit_small_patch16_224", "vit_base_patch16_224"]
    args.train_batch = args.train_batch or args.batch
    total = len(args.models) * len(args.rhos) * len(args.blocks)
    rows: list[dict[str, object]] = []
    with tqdm(total=total, desc="configs", disable=args.no_progress) as bar:
        for name in args.models:
            rows += bench_model(name, args, bar)
    settings = {"device": args.device, "bf16": args.bf16, "batch": args.batch, "train_batch": args.train_batch,
                "repeats": args.repeats, "compile": args.compile}
    return report("trpts token-selection benchmark", "tokens.py", argv, settings, rows, args.json)


if __name__ == "__main__":
    main()
