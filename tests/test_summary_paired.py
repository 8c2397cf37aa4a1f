"""Paired differences in the sweep summaries: each series (and each paper cell) minus its reference
sampler on the same seed, mean ± std over seeds and a bootstrap interval over seeds, * where the
interval excludes 0; summary.reference chooses the reference; summary.select_on chooses paper.md's
s on some seeds and reports the others, with the selection effect."""

import json
import logging
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import stats

from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.sweep import (
    SummaryCallback,
    better_direction,
    check_summary_options,
    collect_results,
    find_reference,
    metric_names,
    paper_markdown,
    summary_markdown,
    varying_metrics,
    write_summary,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLERS = {"DDIM": "ddim", "HEUN": "heun", "ORTHO": "ddim_gmm", "RAND": "ddim_gmm"}


def write_job(
    root: Path,
    name: str,
    variant: str,
    seed: int,
    metrics: dict | float,
    scale: float | None = None,
    steps: int = 5,
    eta: float | None = 0.0,
    guidance: float = 2.5,
) -> None:
    """results.json as the runner writes it (as tests/test_summary_seeds.py does): a GMM variant
    records gmm.*, a baseline (HEUN) records no eta."""
    sampler = SAMPLERS[variant]
    eta = None if variant == "HEUN" else eta
    flat = {"model.name": "digits", "sampler.name": sampler, "sampler.steps": steps}
    flat |= {"sampler.guidance_scale": guidance, "data.seed": seed, "data.num_samples": 400}
    flat |= {} if eta is None else {"sampler.eta": eta}
    if sampler == "ddim_gmm":
        flat |= {"gmm.scale": scale, "gmm.n_components": 8, "gmm.orthonormal": variant == "ORTHO"}
    result = dict(
        model="digits",
        sampler=sampler,
        variant=variant,
        eta=eta,
        n_components=8 if sampler == "ddim_gmm" else None,
        gmm_scale=scale,
        conditional=True,
        guidance_scale=guidance,
        steps=steps,
        seed=seed,
        metrics=metrics if isinstance(metrics, dict) else {"fid_digits": metrics},
        settings=flat,
    )
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps(result))


def write_sweep(root: Path, values: dict[tuple, dict[int, float]], **common) -> Path:
    """values: (variant, s, steps) -> {seed: fid}."""
    for num, ((variant, scale, steps), by_seed) in enumerate(values.items()):
        for seed, fid in by_seed.items():
            write_job(root, f"{num}_{seed}", variant, seed, fid, scale=scale, steps=steps, **common)
    return root


def markdown_table(text: str, title: str) -> dict[tuple[str, str], list[str]]:
    """(first column, second column) -> the other cells, of the table under the line starting with title."""
    after = text.split("\n" + title, 1)[1].split("\n\n", 2)[1]
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in after.splitlines()[2:]]
    return {(row[0], row[1]): row[2:] for row in rows}


def interval(differences: list[float]) -> tuple[float, float]:
    """The documented bootstrap, called here directly: percentile, 9999 resamples, generator seed 0."""
    result = stats.bootstrap(
        (np.array(differences),),
        np.mean,
        n_resamples=9999,
        confidence_level=0.95,
        method="percentile",
        rng=np.random.default_rng(0),
    )
    return result.confidence_interval.low, result.confidence_interval.high


def expected_text(differences: list[float], number: str = "{:+.4g}", spread: str = "{:.2g}") -> str:
    low, high = interval(differences)
    mean, std = statistics.mean(differences), statistics.stdev(differences)
    mark = "*" if low > 0 or high < 0 else ""
    return f"{number.format(mean)} ± {spread.format(std)} [{number.format(low)}, {number.format(high)}]{mark}"


def markdowns(root: Path, **options) -> tuple[str, str]:
    """summary.md and paper.md as write_summary would write them, without the plots."""
    rows = collect_results(root)
    reference = find_reference(rows, options.get("reference"))
    summary = summary_markdown(rows, metric_names(rows), reference)
    return summary, paper_markdown(rows, "fid_digits", "", reference, options.get("select_on"))


