"""The interval over samples of a one-seed cell: where a series and its reference ran one seed and
both saved their features (features.npz), summary.md and paper.md give the difference's 95%
percentile interval over resamples of their samples, centred on the difference, the same positions
in both runs (sample i of both came from the same initial noise), for the Frechet distance,
precision and density; every other cell of one seed keeps "(n=1, no interval)"."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
from test_summary_paired import DDIM_LABEL, ORTHO_LABEL, markdown_table, markdowns, write_job

from ddim_gmm_exp import sweep
from ddim_gmm_exp.metrics import prdc_samples, precision_recall_density_coverage, save_features
from ddim_gmm_exp.sweep import collect_results, sample_interval

N, DIM, REAL, K, PRDC_MAX = 300, 8, 400, 5, 200  # PRDC takes the first 200 samples, as the run did
RESAMPLES = 60  # fewer than the default 200: the naive PRDC below runs once per resample
TITLE = "**{} minus the reference (DDIM), paired by seed**"
HEUN_LABEL = "heun cfg=2.5"


def frechet(x: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> float:
    """The Frechet distance as FID defines it, by scipy.linalg.sqrtm (float64)."""
    x = np.asarray(x, dtype=np.float64)
    cov = np.cov(x, rowvar=False)
    root = scipy.linalg.sqrtm(cov @ sigma).real
    return float(((x.mean(axis=0) - mu) ** 2).sum() + np.trace(cov) + np.trace(sigma) - 2 * np.trace(root))


def prdc(real: np.ndarray, fake: np.ndarray) -> dict[str, float]:
    return precision_recall_density_coverage(*prdc_samples(real, fake, PRDC_MAX), K)


def write_reference(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    real = np.random.default_rng(1).standard_normal((REAL, DIM)).astype(np.float32)
    mu, sigma = real.mean(axis=0, dtype=np.float64), np.cov(real.astype(np.float64), rowvar=False)
    np.savez(path, mu=mu, sigma=sigma, features=real)
    return real, mu, sigma


def write_run(
    root: Path, name: str, variant: str, features: np.ndarray | None, reference: Path, seed: int = 0, **job
) -> None:
    """A job (test_summary_paired.write_job) whose results.json records its metrics on ``features``
    and, where given, the saved features and their reference as the runner does; without features,
    FID 30 and KID alone."""
    real, mu, sigma = (np.load(reference)[k] for k in ("features", "mu", "sigma"))
    metrics = {"fid_digits": 30.0, "kid": 0.01}
    if features is not None:
        metrics = {"fid_digits": frechet(features, mu, sigma), **prdc(real, features), "kid": 0.01}
    write_job(root, name, variant, seed, metrics, **job)
    path = root / name / "results.json"
    result = json.loads(path.read_text())
    result["settings"] |= {"model.fid_name": "fid_digits", "metrics.prdc.max_samples": PRDC_MAX}
    if features is not None:
        save_features(root / name / "features.npz", np.arange(len(features)), features, key="test")
        result |= {
            "features_file": str(root / name / "features.npz"),
            "reference_features_file": str(reference),
            "prdc_k": K,
            "prdc_samples": PRDC_MAX,
            "kid_subsets": 100,
            "kid_subset_size": N,
        }
    path.write_text(json.dumps(result))


@pytest.fixture
def one_seed(tmp_path, monkeypatch) -> dict:
    """DDIM; ORTHO s=1 whose samples are DDIM's shifted and shrunk (clearly worse); ORTHO s=0.3 with
    DDIM's very features (the same metric on every resample); HEUN without features."""
    monkeypatch.setattr(sweep, "SAMPLE_BOOTSTRAP_RESAMPLES", RESAMPLES)
    reference = tmp_path / "reference.npz"
    real, mu, sigma = write_reference(reference)
    ddim = np.random.default_rng(2).standard_normal((N, DIM)).astype(np.float32)
    features = {
        "ddim": ddim,
        "ortho1": (0.6 * ddim + 0.8).astype(np.float32),
        "ortho03": ddim.copy(),
    }
    root = tmp_path / "sweep"
    write_run(root, "ddim", "DDIM", features["ddim"], reference)
    write_run(root, "ortho1", "ORTHO", features["ortho1"], reference, scale=1.0)
    write_run(root, "ortho03", "ORTHO", features["ortho03"], reference, scale=0.3)
    write_run(root, "heun", "HEUN", None, reference)
    return dict(root=root, real=real, mu=mu, sigma=sigma, features=features)


