"""What a run tells: its W&B run's name and id (kept for resume), and the console's time line."""

from __future__ import annotations

import logging

from helpers.runs import SMALL, compose_config, run_records

from ddim_gmm_exp.runner import WANDB_ID_FILE, run


def test_wandb_run_is_named_after_its_settings_and_a_resume_continues_it(tmp_path, cache_dir):
    args = [*SMALL, "logger=wandb", "variant=ortho_vub", "gmm.n_components=4", "gmm.scale=10", "data.num_samples=4",
            "metrics.fid.enabled=false"]  # fmt: skip
    run(compose_config(args, tmp_path, cache_dir))
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    (first,) = run_records(tmp_path)
    (info,) = [r.run for r in first if r.WhichOneof("record_type") == "run"]
    assert info.display_name == "ortho_vub-K4-s10-eta0-5steps-seed0" and info.run_id == run_id
    (tmp_path / "samples" / "000003.png").unlink()
    run(compose_config([*args, "resume=true"], tmp_path, cache_dir))
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == run_id
    runs = run_records(tmp_path)
    assert len(runs) == 2
    assert {r.run.run_id for rs in runs for r in rs if r.WhichOneof("record_type") == "run"} == {run_id}


def test_the_console_gives_wall_time_and_images_per_second(tmp_path, cache_dir, caplog):
    caplog.set_level(logging.INFO, logger="ddim_gmm_exp")
    results = run(compose_config([*SMALL, "logger=none", "data.num_samples=8"], tmp_path, cache_dir))
    line = f"8 samples in {results['seconds']:.1f} s wall, {results['images_per_second']:.1f} images/s sampling"
    assert line in caplog.text
