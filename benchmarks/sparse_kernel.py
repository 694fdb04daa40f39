"""Sparse weight-gradient kernels against the dense weight-gradient GEMM they replace.

For the linear layers of a ViT (``qkv``, ``proj``, ``fc1``, ``fc2`` of ViT-S/16 and ViT-B/16)
at ``batch x 197`` tokens and C selected connections per output neuron, each kernel of
:func:`trpts.sparse.sparse_weight_grad` (``native`` on the CPU, ``triton`` on CUDA,
``compiled``, ``eager``) computes
``g[i, c] = sum_t dY[t, i] X[t, index[i, c]]``; the baseline is ``dY^T @ X``, the dense weight
gradient that full fine-tuning and the hook storage compute for the same layer. Every kernel
and the baseline run on the same tensors, alternating call by call; by default the caches are
flushed before each call (``--hot`` keeps them), since in training ``X`` was saved long before
backward reads it. Medians of ``--repeats`` calls; the error column is the largest absolute
difference from a float64 reference.

    python benchmarks/sparse_kernel.py [--quick] [--batch 8] [--conns 1 4 16] [--kernels native compiled eager]
    python benchmarks/sparse_kernel.py --device cuda --dtype bfloat16 --batch 64   # GPU: triton compiled eager

On CUDA the inputs are made in ``--dtype`` (training under bf16 autocast hands the kernel
bf16 tensors; the GEMM baseline runs in that dtype too), caches are not flushed (the L2 is
small next to the inputs), and ``native`` is not available.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from common import report, timed
from tqdm.auto import tqdm

import trpts.sparse as sp

SHAPES = {  # (in, out) of the linear layers of one block
    "vit_small": {"qkv": (384, 1152), "proj": (384, 384), "fc1": (384, 1536), "fc2": (1536, 384)},
    "vit_base": {"qkv": (768, 2304), "proj": (768, 768), "fc1": (768, 3072), "fc2": (3072, 768)},
}
QUICK_SHAPES = {"tiny": {"fc1": (32, 64), "fc2": (64, 32)}}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, native and eager kernels (seconds)")
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--batch", type=int, default=8, help="images per batch (197 tokens each)")
    parser.add_argument("--conns", nargs="+", type=int, default=[1, 4, 16], help="C: connections per neuron")
    parser.add_argument("--kernels", nargs="+", default=None, choices=["native", "triton", "compiled", "eager"],
                        help="default: native compiled eager (CPU), triton compiled eager (CUDA)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--hot", action="store_true", help="do not flush caches between calls")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("sparse_kernel.py: --device cuda needs a CUDA device")
    args.kernels = args.kernels or (["triton", "compiled", "eager"] if cuda else ["native", "compiled", "eager"])
    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shapes = {m: SHAPES[m] for m in args.models}
    tokens = args.batch * 197
    if args.quick:
        shapes, tokens, args.conns, args.repeats = QUICK_SHAPES, 100, [1, 4], 3
        args.kernels = [k for k in args.kernels if k != "compiled"]
    flush = None if args.hot or cuda else torch.empty(64 * 2**20 // 4)  # larger than the last-level cache here

    def cold(fn) -> float:
        if flush is not None:
            flush.add_(1.0)
        return timed(fn)

    cases = [(m, layer, fan_in, fan_out, c) for m, layers in shapes.items()
             for layer, (fan_in, fan_out) in layers.items() for c in args.conns if c <= fan_in]
    rows: list[dict[str, object]] = []
    g = torch.Generator().manual_seed(0)
    for model, layer, fan_in, fan_out, conns in tqdm(cases, desc="layers", disable=args.no_progress):
        x = torch.randn(tokens, fan_in, generator=g).to(dev, dtype)
        dy = torch.randn(tokens, fan_out, generator=g).to(dev, dtype)
        index = torch.rand(fan_out, fan_in, generator=g).argsort(1)[:, :conns].sort(1).values.to(dev)
        reference = (dy.double().t() @ x.double()).gather(1, index)
        calls = {"dense dW GEMM": lambda x=x, dy=dy: dy.t() @ x}
        errors = {}
        for kind in args.kernels:
            def call(kind: str = kind, x: torch.Tensor = x, dy: torch.Tensor = dy,
                     index: torch.Tensor = index) -> torch.Tensor:
                sp.set_sparse_kernel(kind)  # type: ignore[arg-type]
                return sp.sparse_weight_grad(x, dy, index)

            errors[kind] = (call().double() - reference).abs().max().item()  # also builds/compiles it
            calls[kind] = call
        times: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.repeats):
            for name, fn in calls.items():
                times[name].append(cold(fn))
        sp.set_sparse_kernel("auto")
        base = statistics.median(times["dense dW GEMM"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append({"model": model, "layer": f"{layer} {fan_in}->{fan_out}", "tokens": tokens, "C": conns,
                         "kernel": name, "time": f"{med * 1e3:.2f} ms", "vs dense GEMM": f"{med / base:.2f}x",
                         "max abs error": f"{errors[name]:.1e}" if name in errors else "-"})
    return report("Sparse weight-gradient kernels", "sparse_kernel.py", argv,
                  {"tokens": tokens, "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": args.dtype,
                   "threads": torch.get_num_threads(), "caches": "hot" if flush is None else "flushed",
                   "repeats": args.repeats}, rows, args.json)


if __name__ == "__main__":
    main()