DDIM_LABEL = "ddim eta=0.0 cfg=2.5"
ORTHO_LABEL = "ddim_gmm eta=0.0 ORTHO K=8 s={} cfg=2.5"
# five seeds, so that the percentile interval is not just the range of the differences (as with 2-3)
FIVE = {
    ("DDIM", None, 5): {0: 20.0, 1: 22.5, 2: 19.0, 3: 21.0, 4: 23.5},
    ("ORTHO", 1.0, 5): {0: 18.5, 1: 19.0, 2: 19.5, 3: 18.0, 4: 22.5},  # below DDIM on every seed
    ("ORTHO", 0.3, 5): {0: 20.5, 1: 21.5, 2: 19.5, 3: 21.5, 4: 22.0},  # either side of DDIM
    ("DDIM", None, 10): {0: 12.0, 1: 13.0, 2: 11.0, 3: 12.5, 4: 14.0},
    ("ORTHO", 1.0, 10): {0: 12.5},  # one seed
}


def differences(values: dict, cell: tuple, reference: tuple) -> list[float]:
    return [v - values[reference][seed] for seed, v in sorted(values[cell].items()) if seed in values[reference]]


def test_the_paired_difference_is_the_mean_std_and_bootstrap_interval_of_per_seed_differences(tmp_path):
    summary, paper = markdowns(write_sweep(tmp_path, FIVE))
    table = markdown_table(summary, "**fid_digits minus the reference (DDIM), paired by seed**")
    for scale in (1.0, 0.3):
        diffs = differences(FIVE, ("ORTHO", scale, 5), ("DDIM", None, 5))
        assert table[(ORTHO_LABEL.format(scale), DDIM_LABEL)][:2] == [expected_text(diffs), "5"]
    # one seed: no interval over seeds, said in the cell
    assert table[(ORTHO_LABEL.format(1.0), DDIM_LABEL)][2:] == ["+0.5 (n=1, no interval)", "1"]
    assert all(label != DDIM_LABEL for label, _ in table)  # the reference is not compared with itself
    # paper.md: the best s of the cell (s=1 at 5 steps) against DDIM, three decimals
    paper_table = markdown_table(paper, "**conditional, CFG 2.5, eta = 0.0: fid_digits minus the reference")
    diffs = differences(FIVE, ("ORTHO", 1.0, 5), ("DDIM", None, 5))
    assert paper_table[("ORTHO (K=8)", "DDIM")][:2] == [expected_text(diffs, "{:+.3f}", "{:.3f}"), "5"]
    assert "negative difference favours" in paper  # FID: lower is better


def test_the_mark_is_there_exactly_when_the_interval_excludes_zero(tmp_path):
    summary, _ = markdowns(write_sweep(tmp_path, FIVE))
    table = markdown_table(summary, "**fid_digits minus the reference (DDIM), paired by seed**")
    marks = {}
    for scale in (1.0, 0.3):
        low, high = interval(differences(FIVE, ("ORTHO", scale, 5), ("DDIM", None, 5)))
        cell = table[(ORTHO_LABEL.format(scale), DDIM_LABEL)][0]
        marks[scale] = cell.endswith("*")
        assert marks[scale] == (low > 0 or high < 0)
    assert marks == {1.0: True, 0.3: False}  # both kinds are in the test
    assert statistics.mean(differences(FIVE, ("ORTHO", 0.3, 5), ("DDIM", None, 5))) != 0  # a mean alone is not enough


