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

With --flow it trains the embedded rectified-flow model instead and writes src/ddim_gmm_exp/assets/digits_flow:

    python scripts/train_digits.py --flow            # reproduces src/ddim_gmm_exp/assets/digits_flow
    python scripts/train_digits.py --flow --out /tmp/digits_flow --steps 200 --eval-samples 0

The same UNet, label dropout, optimizer and EMA; the interpolation x_t = (1 - t) x0 + t x1 with
independent coupling (x1 ~ N(0, I) drawn afresh for each x0), t ~ U[0, 1], the network fed
t * 1000, the loss ||v - (x1 - x0)||^2. No classifier is trained: the DDPM's (--classifier-dir)
scores both models, against its reference statistics. card.json gets an FD table measured with
flow.sample_rfim (eta 0: Euler) on the uniform grid, and the DDPM's, measured the same way.
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

from ddim_gmm_exp.diffusers import DDIMScheduler
from ddim_gmm_exp.flow import NUM_TRAIN_TIMESTEPS, sample_rfim
from ddim_gmm_exp.images import to_uint8
from ddim_gmm_exp.metrics import MetricSuite, load_reference, reference_of, save_reference
from ddim_gmm_exp.models.digits import (
    NULL_CLASS,
    NUM_CLASSES,
    DigitClassifier,
    DigitFeatures,
    DigitsAdapter,
    classifier_scores_extra,
    digits_uint8,
    load_digits_dataset,
    shipped_dir,
    stratified_split,
    unet_config,
)
from ddim_gmm_exp.models.digits_flow import DigitsFlowAdapter, shipped_flow_dir
from ddim_gmm_exp.noise import randn, sample_generators
from ddim_gmm_exp.sampling import classifier_free_guidance, sample_ddim, x0_options

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


class FlowTraining(DenoiserTraining):
    """Rectified-flow loss (Liu et al. 2023, Lipman et al. 2023): the velocity target x1 - x0 at
    x_t = (1 - t) x0 + t x1, t ~ U[0, 1], independent coupling; label dropout and EMA as the DDPM's."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x0, labels = batch
        dropped = torch.rand(labels.shape, device=labels.device) < self.hparams.label_dropout
        labels = torch.where(dropped, torch.full_like(labels, NULL_CLASS), labels)
        t = torch.rand(len(x0), device=x0.device)
        x1 = torch.randn_like(x0)
        x_t = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * x1
        velocity = self.unet(x_t, t * NUM_TRAIN_TIMESTEPS, class_labels=labels).sample
        loss = F.mse_loss(velocity, x1 - x0)
        self.log("train/loss", loss, prog_bar=True)
        return loss


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
    training = FlowTraining if args.flow else DenoiserTraining
    module = training(tuple(args.channels), args.lr, args.steps, args.label_dropout, args.ema)
    dataset = TensorDataset(images, labels)
    generator = torch.Generator().manual_seed(args.seed)
    sampler = RandomSampler(dataset, replacement=True, num_samples=args.steps * args.batch_size, generator=generator)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)
    trainer = L.Trainer(
        max_steps=args.steps,
        logger=make_logger(args.logger, args.log_dir, "flow_unet" if args.flow else "unet"),
        enable_checkpointing=False,
        log_every_n_steps=50,
        accelerator="auto",
        devices=1,
    )
    start = time.time()
    trainer.fit(module, loader)
    unet = module.ema.module.eval()
    params = sum(p.numel() for p in unet.parameters())
    seconds = time.time() - start
    log.info("UNet: %d parameters, %d steps in %.0f s", params, args.steps, seconds)
    return unet, seconds


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


# (steps, conditional, guidance scale) of the flow card's FD table; the DDPM's rows use 50 steps
FLOW_TABLE = [(steps, cond, g) for steps in (10, 50) for cond, g in [(True, 1.0), (True, 2.5), (False, 1.0)]]
DDPM_TABLE = [(50, cond, g) for cond, g in [(True, 1.0), (True, 2.5), (False, 1.0)]]


def protocol_images(adapter, sample_loop, samples: int, conditional: bool, guidance: float, batch: int = 250):
    """The runner's protocol, outside the runner: sample i has its own generator seeded i and label
    i % 10 (or none); uint8 images and labels, a batch at a time."""
    for start in range(0, samples, batch):
        seeds = list(range(start, min(start + batch, samples)))
        generators = sample_generators(seeds)
        x = randn((len(seeds), *adapter.sample_shape), generators)
        labels = torch.tensor(seeds) % NUM_CLASSES if conditional else None
        uncond = adapter.null_condition(labels) if labels is not None and guidance != 1.0 else None

        def denoise(x, t, labels=labels, uncond=uncond):
            return classifier_free_guidance(adapter.model_output, x, t, labels, uncond, guidance)

        with torch.no_grad():
            yield to_uint8(adapter.decode(sample_loop(denoise, x, generators))), labels


def protocol_scores(images_and_labels, classifier_dir: Path) -> dict[str, float]:
    """fid_digits and the classifier's scores, as the runner computes them (metrics.MetricSuite)."""
    suite = MetricSuite(
        DigitFeatures(str(classifier_dir)),
        load_reference(classifier_dir / "reference_stats.npz"),
        fid_name="fid_digits",
        extras={"classifier": classifier_scores_extra(str(classifier_dir))},
        seed=0,
    )
    suite.reset_and_load_reference(global_rank=0)
    for images, labels in images_and_labels:
        suite.update(images, labels)
    return suite.compute()


