"""Lightning callbacks of a run: the progress bar with images per second, the report (results.json,
features.npz, grid.png, first_samples.npz, the logger's scalars, grid and tables) on rank 0, and
finishing the W&B run."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from ddim_gmm_exp.dashboard import FIRST_SAMPLES_FILE, WANDB_RECORD, log_run, save_first_samples, wandb_record
from ddim_gmm_exp.images import image_grid, save_png
from ddim_gmm_exp.metrics import save_features

RESULTS_FILE = "results.json"


class ReportResults(L.Callback):
    """Rank 0's report at the end of predict: results.json, grid.png, first_samples.npz (what a
    sweep's compare.png shows of the run), and the logger's scalars; a W&B logger also gets the
    image grid, a one-row results table, the samples table and the run summary (dashboard.py)."""

    def __init__(self, output_dir: Path, meta: dict[str, Any], started: float) -> None:
        self.output_dir = Path(output_dir)
        self.meta = meta
        self.started = started

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank == 0:
            self.report(pl_module, trainer.logger)

    def report(self, module: Any, logger: Any) -> None:
        """Write what ``module`` (a SamplingModule after finish()) measured."""
        results = self.meta | {"metrics": module.results, "seconds": time.time() - self.started} | module.stats
        for space in getattr(module.metrics, "spaces", []):  # what scripts/score.py rescores from
            if space.generated is not None and len(space.generated[0]):
                save_features(self.output_dir / space.features_file, *space.generated, key=space.features_key())
                results[f"features{space.suffix}_file"] = str(self.output_dir / space.features_file)
        if module.grid:
            save_png(image_grid(torch.stack(module.grid)), self.output_dir / "grid.png")
            save_first_samples(module.grid, module.plan, self.output_dir / FIRST_SAMPLES_FILE)
        if logger:
            self.log_to(logger, results, module)
        tmp = self.output_dir / (RESULTS_FILE + ".tmp")
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(self.output_dir / RESULTS_FILE)

    def log_to(self, logger: Any, results: dict[str, Any], module: Any) -> None:
        """The logger's scalars; for W&B also the grid, the tables and the run summary, and the
        run's record in ``results`` (the sweep's summary run joins its group)."""
        logger.log_metrics(
            results["metrics"]
            | {
                "images_per_second": results["images_per_second"] or 0.0,
                "seconds_per_step": results["seconds_per_step"],
            }
        )
        if isinstance(logger, L.pytorch.loggers.WandbLogger):
            if module.grid:
                logger.log_image("grid", [str(self.output_dir / "grid.png")], caption=["first 64 samples"])
            keys = ["sampler", "variant", "steps", "eta", "n_components", "gmm_scale"]
            row = [results.get(k) for k in keys] + list(results["metrics"].values())
            logger.log_table("results", columns=[*keys, *results["metrics"]], data=[row])
            log_run(logger.experiment, results, module.grid, module.plan)
            results[WANDB_RECORD] = wandb_record(logger.experiment)
        logger.save()


class WandbLogger(L.pytorch.loggers.WandbLogger):
    """Lightning's WandbLogger without the ``anonymous`` key it always passes to wandb.init, which
    current wandb answers with a deprecation warning on every run."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wandb_init.pop("anonymous", None)


class FinishWandb(L.Callback):
    """Finish the W&B run in the process that made it (with ddp_fork, a worker, not the launcher)."""

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        finish_wandb(error=False)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        finish_wandb(error=True)


def finish_wandb(error: bool) -> None:
    """Lightning never calls wandb.finish(): do it, also after an error."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if error else 0)


class ImagesPerSecondBar(TQDMProgressBar):
    """Lightning's progress bar, with this rank's images per second in the predict bar."""

    def on_predict_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        seconds = getattr(pl_module, "_seconds", 0.0)
        if self.predict_progress_bar is not None and seconds > 0:
            self.predict_progress_bar.set_postfix({"img/s": f"{pl_module._count / seconds:.1f}"})
