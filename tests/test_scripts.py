"""The README's main job and the benchmarks run end to end (short settings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, timeout: int = 300) -> str:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_quickstart_runs_and_reports(tmp_path):
    out = _run("examples/quickstart.py", "--epochs", "1", "--source-epochs", "1", "--no-progress",
               "--cache-dir", str(tmp_path))
    for method in ("linear probe", "full fine-tuning", "TR-PTS params ", "TR-PTS params + tokens"):
        assert method in out
    assert "bit-identical to the pretrained backbone: yes" in out
    assert "predictions identical: yes" in out
    assert list(tmp_path.glob("digits-canvas-*-ep1.pt")), "the source model should be cached"
    again = _run("examples/quickstart.py", "--epochs", "1", "--source-epochs", "1", "--no-progress",
                 "--cache-dir", str(tmp_path))
    assert "loaded from" in again


def test_selection_benchmark_quick(tmp_path):
    out = _run("benchmarks/selection.py", "--quick", "--no-progress", "--json", str(tmp_path / "r.json"))
    assert "compute_fisher (microbatch)" in out and "allocate_connections" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["command"].startswith("python benchmarks/selection.py --quick")
    assert len(report["rows"]) == 5


def test_figures_example_writes_three_pngs(tmp_path):
    out = _run("examples/figures.py", "--source-epochs", "1", "--no-progress", "--no-cache",
               "--out-dir", str(tmp_path))
    assert "reducing blocks" in out
    for name in ("block_distribution", "selection_overlap", "kept_tokens"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_tokens_benchmark_quick(tmp_path):
    out = _run("benchmarks/tokens.py", "--quick", "--no-progress", "--json", str(tmp_path / "r.json"))
    assert "speed-up / FLOP speed-up" in out
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["rho"] for r in rows] == ["dense", "0.5", "0.5"]
    assert rows[0]["tokens out"] == 65 and rows[1]["tokens out"] == 34
    assert float(rows[2]["FLOP speed-up"].rstrip("x")) > float(rows[1]["FLOP speed-up"].rstrip("x")) > 1


def test_deltas_benchmark_quick(tmp_path):
    out = _run("benchmarks/deltas.py", "--quick", "--no-progress", "--json", str(tmp_path / "r.json"))
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert len(rows) == 4 and "switch task (ms)" in out
    assert all(float(r["vs floor"].split("x")[0]) < 1.2 for r in rows)  # tiny model: the header weighs
