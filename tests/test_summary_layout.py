"""Sweep directories as people arrange them: numbered job folders next to named ones (a sweep and
its controls), summarised in job order."""

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_job(root: Path, name: str, sampler: str, seed: int, fid: float) -> None:
    scale = None if sampler == "ddim" else 1.0
    result = dict(
        model="digits",
        sampler=sampler,
        variant={"ddim": "DDIM", "ddim_noise": "DDIM_NOISE"}[sampler],
        eta=0.0,
        n_components=None,
        gmm_scale=scale,
        conditional=True,
        guidance_scale=2.5,
        steps=5,
        seed=seed,
        metrics={"fid_digits": fid},
    )
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps(result))


def test_numbered_and_named_job_folders_are_summarised_in_job_order(tmp_path):
    ddim = {"0": (0, 12.0), "2": (1, 11.0), "10": (2, 13.0)}
    controls = {"controls/0": (0, 7.0), "controls/1": (1, 8.0), "controls/extra/3": (2, 9.5)}
    for name, (seed, fid) in ddim.items():
        write_job(tmp_path, name, "ddim", seed, fid)
    for name, (seed, fid) in controls.items():
        write_job(tmp_path, name, "ddim_noise", seed, fid)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "summarize.py"), str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    with open(tmp_path / "summary.csv") as f:
        jobs = [row["job"] for row in csv.DictReader(f)]
    assert jobs == ["0", "2", "10", "controls/0", "controls/1", "controls/extra/3"]
    paper = (tmp_path / "paper.md").read_text()
    for name, group in (("DDIM", ddim), ("DDIM_NOISE", controls)):
        values = [fid for _, fid in group.values()]
        best = min(statistics.mean(v) for v in ([f for _, f in ddim.values()], [f for _, f in controls.values()]))
        cell = f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
        cell = f"**{cell}**" if statistics.mean(values) == best else cell
        scale = "" if name == "DDIM" else " (s=1)"
        assert f"| {name} | {cell}{scale} | 3 |" in paper
