"""The VTAB-1k-style benchmark (benchmarks/vtab_mini.py): protocol, resumable results file,
real-image loading, weights loading, and a --quick run end to end on generated data."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import vtab_data  # noqa: E402
import vtab_figures  # noqa: E402
import vtab_methods as vm  # noqa: E402
import vtab_mini  # noqa: E402
import vtab_seeds  # noqa: E402


def _image_folder(root: Path, layout: str = "split", classes: int = 3, per_class: int = 12) -> Path:
    """PNG images whose colour is their class, in ImageFolder layout."""
    rng = np.random.default_rng(0)
    splits = {"train": per_class, "test": per_class} if layout == "split" else {"": 2 * per_class}
    for split, n in splits.items():
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.full((20, 20, 3), 40 + 80 * c, dtype=np.uint8) + rng.integers(0, 20, (20, 20, 3),
                                                                                          dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/vtab_mini.py", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


def test_quick_run_end_to_end_resumes_and_writes_docs_and_figure(tmp_path):
    data = _image_folder(tmp_path / "colours")
    doc = tmp_path / "doc.md"
    doc.write_text(f"# title\n\nbefore\n{vtab_mini.BEGIN}\nold\n{vtab_mini.END}\nafter\n")
    results = tmp_path / "r.jsonl"
    args = ["--quick", "--no-progress", "--data", str(data), "--tasks", "colours", "digits", "--results",
            str(results), "--cache-dir", str(tmp_path / "cache"), "--docs", str(doc), "--figure",
            str(tmp_path / "fig.png")]
    done = _run(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    methods = [m for m in vtab_mini.PRIORITY]
    # grid (1 rate each in --quick) on the grid task = seed 0 there, then seed 0 on the other task
    assert len(rows) == 2 * len(methods)
    assert rows[0]["method"] == "linear probe"  # the head's rate is chosen before anything else runs
    assert {(r["task"], r["method"]) for r in rows} == {(t, m) for t in ("colours", "digits") for m in methods}
    head_lr = rows[0]["lr"]
    assert all(r["head_lr"] == (r["lr"] if vm.METHODS[r["method"]].head_only else head_lr) for r in rows)
    by = {(r["task"], r["method"]): r for r in rows}
    trained = {m: by["digits", m]["trained"] for m in methods}
    assert trained["linear probe"] == trained["TR-PTS tokens only"] == 32 * 10 + 10
    assert trained["linear probe"] < trained["TR-PTS params"] < trained["LoRA r=8 (qkv, peft)"] < \
        trained["full fine-tuning"]
    assert trained["TR-PTS params"] == trained["TR-PTS params + tokens"]
    assert all(0 <= r["val"] <= 1 and 0 <= r["test"] <= 1 and r["train_s"] > 0 for r in rows)
    assert by["digits", "TR-PTS params + tokens"]["token_layers"]
    text = doc.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith("after\n") and "\nold\n" not in text
    assert "| TR-PTS params + tokens " in text and "colours" in text and "--quick" in text
    assert (tmp_path / "fig.png").stat().st_size > 1000
    again = _run(*args)  # everything is in the results file: nothing runs again
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(results.read_text().splitlines()) == len(rows)
    assert again.stdout == done.stdout


def test_default_mode_says_what_is_missing(tmp_path):
    done = _run("--weights", str(tmp_path / "none.safetensors"), "--data", str(tmp_path / "none"),
                "--results", str(tmp_path / "r.jsonl"))
    assert done.returncode != 0
    assert "--weights" in done.stderr and "--data" in done.stderr and "--quick" in done.stderr
    assert not (tmp_path / "r.jsonl").exists()


def test_unknown_method_is_rejected():
    done = _run("--quick", "--methods", "no such method")
    assert done.returncode != 0 and "unknown methods" in done.stderr


def _args(**kw) -> argparse.Namespace:
    base = dict(tasks=["a", "b"], grid_tasks=["a"], seeds=2, quick=False)
    return argparse.Namespace(**{**base, **kw})


def _row(task, method, lr, head_lr, seed, val):
    return {"task": task, "method": method, "lr": lr, "head_lr": head_lr, "seed": seed, "val": val}


def test_plan_picks_rates_on_validation_in_order():
    methods = ["linear probe", "TR-PTS params"]
    todo = vtab_mini.plan(_args(), [], methods)
    assert todo == [("a", "linear probe", lr, lr, 0) for lr in vm.HEAD_GRID]  # nothing else before the head
    rows = [_row("a", "linear probe", lr, lr, 0, v) for lr, v in zip(vm.HEAD_GRID, (0.5, 0.7, 0.7), strict=True)]
    todo = vtab_mini.plan(_args(), rows, methods)
    best = vm.HEAD_GRID[1]  # a tie goes to the smaller rate
    grid = [("a", "TR-PTS params", lr, best, 0) for lr in vm.SPARSE_GRID]
    assert todo[:3] == grid  # grids first, at the chosen head rate
    assert todo[3:] == [("b", "linear probe", best, best, 0), ("a", "linear probe", best, best, 1),
                        ("b", "linear probe", best, best, 1)]  # seed 0 on "a" is the grid run itself
    rows += [_row(*spec[:5], v) for v, spec in zip((0.1, 0.3, 0.2), grid, strict=True)]
    todo = vtab_mini.plan(_args(), rows, methods)
    lr = vm.SPARSE_GRID[1]
    lp, tr = ("linear probe", best, best), ("TR-PTS params", lr, best)
    assert todo == [("b", *lp, 0), ("b", *tr, 0), ("a", *lp, 1), ("a", *tr, 1), ("b", *lp, 1), ("b", *tr, 1)]


def test_a_grid_grows_past_the_edge_its_best_rate_sits_on():
    assert [vtab_mini._step(x, True) for x in (1e-4, 3e-4, 3e-5)] == [3e-4, 1e-3, 1e-4]
    assert [vtab_mini._step(x, False) for x in (1e-4, 3e-4, 3e-5)] == [3e-5, 1e-4, 1e-5]
    args, m = _args(tasks=["a"]), "linear probe"
    rows = [_row("a", m, lr, lr, 0, v) for lr, v in zip(vm.HEAD_GRID, (0.5, 0.6, 0.7), strict=True)]
    grid, best = vtab_mini.search(rows, m, args, None)
    assert best is None and grid == [*vm.HEAD_GRID, 0.1]  # best on the top edge: one step up
    assert vtab_mini.plan(args, rows, [m]) == [("a", m, 0.1, 0.1, 0)]
    rows.append(_row("a", m, 0.1, 0.1, 0, 0.65))
    assert vtab_mini.search(rows, m, args, None) == ([*vm.HEAD_GRID, 0.1], vm.HEAD_GRID[-1])
    rows[-1]["val"] = 0.8  # still rising: one more step, then the cap
    rows.append(_row("a", m, 0.3, 0.3, 0, 0.9))
    assert vtab_mini.search(rows, m, args, None) == ([*vm.HEAD_GRID, 0.1, 0.3], 0.3)
    low = [_row("a", m, lr, lr, 0, v) for lr, v in zip(vm.HEAD_GRID, (0.7, 0.6, 0.5), strict=True)]
    assert vtab_mini.search(low, m, args, None) == ([1e-3, *vm.HEAD_GRID], None)  # bottom edge: one step down


def test_results_file_appends_and_ignores_a_torn_line(tmp_path):
    path = tmp_path / "r.jsonl"
    vtab_mini.append_result(path, {"settings": "k", "x": 1})
    vtab_mini.append_result(path, {"settings": "other", "x": 2})
    with open(path, "a") as f:
        f.write('{"settings": "k", "x"')  # a run killed mid-write
    assert vtab_mini.load_results(path, "k") == [{"settings": "k", "x": 1}]


@pytest.mark.parametrize("layout", ["split", "flat"])
def test_image_folder_task_is_balanced_disjoint_and_cached(tmp_path, layout):
    data = _image_folder(tmp_path / "imgs", layout)
    infos = vtab_data.task_infos(data)
    assert infos["imgs"].classes == 3 and infos["imgs"].group == "natural"
    task = vtab_data.load_task("imgs", data=data, size=24, sizes=(6, 3, 9), cache_dir=tmp_path / "c")
    for split, n in (("train", 6), ("val", 3), ("test", 9)):
        x, y = task[split]
        assert x.shape == (n, 3, 24, 24) and x.dtype == torch.uint8 and y.dtype == torch.int64
        assert torch.bincount(y, minlength=3).tolist() == [n // 3] * 3
        # the colour says the class: the images really are the labelled ones
        assert (x.float().mean(dim=(1, 2, 3)).sub(50 + 80 * y).abs() < 15).all()
    flat = {split: {tuple(img.flatten()[:64].tolist()) for img in task[split][0]} for split in task}
    assert not (flat["train"] & flat["test"]) and not (flat["val"] & flat["test"])
    again = vtab_data.load_task("imgs", data=data, size=24, sizes=(6, 3, 9), cache_dir=tmp_path / "c")
    assert all(torch.equal(task[s][0], again[s][0]) for s in task)
    assert len(list((tmp_path / "c").glob("imgs-24px-*.pt"))) == 1
    with pytest.raises(ValueError, match="images left"):
        vtab_data.load_task("imgs", data=data, size=24, sizes=(90, 3, 9), cache_dir=tmp_path / "c")


def test_weights_load_at_another_resolution_and_misfits_are_refused(tmp_path):
    import timm

    small = dict(patch_size=8, embed_dim=32, depth=2, num_heads=2, pretrained=False)
    source = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=0, **small)
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    settings = vm.Settings("vit_tiny_patch16_224", str(path), 48, 1, 8, (8, 4, 8), 0.01, 0.7, 1, 1,
                           {k: v for k, v in small.items() if k != "pretrained"})
    model = vm.build_model(settings, num_classes=5, seed=0)
    assert model.pos_embed.shape[1] == 1 + 36 and model.head.out_features == 5
    assert torch.equal(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    deeper = vm.Settings(**{**settings.__dict__, "model_kwargs": {**settings.model_kwargs, "depth": 3}})
    with pytest.raises(ValueError, match="does not fit"):
        vm.build_model(deeper, num_classes=5, seed=0)


def test_ablations_run_at_their_base_methods_rate_without_a_grid():
    ablation = "ablation: + biases"
    assert vm.METHODS[ablation].base == vm.PT and vm.METHODS[ablation].grid == ()
    head = [_row("a", "linear probe", lr, lr, 0, v) for lr, v in zip(vm.HEAD_GRID, (0.5, 0.7, 0.6), strict=True)]
    assert vtab_mini.plan(_args(seeds=1), head, [ablation]) == []  # the base's rate is not known yet
    base = [_row("a", vm.PT, lr, vm.HEAD_GRID[1], 0, v) for lr, v in zip(vm.SPARSE_GRID, (0.2, 0.6, 0.4), strict=True)]
    todo = vtab_mini.plan(_args(seeds=1), head + base, [ablation])
    assert todo == [("a", ablation, vm.SPARSE_GRID[1], vm.HEAD_GRID[1], 0)]  # on the grid task only
    todo = vtab_mini.plan(_args(seeds=1), head + base, [vm.PT, ablation])
    assert todo[0] == ("a", ablation, vm.SPARSE_GRID[1], vm.HEAD_GRID[1], 0)  # before the other tasks
    assert todo[1:] == [("b", vm.PT, vm.SPARSE_GRID[1], vm.HEAD_GRID[1], 0)]


def test_fisher_batches_are_the_runs_count_or_the_methods_own():
    settings = vm.Settings(model="vit_tiny_patch16_224", weights=None, img_size=32, epochs=1, batch_size=8,
                           sizes=(20, 4, 4), budget=0.005, rho=0.7, token_blocks=1, fisher_batches=2,
                           model_kwargs=vtab_mini.QUICK_MODEL)
    model = vm.build_model(settings, 3, 0)
    task = {"train": (torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8), torch.arange(20) % 3)}

    def sizes(method: str) -> list[int]:
        run = vm.Run(vm.METHODS[method], settings, 1e-3, 1e-2, 0, task, 3)
        return [len(y) for _, y in vm.fisher_batches(model, run)]

    assert sizes(vm.D1) == [8, 8]
    assert sizes("default: Fisher on every training batch") == [8, 8, 4]


def test_quick_run_of_every_ablation(tmp_path):
    ablations = [m for m, method in vm.METHODS.items() if method.base]
    results = tmp_path / "r.jsonl"
    done = _run("--quick", "--no-progress", "--tasks", "digits", "count", "--results", str(results),
                "--cache-dir", str(tmp_path / "cache"), "--methods", "linear probe", vm.PT, vm.P0, "GPS-style",
                *ablations)
    assert done.returncode == 0, done.stderr[-3000:]
    all_rows = list(map(json.loads, results.read_text().splitlines()))
    rows = {r["method"]: r for r in all_rows if r["task"] == "digits"}
    assert set(rows) == {"linear probe", vm.PT, vm.P0, "GPS-style", *ablations}
    assert rows["GPS-style, no biases"]["trained"] < rows["GPS-style"]["trained"]
    for m in ablations:  # at the base's rate (or its own fixed one); on the grid task, or on every task
        method = vm.METHODS[m]
        assert rows[m]["lr"] == (method.lr if method.lr is not None else rows[method.base]["lr"])
        assert {r["task"] for r in all_rows if r["method"] == m} == ({"digits", "count"} if method.every_task
                                                                      else {"digits"})
    trained = {m: rows[m]["trained"] for m in rows}
    assert trained["ablation: + biases"] > trained[vm.PT]
    # the quick model is so narrow that both budgets sit at eq. 4's floor (one entry per neuron)
    assert trained["ablation: budget 0.69% (LoRA's count)"] >= trained[vm.PT]
    assert rows["ablation: rho 0.5"]["token_layers"] == rows[vm.PT]["token_layers"]
    assert "token_layers" in rows[vm.P0] and "token_layers" not in rows["share_power 0: no tokens"]
    assert "token_layers" not in rows["default: no tokens"]
    assert len(rows["default: twice the reducing blocks"]["token_layers"]) == 2 * len(rows[vm.P0]["token_layers"])
    gps_fisher = "share_power 0: + biases, no tokens (GPS-style with Fisher scores)"
    assert trained[gps_fisher] > trained["share_power 0: no tokens"] == trained[vm.P0]
    gated = rows["default + token gate (skip 0.5)"]
    assert set(gated["gate_skip_test"]) == set(gated["gate_thresholds"]) == set(gated["gate_skip_train"])
    assert all(0 <= v <= 1 for v in gated["gate_skip_test"].values())
    assert set(gated["gate_skip_test"]) < set(gated["fisher_share"])  # the patch embedding is not gated
    assert "gate_skip_test" not in rows[vm.D1] and "Token gate (issue 18)" in done.stdout
    for m in ablations:
        assert m.replace("|", "\\|") in done.stdout  # the tables escape "|"


def test_seed_report_means_per_seed_and_pairs_against_the_recipe(tmp_path):
    """All-task means per seed on test and validation, their spread, and paired differences from
    the recipe; a method with fewer than two complete seeds gets no row."""

    class Key:
        def key(self) -> str:
            return "k"

    head = vm.HEAD_GRID[1]
    rows = [{**_row("a", "linear probe", lr, lr, 0, 0.9 if lr == head else 0.5), "test": 0.5}
            for lr in vm.HEAD_GRID]
    c2 = "default: C=2 + biases (the same count)"

    def run(task, method, seed, test, val):
        rows.append({**_row(task, method, 1e-3, head, seed, val), "test": test})

    for seed in range(3):  # the recipe: test 0.80 / 0.60 on a / b, validation 0.70 on both
        run("a", vm.D1, seed, 0.80, 0.70)
        run("b", vm.D1, seed, 0.60, 0.70)
    for seed, (ta, tb) in enumerate([(0.84, 0.62), (0.78, 0.64)]):  # seeds 0 and 1 complete
        run("a", c2, seed, ta, 0.68)
        run("b", c2, seed, tb, 0.74)
    run("a", c2, 2, 0.99, 0.99)  # seed 2 misses task b: left out
    run("a", "default: per-sample Fisher", 0, 0.9, 0.9)  # one seed: no row
    run("b", "default: per-sample Fisher", 0, 0.9, 0.9)
    path = tmp_path / "r.jsonl"
    for r in rows:
        vtab_mini.append_result(path, {**r, "settings": "k"})
    res = vtab_mini.Results(argparse.Namespace(**{**vars(_args(seeds=3)), "results": path}), Key())
    text = vtab_seeds.seed_report(res, [vm.D1, c2, "default: per-sample Fisher"])
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(lines) == {"method", vm.D1, c2}
    assert lines[vm.D1] == ["70.00 (70.00)"] * 3 + ["70.00 ± 0.00", "70.00 ± 0.00", "reference", "reference"]
    # c2: seed 0 (84 + 62) / 2 = 73, seed 1 (78 + 64) / 2 = 71; validation 71 on both seeds
    # pairs against the recipe: test +4, +2, -2, +4 -> +2.00, 3 of 4 ahead; validation -2, +4 twice -> +1.00, 2 of 4
    assert lines[c2] == ["73.00 (71.00)", "71.00 (71.00)", "-", "72.00 ± 1.41", "71.00 ± 0.00",
                         "+2.00 (3/4)", "+1.00 (2/4)"]
    assert vtab_seeds.seed_report(res, ["default: per-sample Fisher"]) == ""


def test_figure_points_average_every_task_and_name_the_methods_left_out(tmp_path):
    """The paper's Figure 1 from the results file: a method is a point only with a final run on
    every task, at the mean over tasks of each task's mean over seeds; the library's recipe is
    labelled as such; a method missing a task is named in the title, not drawn."""
    head = vm.HEAD_GRID[1]
    rows = [{**_row("a", "linear probe", lr, lr, 0, 0.9 if lr == head else 0.5), "test": 0.5, "trained": 10,
             "total": 10_000} for lr in vm.HEAD_GRID]
    rows += [{**r, "task": "b", "test": 0.7} for r in rows]  # the probe on task b too: it is complete

    def run(task, method, seed, test, trained=100):
        rows.append({**_row(task, method, 1e-3, head, seed, 0.5), "test": test, "trained": trained,
                     "total": 10_000})

    run("a", vm.D1, 0, 0.80)
    run("a", vm.D1, 1, 0.70)  # task a: mean over seeds 75
    run("b", vm.D1, 0, 0.55)  # task b: 55 -> point (1 %, 65)
    run("a", "default: per-sample Fisher", 0, 0.9)  # no run on task b: left out
    settings = vm.Settings(model="m", weights=None, img_size=32, epochs=1, batch_size=8, sizes=(8, 4, 4),
                           budget=0.005, rho=0.7, token_blocks=1, fisher_batches=1)
    path = tmp_path / "r.jsonl"
    for r in rows:
        vtab_mini.append_result(path, {**r, "settings": settings.key(), "threads": 2, "load": 1.0,
                                       "peak_mib": 1.0, "train_s": 1.0})
    args = argparse.Namespace(**{**vars(_args(seeds=3)), "results": path})
    points, title = vtab_mini.figure_points(vtab_mini.Results(args, settings),
                                            ["linear probe", vm.D1, "default: per-sample Fisher"])
    recipe = vtab_mini.LABELS[vm.D1]
    assert set(points) == {"linear probe", recipe}
    assert points[recipe] == pytest.approx((1.0, 65.0))
    assert points["linear probe"][1] == pytest.approx(100 * (0.5 + 0.7) / 2)
    assert title.startswith("mean over 2 tasks (32 px, 1 epochs)")
    assert title.endswith("not on every task yet: default: per-sample Fisher")
    out = vtab_figures.plot_accuracy_vs_trained(points, title, tmp_path / "fig.png")
    assert out.stat().st_size > 0
