"""A series is every job that shares all the settings that differ between jobs but the seed (and
the steps; and the scale s in the paper format): jobs that differ in anything else are never pooled."""

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

from ddim_gmm_exp.sweep import write_summary

ROOT = Path(__file__).resolve().parents[1]


def settings(sampler: str = "ddim_gmm", seed: int = 0, scale: float | None = 1.0, **changes) -> dict:
    """A job's recorded settings as the runner writes them (gmm.* only for a sampler with a GMM)."""
    flat = {
        "model.name": "digits",
        "model.path": None,
        "sampler.name": sampler,
        "sampler.function": f"ddim_gmm_exp.samplers.{sampler}",
        "sampler.steps": 10,
        "sampler.eta": 0.0,
        "sampler.timestep_spacing": "leading",
        "sampler.guidance_scale": 2.5,
        "data.seed": seed,
        "data.num_samples": 400,
        "data.labels": "balanced",
        "metrics.fid.reference_samples": 3000,
    }
    if scale is not None:
        flat |= {
            "gmm.scale": scale,
            "gmm.n_components": 8,
            "gmm.uniform_priors": True,
            "gmm.seed": 0,
            "gmm.last_step": False,
            "gmm.orthonormal": True,
            "gmm.upper_bound_vars": False,
        }
    return flat | changes


def write_job(root: Path, name: str, flat: dict | None, fid: float, **top) -> None:
    """results.json with the top-level keys read from the settings (older runs: no settings)."""
    source = flat or {}
    result = dict(
        model=top.get("model", source.get("model.name", "digits")),
        sampler=source.get("sampler.name", top.get("sampler")),
        eta=source.get("sampler.eta", 0.0),
        n_components=source.get("gmm.n_components", top.get("n_components")),
        gmm_scale=source.get("gmm.scale", top.get("gmm_scale")),
        conditional=True,
        guidance_scale=source.get("sampler.guidance_scale", 2.5),
        steps=source.get("sampler.steps", 10),
        seed=source.get("data.seed", top.get("seed")),
        metrics={"fid_digits": fid},
    )
    result["variant"] = "DDIM" if result["gmm_scale"] is None else "ORTHO"
    if flat is not None:
        result["settings"] = flat
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps(result))


def table_rows(markdown: str, metric: str) -> dict[str, list[str]]:
    """series -> its cells, from the pivot table of one metric in summary.md."""
    block = markdown.split(f"**{metric}**", 1)[1].split("\n\n", 2)[1]
    cells = [line.strip("|").split(" | ") for line in block.splitlines()[2:]]
    return {c[0].strip(): [x.strip() for x in c[1:]] for c in cells}


def test_spacing_and_uniform_priors_are_four_series_not_four_seeds(tmp_path):
    """-m variant=ortho sampler.timestep_spacing=leading,trailing gmm.uniform_priors=true,false (one seed)."""
    fids = {}
    for num, (spacing, priors) in enumerate([(sp, up) for sp in ("leading", "trailing") for up in (True, False)]):
        fids[(spacing, priors)] = 20.0 + num * 1.5
        flat = settings(**{"sampler.timestep_spacing": spacing, "gmm.uniform_priors": priors})
        write_job(tmp_path, str(num), flat, fids[(spacing, priors)])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "summarize.py"), str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    rows = table_rows((tmp_path / "summary.md").read_text(), "fid_digits")
    expected = {
        f"ddim_gmm eta=0.0 ORTHO K=8 s=1.0 cfg=2.5 gmm.uniform_priors={str(up).lower()} "
        f"sampler.timestep_spacing={sp}": [f"{fid:.4g}", "1"]
        for (sp, up), fid in fids.items()
    }
    assert rows == expected
    paper = (tmp_path / "paper.md").read_text()
    for (sp, up), fid in fids.items():
        name = f"ORTHO gmm.uniform_priors={str(up).lower()} sampler.timestep_spacing={sp} (K=8)"
        cell = f"**{fid:.3f}**" if fid == min(fids.values()) else f"{fid:.3f}"
        assert f"| {name} | {cell} (s=1) | 1 |" in paper
    with open(tmp_path / "summary.csv") as f:
        table = list(csv.DictReader(f))
    # the settings that differ are columns; those every job shares are not
    assert [(r["sampler.timestep_spacing"], r["gmm.uniform_priors"]) for r in table] == [
        ("leading", "True"),
        ("leading", "False"),
        ("trailing", "True"),
        ("trailing", "False"),
    ]
    assert "data.num_samples" not in table[0] and "gmm.seed" not in table[0]


