"""Sample-quality metrics, reference implementations first: FID (torchmetrics), precision/recall and
density/coverage (Naeem et al.'s ``prdc`` package), KID (torchmetrics), IS, CLIP.

Every metric consumes the uint8 images that are also written as PNGs, so a resumed run that
re-reads its PNGs scores exactly as an uninterrupted one. FID, PRDC and KID share one feature space
(the model family's own features, or Inception's 2048-d pool features): each image is featurised
once, and the features are kept (``features.npz``) so that ``scripts/score.py`` rescores a run
without sampling.

Reference statistics are EDM-style ``.npz`` files with ``mu`` and ``sigma``, and ``features`` (n x F)
where the real images' features are kept (PRDC and KID need them; FID does not); a reference given
as an image folder or as an ADM reference batch (``arr_0``) becomes one (``reference_file_for``). They are loaded into
the float64 states of torchmetrics' FrechetInceptionDistance (sum = n mu,
cov_sum = (n-1) sigma + n mu mu^T, num_samples = n) on global rank 0 only: those states are summed
over ranks when the metric syncs, so loading them on every rank would count them world_size times.
Statistics computed here (of a model family's real images, or of a folder of images) are cached
under a key of everything that decides them: the images' content and the extractor's weights (and
Inception's resize where it is TF 1.x's, metrics.fid.antialias=false); the key is stored in the
file and checked, and non-finite statistics are never cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
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


def inception_weights_path(weights_path: str | None, setting: str = "metrics.fid.weights_path=") -> str:
    """A local Inception weights file for FID/IS, or a ConfigError saying where to put one
    (``setting``: how the caller takes the path, e.g. scripts/fid_stats.py's ``--weights-path ``).

    No download is attempted: torchmetrics would fetch the file from GitHub at run time.
    """
    if weights_path:
        if not Path(weights_path).is_file():
            raise ConfigError(f"{setting}{weights_path!r} does not exist: give the path of {INCEPTION_WEIGHTS_FILE}")
        return str(weights_path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE
    if cached.is_file():
        return str(cached)
    raise ConfigError(
        f"FID with Inception needs {INCEPTION_WEIGHTS_FILE} and no download is made: fetch it from "
        f"{INCEPTION_WEIGHTS_URL} and put it at {cached} or pass {setting}FILE"
    )


def feature_dim(extractor: torch.nn.Module | int) -> int:
    return extractor if isinstance(extractor, int) else int(extractor.num_features)


class InceptionFeatures(torch.nn.Module):
    """Inception-v3's pool features (2048, or 768/192/64), exactly the module torchmetrics' FID
    builds for an integer ``feature``, from a local weights file.

    ``antialias`` is how images are resized to 299 x 299 (metrics.fid.antialias): True, torchmetrics'
    default, antialiased bilinear; False, TF 1.x's bilinear (torch-fidelity's
    ``interpolate_bilinear_2d_like_tensorflow1x``), the resize of ADM's and EDM's reference statistics."""

    def __init__(self, num_features: int = 2048, weights_path: str | None = None, antialias: bool = True) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.num_features = int(num_features)
        self.net = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=[str(self.num_features)],
            feature_extractor_weights_path=inception_weights_path(weights_path),
            antialias=bool(antialias),
        )

    @property
    def antialias(self) -> bool:
        return bool(self.net.use_antialias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def inception_extractor(
    num_features: int = 2048, weights_path: str | None = None, antialias: bool = True
) -> torch.nn.Module | int:
    """Inception's pool features as the metrics take an extractor: the int (torchmetrics' default,
    antialiased resize) or, for TF 1.x's resize (antialias=False), an InceptionFeatures module. The
    int keeps the reference cache keys of runs from before metrics.fid.antialias (extractor_key);
    the module's key says its resize, so the two resizes never share a cache."""
    return int(num_features) if antialias else InceptionFeatures(num_features, weights_path, antialias=False)


