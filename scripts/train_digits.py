"""Train the embedded digits model and its classifier, and write the files the package ships.

    python scripts/train_digits.py                  # reproduces src/ddim_gmm_exp/assets/digits (~20 min, 2 cores)
    python scripts/train_digits.py --out /tmp/digits --steps 200 --classifier-epochs 2 --eval-samples 0

1. A diffusers UNet2DModel on scikit-learn's 1797 8x8 digits (scaled to [-1, 1]), class-conditional
   with a null class (label dropped 20% of the time, for classifier-free guidance), trained with
   Lightning (Trainer.fit), AdamW + cosine schedule, EMA of the weights, a fixed seed.
2. A small CNN digit classifier on a fixed stratified 80/20 split (its held-out accuracy goes in the
   card); its penultimate features are the FID features of the digits model (fid_digits).
3. Reference statistics of all 1797 real digits in those features (reference_stats.npz).
4. card.json: data, split, seed, steps, training time, held-out accuracy, and an FD table measured
   by the experiment runner on the files just written.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from ddim_gmm_exp.metrics import save_reference, statistics_of
from ddim_gmm_exp.models.digits import (
    NULL_CLASS,
    DigitClassifier,
    DigitFeatures,
    digits_uint8,
    load_digits_dataset,
    shipped_dir,
    stratified_split,
    unet_config,
)

log = logging.getLogger("train_digits")
ROOT = Path(__file__).resolve().parents[1]


class DenoiserTraining(L.LightningModule):
    """eps-prediction loss of DDPM (Ho et al. 2020) with label dropout, and an EMA of the weights."""

    def __init__(self, channels: tuple[int, ...], lr: float, steps: int, label_dropout: float, ema_decay: float):
        super().__init__()
        self.save_hyperparameters()
        self.unet = UNet2DModel(**unet_config(channels))
        self.ema = AveragedModel(self.unet, multi_avg_fn=get_ema_multi_avg_fn(ema_decay), use_buffers=True)
        self.noise_schedule = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x0, labels = batch
        dropped = torch.rand(labels.shape, device=labels.device) < self.hparams.label_dropout
        labels = torch.where(dropped, torch.full_like(labels, NULL_CLASS), labels)
        t = torch.randint(0, self.noise_schedule.config.num_train_timesteps, (len(x0),), device=x0.device)
        noise = torch.randn_like(x0)
        x_t = self.noise_schedule.add_noise(x0, noise, t)
        loss = F.mse_loss(self.unet(x_t, t, class_labels=labels).sample, noise)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.ema.update_parameters(self.unet)

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.unet.parameters(), lr=self.hparams.lr, weight_decay=0.0)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.hparams.steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


class ClassifierTraining(L.LightningModule):
    """Cross-entropy training of the digit classifier, with +-1 pixel random shifts."""

    def __init__(self, lr: float = 2e-3):
        super().__init__()
        self.save_hyperparameters()
        self.classifier = DigitClassifier()

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.classifier(random_shift(x)), y)
        self.log("classifier/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.classifier.parameters(), lr=self.hparams.lr, weight_decay=1e-4)


def random_shift(x: torch.Tensor) -> torch.Tensor:
    """Each image shifted by up to one pixel, the border filled with background (-1)."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2,)).tolist()
    return padded[..., dy : dy + 8, dx : dx + 8]


def make_logger(kind: str, log_dir: Path, name: str):
    if kind == "csv":
        return L.pytorch.loggers.CSVLogger(save_dir=str(log_dir), name=name, version="")
    if kind == "wandb":
        return L.pytorch.loggers.WandbLogger(project="ddim-gmm-exp", name=name, save_dir=str(log_dir), offline=True)
    return False


def train_denoiser(args, images, labels) -> tuple[UNet2DModel, float]:
    module = DenoiserTraining(tuple(args.channels), args.lr, args.steps, args.label_dropout, args.ema)
    dataset = TensorDataset(images, labels)
    generator = torch.Generator().manual_seed(args.seed)
    sampler = RandomSampler(dataset, replacement=True, num_samples=args.steps * args.batch_size, generator=generator)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)
    trainer = L.Trainer(
        max_steps=args.steps,
        logger=make_logger(args.logger, args.log_dir, "unet"),
        enable_checkpointing=False,
        log_every_n_steps=50,
        accelerator="auto",
        devices=1,
    )
    start = time.time()
    trainer.fit(module, loader)
    unet = module.ema.module.eval()
    params = sum(p.numel() for p in unet.parameters())
    log.info("UNet: %d parameters, %d steps in %.0f s", params, args.steps, time.time() - start)
    return unet, time.time() - start


