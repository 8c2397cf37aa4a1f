"""The Lightning predict loop: sample a shard of global indices, decode, score, save PNGs.

Every rank runs predict_step on its shard with the plan's sampler function; metrics are updated
on every rank and computed on every rank at the end (compute() is a collective); global rank 0's
callbacks.ReportResults then writes results.json and logs. Lightning's ``self.log`` is refused in
predict, so nothing here uses it.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from ddim_gmm_exp.controls import ACCOUNT_DIR, VarianceAccount, load_sample_account, save_sample_account
from ddim_gmm_exp.data import labels_of, prompts_of, sample_seeds
from ddim_gmm_exp.gmm import GMM
from ddim_gmm_exp.images import load_png, png_path, save_png, to_uint8
from ddim_gmm_exp.metrics import MetricSuite
from ddim_gmm_exp.models.base import ModelAdapter
from ddim_gmm_exp.noise import Generators, SampleStreams, randn, sample_generators
from ddim_gmm_exp.samplers import Sampler, Schedule
from ddim_gmm_exp.sampling import classifier_free_guidance

log = logging.getLogger(__name__)


@dataclass
class SamplingPlan:
    """What to sample: the sampler function, its schedule, options and kernel, guidance, and what
    each global index means (seed, label, prompt)."""

    sampler: Sampler
    schedule: Schedule
    options: dict[str, Any] = field(default_factory=dict)
    gmm: GMM | None = None
    guidance_scale: float = 1.0
    base_seed: int = 0
    labels: list[int] | None = None
    prompts: list[str] | None = None
    sample_dir: Path | None = None
    resumed_indices: list[int] = field(default_factory=list)
    noise_device: str = "cpu"  # noise.NOISE_DEVICES: per-sample generators on the CPU or the sampling device


class SamplingModule(L.LightningModule):
    """predict_step = sample a batch of global indices with the core library, then score it."""

    def __init__(
        self,
        adapter: ModelAdapter,
        plan: SamplingPlan,
        metrics: MetricSuite,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # the run's composed config: Lightning logs it (W&B config, CSV hparams) on the sampling rank
        self.save_hyperparameters(config or {})
        self.adapter = adapter
        self.plan = plan
        self.metrics = metrics
        self.results: dict[str, float] = {}
        self.stats: dict[str, Any] = {}
        self.grid: list[torch.Tensor] = []
        self._gmm_on_device: GMM | None = None
        self.nfe: int | None = None  # model evaluations per sample of the last batch (sample())
        self.account = VarianceAccount(adapter.dim)  # what the sampler injects, from its own steps
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
        self.account = VarianceAccount(self.adapter.dim)
        if self.global_rank == 0:  # rank 0 alone holds what earlier runs sampled (all ranks' sum)
            self._score_resumed_images()
            self.account = self._resumed_account()

    def _score_resumed_images(self) -> None:
        """Indices sampled by an earlier, interrupted run: their metric features from their PNGs."""
        resumed = self.plan.resumed_indices
        for start in range(0, len(resumed), 256):
            chunk = torch.tensor(resumed[start : start + 256])
            images = torch.stack([load_png(png_path(self.plan.sample_dir, int(i))) for i in chunk]).to(self.device)
            self.metrics.update(
                images, labels_of(chunk, self.plan.labels), prompts_of(chunk, self.plan.prompts), indices=chunk
            )
            self._keep_for_grid(chunk, images)

    @property
    def account_dir(self) -> Path | None:
        return None if self.plan.sample_dir is None else Path(self.plan.sample_dir) / ACCOUNT_DIR

    def _resumed_account(self) -> VarianceAccount:
        """The variance account of the samples an earlier, interrupted run made, from its records."""
        resumed = self.plan.resumed_indices
        if not resumed or self.account_dir is None:
            return VarianceAccount(self.adapter.dim)
        return load_sample_account(self.account_dir, resumed, self.adapter.dim)

    def _keep_for_grid(self, indices: torch.Tensor, images: torch.Tensor) -> None:
        for i, image in zip(indices.tolist(), images, strict=True):
            if i < 64:
                self.first_images.append((i, image.cpu()))

    @torch.no_grad()
    def sample(self, indices: torch.Tensor, account: VarianceAccount | None = None) -> torch.Tensor:
        """The samples (B, *sample_shape) of these global indices, independent of the batch; what
        the sampler injects goes into account (default: the run's)."""
        # CPU streams (the default) give the same image on any device, drawn in parallel and ahead
        # of need (noise.SampleStreams); 'device' streams are EDM's (images depend on the device type)
        seeds = sample_seeds(indices, self.plan.base_seed)
        if self.plan.noise_device == "device" and self.device.type != "cpu":
            return self._sample_with(sample_generators(seeds, device=self.device), indices, account)
        with SampleStreams(sample_generators(seeds)) as streams:
            return self._sample_with(streams, indices, account)

    def _sample_with(
        self, generators: Generators, indices: torch.Tensor, account: VarianceAccount | None
    ) -> torch.Tensor:
        plan, adapter = self.plan, self.adapter
        x = randn((len(indices), *adapter.sample_shape), generators, device=self.device)
        labels = labels_of(indices, plan.labels)
        prompts = prompts_of(indices, plan.prompts)
        cond = adapter.encode_condition(labels, prompts, self.device)
        uncond = adapter.null_condition(cond) if cond is not None and plan.guidance_scale != 1.0 else None

        calls = 0

        def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            nonlocal calls
            calls += 1
            return classifier_free_guidance(adapter.model_output, x, t, cond, uncond, plan.guidance_scale)

        kernel = {"gmm": self._gmm_on_device} if plan.gmm is not None else {}
        samples = plan.sampler(
            denoise,
            x,
            plan.schedule,
            generator=generators,
            callback=self.account if account is None else account,
            **plan.options,
            **kernel,
        )
        # NFE per sample, counted at the denoiser: a guided call evaluates the model twice
        guided = uncond is not None and plan.guidance_scale != 1.0
        self.nfe = calls * (2 if guided else 1)
        return samples

    def predict_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        indices = batch.cpu()
        start = time.perf_counter()
        batch_account = VarianceAccount(self.adapter.dim, per_sample={})
        samples = self.sample(indices, batch_account)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._seconds += time.perf_counter() - start
        self._count += len(indices)
        self._batches += 1
        images = to_uint8(self.adapter.decode(samples))
        self.account = self.account.merged(batch_account)
        self.metrics.update(
            images, labels_of(indices, self.plan.labels), prompts_of(indices, self.plan.prompts), indices=indices
        )
        self._keep_for_grid(indices, images)
        if self.plan.sample_dir is not None:
            # before the PNGs: every sample on disk has its record when a later run resumes this one
            save_sample_account(batch_account, indices.tolist(), self.account_dir)
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
        accounts = gather_objects(self.account.on_cpu(), self.trainer.world_size)
        total = accounts[0]
        for other in accounts[1:]:
            total = total.merged(other)
        stats["variance_account"] = account_summary(total, int(count) + len(self.plan.resumed_indices))
        self.finish(metrics, stats, gather_objects(self.first_images, self.trainer.world_size))

    def score_without_sampling(self) -> None:
        """Every sample is already on disk (a resumed run that was killed after its last PNG)."""
        self.metrics.reset_and_load_reference(0)
        self.adapter.eval()
        if self.plan.gmm is not None:
            self._gmm_on_device = self.plan.gmm.to(self.device)
        self.sample(torch.tensor(self.plan.resumed_indices[:1]), VarianceAccount(self.adapter.dim))  # counts its NFE
        self._score_resumed_images()
        account = account_summary(self._resumed_account(), len(self.plan.resumed_indices))
        stats = self.run_stats(0, 0.0, 1, "none") | {"variance_account": account}
        self.finish(self.metrics.compute(), stats, [self.first_images])

    def run_stats(self, count: int, seconds: float, world_size: int, accelerator: str) -> dict[str, Any]:
        """What this run sampled, how fast, on what (seconds per step from this rank's timings)."""
        return {
            "sampled_this_run": count,
            "sampling_seconds": seconds,
            "images_per_second": count / seconds if seconds else None,
            "seconds_per_step": self._seconds / max(1, self._batches * self.plan.schedule.num_steps),
            "nfe": self.nfe,  # model evaluations per sample, counted (guidance: 2 per call)
            "devices": world_size,
            "accelerator": accelerator,
        }

    def finish(self, metrics: dict[str, float], stats: dict[str, Any], grid_parts: list[list]) -> None:
        """Keep the metrics, the run's statistics and the first 64 images (callbacks.ReportResults
        writes them out on rank 0)."""
        self.results, self.stats = metrics, stats
        self.grid = [img for _, img in sorted((p for part in grid_parts for p in part), key=lambda p: p[0])][:64]


def account_summary(account: VarianceAccount, num_samples: int) -> dict[str, Any]:
    """The account's summary, with a warning where it covers fewer than the run's num_samples (a
    resumed run whose earlier samples were made by a version that kept no per-sample records)."""
    summary = account.summary()
    if summary and summary["num_samples"] < num_samples:
        log.warning(
            "variance account: it covers %d of the run's %d samples (those sampled before the resume have no "
            "record); results.json's variance_account.num_samples says so",
            summary["num_samples"],
            num_samples,
        )
    return summary


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """Every rank's obj, on every rank (uneven sizes are fine, unlike all_gather of tensors)."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return [obj]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
