"""TR-PTS inside a Hugging Face ``Trainer``: Fisher -> selection -> masks -> tokens -> train ->
task delta, in the fewest lines that work.

The recipe for your own script is the block between the two ``# ---`` lines. Defaults run
offline on the quickstart's digits-position task (examples/digits_task.py) with a small
randomly initialized ``ViTForImageClassification``; pass ``--model`` a local folder or a hub id
(e.g. google/vit-base-patch16-224-in21k, downloaded by transformers) for a real checkpoint.

    pip install ".[examples]" && python examples/hf_trainer.py
    torchrun --nproc_per_node 2 examples/hf_trainer.py    # DDP (also: accelerate launch)

Under DDP every rank scores the same all-reduced Fisher and so selects the same entries; the
one thing to get right is the order: join the process group (``PartialState``) *before*
``compute_fisher``, and on a machine without GPUs tell both Accelerate and the Trainer so
(``PartialState(cpu=True)``, ``TrainingArguments(use_cpu=True)``): otherwise each CPU process
trains alone, silently, on its own shard.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits_task as task

import trpts


class Images(Dataset):
    """The dicts a Trainer expects: ``pixel_values`` float32 (3, H, W), ``labels`` int64."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="from_pretrained() source; default: a small random ViT")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--budget", type=float, default=0.01)
    parser.add_argument("--out", type=Path, default=Path("hf-trainer-run"))
    args = parser.parse_args(argv)
    cpu = not torch.cuda.is_available()
    state = PartialState(cpu=cpu)  # joins the process group under torchrun / accelerate launch
    data = task.position_task()
    train_set, (x_test, y_test) = Images(*data["train"]), data["test"]
    if args.model:
        model = ViTForImageClassification.from_pretrained(args.model, num_labels=task.NUM_POSITIONS,
                                                          ignore_mismatched_sizes=True)
    else:
        config = ViTConfig(image_size=task.CANVAS, patch_size=task.PATCH, hidden_size=96, num_hidden_layers=4,
                           num_attention_heads=2, intermediate_size=192, num_labels=task.NUM_POSITIONS)
        model = ViTForImageClassification(config)

    # --- TR-PTS in a Trainer -----------------------------------------------------------------
    loader = torch.utils.data.DataLoader(train_set, batch_size=32)  # a few batches of your data
    fisher = trpts.compute_fisher(model, loader, num_batches=8)    # all-reduced over ranks under DDP
    selection = trpts.allocate_connections(fisher, budget=args.budget, model=model)
    handle = trpts.apply_masks(model, selection)                    # head + selected entries train
    trpts.wrap_vit(model, selection, rho=0.7, num_layers=2)          # token selection, train + eval
    # Weight decay: the handle's groups give it to the head only (decay would move frozen entries).
    optimizer = torch.optim.AdamW(handle.param_groups(weight_decay=0.01, lr=1e-2))
    training_args = TrainingArguments(output_dir=str(args.out), num_train_epochs=args.epochs,
                                      per_device_train_batch_size=64, save_strategy="no", report_to=[],
                                      logging_steps=10, lr_scheduler_type="cosine", warmup_steps=5,
                                      use_cpu=cpu)
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set, optimizers=(optimizer, None))
    trainer.train()
    delta = args.out / "position.safetensors"
    if state.is_main_process:
        trpts.save_delta(model, delta)  # selected values + head, written once
    state.wait_for_everyone()
    # -------------------------------------------------------------------------------------------

    model.eval()
    with torch.no_grad():
        acc = float((model(pixel_values=x_test).logits.argmax(1) == y_test).float().mean())
    wrapper = type(trainer.model_wrapped).__name__
    print(f"rank {state.process_index}/{state.num_processes} ({wrapper}): test accuracy {acc:.1%}; trained "
          f"{handle.num_trainable:,} values; delta {delta} ({delta.stat().st_size / 1024:.1f} KiB)")
    return acc


if __name__ == "__main__":
    main()
