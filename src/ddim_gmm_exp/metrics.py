"""Sample-quality metrics, torchmetrics first: FID (Inception or a model's own features), IS, CLIP.

Every metric consumes the uint8 images that are also written as PNGs, so a resumed run that
re-reads its PNGs scores exactly as an uninterrupted one.

Reference statistics are EDM-style ``.npz`` files with ``mu`` and ``sigma``. They are loaded into
the float64 states of torchmetrics' FrechetInceptionDistance (sum = n mu,
cov_sum = (n-1) sigma + n mu mu^T, num_samples = n) on global rank 0 only: those states are summed
over ranks when the metric syncs, so loading them on every rank would count them world_size times.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore

from ddim_gmm_exp.errors import ConfigError

log = logging.getLogger(__name__)

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_WEIGHTS_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_WEIGHTS_FILE
REFERENCE_N = 50_000  # the count written into the states; any n > 1 recovers mu and sigma exactly


class PixelFeatures(torch.nn.Module):
    """Identity features: the pixels of uint8 images scaled to [0, 1], flattened (toy model)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1).double() / 255


def inception_weights_path(weights_path: str | None) -> str:
    """A local Inception weights file for FID/IS, or a ConfigError saying where to put one.

    No download is attempted: torchmetrics would fetch the file from GitHub at run time.
    """
    if weights_path:
        if not Path(weights_path).is_file():
            raise ConfigError(
                f"metrics.fid.weights_path={weights_path!r} does not exist: give the path of {INCEPTION_WEIGHTS_FILE}"
            )
        return str(weights_path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if cached.is_file():
        return str(cached)
    raise ConfigError(
        f"FID with Inception needs {INCEPTION_WEIGHTS_FILE} and no download is made: fetch it from "
        f"{INCEPTION_WEIGHTS_URL} and put it at {cached} or pass metrics.fid.weights_path=FILE"
    )


def feature_dim(extractor: torch.nn.Module | int) -> int:
    return extractor if isinstance(extractor, int) else int(extractor.num_features)


def make_fid(extractor: torch.nn.Module | int, weights_path: str | None = None) -> FrechetInceptionDistance:
    """torchmetrics FID over a custom feature module, or Inception (2048/768/192/64) from a local file."""
    if isinstance(extractor, int):
        return FrechetInceptionDistance(
            feature=extractor, feature_extractor_weights_path=inception_weights_path(weights_path)
        )
    return FrechetInceptionDistance(feature=extractor)


def load_reference(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an EDM-style .npz."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"metrics.fid.reference={str(path)!r} does not exist: give an .npz with mu and sigma "
            "(scripts/fid_stats.py makes one), or null to compute it from the model's reference images"
        )
    try:
        with np.load(path) as data:
            return np.asarray(data["mu"], dtype=np.float64), np.asarray(data["sigma"], dtype=np.float64)
    except (KeyError, ValueError, OSError) as err:
        raise ConfigError(f"metrics.fid.reference={str(path)!r} is not an .npz with 'mu' and 'sigma': {err}") from err


def save_reference(path: str | Path, mu: np.ndarray, sigma: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, mu=mu, sigma=sigma)


def statistics_of(
    extractor: torch.nn.Module | int, batches: Any, weights_path: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the features of uint8 image batches, through the same FID metric code."""
    fid = make_fid(extractor, weights_path)
    for images in batches:
        fid.update(images, real=True)
    n = fid.real_features_num_samples
    mu = fid.real_features_sum / n
    sigma = (fid.real_features_cov_sum - n * torch.outer(mu, mu)) / (n - 1)
    return mu.numpy(), sigma.numpy()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def image_folder_batches(folder: str | Path, batch: int = 256):
    """uint8 (B, C, H, W) batches of every image under folder, sorted by path. Grayscale files stay
    one channel, others are read as RGB; all must have one size."""
    from PIL import Image

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"{str(folder)!r} holds no PNG/JPEG images")
    mode = "L" if Image.open(files[0]).mode in ("L", "1", "I;16") else "RGB"
    for start in range(0, len(files), batch):
        arrays = np.stack([np.asarray(Image.open(f).convert(mode)) for f in files[start : start + batch]])
        images = torch.from_numpy(arrays)
        yield images.permute(0, 3, 1, 2) if images.ndim == 4 else images[:, None]


def folder_reference(
    folder: str | Path, extractor: torch.nn.Module | int, cache_dir: str | Path, weights_path: str | None = None
) -> Path:
    """Reference statistics of a folder of real images, computed once and cached (keyed by the
    folder, its files' count and newest change, and the features)."""
    files = [p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    newest = max((p.stat().st_mtime_ns for p in files), default=0)
    key = f"{Path(folder).resolve()}|{len(files)}|{newest}|{type(extractor).__name__}|{feature_dim(extractor)}"
    path = Path(cache_dir) / f"fid_ref_folder_{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"
    return cached_statistics(
        path, f"{len(files)} images in {folder}", lambda: image_folder_batches(folder), extractor, weights_path
    )


def cached_statistics(
    path: Path, what: str, batches: Callable[[], Any], extractor: torch.nn.Module | int, weights_path: str | None
) -> Path:
    """path, computing (mu, sigma) of the image batches into it first unless it exists; written to a
    temporary name and renamed, so that an interrupted run leaves no half file in the cache."""
    if not path.is_file():
        log.info("computing reference statistics of %s -> %s", what, path)
        mu, sigma = statistics_of(extractor, batches(), weights_path)
        tmp = path.with_suffix(".tmp.npz")
        save_reference(tmp, mu, sigma)
        os.replace(tmp, path)
    return path


def check_reference(mu: np.ndarray, sigma: np.ndarray, dim: int, source: str) -> None:
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ConfigError(
            f"reference statistics {source} have feature dimension {mu.shape[0] if mu.ndim else mu.shape} "
            f"but the FID feature extractor gives {dim}: use statistics made with the same features"
        )


def cached_reference(
    adapter: Any,
    extractor: torch.nn.Module | int,
    model_key: str,
    cache_dir: str | Path,
    n: int,
    weights_path: str | None = None,
) -> Path:
    """Reference statistics of the model family's real images, computed once and cached."""
    key = hashlib.sha1(f"{model_key}|{type(extractor).__name__}|{feature_dim(extractor)}|{n}".encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"fid_ref_{key}.npz"
    return cached_statistics(
        path, f"{n} real images", lambda: adapter.reference_images(n).split(1000), extractor, weights_path
    )


class MetricSuite(torch.nn.Module):
    """The run's metrics: FID against fixed reference statistics, plus optional extras.

    ``extras`` maps a name to a torchmetrics Metric and a function (images, labels, prompts) ->
    arguments of its update(). ``seed`` (the run's seed), when given, replaces the seed of every
    SeededInceptionScore among them, so that the same run gives the same Inception Score.
    """

    def __init__(
        self,
        fid: FrechetInceptionDistance | None = None,
        reference: tuple[np.ndarray, np.ndarray] | None = None,
        fid_name: str = "fid",
        extras: dict[str, tuple[Metric, Callable[..., tuple]]] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.fid = fid
        self.fid_name = fid_name
        self.reference = reference
        self.extras = torch.nn.ModuleDict({name: m for name, (m, _) in (extras or {}).items()})
        self._extra_args = {name: f for name, (_, f) in (extras or {}).items()}
        if seed is not None:  # the run's seed decides the Inception Score's shuffle into groups
            for metric in self.extras.values():
                if isinstance(metric, SeededInceptionScore):
                    metric.seed = int(seed)

    def reset_and_load_reference(self, global_rank: int) -> None:
        """Reset every metric; global rank 0 alone holds the reference (states sum over ranks)."""
        for metric in self.metrics():
            metric.reset()
        if self.fid is None or self.reference is None or global_rank != 0:
            return
        mu, sigma = (
            torch.as_tensor(a, dtype=torch.float64, device=self.fid.real_features_sum.device) for a in self.reference
        )
        self.fid.real_features_sum = REFERENCE_N * mu
        self.fid.real_features_cov_sum = (REFERENCE_N - 1) * sigma + REFERENCE_N * torch.outer(mu, mu)
        self.fid.real_features_num_samples = torch.tensor(REFERENCE_N, device=mu.device)

    @property
    def needs_prompts(self) -> bool:
        """Whether a metric scores images against their prompts (CLIP score)."""
        return any(getattr(f, "needs_prompts", False) for f in self._extra_args.values())

    def metrics(self) -> list[Metric]:
        return ([self.fid] if self.fid is not None else []) + list(self.extras.values())

    def update(
        self, images: torch.Tensor, labels: torch.Tensor | None = None, prompts: list[str] | None = None
    ) -> None:
        """Feed a batch of generated uint8 images (B, C, H, W)."""
        if self.fid is not None:
            self.fid.update(images, real=False)
        for name, metric in self.extras.items():
            metric.update(*self._extra_args[name](images, labels, prompts))

    def compute(self) -> dict[str, float]:
        """Every metric's value; a collective under DDP, so call it on every rank."""
        out: dict[str, float] = {}
        if self.fid is not None:
            out[self.fid_name] = float(self.fid.compute())
        for name, metric in self.extras.items():
            value = metric.compute()
            if isinstance(value, tuple):  # Inception Score: (mean, std)
                out[name], out[f"{name}_std"] = float(value[0]), float(value[1])
            elif isinstance(value, dict):
                out.update({f"{name}_{k}": float(v) for k, v in value.items()})
            else:
                out[name] = float(value)
        return out


class CLIPFeatures(torch.nn.Module):
    """A transformers CLIPModel whose get_*_features return tensors, as torchmetrics expects.

    transformers 5 returns output objects from get_image_features / get_text_features, which
    torchmetrics 1.9's CLIPScore cannot normalise; this unwraps them.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        if isinstance(out, torch.Tensor):
            return out
        for name in ("image_embeds", "text_embeds", "pooler_output"):
            value = getattr(out, name, None)
            if isinstance(value, torch.Tensor):
                return value
        raise TypeError(f"cannot read features from {type(out).__name__}")

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def clip_loader(model_name_or_path: str) -> Callable[[], tuple[torch.nn.Module, Any]]:
    """The callable torchmetrics' CLIPScore takes: a hub id or a local directory -> (model, processor)."""

    def load() -> tuple[torch.nn.Module, Any]:
        from transformers import CLIPModel, CLIPProcessor

        try:
            model = CLIPModel.from_pretrained(model_name_or_path)
            processor = CLIPProcessor.from_pretrained(model_name_or_path)
        except OSError as err:
            raise ConfigError(
                f"metrics clip model={model_name_or_path!r} cannot be loaded offline: give a local directory "
                "saved with CLIPModel/CLIPProcessor.save_pretrained, or a hub id already in the HF cache"
            ) from err
        return CLIPFeatures(model.eval()), processor

    return load


def clip_score_extra(model: str = "openai/clip-vit-base-patch16", adapter: Any = None) -> tuple[Metric, Callable]:
    """A ``metrics.extra`` entry: torchmetrics CLIPScore of each image against its prompt."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    def arguments(images: torch.Tensor, labels: Any, prompts: list[str] | None) -> tuple:
        if prompts is None:
            raise ConfigError("metrics.extra.clip needs prompts: give data.prompts_file")
        return list(images), prompts

    arguments.needs_prompts = True
    return CLIPScore(model_name_or_path=clip_loader(model)), arguments


class SeededInceptionScore(InceptionScore):
    """torchmetrics InceptionScore whose shuffle before the split into groups is seeded.

    InceptionScore.compute permutes the features with the global RNG (torch.randperm), so the
    score depended on whatever had drawn from it before, and compute() advanced it. Here the
    permutation is drawn from ``seed`` inside a forked CPU RNG: the same features give the same
    score, on every rank, and the global RNG state is left as it was.
    """

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = int(seed)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        # torch.randperm without a device or generator draws from the CPU default generator; only
        # that one is forked and seeded (torch.manual_seed would also reseed every CUDA device)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(self.seed)
            return super().compute()


def inception_score_extra(
    weights_path: str | None = None, adapter: Any = None, seed: int = 0
) -> tuple[Metric, Callable]:
    """A ``metrics.extra`` entry: Inception Score (SeededInceptionScore) from a local Inception
    weights file; ``seed`` seeds the shuffle into groups (MetricSuite's seed replaces it)."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    logits = NoTrainInceptionV3(
        name="inception-v3-compat",
        features_list=["logits_unbiased"],
        feature_extractor_weights_path=inception_weights_path(weights_path),
    )
    metric = SeededInceptionScore(feature=logits, seed=seed)
    return metric, lambda images, labels, prompts: (images,)
