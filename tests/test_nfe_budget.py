"""nfe=N: each sampler takes the most steps that fit in N model evaluations per sample, the count
is the one the denoiser sees, bad budgets are refused alone, and the summaries put NFE on x."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.runs import compose_config

from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.runner import run
from ddim_gmm_exp.sweep import collect_results, paper_markdown, pivot_markdown, write_summary, x_axis

TINY = ["data.num_samples=4", "data.batch_size=4", "metrics.fid.enabled=false", "logger=none"]


@pytest.mark.parametrize(
    "model,sampler,guidance,steps,nfe",
    [
        # budget 10: DDIM 10 steps, or 5 under guidance (2 calls a step); Heun/EDM 2S - 1 calls
        ("toy", "ddim", 1.0, 10, 10),
        ("toy", "ddim", 2.5, 5, 10),
        ("toy", "heun", 1.0, 5, 9),
        ("toy", "heun", 2.5, 3, 10),
        ("toy", "edm", 1.0, 5, 9),
        ("toy", "edm", 2.5, 3, 10),
        ("toy", "dpmpp_2m", 1.0, 10, 10),
        ("toy", "dpmpp_2m", 2.5, 5, 10),
        ("digits_flow", "flow_heun", 1.0, 5, 9),
        ("digits_flow", "flow_heun", 2.5, 3, 10),
    ],
)
def test_a_budget_takes_the_most_steps_that_fit_and_the_denoiser_counts_them(
    model, sampler, guidance, steps, nfe, tmp_path, cache_dir
):
    cfg = compose_config(
        [f"model={model}", f"sampler={sampler}", "nfe=10", f"sampler.guidance_scale={guidance}", *TINY],
        tmp_path,
        cache_dir,
    )
    results = run(cfg)
    # the steps the budget chose, and the evaluations the counting denoiser saw, both pinned
    assert (results["steps"], results["nfe"], results["nfe_budget"]) == (steps, nfe, 10)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["nfe=0"], "nfe=0 is not allowed"),
        (["nfe=2.5"], "nfe=2.5 is not allowed"),
        (["nfe=10", "sampler.steps=4"], "nfe=10 and sampler.steps=4 are both given"),
        (["sampler=heun", "nfe=1", "sampler.guidance_scale=2.5"],
         "nfe=1 is fewer than one step of sampler=heun takes \\(2 model evaluations per sample under guidance 2.5\\)"),
        (["summary.x=calls"], "summary.x='calls' is not allowed: choose one of steps, nfe or null"),
    ],
)  # fmt: skip
def test_each_bad_budget_is_refused_alone_before_sampling(overrides, message, tmp_path, cache_dir):
    cfg = compose_config(["model=toy", *TINY, *overrides], tmp_path, cache_dir)
    with pytest.raises(ConfigError, match=message):
        run(cfg)
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "run_config.json").exists()


def test_the_refusals_name_their_own_reason_only(tmp_path, cache_dir):
    """A budget of 1 with sampler.steps given is refused for the steps, not for being too small;
    a good budget with a bad summary.x is refused for the axis."""
    cfg = compose_config(["model=toy", *TINY, "nfe=1", "sampler.steps=3"], tmp_path / "a", cache_dir)
    with pytest.raises(ConfigError, match="are both given") as err:
        run(cfg)
    assert "fewer than one step" not in str(err.value)
    cfg = compose_config(["model=toy", *TINY, "nfe=4", "summary.x=calls"], tmp_path / "b", cache_dir)
    with pytest.raises(ConfigError, match="summary.x") as err:
        run(cfg)
    assert "nfe=" not in str(err.value)


def _job(sweep: Path, num: int, **result) -> None:
    settings = {
        "sampler.name": result["sampler"],
        "sampler.eta": result.get("eta"),
        "variant": result.get("variant"),
        "gmm.scale": result.get("gmm_scale"),
        "sampler.steps": result["steps"],
        "data.seed": result.get("seed", 0),
        "nfe": result.get("nfe_budget"),
    }
    job = sweep / str(num)
    job.mkdir(parents=True)
    metrics = {"fid": result.pop("fid")}
    row = {"model": "toy", "conditional": False, "guidance_scale": 1.0, "seed": 0, "settings": settings, **result}
    row["metrics"] = metrics
    (job / "results.json").write_text(json.dumps(row))


def _baseline_sweep(sweep: Path) -> None:
    """DDIM and ORTHO-VUB at eta 0 and 1, Heun (no eta) beside them, at budgets 5 and 10."""
    num = 0
    for budget in (5, 10):
        for eta in (0.0, 1.0):
            budgeted = {"steps": budget, "nfe": budget, "nfe_budget": budget}
            _job(sweep, num, sampler="ddim", variant="DDIM", eta=eta, **budgeted, fid=10.0 + eta)
            _job(sweep, num + 1, sampler="ddim_gmm", eta=eta, variant="ortho_vub", n_components=8, gmm_scale=1.0,
                 **budgeted, fid=9.0 + eta)  # fmt: skip
            num += 2
        heun_steps = (budget + 1) // 2
        heun = {"steps": heun_steps, "nfe": 2 * heun_steps - 1, "nfe_budget": budget}
        _job(sweep, num, sampler="heun", variant="HEUN", **heun, fid=8.0)
        num += 1


def test_summaries_of_a_budget_sweep_put_nfe_on_x_with_baselines_in_every_eta_table(tmp_path):
    _baseline_sweep(tmp_path)
    rows = collect_results(tmp_path)
    assert x_axis(rows) == "nfe" and sorted({r["x"] for r in rows}) == [5, 10]
    assert "| 5 NFE | n | 10 NFE | n |" in pivot_markdown(rows, "fid")
    paper = paper_markdown(rows, "fid")
    tables = paper.split("**unconditional")[1:]
    assert len(tables) == 2 and "eta = 0.0" in tables[0] and "eta = 1.0" in tables[1]
    for table in tables:  # Heun has no eta: it is in both, at its budget, saying the 9 calls it made
        assert "| sampler | 5 NFE | n | 10 NFE | n |" in table
        assert "| HEUN | " in table and "| DDIM | " in table
        assert "[9 NFE]" in table and "[5 NFE]" not in table
    # asked for steps, the same jobs are placed at their steps (Heun at 3 and 5)
    rows = collect_results(tmp_path, x="steps")
    assert sorted({r["x"] for r in rows if r["sampler"] == "heun"}) == [3, 5]


def test_summary_x_refusals(tmp_path):
    _baseline_sweep(tmp_path)
    with pytest.raises(ConfigError, match="summary.x='calls' is not allowed"):
        write_summary(tmp_path, x="calls")
    old = tmp_path / "old"
    _job(old, 0, sampler="ddim", eta=0.0, steps=5, fid=1.0)  # an older run: no nfe recorded
    with pytest.raises(ConfigError, match="summary.x='nfe' needs nfe in every results.json"):
        write_summary(old, x="nfe")
    assert not (old / "summary.md").exists()
    assert x_axis(collect_results(old)) == "steps"


def test_steps_stay_on_x_for_a_sweep_of_one_call_per_step_samplers(tmp_path):
    for num, steps in enumerate((4, 8)):
        _job(tmp_path, 2 * num, sampler="ddim", eta=0.0, steps=steps, nfe=steps, fid=2.0)
        _job(tmp_path, 2 * num + 1, sampler="dpmpp_2m", steps=steps, nfe=steps, fid=3.0)
    assert x_axis(collect_results(tmp_path)) == "steps"
    _job(tmp_path, 4, sampler="heun", steps=4, nfe=7, fid=3.0)  # 2S - 1 calls: steps no longer compare
    assert x_axis(collect_results(tmp_path)) == "nfe"
