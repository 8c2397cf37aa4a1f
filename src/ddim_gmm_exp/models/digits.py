"""The embedded default model: a class-conditional DDPM on scikit-learn's 8x8 digits, and the digit
classifier whose penultimate features score it (fid_digits, label accuracy, mode coverage).

Both are trained by ``scripts/train_digits.py`` and shipped in ``ddim_gmm_exp/assets/digits``:
``unet/`` (diffusers UNet2DModel, save_pretrained), ``scheduler/`` (the DDPM schedule),
``classifier.pt`` (state dict), ``reference_stats.npz`` (mu, sigma of all 1797 real digits in the
classifier's features) and ``card.json`` (how they were made and what they score).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics import Metric

from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.models.base import ModelAdapter

NUM_CLASSES = 10
NULL_CLASS = NUM_CLASSES  # class id 10: "no label", for classifier-free guidance
IMAGE_SHAPE = (1, 8, 8)


def shipped_dir() -> Path:
    """Where the package's trained digits model lives."""
    return Path(str(resources.files("ddim_gmm_exp") / "assets" / "digits"))


def load_digits_dataset() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled digits: images in [-1, 1] (1797, 1, 8, 8) float32 and labels (1797,)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16 * 2 - 1
    return images, torch.tensor(data.target, dtype=torch.long)


def digits_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] digits -> uint8 images, as the runner saves samples."""
    return ((images + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8)


def stratified_split(labels: torch.Tensor, held_out: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices, the same fraction of every class held out; fixed by seed."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    train, test = train_test_split(idx, test_size=held_out, random_state=seed, stratify=labels.numpy())
    return np.sort(train), np.sort(test)


def unet_config(block_out_channels: tuple[int, ...] = (32, 64)) -> dict[str, Any]:
    """The digits UNet: two levels, attention at 4x4, 11 class embeddings (10 digits + null)."""
    return dict(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=tuple(block_out_channels),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
        num_class_embeds=NUM_CLASSES + 1,
    )


class DigitClassifier(nn.Module):
    """A 3-layer CNN digit classifier; its 128-d penultimate activations are the FID features."""

    num_features = 128

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, self.num_features),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.num_features, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations of [-1, 1] images (B, 1, 8, 8)."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    path = Path(path) if path is not None else shipped_dir()
    file = path / "classifier.pt" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"digit classifier {str(file)!r} does not exist: run scripts/train_digits.py")
    model = DigitClassifier()
    state = torch.load(file, map_location="cpu", weights_only=True)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def uint8_to_unit(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255 * 2 - 1


class DigitFeatures(nn.Module):
    """FID features for digits: the classifier's penultimate layer on uint8 images."""

    num_features = DigitClassifier.num_features

    def __init__(self, path: str | None = None) -> None:
        super().__init__()
        self.classifier = load_classifier(path)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.classifier.features(uint8_to_unit(images).to(next(self.classifier.parameters()).device))


class DigitsClassifierScores(Metric):
    """The classifier's view of generated digits: label accuracy (the conditional analogue of a CLIP
    score), class histogram (mode coverage) and mean max-confidence."""

    full_state_update = False

    def __init__(self, path: str | None = None) -> None:
        super().__init__()
        self.classifier = load_classifier(path)
        self.add_state("correct", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("labelled", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("confidence", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("histogram", torch.zeros(NUM_CLASSES, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, images: torch.Tensor, labels: torch.Tensor | None) -> None:
        with torch.no_grad():
            probs = self.classifier(uint8_to_unit(images).to(self.histogram.device)).softmax(-1).double()
        confidence, predicted = probs.max(-1)
        self.confidence += confidence.sum()
        self.histogram += torch.bincount(predicted, minlength=NUM_CLASSES).double()
        if labels is not None:
            self.correct += (predicted == labels.to(predicted.device)).sum()
            self.labelled += len(labels)

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.histogram.sum()
        freq = self.histogram / n
        entropy = -(freq[freq > 0] * freq[freq > 0].log()).sum() / np.log(NUM_CLASSES)
        out = {
            "confidence": self.confidence / n,
            "modes_covered": (self.histogram > 0).sum().double(),
            "class_entropy": entropy,
        }
        if self.labelled > 0:
            out["accuracy"] = self.correct / self.labelled
        return out


def classifier_scores_extra(path: str | None = None, adapter: Any = None) -> tuple[Metric, Any]:
    """A ``metrics.extra`` entry for the digits model."""
    return DigitsClassifierScores(path), lambda images, labels, prompts: (images, labels)


class DigitsAdapter(ModelAdapter):
    """The shipped (or a locally trained) class-conditional digits UNet behind the runner's interface."""

    def __init__(self, path: str | None = None, precision: str = "fp32") -> None:
        super().__init__()
        from diffusers import UNet2DModel

        root = Path(path) if path is not None else shipped_dir()
        if not (root / "unet").is_dir():
            raise ConfigError(
                f"model.path={str(root)!r} holds no unet/: give a directory written by scripts/train_digits.py"
            )
        self.unet = UNet2DModel.from_pretrained(root / "unet", low_cpu_mem_usage=False).float().eval()
        self.scheduler_config = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
        self.sample_shape = IMAGE_SHAPE
        self.num_classes = NUM_CLASSES
        self.root = root
        stats = root / "reference_stats.npz"
        self.reference_stats = stats if stats.is_file() else None

    def model_output(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            cond = torch.full((x.shape[0],), NULL_CLASS, device=x.device, dtype=torch.long)
        return self.unet(x, t, class_labels=cond).sample

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.full_like(cond, NULL_CLASS)

    def reference_images(self, n: int, seed: int = 0) -> torch.Tensor:
        """All (up to n) real digits as uint8 images."""
        images, _ = load_digits_dataset()
        return digits_uint8(images[:n])
