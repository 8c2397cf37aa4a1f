"""Controls that separate the mixture's structure from the extra noise it adds, and the account
of what each sampler injects.

The paper's kernel at eta = 0 clips every component variance to 0, so DDIM-GMM there is DDIM plus
an offset of norm about s per step (one of K, shared by all samples). Whether a gain comes from
that structure or from the extra noise alone is what the control answers: the same DDIM (or RFIM)
step plus a FRESH isotropic offset of norm exactly s per sample and step
(``samplers.ddim_noise``, ``samplers.rfim_noise``).

Notation: u ~ N(0, I_D) drawn from the sample's own generator; the control adds s u / ||u||.
The variance account records, per step, E||x_s - m||^2 (m the step's deterministic mean) against
sigma^2 D, from the samples' own steps.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ddim_gmm_exp.noise import Draw, Generators, randn


@dataclass(frozen=True)
class OffsetSettings:
    """The control's own settings: what ``last_step`` means for the GMM."""

    scale: float
    last_step: bool = False


class IsotropicOffsetKernel:
    """x_s = m + sigma z + s u / ||u||: DDIM's (or RFIM's) Gaussian step plus a fresh isotropic offset
    of norm exactly s. It has the GMM's interface as the sampling loops use it, so the step math
    (``sampling.kernel_noise`` / ``kernel_perturbation``) is the same code for both; the
    "components" it draws are the offsets themselves. s = 0 is DDIM bit for bit (no draw)."""

    def __init__(self, scale: float, last_step: bool = False) -> None:
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not 0 <= scale < math.inf:
            raise ValueError(f"scale={scale!r} is not allowed: it must be a finite number >= 0")
        self.hparams = OffsetSettings(float(scale), bool(last_step))

    @property
    def is_trivial(self) -> bool:
        return self.hparams.scale == 0

    @property
    def acts_without_noise(self) -> bool:
        return True

    def mixes_at(self, step_index: int, num_steps: int, eta: float) -> bool:
        """Every step but the last (unless last_step), as the paper's kernel; never for s = 0."""
        return not self.is_trivial and (step_index < num_steps - 1 or self.hparams.last_step)

    def check_num_steps(self, num_steps: int) -> None:
        """Any number of steps: the control has no per-step parameters."""

    def check_shape(self, shape: tuple[int, ...]) -> None:
        """Any sample shape."""

    def mixture_draw(self, shape: tuple[int, ...]) -> Draw:
        """What a step draws from each sample's stream after its z: u ~ N(0, I), float64."""
        return Draw("randn", tuple(shape[1:]), torch.float64)

    def components_from_draw(self, step_index: int, u: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """s u / ||u|| per sample, in ``dtype``."""
        norms = u.flatten(1).norm(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        return (self.hparams.scale * u / norms.view(-1, *([1] * (u.dim() - 1)))).to(dtype or torch.get_default_dtype())

    def draw_components(
        self, step_index: int, batch_size: int, generator: Generators, *, like: torch.Tensor
    ) -> torch.Tensor:
        """s u / ||u|| per sample, u ~ N(0, I) from the sample's own generator (after z)."""
        u = randn(like.shape, generator, device=like.device, dtype=torch.float64)
        return self.components_from_draw(step_index, u, like.dtype)

    def perturbation(
        self,
        step_index: int,
        sigma: float | torch.Tensor,
        z: torch.Tensor | None,
        components: torch.Tensor,
        *,
        like: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x_s - m = sigma z + s u / ||u|| (the offset alone at eta = 0, where no z is drawn)."""
        return components if z is None else sigma * z + components


@dataclass
class VarianceAccount:
    """Per step, the sum over samples of ||x_s - m||^2 and the count, and sigma: what each sampler
    injects beyond its deterministic mean, measured on the samples' own steps. With ``per_sample``
    a dict (an account of one batch), it also keeps each sample's distances of each step, which
    save_sample_account writes to the run directory."""

    dim: int
    sum_sq: dict[int, float] = field(default_factory=dict)
    count: dict[int, int] = field(default_factory=dict)
    sigma: dict[int, float | torch.Tensor] = field(default_factory=dict)  # tensors read back after the run
    per_sample: dict[int, torch.Tensor] | None = None

    def on_mean(self, step_index: int, x_s: torch.Tensor, mean: torch.Tensor, sigma: float | torch.Tensor) -> None:
        """Called by the sampling loop with each step's output and mean."""
        # kept on the device (no sync per step); read out once, in summary() or per batch
        distance = (x_s.double() - mean.double()).flatten(1).pow(2).sum(1)
        if self.per_sample is not None:
            self.per_sample[step_index] = distance
        self.sum_sq[step_index] = self.sum_sq.get(step_index, 0.0) + distance.sum()
        self.count[step_index] = self.count.get(step_index, 0) + x_s.shape[0]
        self.sigma[step_index] = sigma

    def __call__(self, i: int, t: torch.Tensor, x_s: torch.Tensor, x0: torch.Tensor) -> None:
        """The plain step callback: nothing to do (on_mean carries the account)."""

    def on_cpu(self) -> VarianceAccount:
        """The same account with plain floats (to send between ranks)."""
        return VarianceAccount(
            self.dim,
            {i: float(v) for i, v in self.sum_sq.items()},
            dict(self.count),
            {i: float(v) for i, v in self.sigma.items()},
        )

    def merged(self, other: VarianceAccount) -> VarianceAccount:
        """The account of two sets of samples (another batch or another rank)."""
        total = VarianceAccount(self.dim, dict(self.sum_sq), dict(self.count), dict(self.sigma) | other.sigma)
        for i, value in other.sum_sq.items():
            total.sum_sq[i] = total.sum_sq.get(i, 0.0) + value
            total.count[i] = total.count.get(i, 0) + other.count[i]
        return total

    def summary(self) -> dict[str, object]:
        """Per step E||x_s - m||^2 and sigma^2 D; over steps, both per coordinate (/ D); and the
        number of samples the account covers."""
        steps = sorted(self.sum_sq)
        if not steps:
            return {}
        per_step = [
            {
                "step": i,
                "mean_sq_distance": float(self.sum_sq[i]) / self.count[i],
                "sigma_sq_times_d": float(self.sigma[i]) ** 2 * self.dim,
            }
            for i in steps
        ]
        injected = sum(p["mean_sq_distance"] for p in per_step) / len(per_step) / self.dim
        gaussian = sum(p["sigma_sq_times_d"] for p in per_step) / len(per_step) / self.dim
        return {
            "num_samples": min(self.count.values()),
            "injected_per_dim": injected,
            "ddim_variance_per_dim": gaussian,
            "extra_per_dim": injected - gaussian,
            "steps": per_step,
        }


# A run keeps its account per sample on disk (one small .npz per batch, in the samples folder), so
# that a resumed run's account covers the samples of the runs before it, as its metrics do.
ACCOUNT_DIR = "variance_account"


def save_sample_account(account: VarianceAccount, indices: Sequence[int], directory: Path) -> None:
    """One batch's per-sample distances (from an account with ``per_sample``), keyed by the
    samples' global indices; written to a temporary name and renamed (a killed run leaves no half
    file)."""
    steps = sorted(account.per_sample or {})
    if not steps:
        return
    indices = np.asarray(indices, dtype=np.int64)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{indices[0]:06d}-{indices[-1]:06d}-{len(indices)}.npz"
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.stem}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as file:
        np.savez(
            file,
            indices=indices,
            steps=np.asarray(steps, dtype=np.int64),
            sigma=np.asarray([float(account.sigma[i]) for i in steps]),
            sq_distance=torch.stack([account.per_sample[i] for i in steps], dim=1).cpu().numpy(),
        )
    os.replace(tmp, path)


def load_sample_account(directory: Path, indices: Iterable[int], dim: int) -> VarianceAccount:
    """The account of these samples from the batch files under directory, each sample counted
    once. Samples without a record (sampled by a version that kept none) are left out: the
    summary's ``num_samples`` says how many it covers."""
    wanted = np.fromiter(indices, dtype=np.int64)
    account = VarianceAccount(dim)
    for path in sorted(directory.glob("*.npz")) if directory.is_dir() else []:
        with np.load(path) as data:
            rows = np.isin(data["indices"], wanted)  # each wanted index from the first file holding it
            if not rows.any():
                continue
            wanted = np.setdiff1d(wanted, data["indices"][rows])
            batch = VarianceAccount(
                dim,
                dict(zip(data["steps"].tolist(), data["sq_distance"][rows].sum(0).tolist(), strict=True)),
                {i: int(rows.sum()) for i in data["steps"].tolist()},
                dict(zip(data["steps"].tolist(), data["sigma"].tolist(), strict=True)),
            )
        account = account.merged(batch)
    return account
