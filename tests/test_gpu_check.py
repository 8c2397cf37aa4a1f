"""scripts/gpu_check.sh --dry-run: every step of the GPU machine's script runs and passes at tiny sizes on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers.runs import ROOT

STEPS = ["wheels", "pytest_gpu", "bench_gpu", "run_default", "run_noise_device", "parity"]
# what a dry run skips, and why: the local environment has the packages; CPU streams are the device's
SKIPPED_IN_DRY_RUN = {"wheels", "run_noise_device"}
BENCH_ROWS = [
    "(a) bare diffusers loop",
    "(b) runner, ddim eta=0",
    "(b1) runner, ddim eta=1",
    "(c0) runner, ddim_gmm K=8 eta=0",
    "(c1) runner, ddim_gmm K=8 eta=1",
    "(d) runner, bf16 + channels_last",
]


def run_dry(out: Path) -> subprocess.CompletedProcess:
    # the venv's interpreter for every step (the script's python3 may not be it); nothing from the
    # calling pytest that would change the inner one
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")} | {
        "OUT": str(out),
        "PYTHON": sys.executable,
    }
    return subprocess.run(
        ["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_dry_run_passes_every_step(tmp_path):
    proc = run_dry(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] is True
    statuses = {row["step"]: row["status"] for row in summary["steps"]}
    assert list(statuses) == STEPS
    for step, status in statuses.items():
        expected = "skipped: dry run" if step in SKIPPED_IN_DRY_RUN else "passed"
        assert status.startswith(expected), (step, status)
    assert "| pytest_gpu | passed |" in (tmp_path / "summary.md").read_text()

    table = (tmp_path / "bench_gpu.md").read_text()
    for label in BENCH_ROWS:
        noise_rows = 1 if label.startswith(("(a)", "(d)")) else 2  # runner rows: CPU and device streams
        assert table.count(f"| cat256 | {label} |") == noise_rows, label
    rows = json.loads((tmp_path / "bench_gpu.md.json").read_text())["rows"]
    assert len(rows) == 10 and all(row["images_per_second"] > 0 for row in rows)

    runs = json.loads((tmp_path / "runs.json").read_text())
    assert runs["parity"]["devices"] == [1, 2] and runs["parity"]["identical"] == runs["parity"]["samples"] == 8
    assert "gpu_check: dry run" in (tmp_path / "gpu_check.log").read_text()