def expected_intervals(data: dict, name: str) -> dict[str, tuple[float, float]]:
    """The documented bootstrap over samples, computed here the naive way: positions drawn once
    (a generator seeded 0, RESAMPLES x size, with replacement), the same in both runs, each
    resample's metric recomputed from scratch (sqrtm; prdc's own compute_prdc)."""
    mine, base = data["features"][name], data["features"]["ddim"]
    out = {}
    positions = np.random.default_rng(0).integers(0, N, size=(RESAMPLES, N))
    fd = [frechet(mine[p], data["mu"], data["sigma"]) - frechet(base[p], data["mu"], data["sigma"]) for p in positions]
    observed = frechet(mine, data["mu"], data["sigma"]) - frechet(base, data["mu"], data["sigma"])
    out["fid_digits"] = centred(fd, observed)
    positions = np.random.default_rng(0).integers(0, PRDC_MAX, size=(RESAMPLES, PRDC_MAX))
    diffs = {"precision": [], "density": []}
    for p in positions:
        # the run's PRDC set is its first PRDC_MAX samples: a resample of them is one of that set
        a, b = prdc(data["real"], mine[:PRDC_MAX][p]), prdc(data["real"], base[:PRDC_MAX][p])
        for metric in diffs:
            diffs[metric].append(a[metric] - b[metric])
    mine_all, base_all = prdc(data["real"], mine[:PRDC_MAX]), prdc(data["real"], base[:PRDC_MAX])
    out |= {metric: centred(d, mine_all[metric] - base_all[metric]) for metric, d in diffs.items()}
    return out


def centred(differences, observed) -> tuple[float, float]:
    """The percentile interval of the resampled differences, moved to centre on the observed one."""
    low, high = np.percentile(differences, [2.5, 97.5]) + (observed - np.mean(differences))
    return float(low), float(high)


def test_a_one_seed_cell_gets_the_paired_interval_over_samples(one_seed):
    rows = {row["job"]: row for row in collect_results(one_seed["root"])}
    expected = expected_intervals(one_seed, "ortho1")
    summary, paper = markdowns(one_seed["root"])
    for metric, (low, high) in expected.items():
        found = sample_interval(rows["ortho1"], rows["ddim"], metric)
        assert found == pytest.approx((low, high), rel=1e-9, abs=1e-12)
        difference = rows["ortho1"][metric] - rows["ddim"][metric]
        assert low <= difference <= high  # centred on it (an uncentred FD interval can miss it)
        text = f"{difference:+.4g} [samples: {low:+.4g}, {high:+.4g}]"
        table = markdown_table(summary, TITLE.format(metric))
        assert table[(ORTHO_LABEL.format(1.0), DDIM_LABEL)] == [text + ("*" if low > 0 or high < 0 else ""), "1"]
    assert expected["fid_digits"][0] > 0  # clearly worse: marked (above); the header says what it is over
    assert "one seed: [samples: ...], the 95% percentile interval of the difference over 60 resamples" in summary
    # paper.md: the best s is 0.3 (DDIM's features), its interval over samples the degenerate one
    rows_paper = markdown_table(paper, "**conditional, CFG 2.5, eta = 0.0: fid_digits minus the reference")
    assert rows_paper[("ORTHO (K=8)", "DDIM")] == ["+0.000 [samples: +0.000, +0.000]", "1"]


def test_identical_features_give_zero_and_no_mark_and_other_cells_keep_no_interval(one_seed):
    rows = {row["job"]: row for row in collect_results(one_seed["root"])}
    summary, _ = markdowns(one_seed["root"])
    for metric in ("fid_digits", "precision", "density"):
        assert sample_interval(rows["ortho03"], rows["ddim"], metric) == (0.0, 0.0)
        table = markdown_table(summary, TITLE.format(metric))
        assert table[(ORTHO_LABEL.format(0.3), DDIM_LABEL)] == ["+0 [samples: +0, +0]", "1"]  # no *
    # HEUN saved no features: as before
    table = markdown_table(summary, TITLE.format("fid_digits"))
    assert table[(HEUN_LABEL, DDIM_LABEL)] == ["+29.84 (n=1, no interval)", "1"]
    # recall, coverage and KID have features but no interval over samples (docs/runner.md says why)
    for metric in ("recall", "coverage", "kid"):
        table = markdown_table(summary, TITLE.format(metric))
        assert table[(ORTHO_LABEL.format(1.0), DDIM_LABEL)][0].endswith("(n=1, no interval)")
        assert sample_interval(rows["ortho1"], rows["ddim"], metric) is None
    kid_header = summary.split(TITLE.format("kid"))[1].split("\n\n")[0]
    assert "[samples: ...]" not in kid_header  # a table without one does not explain it