def flow_loop(adapter: DigitsFlowAdapter, steps: int):
    """RFIM at eta = 0 (Euler) on the model's uniform grid."""
    sigmas = adapter.flow_sigmas(steps)
    return lambda denoise, x, generators: sample_rfim(
        denoise, x, sigmas, eta=0.0, generator=generators, num_train_timesteps=adapter.num_train_timesteps
    )


def ddim_loop(adapter: DigitsAdapter, steps: int):
    """DDIM at eta = 0 with the runner's defaults ("leading" spacing, the model's x0 clipping)."""
    scheduler = DDIMScheduler.from_config(dict(adapter.scheduler_config) | {"timestep_spacing": "leading"})
    scheduler.set_timesteps(steps)
    return lambda denoise, x, generators: sample_ddim(
        denoise,
        x,
        scheduler.timesteps.tolist(),
        scheduler.alphas_cumprod,
        scheduler.final_alpha_cumprod,
        eta=0.0,
        generator=generators,
        prediction_type=scheduler.config.prediction_type,
        **x0_options(scheduler.config),
    )


def protocol_table(adapter, make_loop, table, samples: int, classifier_dir: Path, sampler: str) -> list[dict]:
    rows = []
    for steps, conditional, guidance in table:
        start = time.time()
        images = protocol_images(adapter, make_loop(adapter, steps), samples, conditional, guidance)
        metrics = protocol_scores(images, classifier_dir)
        rows.append(
            {
                "conditional": conditional,
                "guidance_scale": guidance,
                "sampler": sampler,
                "eta": 0.0,
                "steps": steps,
                "samples": samples,
                **{k: round(v, 4) for k, v in metrics.items()},
                "seconds": round(time.time() - start, 1),
            }
        )
        log.info("%s", rows[-1])
    return rows


def evaluate_flow(out: Path, classifier_dir: Path, samples: int) -> dict[str, list[dict]]:
    """The flow card's FD table, and the DDPM's at 50 steps measured the same way."""
    flow = protocol_table(DigitsFlowAdapter(str(out)), flow_loop, FLOW_TABLE, samples, classifier_dir, "rfim")
    ddpm = protocol_table(DigitsAdapter(str(classifier_dir)), ddim_loop, DDPM_TABLE, samples, classifier_dir, "ddim")
    return {"fd_table": flow, "ddpm_same_protocol": ddpm}


def describe_dir(path: Path) -> str:
    """A directory as the card names it: relative to the flow assets when it is the shipped DDPM."""
    return "../digits" if path.resolve() == shipped_dir().resolve() else str(path)