def test_a_directory_of_several_sweeps_never_pools_models_or_model_paths(tmp_path):
    """Two sweeps, same sampler and seeds: digits against toy, and digits from two checkpoints."""
    values = {("digits", None): [10.0, 12.0], ("toy", None): [30.0, 34.0], ("digits", "ckpt/b.pt"): [50.0, 55.0]}
    for (model, path), fids in values.items():
        for seed, fid in enumerate(fids):
            flat = settings("ddim", seed, None, **{"model.name": model, "model.path": path})
            write_job(tmp_path / f"{model}-{path is not None}", str(seed), flat, fid)
    write_summary(tmp_path)
    rows = table_rows((tmp_path / "summary.md").read_text(), "fid_digits")
    expected = {
        f"{model}: ddim eta=0.0 cfg=2.5 model.path={path or 'null'}": [
            f"{statistics.mean(v):.4g} ± {statistics.stdev(v):.2g}",
            "2",
        ]
        for (model, path), v in values.items()
    }
    assert rows == expected


def test_settings_the_readable_label_hides_are_named(tmp_path):
    """Guidance 0 and 1 both read as no cfg; in the paper format a flow GMM sampler and the DDIM
    GMM share the variant name ORTHO: the setting that tells them apart is named, once."""
    jobs = {
        "g0": (settings("ddim", 0, None, **{"sampler.guidance_scale": 0.0}), 7.0),
        "g1": (settings("ddim", 0, None, **{"sampler.guidance_scale": 1.0}), 9.0),
        "ddim_gmm": (settings("ddim_gmm", 0, 1.0), 11.0),
        "rfim_gmm": (settings("rfim_gmm", 0, 1.0), 13.0),
    }
    for name, (flat, fid) in jobs.items():
        write_job(tmp_path, name, flat, fid)
    write_summary(tmp_path)
    rows = table_rows((tmp_path / "summary.md").read_text(), "fid_digits")
    assert rows == {
        "ddim eta=0.0 sampler.guidance_scale=0.0": ["7", "1"],
        "ddim eta=0.0 sampler.guidance_scale=1.0": ["9", "1"],
        "ddim_gmm eta=0.0 ORTHO K=8 s=1.0 cfg=2.5": ["11", "1"],
        "rfim_gmm eta=0.0 ORTHO K=8 s=1.0 cfg=2.5": ["13", "1"],
    }
    paper = (tmp_path / "paper.md").read_text()
    assert "| ORTHO sampler.name=ddim_gmm (K=8) | **11.000** (s=1) | 1 |" in paper
    assert "| ORTHO sampler.name=rfim_gmm (K=8) | 13.000 (s=1) | 1 |" in paper


def test_the_paper_format_chooses_s_within_each_series(tmp_path):
    """ORTHO at two spacings and two scales: per spacing its own best s (never one pooled row)."""
    fids = {("leading", 0.3): [5.0, 6.0], ("leading", 1.0): [8.0, 9.0], ("trailing", 0.3): [9.0, 9.5]}
    fids[("trailing", 1.0)] = [4.0, 4.5]
    num = 0
    for (spacing, scale), values in fids.items():
        for seed, fid in enumerate(values):
            write_job(
                tmp_path, str(num), settings("ddim_gmm", seed, scale, **{"sampler.timestep_spacing": spacing}), fid
            )
            num += 1
    write_summary(tmp_path)
    paper = (tmp_path / "paper.md").read_text()
    for spacing in ("leading", "trailing"):
        means = {s: statistics.mean(v) for (sp, s), v in fids.items() if sp == spacing}
        best = min(means, key=means.get)
        v = fids[(spacing, best)]
        cell = f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}"
        overall = min(statistics.mean(x) for x in fids.values())
        cell = f"**{cell}**" if statistics.mean(v) == overall else cell
        assert f"| ORTHO sampler.timestep_spacing={spacing} (K=8) | {cell} (s={best:g}) | 2 |" in paper


def test_results_without_settings_fall_back_to_the_top_level_keys(tmp_path):
    """Older results.json files: seeds of one (sampler, eta, variant, K, s, cfg) are averaged."""
    values = {("ddim", None, None): [3.0, 5.0, 4.0], ("ddim_gmm", 8, 1.0): [6.0, 8.0, 9.0]}
    for (sampler, k, scale), fids in values.items():
        for seed, fid in enumerate(fids):
            write_job(
                tmp_path, f"{sampler}{seed}", None, fid, sampler=sampler, n_components=k, gmm_scale=scale, seed=seed
            )
    write_summary(tmp_path)
    rows = table_rows((tmp_path / "summary.md").read_text(), "fid_digits")
    ddim, gmm = values[("ddim", None, None)], values[("ddim_gmm", 8, 1.0)]
    assert rows == {
        "ddim eta=0.0 cfg=2.5": [f"{statistics.mean(ddim):.4g} ± {statistics.stdev(ddim):.2g}", "3"],
        "ddim_gmm eta=0.0 ORTHO K=8 s=1.0 cfg=2.5": [f"{statistics.mean(gmm):.4g} ± {statistics.stdev(gmm):.2g}", "3"],
    }
