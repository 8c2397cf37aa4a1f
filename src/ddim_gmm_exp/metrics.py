"""Sample-quality metrics, torchmetrics first: FID (Inception or a model's own features), IS, CLIP.

Every metric consumes the uint8 images that are also written as PNGs, so a resumed run that
re-reads its PNGs scores exactly as an uninterrupted one.

Reference statistics are EDM-style ``.npz`` files with ``mu`` and ``sigma``. They are loaded into
the float64 states of torchmetrics' FrechetInceptionDistance (sum = n mu,
cov_sum = (n-1) sigma + n mu mu^T, num_samples = n) on global rank 0 only: those states are summed
over ranks when the metric syncs, so loading them on every rank would count them world_size times.
Statistics computed here (of a model family's real images, or of a folder of images) are cached
under a key of everything that decides them: the images' content and the extractor's weights; the
key is stored in the file and checked, and non-finite statistics are never cached.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.utilities import dim_zero_cat

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


def save_reference(path: str | Path, mu: np.ndarray, sigma: np.ndarray, key: str | None = None) -> None:
    """An EDM-style .npz (mu, sigma), plus the cache key it was made under when given; written to a
    temporary file and renamed, so that an interrupted or concurrent writer leaves no half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    extra = {} if key is None else {"key": np.array(key)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            np.savez(file, mu=mu, sigma=sigma, **extra)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def statistics_of(
    extractor: torch.nn.Module | int, batches: Any, weights_path: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the features of uint8 image batches, through the same FID metric code; a
    ConfigError for fewer than 2 images (no covariance) or features that are not finite."""
    fid = make_fid(extractor, weights_path)
    for images in batches:
        fid.update(images, real=True)
    n = int(fid.real_features_num_samples)
    if n < 2:  # sigma would be 0/0: NaN statistics that LAPACK later crashes on
        raise ConfigError(f"reference statistics need at least 2 images (a covariance), got {n}")
    mu = fid.real_features_sum / n
    sigma = (fid.real_features_cov_sum - n * torch.outer(mu, mu)) / (n - 1)
    if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all()):
        raise ConfigError(f"the features of the {n} reference images are not finite (NaN or inf): nothing is kept")
    return mu.numpy(), sigma.numpy()


def statistics_problem(mu: np.ndarray, sigma: np.ndarray, dim: int) -> str | None:
    """What makes (mu, sigma) unusable as reference statistics of dim features; None if nothing."""
    if mu.shape != (dim,):
        return (
            f"have feature dimension {mu.shape[0] if mu.ndim else mu.shape} "
            f"but the FID feature extractor gives {dim}: use statistics made with the same features"
        )
    if sigma.shape != (dim, dim):
        return f"have a sigma of shape {sigma.shape}, not ({dim}, {dim})"
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        return "are not finite (NaN or inf)"
    # float32 files are symmetric to ~1e-7 relative; a covariance is symmetric by definition
    if np.abs(sigma - sigma.T).max() > 1e-6 * max(np.abs(sigma).max(), np.finfo(np.float64).tiny):
        return "have a covariance (sigma) that is not symmetric"
    return None


def warn_if_singular(sigma: np.ndarray, source: str) -> None:
    """One warning line where the reference covariance is singular beyond its constant features
    (as from no more images than features); constant features (a classifier's dead units) are
    left out, since more images cannot give them variance."""
    diag = np.diag(sigma)
    varying = diag > diag.max(initial=0.0) * len(diag) * np.finfo(np.float64).eps
    if not varying.any():
        return
    rank = int(np.linalg.matrix_rank(sigma[np.ix_(varying, varying)], hermitian=True))
    if rank < int(varying.sum()):
        log.warning(
            "reference statistics %s: the covariance is singular (rank %d of %d varying features): FID is less "
            "reliable; use more reference images than features (metrics.fid.reference_samples)",
            source,
            rank,
            int(varying.sum()),
        )


def check_reference(mu: np.ndarray, sigma: np.ndarray, dim: int, source: str) -> None:
    """A ConfigError naming source if (mu, sigma) cannot serve as reference statistics of dim
    features; a warning if the covariance is singular."""
    problem = statistics_problem(mu, sigma, dim)
    if problem is not None:
        raise ConfigError(f"reference statistics {source} {problem}")
    warn_if_singular(sigma, source)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def image_files(folder: str | Path) -> list[Path]:
    """Every image file under folder, sorted by path; a ConfigError if there is none."""
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"{str(folder)!r} holds no PNG/JPEG images")
    return files


def image_folder_batches(folder: str | Path, batch: int = 256):
    """uint8 (B, C, H, W) batches of every image under folder, sorted by path. Grayscale files stay
    one channel, others are read as RGB; all must have one size."""
    from PIL import Image

    files = image_files(folder)
    mode = "L" if Image.open(files[0]).mode in ("L", "1", "I;16") else "RGB"
    for start in range(0, len(files), batch):
        arrays = np.stack([np.asarray(Image.open(f).convert(mode)) for f in files[start : start + batch]])
        images = torch.from_numpy(arrays)
        yield images.permute(0, 3, 1, 2) if images.ndim == 4 else images[:, None]


# ----------------------------------------------------------------------------------- reference caches
# A cache file is named by a hash of its key and holds the key itself; a file whose key, shape or
# values do not check out is recomputed (with a warning), never used.

CACHE_KEY_VERSION = "v2"  # v1 keyed folders by mtime and extractors by class name


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def extractor_key(extractor: torch.nn.Module | int, weights_path: str | None = None) -> str:
    """What decides an extractor's features: Inception's dimension and the content of its weights
    file (wherever it lies), or a module's class, dimension and a hash of its state_dict."""
    if isinstance(extractor, int):
        return f"inception-{extractor}|weights-sha256={file_sha256(inception_weights_path(weights_path))}"
    digest = hashlib.sha256()
    for name, value in sorted(extractor.state_dict().items()):
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().contiguous()
            digest.update(f"{name}|{value.dtype}|{tuple(value.shape)}|".encode())
            digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:  # a module's extra state
            digest.update(f"{name}|{value!r}|".encode())
    cls = type(extractor)
    return f"{cls.__module__}.{cls.__qualname__}-{feature_dim(extractor)}|state-sha256={digest.hexdigest()}"


def folder_key(files: list[Path], folder: str | Path) -> str:
    """The content of the image files: their names relative to folder and a hash of their bytes
    (mtimes are not content: tar -x and rsync -a restore older ones)."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(folder).as_posix()}\0{file_sha256(path)}\n".encode())
    return f"{len(files)} images|content-sha256={digest.hexdigest()}"


def cache_path(cache_dir: str | Path, prefix: str, key: str) -> Path:
    return Path(cache_dir) / f"{prefix}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


def cache_problem(path: Path, key: str, dim: int) -> str | None:
    """Why the cache file cannot be used as it is (it is missing, unreadable, made under another
    key, or holds bad statistics); None if it can."""
    if not path.is_file():
        return "is missing"
    try:
        with np.load(path) as data:
            stored = str(data["key"]) if "key" in data else None
            mu, sigma = np.asarray(data["mu"], dtype=np.float64), np.asarray(data["sigma"], dtype=np.float64)
    except (KeyError, ValueError, OSError, EOFError) as err:
        return f"cannot be read ({err})"
    if stored != key:
        return "has no key (an older cache)" if stored is None else "was made under another key"
    return statistics_problem(mu, sigma, dim)


def folder_reference(
    folder: str | Path, extractor: torch.nn.Module | int, cache_dir: str | Path, weights_path: str | None = None
) -> Path:
    """Reference statistics of a folder of real images, computed once and cached, keyed by the
    images' names and content and by the extractor's weights."""
    files = image_files(folder)
    key = f"{CACHE_KEY_VERSION}|folder|{folder_key(files, folder)}|{extractor_key(extractor, weights_path)}"
    return cached_statistics(
        cache_path(cache_dir, "fid_ref_folder", key),
        key,
        f"{len(files)} images in {folder}",
        lambda: image_folder_batches(folder),
        extractor,
        weights_path,
    )


def cached_statistics(
    path: Path,
    key: str,
    what: str,
    batches: Callable[[], Any],
    extractor: torch.nn.Module | int,
    weights_path: str | None,
) -> Path:
    """path, (re)computing (mu, sigma) of the image batches into it first unless it holds valid
    statistics made under key. Statistics that are not finite are refused, never cached."""
    problem = cache_problem(path, key, feature_dim(extractor))
    if problem is None:
        return path
    if problem != "is missing":
        log.warning("reference cache %s %s: recomputing it", path, problem)
    log.info("computing reference statistics of %s -> %s", what, path)
    mu, sigma = statistics_of(extractor, batches(), weights_path)
    save_reference(path, mu, sigma, key=key)
    return path


def cached_reference(
    adapter: Any,
    extractor: torch.nn.Module | int,
    model_key: str,
    cache_dir: str | Path,
    n: int,
    weights_path: str | None = None,
) -> Path:
    """Reference statistics of n of the model family's real images, computed once and cached,
    keyed by the model, n and the extractor's weights."""
    if n < 2:
        raise ConfigError(
            f"metrics.fid.reference_samples={n} is too few: reference statistics need at least 2 images "
            "(and more than the feature dimension for a non-singular covariance)"
        )
    key = f"{CACHE_KEY_VERSION}|model|{model_key}|n={n}|{extractor_key(extractor, weights_path)}"
    return cached_statistics(
        cache_path(cache_dir, "fid_ref", key),
        key,
        f"{n} real images",
        lambda: adapter.reference_images(n).split(1000),
        extractor,
        weights_path,
    )


class MetricSuite(torch.nn.Module):
    """The run's metrics: FID against fixed reference statistics, plus optional extras.

    ``extras`` maps a name to a torchmetrics Metric and a function (images, labels, prompts) ->
    arguments of its update(); a SeededInceptionScore is also given the global indices. ``seed``
    (the run's seed), when given, replaces the seed of every SeededInceptionScore among them, so
    that the same run gives the same Inception Score.
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
        self,
        images: torch.Tensor,
        labels: torch.Tensor | None = None,
        prompts: list[str] | None = None,
        indices: torch.Tensor | None = None,
    ) -> None:
        """Feed a batch of generated uint8 images (B, C, H, W) and their global sample indices
        (which order the Inception Score's features, whatever order the batches come in)."""
        if self.fid is not None:
            self.fid.update(images, real=False)
        for name, metric in self.extras.items():
            arguments = self._extra_args[name](images, labels, prompts)
            if isinstance(metric, SeededInceptionScore):
                metric.update(*arguments, indices=indices)
            else:
                metric.update(*arguments)

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
    """torchmetrics InceptionScore over features ordered by global sample index, then shuffled
    into groups by a seeded permutation.

    InceptionScore.compute permutes the features in the order they were gathered (which depends on
    the number of ranks and on what a resumed run scored first) with the global RNG (torch.randperm),
    so the same images could give another score. Here each feature carries its sample's global
    index, the features are sorted by it, and the permutation is drawn from ``seed`` with a private
    generator: the same images give the same score on any number of ranks and after a resume, and
    the global RNG is left alone.
    """

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = int(seed)
        # gathered like the features (same reduction), so the two stay aligned row for row
        self.add_state("sample_indices", [], dist_reduce_fx=None)

    def update(self, imgs: torch.Tensor, indices: torch.Tensor | None = None) -> None:
        """Features of a batch and the batch's global sample indices (default: the order fed here)."""
        if indices is None:
            seen = sum(len(i) for i in self.sample_indices)
            indices = torch.arange(seen, seen + len(imgs))
        super().update(imgs)
        self.sample_indices.append(torch.as_tensor(indices, dtype=torch.long).to(self.features[-1].device))

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) over the groups, as InceptionScore.compute but on features in index order."""
        features = dim_zero_cat(self.features)
        features = features[torch.argsort(dim_zero_cat(self.sample_indices), stable=True)]
        # the CPU generator that torch.randperm uses by default, seeded: the permutation of old runs
        generator = torch.Generator().manual_seed(self.seed)
        features = features[torch.randperm(len(features), generator=generator).to(features.device)]
        scores = [
            (prob * (log_prob - prob.mean(dim=0, keepdim=True).log())).sum(dim=1).mean().exp()
            for prob, log_prob in zip(
                features.softmax(dim=1).chunk(self.splits), features.log_softmax(dim=1).chunk(self.splits), strict=True
            )
        ]
        kl = torch.stack(scores)
        return kl.mean(), kl.std()


def inception_score_extra(
    weights_path: str | None = None, adapter: Any = None, seed: int = 0, logits: torch.nn.Module | None = None
) -> tuple[Metric, Callable]:
    """A ``metrics.extra`` entry: Inception Score (SeededInceptionScore) from a local Inception
    weights file; ``seed`` seeds the shuffle into groups (MetricSuite's seed replaces it).
    ``logits``, when given, is the classifier scored instead of Inception-v3 (a module from uint8
    images to class logits, e.g. a model family's own classifier)."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    if logits is None:
        logits = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["logits_unbiased"],
            feature_extractor_weights_path=inception_weights_path(weights_path),
        )
    metric = SeededInceptionScore(feature=logits, seed=seed)
    return metric, lambda images, labels, prompts: (images,)
