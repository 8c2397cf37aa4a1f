"""The sweep plots: the legend names every series drawn in any panel, the labels follow the
metric's direction, and each figure says what its bars are (paper.png ± std, summary.png min-max)."""

import json
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from ddim_gmm_exp.sweep import write_summary


def write_job(root: Path, name: str, variant: str, eta: float, seed: int, metrics: dict) -> None:
    scale = None if variant == "DDIM" else 1.0
    result = dict(
        model="digits",
        sampler="ddim" if scale is None else "ddim_gmm",
        variant=variant,
        eta=eta,
        n_components=None if scale is None else 8,
        gmm_scale=scale,
        conditional=True,
        guidance_scale=2.5,
        steps=5,
        seed=seed,
        metrics=metrics,
    )
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps(result))


@pytest.fixture
def saved(monkeypatch) -> dict[str, Figure]:
    """file name -> the figure write_summary saved there (inspected after it is written)."""
    figures: dict[str, Figure] = {}
    original = Figure.savefig

    def keep(self, path, *args, **kwargs):
        figures[Path(path).name] = self
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def legend_texts(figure: Figure) -> list[str]:
    return [text.get_text() for legend in figure.legends for text in legend.get_texts()]


def sweep_with_a_series_missing_from_the_first_panel(root: Path, ddim_only_metric: bool = False) -> Path:
    """eta 0: DDIM only (paper.png's first panel); eta 1: DDIM and ORTHO; two seeds; higher-is-better metrics."""
    jobs = [("DDIM", 0.0), ("DDIM", 1.0), ("ORTHO", 1.0)]
    for num, (variant, eta) in enumerate(jobs):
        for seed in range(2):
            metrics = {"classifier_confidence": 0.9 + 0.01 * num + 0.005 * seed}
            if variant == "DDIM" and ddim_only_metric:  # summary.png's first panel: one ORTHO lacks
                metrics = {"classifier_accuracy": 0.5 + 0.1 * seed + 0.01 * num, **metrics}
            write_job(root, f"{num}{seed}", variant, eta, seed, metrics)
    return root


def test_paper_png_legend_names_every_series_and_says_its_bars_are_std(tmp_path, saved):
    write_summary(sweep_with_a_series_missing_from_the_first_panel(tmp_path))
    figure = saved["paper.png"]
    assert legend_texts(figure) == ["DDIM", "ORTHO (K=8)"]
    assert "± std over seeds" in figure._suptitle.get_text()
    drawn = [ax for ax in figure.axes if ax.lines]
    assert len(drawn) == 2
    assert {ax.get_ylabel() for ax in drawn} == {"classifier_confidence (higher is better)"}


def test_summary_png_legend_names_every_series_and_says_its_bars_are_min_max(tmp_path, saved):
    write_summary(sweep_with_a_series_missing_from_the_first_panel(tmp_path, ddim_only_metric=True))
    figure = saved["summary.png"]
    assert legend_texts(figure) == [
        "ddim eta=0.0 cfg=2.5",
        "ddim eta=1.0 cfg=2.5",
        "ddim_gmm eta=1.0 ORTHO K=8 s=1.0 cfg=2.5",
    ]
    titles = [ax.get_title() for ax in figure.axes if ax.lines]
    assert titles and all("bars min-max over seeds" in title for title in titles)
    assert any("higher is better" in title for title in titles)


def test_a_sweep_of_one_step_count_plots_one_row_per_series(tmp_path, saved):
    """summary.png of one step count: each series on its own row at its mean (it was a column of
    dots at x = steps)."""
    for num, (variant, fid) in enumerate([("DDIM", 30.0), ("ORTHO", 20.0), ("RAND", 25.0)]):
        write_job(tmp_path, str(num), variant, 0.0, 0, {"fid_digits": fid, "classifier_accuracy": 0.9 + num / 100})
    write_summary(tmp_path)
    ax = saved["summary.png"].axes[0]
    markers = [line for line in ax.get_lines() if line.get_marker() not in ("|", "_", "None", None)]  # not caps
    points = sorted((line.get_ydata()[0], line.get_xdata()[0]) for line in markers)
    assert [x for _, x in points] == [30.0, 20.0, 25.0] and [y for y, _ in points] == [0, 1, 2]
    assert ax.get_xlabel() == "fid_digits" and "at 5 steps" in ax.get_title()
