"""What the runner needs of a model family: eps(x, t, cond), its noise schedule, decoding.

An adapter wraps one model family (the analytic toy, the shipped digits UNet, diffusers pixel
DDPMs, latent models...) behind one small interface, so the sampler, the metrics and the
logging never look inside a model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ddim_gmm_exp.errors import ConfigError


class ModelAdapter(torch.nn.Module):
    """Base class of model adapters. Subclasses set the attributes and implement the methods.

    Attributes:
        sample_shape: (C, H, W) of what the sampler draws (the latent for latent models);
            the GMM's dimension D is its product.
        scheduler_config: a diffusers DDIMScheduler config (dict) with the training schedule.
        num_classes: number of class labels, or 0 for an unconditional model. Class
            ``num_classes`` is the null class used for classifier-free guidance.
        family: "diffusion" (DDPM-trained: eps, v or x0 over alpha-bars) or "flow" (rectified
            flow: velocity over sigmas, with ``flow_sigmas``); the sampler must walk the same.
    """

    family: str = "diffusion"

    sample_shape: tuple[int, ...] = ()
    scheduler_config: dict[str, Any] = {}
    num_classes: int = 0
    takes_prompts: bool = False
    # FID reference statistics (.npz) that ship with the model family, in its own features
    reference_stats: Path | None = None

    @property
    def dim(self) -> int:
        """D = C*H*W of a sample: what the GMM is built for."""
        return math.prod(self.sample_shape)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def model_output(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """The network's output (eps, v or x0, as scheduler_config's prediction_type says)."""
        raise NotImplementedError

    def flow_sigmas(self, steps: int) -> list[float]:
        """A flow family's time grid for ``steps`` steps: sigmas from the noisiest down to 0."""
        raise NotImplementedError(f"{type(self).__name__} is not a flow model")

    def null_condition(self, cond: Any) -> Any:
        """The unconditional counterpart of ``cond`` for classifier-free guidance."""
        if self.num_classes:
            return torch.full_like(cond, self.null_label)
        raise NotImplementedError

    def encode_condition(self, labels: torch.Tensor | None, prompts: list[str] | None, device: torch.device) -> Any:
        """The model's conditioning for a batch of labels and/or prompts (None: unconditional)."""
        return None if labels is None else labels.to(device)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Samples (B, *sample_shape) -> images (B, 3 or 1, H, W) in [0, 1]."""
        return ((x + 1) / 2).clamp(0, 1)

    def reference_images(self, n: int, seed: int = 0) -> torch.Tensor:
        """n real images (uint8, B x C x H x W) for reference statistics, where the family has them."""
        raise ConfigError(f"{type(self).__name__} ships no reference images: give metrics.fid.reference")
