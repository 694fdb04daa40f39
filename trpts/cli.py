"""The ``trpts`` console script: inspect and merge task-delta files.

    trpts info task.safetensors
    trpts merge task.safetensors --model vit_base_patch16_224 --weights base.safetensors --out merged.safetensors
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .delta import merge_delta, read_delta
from .errors import TrptsError, TrptsValueError

__all__ = ["main"]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _info(args: argparse.Namespace) -> int:
    meta, tensors = read_delta(args.file)
    selected = sum(v.numel() for k, v in tensors.items() if k.startswith("values:"))
    full = sum(v.numel() for k, v in tensors.items() if k.startswith("full:"))
    dtypes = sorted({str(v.dtype).replace("torch.", "") for k, v in tensors.items() if not k.startswith("columns:")})
    tokens, gate = meta.get("tokens"), meta.get("gate")
    lines = [
        f"file            {args.file} ({_size(os.path.getsize(args.file))})",
        f"task            {meta.get('name')}",
        f"format version  {meta['format_version']} (written by trpts {meta.get('trpts_version')})",
        f"model           {meta.get('family')} / {meta.get('architecture')}",
        f"fingerprint     {meta['fingerprint']}",
        f"trained values  {selected + full:,} ({selected:,} selected entries in {len(meta['matrices'])} "
        f"weights + {full:,} in fully trained tensors), stored as {', '.join(dtypes)}",
        f"heads           {', '.join(meta['heads']) or '-'}",
        "token selection " + (f"blocks {tokens['layers']}, rho {tokens['rho']} ({tokens['placement']})"
                              if tokens else "none"),
        "token gate      " + (f"{len(gate['matrices'])} gated weights (target skip {gate['skip']:g}); thresholds "
                              "in the table" if gate else "none"),
        f"selection       {meta.get('selection')}",
        f"architecture    {meta.get('identity') or '-'}",
        f"labels          {', '.join(map(str, meta['labels'])) if meta.get('labels') else '-'}",
        f"user metadata   {meta.get('user') or '-'}",
    ]
    print("\n".join(lines))
    if not args.brief:
        width = max((len(m) for m in meta["matrices"]), default=6)
        print(f"\n  {'weight':<{width}}  {'shape':>12}  {'C_l':>5}  {'values':>9}" + ("  threshold" if gate else ""))
        for m, info in meta["matrices"].items():
            shape = "x".join(map(str, info["shape"]))
            tau = tensors.get(f"threshold:{m}")
            print(f"  {m:<{width}}  {shape:>12}  {info['connections']:>5}  {info['shape'][0] * info['connections']:>9,}"
                  + (f"  {float(tau):.4g}" if tau is not None else ""))
        for n, shape in meta["full"].items():
            print(f"  {n:<{width}}  {'x'.join(map(str, shape)):>12}  {'full':>5}  {int(torch.tensor(shape).prod()):>9,}")
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .models._build import build_backbone

    meta, _ = read_delta(args.file)
    model = build_backbone(meta, model=args.model, model_kwargs=_kwargs(args.model_kwargs),
                           hf_config=args.hf_config, num_classes=args.num_classes)
    if args.weights:
        _load_weights(model, Path(args.weights))
    state = merge_delta(model, args.file, args.out, ignore_fingerprint=args.ignore_fingerprint,
                        ignore_architecture=args.ignore_architecture)
    print(f"wrote {args.out}: {len(state)} tensors, {_size(os.path.getsize(args.out))} "
          f"({meta.get('name')} merged into {type(model).__name__} {meta.get('architecture')})")
    return 0


def _kwargs(text: str | None) -> dict[str, Any]:
    """``img_size=64,depth=4,global_pool=token`` -> a dict (numbers, true/false/none parsed)."""
    out: dict[str, Any] = {}
    for item in filter(None, (text or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TrptsValueError(f"--model-kwargs takes key=value pairs separated by commas, got {item!r}")
        out[key.strip()] = _value(value.strip())
    return out


def _value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[lowered]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _load_weights(model: torch.nn.Module, weights: Path) -> None:
    if weights.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # sizes differ: the model built is not the one of the weights
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err)[:300])
        raise TrptsValueError(f"the base weights {weights} do not fit the model built for the delta "
                              f"({first}): a different architecture; describe the model with --model / "
                              "--model-kwargs") from None
    if missing or unexpected:
        print(f"trpts merge: note: {len(missing)} missing and {len(unexpected)} unexpected keys in "
              f"{weights} (e.g. {(missing or unexpected)[:3]})", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trpts", description="Inspect and merge trpts task-delta files (.safetensors).",
        epilog="Exit codes: 0 success, 1 a trpts or file error (message on stderr), 2 bad arguments.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="print a summary of a delta file",
                          description="Print a human summary of a delta: task, format version, model, "
                                      "fingerprint, trained values per weight, token configuration, size.")
    info.add_argument("file", help="a .safetensors file written by trpts.save_delta")
    info.add_argument("--brief", action="store_true", help="omit the per-weight table")
    info.set_defaults(run=_info)
    merge = sub.add_parser("merge", help="bake a delta into a plain checkpoint",
                           description="Build the timm or Hugging Face model the delta was trained on, load "
                                       "its local base weights, apply the delta and write a plain safetensors "
                                       "state dict usable without trpts (nothing is downloaded).")
    merge.add_argument("file", help="a .safetensors file written by trpts.save_delta")
    merge.add_argument("--model", help="timm model name, e.g. vit_base_patch16_224 (default: the one stored "
                                       "in the delta, built with its stored depth, width, heads, patch and "
                                       "image size)")
    merge.add_argument("--model-kwargs", help="more timm create_model arguments, e.g. img_size=64,depth=4")
    merge.add_argument("--hf-config", help="a Hugging Face model: a local save_pretrained directory (its "
                                           "config.json, and its weights when it holds them)")
    merge.add_argument("--weights", help="local base weights (.safetensors, or a torch state dict file); "
                                         "nothing is downloaded")
    merge.add_argument("--num-classes", type=int, help="head size of the base model before merging")
    merge.add_argument("--out", required=True, help="where to write the merged .safetensors")
    merge.add_argument("--ignore-fingerprint", action="store_true",
                       help="merge even if the base weights differ from those the delta was trained on")
    merge.add_argument("--ignore-architecture", action="store_true",
                       help="merge even if depth, width, heads, patch or image size differ from the stored ones")
    merge.set_defaults(run=_merge)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (TrptsError, FileNotFoundError, RuntimeError, ValueError) as err:
        print(f"trpts {args.command}: error: {_flags(str(err))}", file=sys.stderr)
        return 1


def _flags(message: str) -> str:
    """Python argument names in a library message, as this command's flags."""
    for python, flag in (("ignore_fingerprint=True", "--ignore-fingerprint"),
                         ("ignore_architecture=True", "--ignore-architecture")):
        message = message.replace(python, flag)
    return message


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
