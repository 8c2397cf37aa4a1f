"""Seeds in the summaries: best s is chosen on the seeds every s of a cell has, each cell shows its
seed count n, incomplete cells are flagged with the seeds they miss, and a seed present twice (a
repeated job) counts once."""

import json
import logging
import statistics
import subprocess
import sys
from pathlib import Path

from ddim_gmm_exp.sweep import write_summary

ROOT = Path(__file__).resolve().parents[1]


def write_job(root: Path, name: str, variant: str, scale: float | None, seed: int, fid: float) -> None:
    gmm = scale is not None and variant != "DDIM_NOISE"
    sampler = {"DDIM": "ddim", "DDIM_NOISE": "ddim_noise"}.get(variant, "ddim_gmm")
    flat = {"model.name": "digits", "sampler.name": sampler, "sampler.eta": 0.0, "sampler.steps": 5}
    flat |= {"sampler.guidance_scale": 2.5, "data.seed": seed, "data.num_samples": 400}
    flat |= {"gmm.scale": scale} if scale is not None else {}
    flat |= {"gmm.n_components": 8, "gmm.orthonormal": True} if gmm else {}
    result = dict(
        model="digits",
        sampler=sampler,
        variant=variant,
        eta=0.0,
        n_components=8 if gmm else None,
        gmm_scale=scale,
        conditional=True,
        guidance_scale=2.5,
        steps=5,
        seed=seed,
        metrics={"fid_digits": fid},
        settings=flat,
    )
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps(result))


# (variant, s) -> {seed: fid}: s = 1 misses seed 2, where s = 0.3 happened to score well
FIDS = {
    ("DDIM", None): {0: 12.0, 1: 13.0, 2: 11.0},
    ("ORTHO", 0.3): {0: 10.0, 1: 10.5, 2: 4.0},
    ("ORTHO", 1.0): {0: 9.0, 1: 9.5},
}


def write_sweep(root: Path) -> Path:
    for num, ((variant, scale), by_seed) in enumerate(FIDS.items()):
        for seed, fid in by_seed.items():
            write_job(root, f"{num}{seed}", variant, scale, seed, fid)
    return root


def run_summarize(sweep: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "summarize.py"), str(sweep)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_best_s_is_chosen_on_shared_seeds_and_the_cell_shows_n_and_what_it_misses(tmp_path):
    run_summarize(write_sweep(tmp_path))
    paper = (tmp_path / "paper.md").read_text()
    ortho = {s: v for (variant, s), v in FIDS.items() if variant == "ORTHO"}
    shared = set.intersection(*(set(v) for v in ortho.values()))
    assert shared == {0, 1}
    on_shared = {s: statistics.mean(v[seed] for seed in shared) for s, v in ortho.items()}
    best = min(on_shared, key=on_shared.get)
    assert best == 1.0  # over all its seeds s = 0.3 (mean 8.17) would look better than s = 1 (9.25)
    values = [ortho[best][seed] for seed in sorted(shared)]
    ddim = list(FIDS[("DDIM", None)].values())
    bold = statistics.mean(values) < statistics.mean(ddim)
    cell = f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
    assert f"| ORTHO (K=8) | {f'**{cell}**' if bold else cell} (s=1) | 2† |" in paper
    ddim_cell = f"{statistics.mean(ddim):.3f} ± {statistics.stdev(ddim):.3f}"
    assert f"| DDIM | {ddim_cell} | 3 |" in paper
    assert "† ORTHO (K=8) at 5 steps (s=1): seeds missing: 2" in paper


def test_the_summary_tables_show_n_and_flag_the_series_that_miss_a_seed(tmp_path):
    run_summarize(write_sweep(tmp_path))
    summary = (tmp_path / "summary.md").read_text()
    for (_, scale), by_seed in FIDS.items():
        values = list(by_seed.values())
        label = "ddim eta=0.0 cfg=2.5" if scale is None else f"ddim_gmm eta=0.0 ORTHO K=8 s={scale} cfg=2.5"
        flag = "†" if len(values) < max(len(v) for v in FIDS.values()) else ""
        cell = f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g} | {len(values)}{flag}"
        assert f"| {label} | {cell} |" in summary
    assert "† ddim_gmm eta=0.0 ORTHO K=8 s=1.0 cfg=2.5 at 5 steps: seeds missing: 2" in summary


def test_a_seed_present_twice_counts_once(tmp_path, caplog):
    """The same DDIM job run twice (seed 0, jobs a0 and b0): std and seeds over {0, 1, 2}, said once."""
    by_seed = {0: 12.0, 1: 13.0, 2: 11.0}
    for seed, fid in by_seed.items():
        write_job(tmp_path, f"a{seed}", "DDIM", None, seed, fid)
    write_job(tmp_path, "b0", "DDIM", None, 0, 12.0)
    write_job(tmp_path, "g0", "ORTHO", 1.0, 0, 8.0)
    with caplog.at_level(logging.WARNING, logger="ddim_gmm_exp.sweep"):
        write_summary(tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    values = list(by_seed.values())
    cell = f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"
    assert f"| ddim eta=0.0 cfg=2.5 | {cell} | 3 |" in summary
    assert f"| ddim eta=0.0 cfg=2.5 | 5 | {cell} | 3 |" in summary  # the long table: seeds 3, not 4
    note = "seed 0 of ddim eta=0.0 cfg=2.5 at 5 steps is in jobs a0, b0: counted once (job a0)"
    assert note in summary and note in (tmp_path / "paper.md").read_text()
    assert [r.getMessage() for r in caplog.records if "counted once" in r.getMessage()] == [f"duplicate jobs: {note}"]
    paper = (tmp_path / "paper.md").read_text()
    assert f"| DDIM | {statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} | 3 |" in paper
    csv_text = (tmp_path / "summary.csv").read_text()
    assert len(csv_text.splitlines()) == 6 and ",a0," in csv_text  # every job stays in the CSV, b0 naming a0


def test_no_seed_common_to_every_s_is_said(tmp_path):
    write_job(tmp_path, "0", "ORTHO", 0.3, 0, 6.0)
    write_job(tmp_path, "1", "ORTHO", 1.0, 1, 5.0)
    write_summary(tmp_path)
    paper = (tmp_path / "paper.md").read_text()
    assert "| ORTHO (K=8) | **5.000** (s=1) | 1† |" in paper
    assert "ORTHO (K=8) at 5 steps (s=1): no seed is common to every s: each s compared on its own seeds" in paper