def test_each_series_is_paired_with_the_reference_of_its_own_eta_and_guidance(tmp_path):
    for seed in (0, 1):
        for eta in (0.0, 0.2):
            write_job(tmp_path, f"ddim{eta}_{seed}", "DDIM", seed, 20.0 + eta + seed, eta=eta)
        write_job(tmp_path, f"ddim_cfg1_{seed}", "DDIM", seed, 5.0 + seed, guidance=1.0)
        write_job(tmp_path, f"ortho_{seed}", "ORTHO", seed, 15.0 + 2 * seed, scale=1.0, eta=0.2)
        write_job(tmp_path, f"heun_{seed}", "HEUN", seed, 18.0 - seed)
    summary, paper = markdowns(tmp_path)
    table = markdown_table(summary, "**fid_digits minus the reference (DDIM), paired by seed**")
    assert set(table) == {
        ("ddim_gmm eta=0.2 ORTHO K=8 s=1.0 cfg=2.5", "ddim eta=0.2 cfg=2.5"),
        # a baseline has no eta: every DDIM of its guidance is a reference, each a row of its own
        ("heun cfg=2.5", "ddim eta=0.0 cfg=2.5"),
        ("heun cfg=2.5", "ddim eta=0.2 cfg=2.5"),
    }
    ortho = [15.0 - 20.2, 17.0 - 21.2]
    assert table[("ddim_gmm eta=0.2 ORTHO K=8 s=1.0 cfg=2.5", "ddim eta=0.2 cfg=2.5")] == [expected_text(ortho), "2"]
    # paper.md: one difference table per eta table, the baseline in each against that table's DDIM
    for eta, heun in ((0.0, [-2.0, -4.0]), (0.2, [-2.2, -4.2])):
        rows = markdown_table(paper, f"**conditional, CFG 2.5, eta = {eta}: fid_digits minus the reference")
        assert rows[("HEUN", "DDIM")][0] == expected_text(heun, "{:+.3f}", "{:.3f}")
        assert ("ORTHO (K=8)", "DDIM") in rows if eta == 0.2 else ("ORTHO (K=8)", "DDIM") not in rows


def test_summary_reference_chooses_another_reference(tmp_path):
    summary, paper = markdowns(write_sweep(tmp_path, FIVE), reference="ortho")  # a variant, in any case
    table = markdown_table(summary, "**fid_digits minus the reference (ortho), paired by seed**")
    ddim = differences(FIVE, ("DDIM", None, 5), ("ORTHO", 1.0, 5))
    assert table[(DDIM_LABEL, ORTHO_LABEL.format(1.0))][:2] == [expected_text(ddim), "5"]
    assert (DDIM_LABEL, ORTHO_LABEL.format(0.3)) in table and not any(s.startswith("ddim_gmm") for s, _ in table)
    rows = markdown_table(paper, "**conditional, CFG 2.5, eta = 0.0: fid_digits minus the reference")
    assert rows[("DDIM", "ORTHO (K=8) (its best s)")][0] == expected_text(ddim, "{:+.3f}", "{:.3f}")
    assert markdowns(tmp_path, reference="ORTHO (K=8)")[1] == paper  # paper.md's row name names it too
    # a series label is a reference too: that s alone
    summary, _ = markdowns(tmp_path, reference=ORTHO_LABEL.format(0.3))
    table = markdown_table(summary, f"**fid_digits minus the reference ({ORTHO_LABEL.format(0.3)})")
    assert set(table) == {(DDIM_LABEL, ORTHO_LABEL.format(0.3)), (ORTHO_LABEL.format(1.0), ORTHO_LABEL.format(0.3))}


def test_an_unknown_reference_is_refused_with_one_line_naming_it_and_the_series(tmp_path):
    write_sweep(tmp_path, FIVE)
    with pytest.raises(ConfigError) as err:
        write_summary(tmp_path, reference="EDM")
    message = str(err.value)
    assert "\n" not in message and "'EDM'" in message
    assert all(label in message for label in (DDIM_LABEL, ORTHO_LABEL.format(1.0), ORTHO_LABEL.format(0.3)))
    assert not list(tmp_path.glob("summary.*")) and not list(tmp_path.glob("paper.*"))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "summarize.py"), str(tmp_path), "--reference", "EDM"],
        capture_output=True,
        text=True,
    )
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "'EDM'" in errors[0] and DDIM_LABEL in errors[0]
    assert not list(tmp_path.glob("summary.*"))