class GivenFeatures(torch.nn.Module):
    """The identity on features already extracted: FID and KID fed features, not images."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DINOv2Features(torch.nn.Module):
    """DINOv2's CLS token (``pooler_output``: after the last layer norm) of uint8 images, from a
    local transformers ``Dinov2Model`` directory (no hub at run time), as Stein et al. (2023) and
    dgm-eval use it: images resized to the model's image size (224 for the released models) with
    bicubic, antialiased interpolation, grayscale repeated to RGB, normalised with ImageNet's mean
    and std."""

    def __init__(self, path: str) -> None:
        super().__init__()
        from transformers import Dinov2Model

        if not path or not Path(path).is_dir():
            raise ConfigError(
                f"metrics.dinov2.path={path!r} is not a directory: give a local transformers Dinov2Model "
                "directory (save_pretrained, e.g. of facebook/dinov2-base; no download is made)"
            )
        try:
            self.model = Dinov2Model.from_pretrained(path, local_files_only=True).eval()
        except (OSError, ValueError) as err:
            raise ConfigError(f"metrics.dinov2.path={path!r} holds no Dinov2Model: {err}") from err
        self.num_features = int(self.model.config.hidden_size)
        self.image_size = int(self.model.config.image_size)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.mean.device).float() / 255
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        size = (self.image_size, self.image_size)
        x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        x = (x.clamp(0, 1) - self.mean) / self.std
        with torch.no_grad():
            return self.model(pixel_values=x).pooler_output


def feature_extractor(extractor: torch.nn.Module | int, weights_path: str | None = None) -> torch.nn.Module:
    """The module that maps uint8 images to features: a family's own, or Inception for an int."""
    return InceptionFeatures(extractor, weights_path) if isinstance(extractor, int) else extractor