def test_features_that_do_not_give_the_recorded_value_get_no_interval(one_seed, caplog):
    path = one_seed["root"] / "ortho1" / "results.json"
    result = json.loads(path.read_text())
    result["metrics"]["fid_digits"] += 1.0  # not what its features.npz gives
    path.write_text(json.dumps(result))
    with caplog.at_level(logging.WARNING, logger="ddim_gmm_exp.sweep"):
        summary, _ = markdowns(one_seed["root"])
    table = markdown_table(summary, TITLE.format("fid_digits"))
    assert table[(ORTHO_LABEL.format(1.0), DDIM_LABEL)][0].endswith("(n=1, no interval)")
    assert "no interval over samples for fid_digits of job ortho1" in caplog.text
    # the other metrics of the run still have theirs
    assert "[samples:" in markdown_table(summary, TITLE.format("precision"))[(ORTHO_LABEL.format(1.0), DDIM_LABEL)][0]


def test_runs_of_other_samples_or_another_reference_are_not_paired(one_seed, tmp_path):
    rows = {row["job"]: row for row in collect_results(one_seed["root"])}
    # other sample indices: no pairing by index
    shifted = one_seed["root"] / "ortho1" / "features.npz"
    save_features(shifted, np.arange(N) + N, one_seed["features"]["ortho1"], key="other")
    assert sample_interval(rows["ortho1"], rows["ddim"], "fid_digits") is None
    # another reference file, even with the same numbers
    other = tmp_path / "other_reference.npz"
    other.write_bytes((tmp_path / "reference.npz").read_bytes())
    rows["ortho03"]["_features"]["reference_features_file"] = str(other)
    assert sample_interval(rows["ortho03"], rows["ddim"], "fid_digits") is None


def test_one_seed_with_two_seeds_elsewhere_keeps_the_interval_over_seeds(one_seed):
    """A cell of several seeds is untouched: its interval is over seeds, with no [samples: ...]."""
    root, reference = one_seed["root"], one_seed["root"].parent / "reference.npz"
    write_run(root, "ddim_s1", "DDIM", None, reference, seed=1)
    write_run(root, "ortho1_s1", "ORTHO", None, reference, seed=1, scale=1.0)
    summary, _ = markdowns(root)
    table = markdown_table(summary, TITLE.format("fid_digits"))
    cell = table[(ORTHO_LABEL.format(1.0), DDIM_LABEL)]
    assert cell[1] == "2" and "samples" not in cell[0] and " ± " in cell[0]
    # the one-seed cell beside it keeps its interval over samples
    assert table[(ORTHO_LABEL.format(0.3), DDIM_LABEL)] == ["+0 [samples: +0, +0]", "1"]


def test_another_feature_space_gets_its_own_interval(one_seed):
    """metrics=dinov2: fd_dinov2, precision_dinov2 and density_dinov2 from features_dinov2.npz
    against reference_features_dinov2_file, as the run's own space from features.npz."""
    root = one_seed["root"]
    for name in ("ddim", "ortho1"):
        path = root / name / "results.json"
        result = json.loads(path.read_text())
        (root / name / "features_dinov2.npz").write_bytes((root / name / "features.npz").read_bytes())
        result["features_dinov2_file"] = str(root / name / "features_dinov2.npz")
        result["reference_features_dinov2_file"] = result["reference_features_file"]
        result["metrics"] |= {f"{k}_dinov2": result["metrics"][k] for k in ("precision", "density")}
        result["metrics"]["fd_dinov2"] = result["metrics"]["fid_digits"]
        path.write_text(json.dumps(result))
    rows = {row["job"]: row for row in collect_results(root)}
    for metric in ("fid_digits", "precision", "density"):
        own = sample_interval(rows["ortho1"], rows["ddim"], metric)
        other = "fd_dinov2" if metric == "fid_digits" else f"{metric}_dinov2"
        assert own is not None and sample_interval(rows["ortho1"], rows["ddim"], other) == own
