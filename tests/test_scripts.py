"""The README's main job and the benchmarks run end to end (short settings)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 300, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    """A cache directory holding the quickstart's source model (1 epoch), trained once here by the
    function the scripts call, so the scripts below load it instead of each training it."""
    sys.path.insert(0, str(ROOT / "examples"))
    import digits_task

    cache = tmp_path_factory.mktemp("digits-cache")
    digits_task.pretrained_backbone(cache, epochs=1, progress=False)
    assert list(cache.glob("digits-canvas-*-ep1.pt")), "the source model should be cached"
    return cache


def test_quickstart_runs_and_reports(digits_cache):
    out = _run("examples/quickstart.py", "--epochs", "1", "--source-epochs", "1", "--no-progress",
               "--cache-dir", str(digits_cache))
    for method in ("linear probe", "full fine-tuning", "TR-PTS params ", "TR-PTS params + tokens"):
        assert method in out
    assert "bit-identical to the pretrained backbone: yes" in out
    assert "predictions identical: yes" in out
    assert "loaded from" in out  # the cached source model


def test_selection_benchmark_quick(tmp_path):
    out = _run("benchmarks/selection.py", "--quick", "--no-progress", "--json", str(tmp_path / "r.json"))
    assert "compute_fisher (microbatch)" in out and "allocate_connections" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["command"].startswith("python benchmarks/selection.py --quick")
    assert len(report["rows"]) == 4
    assert re.fullmatch(r"peak \d+\.\d\dx the scores", report["rows"][-1]["vs baseline"])


def test_figures_example_writes_three_pngs(tmp_path):
    out = _run("examples/figures.py", "--source-epochs", "1", "--no-progress", "--no-cache",
               "--out-dir", str(tmp_path))
    assert "reducing blocks" in out
    for name in ("block_distribution", "selection_overlap", "kept_tokens"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("compile_mode", ["none", "default"])
def test_tokens_benchmark_quick(tmp_path, compile_mode):
    out = _run("benchmarks/tokens.py", "--quick", "--no-progress", "--compile", compile_mode,
               "--json", str(tmp_path / "r.json"))
    assert "speed-up / FLOP speed-up" in out and "train / FLOP speed-up" in out
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["rho"] for r in rows] == ["dense", "0.5", "0.5"]
    assert rows[0]["tokens out"] == 65 and rows[1]["tokens out"] == 34
    assert float(rows[2]["FLOP speed-up"].rstrip("x")) > float(rows[1]["FLOP speed-up"].rstrip("x")) > 1


def test_tokens_benchmark_quick_on_pooled_and_position_dependent_families(tmp_path):
    models = ["vit_tiny_patch16_224:global_pool=avg,class_token=false", "eva02_tiny_patch14_224",
              "beit_base_patch16_224"]
    _run("benchmarks/tokens.py", "--quick", "--no-progress", "--skip-train", "--models", *models,
         "--json", str(tmp_path / "r.json"))
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert all(r["train step speed-up"] == "nanx" for r in rows if r["rho"] != "dense")
    assert [r["model"] for r in rows] == [m for m in models for _ in range(3)]
    assert [r["score"] for r in rows] == ["-", "mean", "mean"] * 3  # all three heads read the patch tokens
    assert all(float(r["FLOP speed-up"].rstrip("x")) > 1 for r in rows if r["rho"] != "dense")


def test_deltas_benchmark_quick(tmp_path):
    out = _run("benchmarks/deltas.py", "--quick", "--no-progress", "--json", str(tmp_path / "r.json"))
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert len(rows) == 4 and "switch task (ms)" in out
    assert all(float(r["vs floor"].split("x")[0]) < 1.2 for r in rows)  # tiny model: the header weighs


def test_serving_benchmark_quick(tmp_path):
    _run("benchmarks/serving.py", "--quick", "--no-progress", "--json", str(tmp_path / "r.json"))
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    names = [r["configuration"] for r in rows]
    assert names[0] == "single-task batch (reference)" and rows[0]["vs single-task batch"] == "1.00x"
    for t in (1, 2, 4):
        assert f"trpts forward_tasks, T={t}" in names and f"PEFT mixed LoRA r=8, T={t}" in names
    assert "trpts sequential activate_delta, T=4" in names and len(rows) == 9


def test_accuracy_benchmark_quick(tmp_path, digits_cache):
    out = _run("benchmarks/accuracy.py", "--quick", "--no-progress", "--cache-dir", str(digits_cache),
               "--json", str(tmp_path / "r.json"))
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["method"] for r in rows] == [
        "linear probe", "full fine-tuning", "BitFit", "LoRA (peft, r=8, qkv)", "GPS-style (uniform K, |grad|)",
        "TR-PTS params only", "TR-PTS tokens only", "TR-PTS params + tokens (sparse)",
        "TR-PTS params + tokens (dense)", "TR-PTS params + tokens (random)"]
    trained = {r["method"]: int(r["trained values"].replace(",", "")) for r in rows}
    assert trained["linear probe"] == trained["TR-PTS tokens only"] == 96 * 4 + 4
    assert trained["linear probe"] < trained["TR-PTS params only"] < trained["LoRA (peft, r=8, qkv)"]
    assert trained["TR-PTS params only"] < trained["full fine-tuning"]
    assert "test acc" in out


def test_sparse_kernel_benchmark_quick(tmp_path):
    _run("benchmarks/sparse_kernel.py", "--quick", "--no-progress", "--json", str(tmp_path / "r.json"))
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["kernel"] for r in rows[:3]] == ["dense dW GEMM", "native", "eager"]
    assert len(rows) == 2 * 2 * 3 and all(r["vs dense GEMM"].endswith("x") for r in rows)
    assert all(float(r["max abs error"]) < 1e-4 for r in rows if r["kernel"] != "dense dW GEMM")


def test_training_benchmark_quick(tmp_path):
    # every method kind and both storages, with tokens (the plain TR-PTS rows differ only by not wrapping)
    methods = ["full fine-tuning", "linear probe", "LoRA (peft r=8, qkv)", "SHiRA (peft)", "Super-Tuning (peft)",
               "TR-PTS params + tokens (hooks)", "TR-PTS params (sparse)", "TR-PTS params (sparse, token gate)"]
    import timm
    from safetensors.torch import save_file

    weights = tmp_path / "w.safetensors"  # --weights: a timm-named checkpoint (here a random one at 224 px)
    save_file({k: v.contiguous() for k, v in timm.create_model("vit_tiny_patch16_224").state_dict().items()},
              str(weights))
    _run("benchmarks/training.py", "--quick", "--no-progress", "--methods", *methods, "--json", str(tmp_path / "r.json"),
         "--weights", str(weights), "--share-power", "0", "--fisher-task", "location", "--num-classes", "16",
         env={"XDG_CACHE_HOME": str(tmp_path / "cache")})  # the task's images are cached there
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["method"] for r in rows][:3] == ["full fine-tuning", "linear probe", "LoRA (peft r=8, qkv)"]
    assert rows[0]["time vs full"] == "1.00x" and rows[0]["memory vs full"] == "1.00x"
    assert all(float(r["peak memory"].split()[0]) > 0 for r in rows)


def _png(path: Path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 20), (value, 255 - value, value // 2)).save(path)


TINY = ["--checkpoint", "vit_tiny_patch16_224", "--no-pretrained", "--model-kwargs",
        '{"depth": 2, "embed_dim": 48, "num_heads": 2}', "--img-size", "32", "--epochs", "2", "--warmup-epochs",
        "1", "--batch-size", "4", "--workers", "0", "--fisher-batches", "1", "--token-blocks", "1",
        "--budget", "0.05", "--no-progress"]


def test_vtab_harness_on_a_generated_dataset(tmp_path):
    import trpts

    root = tmp_path / "vtab-1k" / "eurosat"
    lines = []
    for i in range(12):
        _png(root / "images" / f"{i}.jpg", 20 * i)
        lines.append(f"images/{i}.jpg {i % 3}")
    for name, part in {"train800": lines[:6], "val200": lines[6:8], "train800val200": lines[:8],
                       "test": lines[8:]}.items():
        (root / f"{name}.txt").write_text("\n".join(part) + "\n")
    out = _run("examples/vtab.py", "--data-root", str(tmp_path / "vtab-1k"), "--dataset", "eurosat",
               "--out", str(tmp_path / "runs"), "--head-lr", "0.01", "--train-biases", *TINY)
    assert "eurosat: test accuracy" in out
    result = json.loads((tmp_path / "runs" / "eurosat.json").read_text())
    assert result["settings"]["head_lr"] == 0.01 and result["settings"]["train_biases"]
    assert result["eval_split"] == "test" and 0 <= result["accuracy"] <= 1 and len(result["reducing_blocks"]) == 1
    meta, tensors = trpts.read_delta(tmp_path / "runs" / "eurosat.safetensors")
    assert meta["user"]["eval_split"] == "test"
    assert any(k.startswith("full:blocks.") and k.endswith(".bias") for k in tensors)  # --train-biases
    bad = subprocess.run([sys.executable, "examples/vtab.py", "--data-root", str(tmp_path), "--dataset", "dtd",
                          *TINY], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "train800val200.txt not found" in bad.stderr


def test_fgvc_harness_on_a_generated_dataset(tmp_path):
    root = tmp_path / "fgvc" / "CUB_200_2011"
    splits: dict[str, dict[str, int]] = {"train": {}, "val": {}, "test": {}}
    for i in range(12):
        rel = f"{i % 3:03d}.Bird/{i}.jpg"
        _png(root / "images" / rel, 20 * i)
        split = "train" if i < 6 else "val" if i < 8 else "test"
        splits[split][rel] = 1 + i % 3  # CUB's labels are 1-based
    for name, content in splits.items():
        (root / f"{name}.json").write_text(json.dumps(content))
    out = _run("examples/fgvc.py", "--data-root", str(tmp_path / "fgvc"), "--dataset", "CUB_200_2011",
               "--split", "val", "--out", str(tmp_path / "runs"), *TINY)
    assert "CUB_200_2011: val accuracy" in out
    result = json.loads((tmp_path / "runs" / "CUB_200_2011.json").read_text())
    assert result["eval_split"] == "val" and result["trained_values"] > 0
    assert not result["settings"]["train_biases"]


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"],
    # accelerate's DDP launcher (torchrun underneath); --multi_gpu also drives CPU processes,
    # while --cpu with several processes needs mpirun
    "accelerate": ["-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "29518"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_hf_trainer_example_on_two_processes(tmp_path, launcher):
    """The Trainer example under torchrun and under ``accelerate launch`` with 2 CPU processes:
    the Trainer really runs DDP, both ranks end with the same model (same test accuracy) and
    rank 0 alone writes the delta."""
    import re

    import trpts

    out = _run(*LAUNCHERS[launcher], "examples/hf_trainer.py", "--epochs", "0.5", "--out", str(tmp_path),
               timeout=600)
    ranks = dict(re.findall(r"rank (\d)/2 \(DistributedDataParallel\): test accuracy ([\d.]+)%", out))
    assert sorted(ranks) == ["0", "1"] and ranks["0"] == ranks["1"], out
    meta, tensors = trpts.read_delta(tmp_path / "position.safetensors")
    assert meta["family"] == "hf-vit" and meta["tokens"]["layers"]
    assert any(k.startswith("values:") for k in tensors)
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors"] == ["position.safetensors"]


def test_fisher_batches_benchmark_quick(tmp_path):
    out = _run("benchmarks/fisher_batches.py", "--quick", "--no-progress", "--cache-dir", str(tmp_path / "c"),
               "--json", str(tmp_path / "r.json"))
    assert "recall vs all" in out
    report = json.loads((tmp_path / "r.json").read_text())
    recalls = [r["recall vs all (median)"] for r in report["rows"]]
    assert [r["batches"] for r in report["rows"]] == [1, 2, 4] and all(0 < v <= 1 for v in recalls)
    assert report["fisher_batch_s"] > 0 and report["train_step_s"] > 0