def main_flow(args, argv: list[str] | None, images: torch.Tensor, labels: torch.Tensor) -> int:
    """--flow: train the rectified-flow UNet and write unet/, scheduler/ and card.json."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    classifier_dir = args.classifier_dir
    for name in ("classifier.pt", "reference_stats.npz"):
        if not (classifier_dir / name).is_file():
            print(f"error: --classifier-dir {classifier_dir} has no {name}", file=sys.stderr)
            return 2
    unet, seconds = train_denoiser(args, images, labels)
    (unet.half() if args.fp16 else unet).save_pretrained(args.out / "unet")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0).save_pretrained(
        args.out / "scheduler"
    )
    card = {
        "data": "scikit-learn load_digits: 1797 8x8 grayscale digits, 10 classes, scaled to [-1, 1]",
        "model": "rectified flow: x_t = (1 - t) x0 + t x1, data at t = 0, noise x1 ~ N(0, I) at t = 1",
        "unet": {
            "config": unet_config(tuple(args.channels)),
            "parameters": sum(p.numel() for p in unet.parameters()),
            "objective": "velocity: ||v(x_t, 1000 t, label) - (x1 - x0)||^2, independent coupling",
            "time_sampling": "t ~ U[0, 1]; the network is fed t * 1000",
            "steps": args.steps,
            "batch_size": args.batch_size,
            "optimizer": f"AdamW lr {args.lr}, cosine",
            "ema": args.ema,
            "label_dropout": args.label_dropout,
            "dtype": "float16" if args.fp16 else "float32",
            "training_seconds": round(seconds, 1),
        },
        "scheduler": "FlowMatchEulerDiscreteScheduler, shift 1.0; sampled on the uniform grid t_i = i / S",
        "classifier": f"{describe_dir(classifier_dir)}/classifier.pt: the digits DDPM's, not retrained",
        "reference_stats": f"{describe_dir(classifier_dir)}/reference_stats.npz: the digits DDPM's, all 1797 "
        "real digits in the classifier's 128-d penultimate features",
        "evaluation": "per-sample generators seeded 0..N-1, label i % 10 (conditional) or the null class; "
        "flow.sample_rfim at eta 0 (Euler); fid_digits and the classifier's scores via metrics.MetricSuite",
        "seed": args.seed,
        "command": "python scripts/train_digits.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if args.eval_samples:
        card |= evaluate_flow(args.out, classifier_dir, args.eval_samples)
    (args.out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    log.info("wrote %s (%.2f MB)", args.out, size / 2**20)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the package assets)")
    parser.add_argument("--flow", action="store_true", help="train the rectified-flow model (assets/digits_flow)")
    parser.add_argument(
        "--classifier-dir",
        type=Path,
        default=shipped_dir(),
        help="--flow: the digits DDPM directory whose classifier.pt and reference_stats.npz score the flow model",
    )
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
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); 1 is much faster on a machine shared with other work",
    )
    parser.add_argument("--logger", choices=["csv", "wandb", "none"], default="csv")
    parser.add_argument("--log-dir", type=Path, default=ROOT / "outputs" / "train_digits", help="training logs")
    parser.add_argument("--eval-samples", type=int, default=1000, help="samples per FD-table row; 0: skip")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.steps < 1 or args.classifier_epochs < 1 or args.batch_size < 1:
        print("error: --steps, --classifier-epochs and --batch-size must be >= 1", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.out is None:
        args.out = shipped_flow_dir() if args.flow else shipped_dir()
    args.out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(args.seed, workers=True)
    images, labels = load_digits_dataset()
    if args.flow:
        return main_flow(args, argv, images, labels)

    classifier, accuracy, train_idx, test_idx = train_classifier(args, images, labels)
    torch.save(classifier.state_dict(), args.out / "classifier.pt")
    unet, seconds = train_denoiser(args, images, labels)
    (unet.half() if args.fp16 else unet).save_pretrained(args.out / "unet")
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    scheduler.save_pretrained(args.out / "scheduler")
    mu, sigma, features = reference_of(DigitFeatures(str(args.out)), [digits_uint8(images)])
    save_reference(args.out / "reference_stats.npz", mu, sigma, features=features)

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
        "reference_stats": "mu, sigma and the features (1797 x 128) of all 1797 real digits in the classifier's "
        "128-d penultimate features",
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