def train_classifier(args, images, labels) -> tuple[DigitClassifier, float, np.ndarray, np.ndarray]:
    train_idx, test_idx = stratified_split(labels, held_out=0.2, seed=args.seed)
    module = ClassifierTraining()
    loader = DataLoader(
        TensorDataset(images[train_idx], labels[train_idx]),
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    trainer = L.Trainer(
        max_epochs=args.classifier_epochs,
        logger=make_logger(args.logger, args.log_dir, "classifier"),
        enable_checkpointing=False,
        log_every_n_steps=10,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(module, loader)
    classifier = module.classifier.eval()
    with torch.no_grad():
        accuracy = (classifier(images[test_idx]).argmax(-1) == labels[test_idx]).float().mean().item()
    log.info("classifier held-out accuracy %.4f on %d digits", accuracy, len(test_idx))
    return classifier, accuracy, train_idx, test_idx


def evaluate(out: Path, samples: int, cache: Path) -> list[dict]:
    """The FD table of the card: the experiment runner on the files just written."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from ddim_gmm_exp.runner import run

    rows = []
    for labels, steps in [("balanced", 10), ("balanced", 50), ("null", 10), ("null", 50)]:
        overrides = [
            "model=digits",
            f"model.path={out}",
            f"data.num_samples={samples}",
            f"data.labels={labels}",
            f"sampler.steps={steps}",
            "logger=none",
            "save_images=false",
        ]
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
        HydraConfig().set_config(cfg)
        with tempfile.TemporaryDirectory() as tmp, open_dict(cfg):
            cfg.paths.output_dir, cfg.paths.cache_dir = tmp, str(cache)
            metrics = run(cfg)["metrics"]
        rows.append(
            {
                "conditional": labels == "balanced",
                "sampler": "ddim",
                "eta": 0.0,
                "steps": steps,
                "samples": samples,
                **{k: round(v, 4) for k, v in metrics.items()},
            }
        )
        log.info("%s", rows[-1])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=shipped_dir(), help="where to write (default: the package assets)")
    parser.add_argument("--steps", type=int, default=6500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--label-dropout", type=float, default=0.2)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--classifier-epochs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--fp16",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="store the UNet weights in float16 (loaded back as float32)",
    )
    parser.add_argument("--logger", choices=["csv", "wandb", "none"], default="csv")
    parser.add_argument("--log-dir", type=Path, default=ROOT / "outputs" / "train_digits", help="training logs")
    parser.add_argument("--eval-samples", type=int, default=1000, help="samples per FD-table row; 0: skip")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.steps < 1 or args.classifier_epochs < 1 or args.batch_size < 1:
        print("error: --steps, --classifier-epochs and --batch-size must be >= 1", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(args.seed, workers=True)
    images, labels = load_digits_dataset()

    classifier, accuracy, train_idx, test_idx = train_classifier(args, images, labels)
    torch.save(classifier.state_dict(), args.out / "classifier.pt")
    unet, seconds = train_denoiser(args, images, labels)
    (unet.half() if args.fp16 else unet).save_pretrained(args.out / "unet")
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    scheduler.save_pretrained(args.out / "scheduler")
    mu, sigma = statistics_of(DigitFeatures(str(args.out)), [digits_uint8(images)])
    save_reference(args.out / "reference_stats.npz", mu, sigma)

    card = {
        "data": "scikit-learn load_digits: 1797 8x8 grayscale digits, 10 classes, scaled to [-1, 1]",
        "split": {
            "classifier": "stratified 80/20 (sklearn train_test_split)",
            "seed": args.seed,
            "train": len(train_idx),
            "held_out": len(test_idx),
        },
        "unet": {
            "config": unet_config(tuple(args.channels)),
            "parameters": sum(p.numel() for p in unet.parameters()),
            "steps": args.steps,
            "batch_size": args.batch_size,
            "optimizer": f"AdamW lr {args.lr}, cosine",
            "ema": args.ema,
            "label_dropout": args.label_dropout,
            "dtype": "float16" if args.fp16 else "float32",
            "training_seconds": round(seconds, 1),
            "schedule": "DDPM linear betas 1e-4..0.02, T = 1000",
        },
        "classifier": {
            "architecture": "3 conv layers + 128-d penultimate + linear",
            "held_out_accuracy": accuracy,
            "epochs": args.classifier_epochs,
        },
        "reference_stats": "mu, sigma of all 1797 real digits in the classifier's 128-d penultimate features",
        "seed": args.seed,
        "command": "python scripts/train_digits.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
    }
    if args.eval_samples:
        with tempfile.TemporaryDirectory() as cache:
            card["fd_table"] = evaluate(args.out, args.eval_samples, Path(cache))
    (args.out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    log.info("wrote %s (%.2f MB)", args.out, size / 2**20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
