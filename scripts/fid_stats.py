"""Make FID reference statistics (an EDM-style .npz with mu and sigma, and the real features that
precision/recall, density/coverage and KID need).

    # from a folder of real images (PNG/JPEG), in Inception features (local weights file)
    python scripts/fid_stats.py --images data/cifar10_train --features inception \
        --weights-path weights-inception-2015-12-05-6726825d.pth --out refs/cifar10.npz
    # from an ADM reference batch (openai/guided-diffusion: arr_0, uint8 N x H x W x 3), streamed
    python scripts/fid_stats.py --images VIRTUAL_imagenet256_labeled.npz --features inception \
        --weights-path weights-inception-2015-12-05-6726825d.pth --out refs/imagenet256.npz
    # resized to Inception's 299 x 299 as TF 1.x does (ADM's, EDM's, torch-fidelity's statistics), to
    # compare with their published statistics; runs scored against it need metrics.fid.antialias=false
    python scripts/fid_stats.py --images data/cifar10_train --features inception --no-antialias \
        --weights-path weights-inception-2015-12-05-6726825d.pth --out refs/cifar10_tf.npz
    # from a model family's own real images, in its own features (what the runner caches)
    python scripts/fid_stats.py --model toy --n 10000 --out refs/toy.npz

Images are read as uint8, RGB (grayscale files: one channel), and must all have one size. An ADM
batch's arr_0 is its images (its own mu and sigma, if any, are not read: they are recomputed). At
least 2 images are needed, and more than the feature dimension for a non-singular covariance
(a warning says when it is singular); statistics that are not finite are refused, not written.
The file's ``key`` records the extractor that made it (metrics.extractor_key: Inception's weights,
and ``antialias=false`` where it resized as TF 1.x does).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterator
from pathlib import Path

from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.metrics import (
    PixelFeatures,
    adm_batch_images,
    check_reference,
    extractor_key,
    feature_dim,
    image_folder_batches,
    inception_extractor,
    inception_weights_path,
    reference_of,
    save_reference,
)

ROOT = Path(__file__).resolve().parents[1]


def model_family(name: str):
    """The adapter and FID feature extractor of conf/model/NAME.yaml."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"model={name}"])
    return instantiate(cfg.model.adapter), instantiate(cfg.model.features)


def image_batches(path: Path) -> Iterator:
    """uint8 (B, C, H, W) batches of a folder's images, or of an ADM reference batch's (an .npz file)."""
    if not path.exists():
        raise ConfigError(f"--images {str(path)!r} does not exist: give a folder of images or an ADM .npz (arr_0)")
    return adm_batch_images(path, "--images") if path.is_file() else image_folder_batches(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path, help="a folder of real images, or an ADM reference batch (.npz)")
    source.add_argument("--model", help="a model family of conf/model/ (its reference images and features)")
    parser.add_argument("--out", type=Path, required=True, help="the .npz to write")
    parser.add_argument(
        "--features",
        choices=["inception", "pixels"],
        default="inception",
        help="with --images: Inception-v3 2048 features, or raw pixels",
    )
    parser.add_argument("--weights-path", help="local Inception weights file (no download is made)")
    parser.add_argument(
        "--antialias",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Inception's resize to 299 x 299: antialiased bilinear (torchmetrics' default, metrics.fid.antialias="
        "true), or with --no-antialias TF 1.x's bilinear (ADM, EDM, torch-fidelity; metrics.fid.antialias=false)",
    )
    parser.add_argument("--n", type=int, default=10000, help="with --model: number of real images")
    args = parser.parse_args(argv)
    try:
        if args.out.exists():
            raise ConfigError(f"--out {str(args.out)!r} exists: choose another path (nothing was overwritten)")
        if not args.antialias and (args.model or args.features != "inception"):
            used = f"--model {args.model}'s own" if args.model else f"--features {args.features}"
            raise ConfigError(f"--no-antialias is not used by {used} features: it applies to Inception's resize")
        if args.model:
            adapter, extractor = model_family(args.model)
            batches = adapter.reference_images(args.n).split(1000)
        else:
            batches = image_batches(args.images)
            first = next(batches)  # the pixel count of one image: the pixel features' dimension
            batches = itertools.chain([first], batches)
            if args.features == "inception":
                inception_weights_path(args.weights_path, setting="--weights-path ")  # this script's option, named
                extractor = inception_extractor(2048, args.weights_path, args.antialias)
            else:
                extractor = PixelFeatures(first[0].numel())
        # fewer than 2 images or non-finite features are refused here, before anything is written
        mu, sigma, features = reference_of(extractor, batches, args.weights_path)
        check_reference(mu, sigma, feature_dim(extractor), f"for {args.out}")  # warns if singular
        key = f"fid_stats|{extractor_key(extractor, args.weights_path)}"  # which extractor (and resize) made it
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    save_reference(args.out, mu, sigma, key=key, features=features)
    print(f"{args.out}: mu {mu.shape}, sigma {sigma.shape}, features {features.shape}, key {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
