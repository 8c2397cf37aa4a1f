"""Sweep summaries from results.json files: tables, plots, the paper's best-s format."""

import json

from ddim_gmm_exp.sweep import best_scale_cells, collect_results, paper_markdown, write_summary


def write_job(root, name, **fields):
    job = root / name
    job.mkdir(parents=True)
    (job / "results.json").write_text(json.dumps(fields))


def result(sampler, variant, steps, seed, fid, scale=None, k=None, eta=0.0):
    return dict(
        model="digits",
        sampler=sampler,
        variant=variant,
        eta=eta,
        n_components=k,
        gmm_scale=scale,
        conditional=True,
        guidance_scale=2.5,
        steps=steps,
        seed=seed,
        metrics={"fid_digits": fid, "classifier_accuracy": 1.0},
    )


def test_equal_values_over_seeds_plot_and_the_paper_table_picks_the_best_s(tmp_path):
    """Seeds with equal values (a zero-width bar, which rounding could make negative) still plot;
    the paper's table keeps the s with the lowest mean per cell, and the control is a row of it."""
    for seed in range(3):
        write_job(tmp_path, f"d{seed}", **result("ddim", "DDIM", 5, seed, 0.1 + 0.2))
        write_job(tmp_path, f"a{seed}", **result("ddim_gmm", "ORTHO-VUB", 5, seed, 10.0 + seed, scale=0.3, k=8))
        write_job(tmp_path, f"b{seed}", **result("ddim_gmm", "ORTHO-VUB", 5, seed, 5.0 + seed, scale=1.0, k=8))
        write_job(tmp_path, f"c{seed}", **result("ddim_noise", "DDIM_NOISE", 5, seed, 7.0, scale=1.0))
    written = write_summary(tmp_path)
    assert {p.name for p in written} == {"summary.csv", "summary.md", "summary.png", "paper.md", "paper.png"}
    rows = collect_results(tmp_path)
    cells = best_scale_cells(rows, "fid_digits")
    assert cells[("conditional, CFG 2.5", 0.0, "ORTHO-VUB", 8, 5)][2] == 1.0  # the best s
    table = paper_markdown(rows, "fid_digits")
    assert "| DDIM_NOISE | 7.000 ± 0.000 (s=1) |" in table
    assert "**0.300 ± 0.000**" in table  # DDIM is the best of its column, in bold
