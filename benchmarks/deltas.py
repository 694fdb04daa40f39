"""Size and speed of task deltas.

For timm ``vit_base_patch16_224`` (random weights: sizes and times do not depend on them) at
budgets of about 0.3 % and 0.6 %: the delta file against the information floor (stored value
bytes + 2 bytes per position + head; goal: file <= 1.05 x floor + 4 KiB, the slack being the
safetensors header with trpts' metadata), against the
full checkpoint (goal >= 100x smaller) and against a LoRA adapter from ``peft`` (r = 8 on qkv,
head saved too) written by ``save_pretrained``; then load time and task-switch time (goal
<= 20 ms on a 2-core CPU).

Usage::

    python benchmarks/deltas.py            # vit_base_patch16_224
    python benchmarks/deltas.py --quick    # vit_tiny, seconds; run by the test suite
"""

from __future__ import annotations

import argparse
import copy
import struct
import sys
import tempfile
from pathlib import Path

import timm
import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds, report

import trpts


def _fake_train(model: torch.nn.Module, handle: trpts.MaskHandle, seed: int) -> None:
    """Move the selected entries and the head as training would (sizes do not care how)."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in handle.selection:
            idx = handle.selection.flat_indices(name)
            params[name].view(-1)[idx] += 0.01 * torch.randn(idx.numel(), generator=g)
        for p in handle.full.values():
            p.add_(0.01 * torch.randn(p.shape, generator=g))


def _header_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def _lora_bytes(model: torch.nn.Module, tmp: Path) -> int:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, target_modules=["qkv"], modules_to_save=["head"]))
    peft_model.save_pretrained(tmp / "lora")
    return sum(f.stat().st_size for f in (tmp / "lora").iterdir())


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="vit_tiny and few repeats (seconds)")
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.003, 0.006])
    parser.add_argument("--num-classes", type=int, default=100, help="head size of each task")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (median)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    name = "vit_tiny_patch16_224" if args.quick else args.model
    repeats = args.repeats or (2 if args.quick else 9)
    torch.manual_seed(0)
    backbone = timm.create_model(name, pretrained=False, num_classes=args.num_classes).eval()
    scored = trpts.default_scored_parameters(backbone)
    params = dict(backbone.named_parameters())
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, tmp / "full.safetensors")
        full_bytes = (tmp / "full.safetensors").stat().st_size
        lora_bytes = _lora_bytes(backbone, tmp)
        paths = []
        for i, budget in enumerate(tqdm(args.budgets, desc="budgets", disable=args.no_progress)):
            g = torch.Generator().manual_seed(i)
            fisher = {n: torch.rand(params[n].shape, generator=g).pow_(4) for n in scored}
            selection = trpts.allocate_connections(fisher, budget=budget, model=backbone, share_power=1)
            for dtype in (None, torch.float16):
                model = copy.deepcopy(backbone)
                handle = trpts.apply_masks(model, selection)
                _fake_train(model, handle, seed=i)
                path = trpts.save_delta(model, tmp / f"task{i}-{dtype}.safetensors", dtype=dtype)
                if dtype is None:
                    paths.append(path)
                value_bytes = 2 if dtype is torch.float16 else 4
                floor = (selection.num_selected * (value_bytes + 2)
                         + sum(p.numel() for p in handle.full.values()) * value_bytes)
                size = path.stat().st_size
                rows.append({
                    "model": name, "budget": f"{budget:.3%}", "selected": f"{selection.num_selected:,}",
                    "stored as": "fp16" if dtype else "fp32", "delta": f"{size / 1024:.0f} KiB",
                    "floor (no header)": f"{floor / 1024:.0f} KiB", "header": f"{_header_bytes(path) / 1024:.1f} KiB",
                    "vs floor": f"{size / floor:.3f}x (<= 1.05x + 4 KiB: {'met' if size <= 1.05 * floor + 4096 else 'MISSED'})",
                    "full checkpoint / delta": f"{full_bytes / size:.0f}x",
                    "LoRA r=8 qkv / delta": f"{lora_bytes / size:.2f}x",
                })
        # load and switch times on one backbone holding both fp32 tasks
        model = copy.deepcopy(backbone)

        def load_once() -> None:
            trpts.load_delta(model, paths[0], name="probe").remove()

        load_s = median_seconds(load_once, repeats)[0]
        for j, p in enumerate(paths):
            trpts.load_delta(model, p, name=f"t{j}")
        state = {"i": 0}

        def switch() -> None:
            state["i"] ^= 1
            trpts.activate_delta(model, f"t{state['i']}")

        switch_s = median_seconds(switch, repeats * 5)[0]
        to_plain_s = median_seconds(lambda: (trpts.activate_delta(model, None), trpts.activate_delta(model, "t0")),
                                    repeats)[0] / 2
    for r in rows:
        r["load (ms)"] = f"{1e3 * load_s:.0f}"
        r["switch task (ms)"] = f"{1e3 * switch_s:.1f} (goal <= 20)"
        r["to/from plain (ms)"] = f"{1e3 * to_plain_s:.1f}"
    settings = {"full checkpoint": f"{full_bytes / 2**20:.1f} MiB", "LoRA adapter": f"{lora_bytes / 1024:.0f} KiB",
                "repeats": repeats}
    return report("trpts delta benchmark", "deltas.py", argv, settings, rows, args.json)


if __name__ == "__main__":
    main()