def make_fid(
    extractor: torch.nn.Module | int, weights_path: str | None = None, antialias: bool = True
) -> FrechetInceptionDistance:
    """torchmetrics FID over a custom feature module, or Inception (2048/768/192/64) from a local file,
    resizing antialiased (torchmetrics' default) or as TF 1.x does (antialias=False)."""
    if isinstance(extractor, int):
        return FrechetInceptionDistance(
            feature=extractor,
            feature_extractor_weights_path=inception_weights_path(weights_path),
            antialias=bool(antialias),
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


def load_reference_features(path: str | Path) -> np.ndarray | None:
    """The real images' features (n x F float32) kept in a reference .npz; None where it holds only
    mu and sigma (an EDM or ADM statistics file): FID works, PRDC and KID need the features."""
    with np.load(path) as data:
        return np.asarray(data["features"], dtype=np.float32) if "features" in data else None


def save_reference(
    path: str | Path, mu: np.ndarray, sigma: np.ndarray, key: str | None = None, features: np.ndarray | None = None
) -> None:
    """An EDM-style .npz (mu, sigma), plus the real features (float32) and the cache key it was
    made under when given; written atomically (no half file from an interrupted or concurrent writer)."""
    extra = {} if key is None else {"key": np.array(key)}
    if features is not None:
        extra["features"] = np.asarray(features, dtype=np.float32)
    write_npz_atomically(path, mu=mu, sigma=sigma, **extra)


def write_npz_atomically(path: str | Path, **arrays: np.ndarray) -> None:
    """np.savez to a temporary file in path's folder, then renamed over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            np.savez(file, **arrays)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a results file is readable as any other
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def features_of(
    extractor: torch.nn.Module | int, batches: Iterable[torch.Tensor], weights_path: str | None = None
) -> np.ndarray:
    """The features (n x F, in the extractor's precision) of uint8 image batches."""
    module = feature_extractor(extractor, weights_path)
    with torch.no_grad():
        parts = [module(images).detach().cpu() for images in batches]
    return torch.cat(parts).numpy() if parts else np.zeros((0, feature_dim(extractor)), dtype=np.float32)


def statistics_of_features(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of features through torchmetrics' FID states (float64 sums, as FID computes them);
    a ConfigError for fewer than 2 rows (no covariance) or features that are not finite."""
    n = len(features)
    if n < 2:  # sigma would be 0/0: NaN statistics that LAPACK later crashes on
        raise ConfigError(f"reference statistics need at least 2 images (a covariance), got {n}")
    fid = FrechetInceptionDistance(feature=GivenFeatures(features.shape[1]))
    fid.update(torch.from_numpy(np.ascontiguousarray(features)), real=True)
    mu = fid.real_features_sum / n
    sigma = (fid.real_features_cov_sum - n * torch.outer(mu, mu)) / (n - 1)
    if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all()):
        raise ConfigError(f"the features of the {n} reference images are not finite (NaN or inf): nothing is kept")
    return mu.numpy(), sigma.numpy()


def reference_of(
    extractor: torch.nn.Module | int, batches: Iterable[torch.Tensor], weights_path: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mu, sigma, features) of uint8 image batches."""
    features = features_of(extractor, batches, weights_path)
    return (*statistics_of_features(features), features)


def statistics_of(
    extractor: torch.nn.Module | int, batches: Any, weights_path: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the features of uint8 image batches, through the same FID metric code; a
    ConfigError for fewer than 2 images (no covariance) or features that are not finite."""
    return statistics_of_features(features_of(extractor, batches, weights_path))


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

CACHE_KEY_VERSION = "v3"  # v1 keyed folders by mtime and extractors by class name; v2 kept no features


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:  # streamed (hashlib.file_digest is 3.11+): an ADM reference batch is GBs
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def extractor_key(extractor: torch.nn.Module | int, weights_path: str | None = None) -> str:
    """What decides an extractor's features: Inception's dimension and the content of its weights
    file (wherever it lies), or a module's class, dimension and a hash of its state_dict, and for an
    Inception resizing as TF 1.x does, that resize (its state_dict is the same as the default's)."""
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
    key = f"{cls.__module__}.{cls.__qualname__}-{feature_dim(extractor)}|state-sha256={digest.hexdigest()}"
    # only the non-default resize is named: the default's keys (caches, features.npz) stay as they were
    return key + "|antialias=false" if isinstance(extractor, InceptionFeatures) and not extractor.antialias else key


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
            features = data["features"] if "features" in data else None
    except (KeyError, ValueError, OSError, EOFError) as err:
        return f"cannot be read ({err})"
    if stored != key:
        return "has no key (an older cache)" if stored is None else "was made under another key"
    problem = statistics_problem(mu, sigma, dim)
    if problem is None and (features is None or features.ndim != 2 or features.shape[1] != dim):
        return "holds no features of the right dimension (an older cache)"
    return problem


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
    """path, (re)computing (mu, sigma) and the features of the image batches into it first unless it
    holds valid statistics made under key. Statistics that are not finite are refused, never cached."""
    problem = cache_problem(path, key, feature_dim(extractor))
    if problem is None:
        return path
    if problem != "is missing":
        log.warning("reference cache %s %s: recomputing it", path, problem)
    log.info("computing reference statistics of %s -> %s", what, path)
    mu, sigma, features = reference_of(extractor, batches(), weights_path)
    save_reference(path, mu, sigma, key=key, features=features)
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


# ----------------------------------------------------------------------------------- given references
# A reference as the field ships one: an image folder, statistics (EDM's and ADM's .npz: mu, sigma), or
# ADM's reference batch (openai/guided-diffusion evaluations: the images themselves as arr_0).

ADM_IMAGES = "arr_0"  # ADM's name for the images: what np.savez calls its first unnamed array


def reference_file_for(
    given: str | Path,
    extractor: torch.nn.Module | int,
    cache_dir: str | Path,
    weights_path: str | None = None,
    setting: str = "metrics.fid.reference",
) -> Path:
    """The .npz of reference statistics (mu, sigma, maybe features) for a given reference, by one rule:

    - a folder of images: featurised through the run's extractor once and cached (folder_reference);
    - an .npz whose ``mu`` has the run's feature dimension (EDM's files; ADM's, whose mu and sigma are
      TF-Inception pool3 features of 2048): used as it is, mu and sigma only (PRDC and KID need
      features: they are skipped with a note, unless it also holds ``features``);
    - else an .npz with ``arr_0``, uint8 N x H x W x C images (an ADM reference batch, or its mu and
      sigma are of another space, e.g. DINOv2's): featurised once and cached like a folder, keyed by
      the file's sha256 and the extractor, features kept;
    - else refused in one line (setting names the config key): statistics of another dimension and no
      images, or neither statistics nor images.
    """
    path = Path(given)
    if path.is_dir():
        return folder_reference(path, extractor, cache_dir, weights_path)
    if not path.is_file():
        raise ConfigError(
            f"{setting}={str(path)!r} does not exist: give a folder of images, an .npz with mu and sigma "
            "(EDM, ADM, scripts/fid_stats.py) or an ADM reference batch (.npz with arr_0)"
        )
    keys, dim = npz_keys(path, setting), feature_dim(extractor)
    has_statistics = {"mu", "sigma"} <= keys
    if has_statistics and npz_array_header(path, "mu", setting)[0] == (dim,):
        return path
    if ADM_IMAGES in keys:
        log.info("%s=%s: featurising its %s images (its keys: %s)", setting, path, ADM_IMAGES, ", ".join(sorted(keys)))
        return adm_batch_reference(path, extractor, cache_dir, weights_path, setting)
    if has_statistics:  # statistics_problem says which dimension against which
        problem = statistics_problem(*load_reference(path), dim)
        raise ConfigError(f"reference statistics in {str(path)!r} {problem} (and it holds no {ADM_IMAGES} images)")
    raise ConfigError(
        f"{setting}={str(path)!r} is neither EDM/ADM statistics (mu, sigma) nor an ADM reference batch "
        f"({ADM_IMAGES}): keys found {sorted(keys)}; the run's features have dimension {dim}"
    )


def holds_images(given: str | Path) -> bool:
    """Whether a given reference is images (a folder, or an .npz with arr_0) that any extractor can
    featurise, rather than statistics of one feature space."""
    path = Path(given)
    if path.is_dir() or not path.is_file():
        return path.is_dir()
    try:
        with zipfile.ZipFile(path) as archive:
            return f"{ADM_IMAGES}.npy" in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def npz_keys(path: Path, setting: str) -> set[str]:
    """The array names in an .npz (a zip of NAME.npy), read from its directory, not its data."""
    try:
        with zipfile.ZipFile(path) as archive:
            return {name.removesuffix(".npy") for name in archive.namelist()}
    except (OSError, zipfile.BadZipFile) as err:
        raise ConfigError(f"{setting}={str(path)!r} is not an .npz (nor a folder of images): {err}") from err


def read_npy_header(file: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) from an open .npy stream, which is left at the array's data."""
    version = np.lib.format.read_magic(file)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(file)


def npz_array_header(path: Path, name: str, setting: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of one array of an .npz, without reading its data (ADM's ImageNet
    512 reference batch is 7.9 GB)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{name}.npy") as member:
            return read_npy_header(member)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise ConfigError(f"{setting}={str(path)!r}: its {name} cannot be read ({err})") from err


def adm_batch_problem(shape: tuple[int, ...], dtype: np.dtype) -> str | None:
    """What makes an arr_0 of this shape and dtype unusable as reference images; None if nothing."""
    if dtype != np.uint8:
        return f"has dtype {dtype}: reference images must be uint8 (0..255), as ADM's reference batches hold them"
    if len(shape) != 4 or shape[3] not in (1, 3):
        return (
            f"has shape {shape}: reference images must be N x H x W x C (NHWC, as ADM's reference batches "
            "hold them) with C = 3 (RGB) or 1 (grayscale)"
        )
    if shape[0] < 2:
        return f"holds {shape[0]} image(s): reference statistics need at least 2 (a covariance)"
    return None


def adm_batch_header(path: Path, setting: str) -> tuple[tuple[int, ...], bool]:
    """(shape, fortran_order) of an ADM reference batch's images; a ConfigError naming the file,
    arr_0's shape or dtype and what is allowed, where they are not uint8 NHWC images."""
    shape, fortran, dtype = npz_array_header(path, ADM_IMAGES, setting)
    problem = adm_batch_problem(shape, dtype)
    if problem is not None:
        raise ConfigError(f"{setting}={str(path)!r}: {ADM_IMAGES} {problem}")
    return shape, fortran


def adm_batch_images(path: str | Path, setting: str = "--images", batch: int = 256) -> Iterator[torch.Tensor]:
    """uint8 (B, C, H, W) batches of an ADM reference batch's images (arr_0, N x H x W x C), in file
    order, as image_folder_batches gives a folder's; checked first (a ConfigError), then streamed."""
    shape, fortran = adm_batch_header(Path(path), setting)
    return npz_image_batches(Path(path), shape, fortran, batch)


def npz_image_batches(path: Path, shape: tuple[int, ...], fortran: bool, batch: int) -> Iterator[torch.Tensor]:
    """arr_0's images read batch by batch from the zip member (memory: one batch, not the file)."""
    if fortran:  # its bytes are not image after image: the whole array, as np.load reads it
        with np.load(path) as data:
            images = np.ascontiguousarray(data[ADM_IMAGES])
        for start in range(0, len(images), batch):
            yield torch.from_numpy(images[start : start + batch]).permute(0, 3, 1, 2)
        return
    image_bytes = int(np.prod(shape[1:]))  # uint8
    with zipfile.ZipFile(path) as archive, archive.open(f"{ADM_IMAGES}.npy") as member:
        read_npy_header(member)
        for start in range(0, shape[0], batch):
            count = min(batch, shape[0] - start)
            data = member.read(count * image_bytes)
            if len(data) != count * image_bytes:
                raise ConfigError(f"{str(path)!r}: {ADM_IMAGES} is truncated (its header says {shape[0]} images)")
            yield torch.frombuffer(bytearray(data), dtype=torch.uint8).view(count, *shape[1:]).permute(0, 3, 1, 2)


def adm_batch_reference(
    path: Path,
    extractor: torch.nn.Module | int,
    cache_dir: str | Path,
    weights_path: str | None = None,
    setting: str = "metrics.fid.reference",
) -> Path:
    """Reference statistics of an ADM reference batch's images (arr_0), computed once and cached,
    keyed by the file's content and the extractor's weights; the features are kept (PRDC, KID)."""
    shape, _ = adm_batch_header(path, setting)
    key = (
        f"{CACHE_KEY_VERSION}|adm-batch|{shape[0]} images|content-sha256={file_sha256(path)}|"
        f"{extractor_key(extractor, weights_path)}"
    )
    return cached_statistics(
        cache_path(cache_dir, "fid_ref_adm", key),
        key,
        f"{shape[0]} images ({ADM_IMAGES}) in {path}",
        lambda: adm_batch_images(path, setting),
        extractor,
        weights_path,
    )


# ----------------------------------------------------------------------------------- diversity
# Notation (METHOD.md, "Diversity metrics"): real features R (n x F), generated G (m x F), k nearest
# neighbours within a set (self excluded), r(x) = the distance from x to its k-th neighbour.

KID_SUBSET_SIZE = 1000  # torchmetrics' and torch-fidelity's default; fewer samples: all of them


@dataclass(frozen=True)
class DiversitySettings:
    """Which metrics share FID's features besides FID, and their settings (metrics.prdc, metrics.kid)."""

    prdc: bool = True
    prdc_k: int = 5
    prdc_max_samples: int = 10_000  # generated samples PRDC uses at most (its distances are n^2 in memory)
    kid: bool = True
    kid_subsets: int = 100
    kid_subset_size: int | None = None  # None: min(KID_SUBSET_SIZE, generated, reference)


def precision_recall_density_coverage(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) and density and coverage (Naeem et
    al. 2020), by Naeem et al.'s own ``prdc`` package, on Euclidean distances in float64."""
    from prdc import compute_prdc

    with contextlib.redirect_stdout(io.StringIO()):  # it prints the two set sizes
        values = compute_prdc(np.asarray(real, np.float64), np.asarray(fake, np.float64), nearest_k=int(k))
    return {name: float(values[name]) for name in ("precision", "recall", "density", "coverage")}


PRDC_REFERENCE_SEED = 0  # the reference subset PRDC uses: the same for every run, so runs pair


def prdc_samples(real: np.ndarray, fake: np.ndarray, max_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The two sets PRDC compares, of equal size as Naeem et al. use them: the first
    min(m, max_samples) generated samples (in index order), and as many reference samples, drawn
    once by a fixed permutation (all of them where there are no more)."""
    fake = fake[: min(len(fake), int(max_samples))]
    if len(real) > len(fake):
        real = real[np.random.default_rng(PRDC_REFERENCE_SEED).permutation(len(real))[: len(fake)]]
    return real, fake


def kid_subset_size(requested: int | None, n_real: int, n_fake: int) -> int:
    """The KID subset size: the requested one, or min(KID_SUBSET_SIZE, n_real, n_fake)."""
    return int(requested) if requested is not None else min(KID_SUBSET_SIZE, n_real, n_fake)


def kernel_inception_distance(
    real: np.ndarray, fake: np.ndarray, subsets: int, subset_size: int, seed: int
) -> tuple[float, float]:
    """(KID, its std over subsets): torchmetrics' KernelInceptionDistance (unbiased MMD^2, kernel
    (x.y / F + 1)^3, ``subsets`` random subsets of ``subset_size``) on given features in float64,
    its subsets drawn from the global RNG seeded by ``seed`` inside a fork (left as it was)."""
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance

    with warnings.catch_warnings():  # "will save all extracted features in buffer": that is the point
        warnings.simplefilter("ignore", UserWarning)
        # sync_on_compute=False: every rank already holds all the features (a sync would double them)
        metric = KernelInceptionDistance(
            feature=GivenFeatures(real.shape[1]),
            subsets=int(subsets),
            subset_size=int(subset_size),
            sync_on_compute=False,
        )
    metric.update(torch.as_tensor(real, dtype=torch.float64), real=True)
    metric.update(torch.as_tensor(fake, dtype=torch.float64), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        mean, std = metric.compute()
    return float(mean), float(std)


def diversity_metrics(real: np.ndarray, fake: np.ndarray, settings: DiversitySettings, seed: int) -> dict[str, float]:
    """precision, recall, density, coverage, kid and kid_std of fake against real features."""
    out: dict[str, float] = {}
    if settings.prdc:
        out |= precision_recall_density_coverage(*prdc_samples(real, fake, settings.prdc_max_samples), settings.prdc_k)
    if settings.kid:
        size = kid_subset_size(settings.kid_subset_size, len(real), len(fake))
        out["kid"], out["kid_std"] = kernel_inception_distance(real, fake, settings.kid_subsets, size, seed)
    return out


def diversity_problem(settings: DiversitySettings, n_real: int, n_fake: int) -> str | None:
    """Why PRDC or KID cannot be computed on n_real reference and n_fake generated features; None if
    they can (checked before sampling)."""
    prdc_n = min(n_real, n_fake, settings.prdc_max_samples)
    if settings.prdc and settings.prdc_k + 1 > prdc_n:
        return (
            f"metrics.prdc.k={settings.prdc_k} needs more than k samples on each side (a sample's k-th "
            f"neighbour besides itself), but PRDC compares {prdc_n} generated with {prdc_n} reference samples: "
            f"use k <= {prdc_n - 1}"
        )
    if settings.kid and settings.kid_subset_size is not None and settings.kid_subset_size > min(n_real, n_fake):
        return (
            f"metrics.kid.subset_size={settings.kid_subset_size} is more than the {n_fake} generated or "
            f"{n_real} reference samples: use at most {min(n_real, n_fake)}, or null for min(1000, both)"
        )
    return None


class FeatureBank(Metric):
    """Every generated sample's features (float32) and global index: gathered over ranks and
    returned in index order, once per index, whatever order the batches came in."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("features", [], dist_reduce_fx="cat")
        self.add_state("sample_indices", [], dist_reduce_fx="cat")

    def update(self, features: torch.Tensor, indices: torch.Tensor) -> None:
        self.features.append(features.detach().float())
        self.sample_indices.append(torch.as_tensor(indices, dtype=torch.long).to(features.device))

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, features) sorted by index; a repeated index keeps its first row."""
        if isinstance(self.features, list) and not self.features:  # nothing fed (after a sync: a tensor)
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, 0)
        features, indices = dim_zero_cat(self.features), dim_zero_cat(self.sample_indices)
        order = torch.argsort(indices, stable=True)
        indices, features = indices[order], features[order]
        first = torch.ones_like(indices, dtype=torch.bool)
        first[1:] = indices[1:] != indices[:-1]
        return indices[first], features[first]


class FeatureSpace(torch.nn.Module):
    """One feature space of a run: its extractor, FID (torchmetrics, against ``reference`` =
    (mu, sigma)) and a FeatureBank of the generated features, from which PRDC and KID are computed
    against ``reference_features`` (skipped where there are none) and features.npz is written.

    ``fd_name`` names its Frechet distance (fid, fid_digits, fd_dinov2); ``suffix`` follows the
    names of its other metrics and files (precision, ..., features.npz for the run's FID space;
    precision_dinov2, ..., features_dinov2.npz for DINOv2's).
    """

    def __init__(
        self,
        extractor: torch.nn.Module | int,
        reference: tuple[np.ndarray, np.ndarray] | None = None,
        fd_name: str = "fid",
        suffix: str = "",
        reference_features: np.ndarray | None = None,
        weights_path: str | None = None,
        reference_file: Path | None = None,
    ) -> None:
        super().__init__()
        self.extractor = feature_extractor(extractor, weights_path)
        self.reference_file = reference_file  # where reference and reference_features were read
        self.fid = FrechetInceptionDistance(feature=GivenFeatures(feature_dim(extractor)))
        self.bank = FeatureBank()
        self.fd_name, self.suffix = fd_name, suffix
        self.reference = reference
        self.reference_features = reference_features
        self.generated: tuple[np.ndarray, np.ndarray] | None = None  # (indices, features) after compute()
        self._features_key: str | None = None

    @property
    def features_file(self) -> str:
        return f"features{self.suffix}.npz"

    def features_key(self) -> str:
        """What decides the features (extractor_key): saved with them, checked before reuse."""
        if self._features_key is None:
            self._features_key = extractor_key(self.extractor)
        return self._features_key

    def reset_and_load_reference(self, global_rank: int) -> None:
        """Reset; global rank 0 alone holds the reference (FID's states sum over ranks)."""
        self.fid.reset()
        self.bank.reset()
        self.generated = None
        if self.reference is None or global_rank != 0:
            return
        mu, sigma = (
            torch.as_tensor(a, dtype=torch.float64, device=self.fid.real_features_sum.device) for a in self.reference
        )
        self.fid.real_features_sum = REFERENCE_N * mu
        self.fid.real_features_cov_sum = (REFERENCE_N - 1) * sigma + REFERENCE_N * torch.outer(mu, mu)
        self.fid.real_features_num_samples = torch.tensor(REFERENCE_N, device=mu.device)

    def update(self, images: torch.Tensor | None, indices: torch.Tensor, features: torch.Tensor | None = None) -> None:
        """Feed a batch: its features (extracted from images unless given) and global indices."""
        if features is None:
            with torch.no_grad():
                features = self.extractor(images)
        # float32, as features.npz keeps them: a rescore from the file gives the same numbers
        features = features.float()
        self.fid.update(features, real=False)
        self.bank.update(features, indices)

    def compute(self, diversity: DiversitySettings, seed: int) -> dict[str, float]:
        """Its Frechet distance, and PRDC and KID where the reference has features; a collective."""
        out = {self.fd_name: float(self.fid.compute())}
        indices, features = self.bank.compute()
        self.generated = (indices.cpu().numpy(), features.cpu().numpy())
        if self.reference_features is not None:
            values = diversity_metrics(self.reference_features, self.generated[1], diversity, seed)
            out |= {metric_name(name, self.suffix): value for name, value in values.items()}
        return out


def metric_name(name: str, suffix: str) -> str:
    """kid + _dinov2 -> kid_dinov2; kid_std + _dinov2 -> kid_dinov2_std (the std follows its metric)."""
    if name.endswith("_std"):
        return f"{name[:-4]}{suffix}_std"
    return f"{name}{suffix}"


class MetricSuite(torch.nn.Module):
    """The run's metrics: FID, PRDC and KID in the run's feature space (and in any ``extra_spaces``,
    e.g. DINOv2's), against fixed references, plus optional extras.

    ``extractor`` maps uint8 images to features (a family's own module, or an int: Inception's pool
    features of that size from ``weights_path``); each batch is featurised once per space (see
    FeatureSpace). ``extras`` maps a name to a torchmetrics Metric and a function (images, labels,
    prompts) -> arguments of its update(); a SeededInceptionScore is also given the global indices.
    ``seed`` (the run's seed), when given, seeds KID's subsets and replaces the seed of every
    SeededInceptionScore among the extras, so that the same run gives the same scores.
    """

    def __init__(
        self,
        extractor: torch.nn.Module | int | None = None,
        reference: tuple[np.ndarray, np.ndarray] | None = None,
        fid_name: str = "fid",
        extras: dict[str, tuple[Metric, Callable[..., tuple]]] | None = None,
        seed: int | None = None,
        reference_features: np.ndarray | None = None,
        diversity: DiversitySettings | None = None,
        weights_path: str | None = None,
        extra_spaces: list[FeatureSpace] | None = None,
    ) -> None:
        super().__init__()
        spaces = (
            []
            if extractor is None
            else [FeatureSpace(extractor, reference, fid_name, "", reference_features, weights_path)]
        )
        self.spaces = torch.nn.ModuleList(spaces + list(extra_spaces or []))
        self.diversity = diversity or DiversitySettings()
        self.seed = int(seed or 0)
        self.extras = torch.nn.ModuleDict({name: m for name, (m, _) in (extras or {}).items()})
        self._extra_args = {name: f for name, (_, f) in (extras or {}).items()}
        if seed is not None:  # the run's seed decides the Inception Score's shuffle into groups
            for metric in self.extras.values():
                if isinstance(metric, SeededInceptionScore):
                    metric.seed = int(seed)

    @property
    def fid(self) -> FrechetInceptionDistance | None:
        """The run's own FID metric (its first feature space's)."""
        return self.spaces[0].fid if len(self.spaces) else None

    def reset_and_load_reference(self, global_rank: int) -> None:
        """Reset every metric; global rank 0 alone holds the references (states sum over ranks)."""
        for space in self.spaces:
            space.reset_and_load_reference(global_rank)
        for metric in self.extras.values():
            metric.reset()

    @property
    def needs_prompts(self) -> bool:
        """Whether a metric scores images against their prompts (CLIP score)."""
        return any(getattr(f, "needs_prompts", False) for f in self._extra_args.values())

    @property
    def needs_images(self) -> bool:
        """Whether a metric other than the feature spaces' reads the images (saved features cannot serve it)."""
        return bool(self.extras)

    def metrics(self) -> list[Metric]:
        shared = [m for space in self.spaces for m in (space.fid, space.bank)]
        return shared + list(self.extras.values())

    def update(
        self,
        images: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        prompts: list[str] | None = None,
        indices: torch.Tensor | None = None,
        features: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Feed a batch of generated uint8 images (B, C, H, W) and their global sample indices
        (which order the saved features and the Inception Score's features, whatever order the
        batches come in). ``features`` maps a space's suffix ("" for the run's own) to the batch's
        features already extracted (a rescore from features.npz): that extractor is not run, and
        images may be None where nothing else needs them."""
        if indices is None:
            seen = sum(len(i) for i in self.spaces[0].bank.sample_indices) if len(self.spaces) else 0
            count = len(images) if images is not None else len(next(iter((features or {}).values())))
            indices = torch.arange(seen, seen + count)
        for space in self.spaces:
            space.update(images, indices, (features or {}).get(space.suffix))
        for name, metric in self.extras.items():
            arguments = self._extra_args[name](images, labels, prompts)
            if isinstance(metric, SeededInceptionScore):
                metric.update(*arguments, indices=indices)
            else:
                metric.update(*arguments)

    def compute(self) -> dict[str, float]:
        """Every metric's value; a collective under DDP, so call it on every rank. Each space keeps
        its generated features (``generated``) for its features file."""
        out: dict[str, float] = {}
        for space in self.spaces:
            out |= space.compute(self.diversity, self.seed)
        for name, metric in self.extras.items():
            value = metric.compute()
            if isinstance(value, tuple):  # Inception Score: (mean, std)
                out[name], out[f"{name}_std"] = float(value[0]), float(value[1])
            elif isinstance(value, dict):
                out.update({f"{name}_{k}": float(v) for k, v in value.items()})
            else:
                out[name] = float(value)
        return out


# ----------------------------------------------------------------------------------- features on disk

FEATURES_FILE = "features.npz"  # the run's own feature space; another's: features{suffix}.npz


def load_features(path: str | Path, with_key: bool = False) -> tuple:
    """(indices, features) of a run's features.npz, and the extractor key they were made under
    (extractor_key; None in a file without one) when with_key."""
    with np.load(path) as data:
        indices = np.asarray(data["indices"], dtype=np.int64)
        features = np.asarray(data["features"], dtype=np.float32)
        key = str(data["key"]) if "key" in data else None
    return (indices, features, key) if with_key else (indices, features)


def save_features(path: str | Path, indices: np.ndarray, features: np.ndarray, key: str | None = None) -> None:
    """A run's features.npz (``features`` N x F float32, ``indices`` the global sample index of
    each row, sorted, and ``key``: what made them, extractor_key), written atomically. Rows of an
    existing file made by the same extractor whose index is not among ``indices`` are kept (a resumed
    run appends; nothing is duplicated)."""
    indices, features = np.asarray(indices, np.int64), np.asarray(features, np.float32)
    path = Path(path)
    if path.is_file():
        old_indices, old_features, old_key = load_features(path, with_key=True)
        if old_key == key and old_features.shape[1:] == features.shape[1:]:
            keep = ~np.isin(old_indices, indices)
            indices = np.concatenate([old_indices[keep], indices])
            features = np.concatenate([old_features[keep], features])
    order = np.argsort(indices, kind="stable")
    extra = {} if key is None else {"key": np.array(key)}
    write_npz_atomically(path, features=features[order], indices=indices[order], **extra)


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
    weights_path: str | None = None,
    adapter: Any = None,
    seed: int = 0,
    logits: torch.nn.Module | None = None,
    antialias: bool = True,
) -> tuple[Metric, Callable]:
    """A ``metrics.extra`` entry: Inception Score (SeededInceptionScore) from a local Inception
    weights file; ``seed`` seeds the shuffle into groups (MetricSuite's seed replaces it).
    ``antialias`` is Inception's resize to 299 x 299 (InceptionFeatures; the runner passes
    metrics.fid.antialias). ``logits``, when given, is the classifier scored instead of Inception-v3
    (a module from uint8 images to class logits, e.g. a model family's own classifier), which
    resizes nothing: antialias=False is refused with it."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    if logits is not None and not antialias:
        raise ConfigError(
            "inception_score_extra: antialias=False is not used with logits: it applies to Inception's resize"
        )
    if logits is None:
        logits = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["logits_unbiased"],
            feature_extractor_weights_path=inception_weights_path(weights_path),
            antialias=bool(antialias),
        )
    metric = SeededInceptionScore(feature=logits, seed=seed)
    return metric, lambda images, labels, prompts: (images,)
