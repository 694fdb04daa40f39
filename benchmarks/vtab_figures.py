"""Figures of the VTAB-1k-style benchmark: accuracy against trained fraction (the paper's
Figure 1) from the results file, and Figures 5-7 (selected weights per block, kept patches,
overlap of selections between tasks) drawn from the real tasks with the library's own plots."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

import vtab_data
import vtab_methods as vm

import trpts
from trpts._utils import atomic_write


def plot_accuracy_vs_trained(points: dict[str, tuple[float, float]], title: str, path: Path) -> Path:
    """One marker per method at (trained % of the model, mean test accuracy %); log x axis.
    With no points the axes stay empty and say so (nothing unmeasured is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colours = plt.get_cmap("tab20")  # ten hues dark, then the same ten light: no two alike up to 20
    for i, (name, (trained, acc)) in enumerate(sorted(points.items(), key=lambda kv: kv[1][0])):
        marker = "*" if name.startswith("TR-PTS") else "o"
        colour = colours((2 * i + i // 10) % 20)
        ax.scatter([trained], [acc], s=140 if marker == "*" else 50, marker=marker, color=colour, label=name)
    if not points:
        ax.text(0.5, 0.5, "not measured yet", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.set_xscale("log")
        ax.legend(fontsize="x-small", loc="best")
    ax.set_xlabel("trained values (% of the model)")
    ax.set_ylabel("mean test accuracy (%)")
    ax.set_title("\n".join(textwrap.fill(line, 90) for line in title.splitlines()), fontsize="small")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


def paper_figures(args: argparse.Namespace, settings: vm.Settings, infos: dict[str, vtab_data.TaskInfo],
                  out: Path) -> list[Path]:
    """Figures 5 and 7 from each task's seed-0 selection (Fisher on its first training
    batches, the benchmark's budget) and Figure 6 on four test images of the first task."""
    data = args.data if args.data.exists() else None
    selections, tasks = {}, {}
    for name in args.tasks:
        task = vtab_data.load_task(name, data=data, size=settings.img_size, sizes=settings.sizes,
                                   cache_dir=args.cache_dir)
        tasks[name] = task
        run = vm.Run(vm.METHODS["TR-PTS params"], settings, 0.0, 0.0, 0, task, infos[name].classes)
        model = vm.build_model(settings, infos[name].classes, 0)
        selections[name] = vm.trpts_selection(model, run)
        print(f"{name:<12} selected per block {selections[name].block_counts}")
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "vtab_mini_block_distribution.png", out / "vtab_mini_selection_overlap.png",
               out / "vtab_mini_kept_tokens.png"]
    trpts.plot_block_distribution(selections, written[0])
    trpts.plot_selection_overlap(selections, written[1])
    first = args.tasks[0]
    model = vm.build_model(settings, infos[first].classes, 0)
    trpts.wrap_vit(model, selections[first], rho=settings.rho, num_layers=settings.token_blocks)
    x, y = tasks[first]["test"]
    picks = [int((y == c).nonzero()[0, 0]) for c in y.unique()[:4]]
    norm = vm.normalizer(model)
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    trpts.plot_kept_tokens(model, norm(x[picks].float() / 255), written[2], mean=cfg["mean"], std=cfg["std"])
    return written