def test_a_sweep_without_the_reference_has_no_difference_tables_and_says_why_once(tmp_path, caplog):
    write_sweep(tmp_path, {key: v for key, v in FIVE.items() if key[0] == "ORTHO"})
    with caplog.at_level(logging.WARNING, logger="ddim_gmm_exp.sweep"):
        written = write_summary(tmp_path)
    assert {p.name for p in written} >= {"summary.md", "paper.md"}
    assert "minus the reference" not in (tmp_path / "summary.md").read_text()
    assert "minus the reference" not in (tmp_path / "paper.md").read_text()
    why = [r.getMessage() for r in caplog.records if "paired differences" in r.getMessage()]
    assert len(why) == 1 and "DDIM or RFIM" in why[0] and "summary.reference" in why[0]


# s = 0.3 is the best s on seed 0, s = 1 on seeds 1 and 2 (and over all three seeds)
SELECTION = {
    ("DDIM", None, 5): {0: 20.0, 1: 21.0, 2: 19.0},
    ("ORTHO", 0.3, 5): {0: 10.0, 1: 14.0, 2: 15.0},
    ("ORTHO", 1.0, 5): {0: 12.0, 1: 11.0, 2: 11.5},
    ("RAND", 0.3, 5): {1: 16.0, 2: 17.0},  # no selection seed: RAND cannot be chosen
    ("RAND", 1.0, 5): {1: 15.0, 2: 15.5},
}


def test_select_on_chooses_s_on_the_selection_seeds_and_reports_only_the_others(tmp_path):
    write_sweep(tmp_path, SELECTION)
    _, usual = markdowns(tmp_path)
    assert "| ORTHO (K=8) | **11.500 ± 0.500** (s=1) | 3 |" in usual  # the best over all seeds is s = 1
    summary, paper = markdowns(tmp_path, select_on=(0,))
    held_out = [14.0, 15.0]  # s = 0.3, chosen on seed 0, on seeds 1 and 2
    cell = f"{statistics.mean(held_out):.3f} ± {statistics.stdev(held_out):.3f}"
    assert f"| ORTHO (K=8) | **{cell}** (s=0.3) | 2 |" in paper
    assert "| DDIM | 20.000 ± 1.414 | 2 |" in paper  # DDIM too on the held-out seeds only
    assert "Scale s chosen on seed 0 (summary.select_on)" in paper and "held-out seeds 1, 2 only" in paper
    assert "RAND (K=8) at 5 steps (conditional, CFG 2.5): no s of it ran a selection seed (0)" in paper
    assert "| RAND" not in paper.split("**conditional, CFG 2.5, eta = 0.0**")[1].split("\n\n")[1]
    rows = markdown_table(paper, "**conditional, CFG 2.5, eta = 0.0: fid_digits minus the reference")
    assert rows[("ORTHO (K=8)", "DDIM")] == [expected_text([14.0 - 21.0, 15.0 - 19.0], "{:+.3f}", "{:.3f}"), "2"]
    # the selection effect: on seeds 1 and 2, the grid's best (s=1: 11.25) against the chosen s (14.5)
    assert "Mean over 1 cell: 3.250" in paper
    effect = markdown_table(paper, "Mean over 1 cell:")
    assert effect[("conditional, CFG 2.5, eta = 0.0", "ORTHO (K=8)")] == ["3.250"]
    # summary.md chooses nothing: every s is its own series, over all its seeds
    assert f"| {ORTHO_LABEL.format(0.3)} | 13 ± 2.6 | 3 |" in summary


def test_select_on_end_to_end_from_the_callback_and_the_script(tmp_path):
    write_sweep(tmp_path, SELECTION)
    config = OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(tmp_path)}}, "summary": {"reference": "DDIM", "select_on": [0]}}
    )
    SummaryCallback().on_multirun_end(config)
    assert "(s=0.3) | 2 |" in (tmp_path / "paper.md").read_text() and (tmp_path / "paper.png").is_file()
    (tmp_path / "paper.md").unlink()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "summarize.py"), str(tmp_path), "--select-on", "0"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert "(s=0.3) | 2 |" in (tmp_path / "paper.md").read_text()


