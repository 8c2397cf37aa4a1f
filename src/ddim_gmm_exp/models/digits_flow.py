"""The embedded rectified-flow model: a class-conditional flow on scikit-learn's 8x8 digits.

The same UNet as the digits DDPM (models/digits.unet_config), trained by
``scripts/train_digits.py --flow`` on the interpolation x_t = (1 - t) x_0 + t x_1 (data at t = 0,
noise at t = 1, independent coupling) with the velocity target x_1 - x_0, t ~ U[0, 1], the
network fed t * 1000, labels dropped to the null class 10 for classifier-free guidance. Shipped in
``ddim_gmm_exp/assets/digits_flow``: ``unet/`` (float16), ``scheduler/`` (a diffusers
FlowMatchEulerDiscreteScheduler config, shift 1.0) and ``card.json``. It is scored as the DDPM is,
in the DDPM's classifier features against the DDPM's reference statistics (``assets/digits``),
so the two models' fid_digits compare directly.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.flow import NUM_TRAIN_TIMESTEPS, uniform_sigmas
from ddim_gmm_exp.models.base import ModelAdapter
from ddim_gmm_exp.models.digits import (
    IMAGE_SHAPE,
    NULL_CLASS,
    NUM_CLASSES,
    digits_uint8,
    load_digits_dataset,
    shipped_dir,
)


def shipped_flow_dir() -> Path:
    """Where the package's trained digits flow model lives."""
    return Path(str(resources.files("ddim_gmm_exp") / "assets" / "digits_flow"))


class DigitsFlowAdapter(ModelAdapter):
    """The shipped (or a locally trained) digits flow UNet: velocity v(x_t, t * 1000, label)."""

    family = "flow"

    def __init__(self, path: str | None = None, precision: str = "fp32") -> None:
        super().__init__()
        from diffusers import UNet2DModel

        root = Path(path) if path is not None else shipped_flow_dir()
        if not (root / "unet").is_dir():
            raise ConfigError(
                f"model.path={str(root)!r} holds no unet/: give a directory written by scripts/train_digits.py --flow"
            )
        self.unet = UNet2DModel.from_pretrained(root / "unet", low_cpu_mem_usage=False).float().eval()
        self.scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        self.num_train_timesteps = int(self.scheduler_config.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS))
        self.sample_shape = IMAGE_SHAPE
        self.num_classes = NUM_CLASSES
        self.root = root
        # scored in the DDPM's features: its reference statistics, unless the directory brings its own
        own = root / "reference_stats.npz"
        self.reference_stats = own if own.is_file() else shipped_dir() / "reference_stats.npz"

    def model_output(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        """The velocity v = E[x_1 - x_0 | x_t] at model timesteps t = flow time * 1000 (B,)."""
        if cond is None:
            cond = torch.full((x.shape[0],), NULL_CLASS, device=x.device, dtype=torch.long)
        return self.unet(x, t, class_labels=cond).sample

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.full_like(cond, NULL_CLASS)

    def flow_sigmas(self, steps: int) -> list[float]:
        """The model's time grid for ``steps`` steps: uniform, [1, (S-1)/S, ..., 1/S, 0]."""
        return uniform_sigmas(steps)

    def reference_images(self, n: int, seed: int = 0) -> torch.Tensor:
        """All (up to n) real digits as uint8 images."""
        images, _ = load_digits_dataset()
        return digits_uint8(images[:n])
