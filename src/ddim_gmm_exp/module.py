"""The Lightning predict loop: sample a shard of global indices, decode, score, save PNGs.

Every rank runs predict_step on its shard; metrics are updated on every rank and computed on
every rank at the end (compute() is a collective); global rank 0 then reports (results.json,
logger). Lightning's ``self.log`` is refused in predict, so nothing here uses it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from ddim_gmm_exp.data import labels_of, prompts_of, sample_seeds
from ddim_gmm_exp.gmm import GMM
from ddim_gmm_exp.images import load_png, png_path, save_png, to_uint8
from ddim_gmm_exp.metrics import MetricSuite
from ddim_gmm_exp.models.base import ModelAdapter
from ddim_gmm_exp.noise import randn, sample_generators
from ddim_gmm_exp.sampling import classifier_free_guidance, sample_ddim, x0_options


@dataclass
class SamplingPlan:
    """What to sample: the timesteps and schedule, the kernel, guidance, and the index meanings."""

    timesteps: list[int]
    alphas_cumprod: torch.Tensor
    final_abar: torch.Tensor
    eta: float
    prediction_type: str
    step_options: dict[str, Any]
    guidance_scale: float = 1.0
    gmm: GMM | None = None
    base_seed: int = 0
    labels: list[int] | None = None
    prompts: list[str] | None = None
    sample_dir: Path | None = None
    resumed_indices: list[int] = field(default_factory=list)

    @classmethod
    def from_scheduler(cls, scheduler: Any, eta: float, **kwargs: Any) -> SamplingPlan:
        """The plan of a diffusers DDIMScheduler after set_timesteps: its timesteps, schedule,
        prediction type and x0 clipping / thresholding settings."""
        return cls(
            timesteps=scheduler.timesteps.tolist(),
            alphas_cumprod=scheduler.alphas_cumprod,
            final_abar=scheduler.final_alpha_cumprod,
            eta=float(eta),
            prediction_type=scheduler.config.prediction_type,
            step_options=x0_options(scheduler.config),
            **kwargs,
        )


class SamplingModule(L.LightningModule):
    """predict_step = sample a batch of global indices with the core library, then score it."""

    def __init__(
        self,
        adapter: ModelAdapter,
        plan: SamplingPlan,
        metrics: MetricSuite,
        report: Callable[[dict[str, float], dict[str, Any], list[torch.Tensor], Any], None] | None = None,
    ) -> None:
        super().__init__()
        self.adapter = adapter
        self.plan = plan
        self.metrics = metrics
        self.report = report
        self.results: dict[str, float] = {}
        self._gmm_on_device: GMM | None = None
        self._seconds = 0.0
        self._count = 0
        self._batches = 0
        self.first_images: list[tuple[int, torch.Tensor]] = []  # (global index, image) of indices < 64

    def on_predict_start(self) -> None:
        self.adapter.eval()
        if self.plan.gmm is not None:
            self._gmm_on_device = self.plan.gmm.to(self.device)
        self.metrics.reset_and_load_reference(self.global_rank)
        self._seconds, self._count, self._batches, self.first_images = 0.0, 0, 0, []
        if self.global_rank == 0:
            self._score_resumed_images()

    def _score_resumed_images(self) -> None:
        """Indices sampled by an earlier, interrupted run: their metric features from their PNGs."""
        resumed = self.plan.resumed_indices
        for start in range(0, len(resumed), 256):
            chunk = torch.tensor(resumed[start : start + 256])
            images = torch.stack([load_png(png_path(self.plan.sample_dir, int(i))) for i in chunk]).to(self.device)
            self.metrics.update(images, labels_of(chunk, self.plan.labels), prompts_of(chunk, self.plan.prompts))
            self._keep_for_grid(chunk, images)

    def _keep_for_grid(self, indices: torch.Tensor, images: torch.Tensor) -> None:
        for i, image in zip(indices.tolist(), images, strict=True):
            if i < 64:
                self.first_images.append((i, image.cpu()))

    @torch.no_grad()
    def sample(self, indices: torch.Tensor) -> torch.Tensor:
        """The samples (B, *sample_shape) of these global indices, independent of the batch."""
        plan, adapter = self.plan, self.adapter
        generators = sample_generators(sample_seeds(indices, plan.base_seed))  # CPU: device-independent
        x = randn((len(indices), *adapter.sample_shape), generators, device=self.device)
        labels = labels_of(indices, plan.labels)
        prompts = prompts_of(indices, plan.prompts)
        cond = adapter.encode_condition(labels, prompts, self.device)
        uncond = adapter.null_condition(cond) if cond is not None and plan.guidance_scale != 1.0 else None

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return classifier_free_guidance(adapter.model_output, x, t, cond, uncond, plan.guidance_scale)

        return sample_ddim(
            denoise,
            x,
            plan.timesteps,
            plan.alphas_cumprod,
            plan.final_abar,
            eta=plan.eta,
            gmm=self._gmm_on_device,
            generator=generators,
            prediction_type=plan.prediction_type,
            **plan.step_options,
        )

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        indices = batch.cpu()
        start = time.perf_counter()
        samples = self.sample(indices)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._seconds += time.perf_counter() - start
        self._count += len(indices)
        self._batches += 1
        images = to_uint8(self.adapter.decode(samples))
        self.metrics.update(images, labels_of(indices, self.plan.labels), prompts_of(indices, self.plan.prompts))
        self._keep_for_grid(indices, images)
        if self.plan.sample_dir is not None:
            for i, image in zip(indices.tolist(), images, strict=True):
                save_png(image, png_path(self.plan.sample_dir, i))

    def on_predict_epoch_end(self) -> None:
        strategy = self.trainer.strategy
        metrics = self.metrics.compute()  # a collective: every rank calls it
        count = strategy.reduce(torch.tensor(float(self._count), device=self.device), reduce_op="sum")
        seconds = strategy.reduce(torch.tensor(self._seconds, device=self.device), reduce_op="max")
        stats = self.run_stats(
            int(count), float(seconds), self.trainer.world_size, type(self.trainer.accelerator).__name__
        )
        self.finish(metrics, stats, gather_objects(self.first_images, self.trainer.world_size), self.trainer.logger)

    def score_without_sampling(self, logger: Any) -> None:
        """Every sample is already on disk (a resumed run that was killed after its last PNG)."""
        self.metrics.reset_and_load_reference(0)
        self._score_resumed_images()
        self.finish(self.metrics.compute(), self.run_stats(0, 0.0, 1, "none"), [self.first_images], logger)

    def run_stats(self, count: int, seconds: float, world_size: int, accelerator: str) -> dict[str, Any]:
        """What this run sampled, how fast, on what (seconds per step from this rank's timings)."""
        return {
            "sampled_this_run": count,
            "sampling_seconds": seconds,
            "images_per_second": count / seconds if seconds else None,
            "seconds_per_step": self._seconds / max(1, self._batches * len(self.plan.timesteps)),
            "devices": world_size,
            "accelerator": accelerator,
        }

    def finish(self, metrics: dict[str, float], stats: dict[str, Any], grid_parts: list[list], logger: Any) -> None:
        """Keep the metrics and the first 64 images, and report on rank 0."""
        self.results = metrics
        self.grid = [img for _, img in sorted((p for part in grid_parts for p in part), key=lambda p: p[0])][:64]
        if self.global_rank == 0 and self.report is not None:
            self.report(metrics, stats, self.grid, logger)


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """Every rank's obj, on every rank (uneven sizes are fine, unlike all_gather of tensors)."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


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