@pytest.mark.parametrize(
    ("select_on", "why"),
    [
        ([7], "summary.select_on: seed 7 is not a seed of this sweep (its seeds: 0, 1, 2)"),
        ([0, 1, 2], "holds every seed of this sweep (0, 1, 2): no seed would be left to report"),
        ([], "summary.select_on=[] is not allowed: a list of data.seed values"),
        (["a"], """summary.select_on=["a"] is not allowed"""),
    ],
)
def test_a_bad_select_on_is_refused_for_its_own_reason(tmp_path, select_on, why):
    write_sweep(tmp_path, SELECTION)
    with pytest.raises(ConfigError) as err:
        write_summary(tmp_path, select_on=select_on)
    assert why in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.glob("summary.*")) and not list(tmp_path.glob("paper.*"))


def test_check_summary_options_before_sampling():
    """The check a run can make before any job samples (the sweep's seeds, where known)."""
    assert check_summary_options(None, None) is None
    assert check_summary_options("DDIM", 0) == (0,)
    assert check_summary_options(None, OmegaConf.create({"s": [2, 0, 2]}).s) == (0, 2)
    assert check_summary_options(None, [0], seeds=[0, 1]) == (0,)
    for reference in ("", 3):
        with pytest.raises(ConfigError, match="summary.reference=.* is not allowed"):
            check_summary_options(reference, None)
    with pytest.raises(ConfigError, match="summary.select_on=True is not allowed"):
        check_summary_options(None, True)
    with pytest.raises(ConfigError, match="seed 5 is not a seed of this sweep"):
        check_summary_options(None, [0, 5], seeds=[0, 1])
    with pytest.raises(ConfigError, match="holds every seed"):
        check_summary_options(None, [1, 0], seeds=[0, 1])


def test_diversity_metrics_have_their_direction_and_appear_in_every_summary_file(tmp_path):
    new = {"precision": 0.7, "recall": 0.5, "density": 0.9, "coverage": 0.6, "kid": 0.01, "kid_std": 0.002}
    for name in new:
        assert better_direction(name) == ("lower is better" if name.startswith("kid") else "higher is better")
    assert better_direction("fid_digits") == "lower is better"
    for seed in (0, 1):
        for variant, scale, shift in (("DDIM", None, 0.0), ("ORTHO", 1.0, 0.1)):
            metrics = {"fid_digits": 20.0 - 10 * shift + seed} | {k: v + shift + 0.01 * seed for k, v in new.items()}
            write_job(tmp_path, f"{variant}{seed}", variant, seed, metrics, scale=scale)
    write_summary(tmp_path)
    summary = (tmp_path / "summary.md").read_text()
    for name in new:
        assert f"**{name}** ({better_direction(name)};" in summary
        assert f"**{name} minus the reference (DDIM), paired by seed**" in summary
    assert "For recall higher is better: a positive difference favours the series" in summary
    header = (tmp_path / "summary.csv").read_text().splitlines()[0].split(",")
    assert set(new) <= set(header)
    assert set(new) <= set(varying_metrics(collect_results(tmp_path), metric_names(collect_results(tmp_path))))
    assert (tmp_path / "summary.png").stat().st_size > 1000
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "summarize.py"), str(tmp_path), "--metric", "recall"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "paper.md").read_text().startswith("# recall, higher is better")


def test_with_three_seeds_or_fewer_the_interval_is_the_range_of_the_differences():
    """As docs/runner.md warns: there, * says only that every seed moved the same way."""
    from ddim_gmm_exp.sweep import seed_interval, seed_intervals

    for differences in ([0.4, -1.5], [2.0, -0.5, 1.0], [0.3, 0.1, 0.2]):
        assert seed_interval(differences) == pytest.approx((min(differences), max(differences)), abs=1e-12)
    five = [1.0, -0.2, 0.7, 0.4, 2.5]
    assert seed_interval(five) == pytest.approx(interval(five), abs=1e-12)
    assert seed_interval([1.5]) is None
    # batched by size, each as if alone
    batch = seed_intervals([five, [0.4, -1.5], [3.0], [2.0, 2.5, 1.0, 0.5, 0.0]])
    assert batch[0] == pytest.approx(interval(five), abs=1e-12) and batch[2] is None
    assert batch[1] == pytest.approx((-1.5, 0.4), abs=1e-12)
    assert batch[3] == pytest.approx(interval([2.0, 2.5, 1.0, 0.5, 0.0]), abs=1e-12)
