"""The benchmark scripts run and print their ratio tables (small sizes; the numbers are not checked)."""

import subprocess
import sys

from helpers.runs import ROOT


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_bench_kernel_prints_its_table():
    proc = run_script(
        "scripts/bench_kernel.py", "--device", "cpu", "--dims", "3x32x32", "--ks", "4", "--repeats", "2", "--no-unet"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| 3x32x32")]
    assert len(rows) == 3  # paper, matched_diagonal, matched_full


def test_bench_gpu_runs_on_cpu_at_small_sizes(tmp_path):
    """Every row of the text-conditioned, guided architecture (cat256's UNet2DModel rows run in
    tests/test_gpu_check.py's dry run)."""
    out = tmp_path / "bench.md"
    proc = run_script(
        "scripts/bench_gpu.py",
        "--small",
        "--device",
        "cpu",
        "--steps",
        "2",
        "--repeats",
        "1",
        "--out",
        str(out),
        "--models",
        "sd21",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = out.read_text()
    for variant in ("(a) bare diffusers loop", "(d) runner, bf16"):
        assert table.count(variant) == 1
    for variant in (
        "(b) runner, ddim eta=0",
        "(b1) runner, ddim eta=1",
        "(c0) runner, ddim_gmm K=8 eta=0",
        "(c1) runner, ddim_gmm K=8 eta=1",
    ):
        assert table.count(variant) == 2  # CPU and device noise streams
    assert "failed" not in table


def test_bench_noise_runs_at_small_sizes():
    """The noise and host-read tables of docs/performance.md; every path reads nothing back."""
    proc = run_script("scripts/bench_noise.py", "--small")
    assert proc.returncode == 0, proc.stderr[-2000:]
    reads = [line for line in proc.stdout.splitlines() if line.startswith("| ") and line.rstrip().endswith("|")]
    counts = [line for line in reads if line.count("|") == 3 and "steps)" in line]
    assert len(counts) == 8 and all(line.rstrip(" |").endswith(" 0") for line in counts), counts
