"""Sampling throughput of the runner's path against a bare diffusers loop, on real architectures.

    python scripts/bench_gpu.py --out bench_gpu.md              # on a GPU: the table of docs/performance.md
    python scripts/bench_gpu.py --small --device cpu            # small sizes, to check the script on a CPU
    python scripts/bench_gpu.py --models cat256 --repeats 5     # one architecture

With random weights of three real architectures, 10 DDIM steps, it times images per second of the
denoising loop (no decoding):
    cifar10: google/ddpm-cifar10-32's UNet2DModel at batch 256;
    sd21:    stable-diffusion-2-1-base's UNet2DConditionModel at batch 8, classifier-free guidance 7.5;
    cat256:  google/ddpm-cat-256's UNet2DModel (the paper's pixel-space case) at batch 32,
             DDPM's linear betas 1e-4..0.02 over T = 1000.
Rows, for each architecture:
    (a)  a bare loop: the UNet and diffusers' DDIMScheduler.step, one generator on the device;
    (b)  the runner's sampling path (SamplingModule.sample: per-sample generators, ddim_step), DDIM eta 0;
    (b1) the same at eta 1 (per-sample variance noise);
    (c0) the same with DDIM-GMM at eta 0: the paper's kernel, GMM().initialize(dim, 8, steps);
    (c1) DDIM-GMM at eta 1;
    (d)  (b) with bf16 autocast + channels_last (+ torch.compile with --compile).
(b), (b1), (c0) and (c1) run twice: with per-sample generators on the CPU (data.noise_device=cpu,
the default) and on the sampling device (data.noise_device=device, NVlabs/edm's way).
Targets on a GPU: every runner row >= 0.95 of (a); (c0)/(b) >= 0.98 (the GMM's cost, at equal eta
and noise streams; (c1)/(b1) likewise); (d) > (a). On a CPU the numbers only check the script.

Each row is printed and appended to --out (markdown; rows also in OUT.json) as soon as it is
measured, so a run stopped by a timeout keeps the rows it measured.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ddim_gmm_exp.diffusers import DDIMScheduler
from ddim_gmm_exp.gmm import GMM
from ddim_gmm_exp.metrics import MetricSuite
from ddim_gmm_exp.models.pretrained import PretrainedAdapter, ddpm_cifar10_unet
from ddim_gmm_exp.module import SamplingModule, SamplingPlan
from ddim_gmm_exp.samplers import DiffusionSchedule, ddim, ddim_gmm

SD_SCHEDULE = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)
DDPM_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=True)
GMM_COMPONENTS = 8  # the paper's default K
RUNNER_TARGET, GMM_TARGET = 0.95, 0.98
HEADER = "| model | variant | noise streams | images/s | ratio to (a) | GMM / DDIM |\n|---|---|---|---|---|---|"


@dataclass
class Case:
    """One architecture at one batch size: what both loops need."""

    name: str
    unet: torch.nn.Module
    shape: tuple[int, ...]
    schedule: dict[str, Any]
    batch: int
    guidance: float = 1.0
    context_dim: int = 0  # text-conditioned models: the text embeddings' width


@dataclass(frozen=True)
class Variant:
    """One runner row: its key ((b), (b1), (c0), (c1), (d)), DDIM's eta, whether the GMM kernel
    replaces DDIM's Gaussian, where the per-sample generators live, and adapter options."""

    key: str
    eta: float
    gmm: bool = False
    noise_device: str = "cpu"
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.options:
            extras = " + compile" if self.options.get("compile") else ""
            return f"{self.key} runner, bf16 + channels_last{extras}"
        sampler = f"ddim_gmm K={GMM_COMPONENTS}" if self.gmm else "ddim"
        return f"{self.key} runner, {sampler} eta={self.eta:g}"

    @property
    def baseline_key(self) -> str | None:
        """The DDIM row at the same eta that the GMM row is compared with."""
        return {"(c0)": "(b)", "(c1)": "(b1)"}.get(self.key)


def variants(compile: bool) -> list[Variant]:
    """The runner rows, in an order where each GMM row's DDIM baseline is measured before it."""
    rows = [
        Variant(key, eta, gmm, noise)
        for key, eta, gmm in (("(b)", 0.0, False), ("(b1)", 1.0, False), ("(c0)", 0.0, True), ("(c1)", 1.0, True))
        for noise in ("cpu", "device")
    ]
    fast = {"precision": "bf16", "channels_last": True, "compile": compile}
    return [*rows, Variant("(d)", 0.0, options=fast)]


def cifar_case(small: bool) -> Case:
    unet = ddpm_cifar10_unet((32, 64, 64, 64) if small else (128, 256, 256, 256))
    return Case("cifar10", unet, (3, 32, 32), DDPM_SCHEDULE, 16 if small else 256)


def sd21_case(small: bool) -> Case:
    from diffusers import UNet2DConditionModel

    if small:
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=64,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            norm_num_groups=8,
        )
        return Case("sd21-base", unet, (4, 16, 16), SD_SCHEDULE, 2, guidance=7.5, context_dim=64)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    return Case("sd21-base", unet, (4, 64, 64), SD_SCHEDULE, 8, guidance=7.5, context_dim=1024)


def cat256_case(small: bool) -> Case:
    """google/ddpm-cat-256's UNet2DModel (its config.json; ddpm-church/bedroom-256 share it),
    113.7M parameters; --small: the same blocks at 64x64, 16-64 channels wide."""
    from diffusers import UNet2DModel

    size = 64 if small else 256
    unet = UNet2DModel(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(16, 16, 32, 32, 64, 64) if small else (128, 128, 256, 256, 512, 512),
        down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
        norm_num_groups=8 if small else 32,
        norm_eps=1e-6,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
    )
    return Case("cat256", unet, (3, size, size), DDPM_SCHEDULE, 4 if small else 32)


CASES: dict[str, Callable[[bool], Case]] = {"cifar10": cifar_case, "sd21": sd21_case, "cat256": cat256_case}


class InMemoryAdapter(PretrainedAdapter):
    """A model adapter around an in-memory denoiser (random weights), text-conditioned or not."""

    def __init__(
        self,
        denoiser: torch.nn.Module,
        shape: tuple[int, ...],
        schedule: dict[str, Any],
        context: torch.Tensor | None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.denoiser = self.prepare_denoiser(denoiser)
        self.sample_shape = shape
        self.scheduler_config = schedule
        self.context = context  # (2, tokens, dim): unconditional and conditional text embeddings

    def encode_condition(self, labels, prompts, device):
        return None if self.context is None else self.context[1:].expand(len(prompts), -1, -1)

    def null_condition(self, cond):
        return self.context[:1].expand_as(cond)

    def model_output(self, x, t, cond):
        return self.denoise(x, t, encoder_hidden_states=cond) if cond is not None else self.denoise(x, t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(fn: Callable[[], Any], batch: int, repeats: int, device: torch.device) -> float:
    """batch / the median time of fn over repeats, after one untimed call (warm-up, compilation)."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return batch / statistics.median(times)


def bare_loop(case: Case, steps: int, context: torch.Tensor | None, device: torch.device) -> Callable[[], Any]:
    """(a): what a diffusers user writes: the UNet and diffusers' own DDIMScheduler."""
    import diffusers

    scheduler = diffusers.DDIMScheduler(**case.schedule)
    scheduler.set_timesteps(steps)
    generator = torch.Generator(device=device).manual_seed(0)
    unet, batch = case.unet, case.batch

    @torch.no_grad()
    def run():
        x = torch.randn((batch, *case.shape), generator=generator, device=device)
        for t in scheduler.timesteps:
            if context is None:
                eps = unet(x, t).sample
            else:
                both = unet(torch.cat([x, x]), t, encoder_hidden_states=context.repeat_interleave(batch, 0)).sample
                uncond, cond = both.chunk(2)
                eps = uncond + case.guidance * (cond - uncond)
            x = scheduler.step(eps, t, x).prev_sample
        return x

    return run


@functools.lru_cache(maxsize=1)
def paper_gmm(dim: int, steps: int) -> GMM:
    """The paper's default kernel (built once per architecture: seconds at 3x256x256)."""
    return GMM().initialize(dim=dim, n_components=GMM_COMPONENTS, n_steps=steps)


def runner_path(adapter: InMemoryAdapter, case: Case, steps: int, variant: Variant, device: torch.device):
    """(b)-(d): the runner's per-batch sampling path, SamplingModule.sample."""
    scheduler = DDIMScheduler.from_config(adapter.scheduler_config)
    scheduler.set_timesteps(steps)
    gmm = paper_gmm(adapter.dim, steps) if variant.gmm else None
    plan = SamplingPlan(
        sampler=ddim_gmm if gmm is not None else ddim,
        schedule=DiffusionSchedule.from_scheduler(scheduler),
        options={"eta": variant.eta},
        gmm=gmm,
        guidance_scale=case.guidance,
        prompts=["a prompt"] if adapter.context is not None else None,
        noise_device=variant.noise_device,
    )
    module = SamplingModule(adapter, plan, MetricSuite()).to(device)
    module._gmm_on_device = gmm.to(device) if gmm is not None else None  # as on_predict_start does
    indices = torch.arange(case.batch)
    return lambda: module.sample(indices)


class Table:
    """The rows measured so far, printed and written to --out (markdown and .json) one by one."""

    def __init__(self, title: str, out: str | None) -> None:
        self.title, self.out, self.rows = title, out, []
        print(f"{title}\n\n{HEADER}", flush=True)
        if out:
            with open(out, "w") as f:
                f.write(f"{title}\n\n{HEADER}\n")

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        line = markdown_row(row)
        print(line, flush=True)
        if self.out:
            with open(self.out, "a") as f:
                f.write(line + "\n")
            with open(self.out + ".json", "w") as f:
                json.dump({"title": self.title, "rows": self.rows}, f, indent=2)

    def finish(self, device: torch.device) -> None:
        """The targets' verdict on a GPU (on a CPU the ratios carry no verdict)."""
        if device.type != "cuda":
            return
        lines = ["", *target_misses(self.rows)]
        print("\n".join(lines), flush=True)
        if self.out:
            with open(self.out, "a") as f:
                f.write("\n".join(lines) + "\n")


def markdown_row(row: dict[str, Any]) -> str:
    ips = row["images_per_second"]
    gmm = f"{row['gmm_over_ddim']:.3f}" if row.get("gmm_over_ddim") is not None else ""
    measured = f"{ips:.2f} | {row['ratio_to_a']:.3f}" if ips is not None else f"failed: {row['error']} | "
    return f"| {row['model']} | {row['variant']} | {row['noise']} | {measured} | {gmm} |"


def target_misses(rows: list[dict[str, Any]]) -> list[str]:
    """One line per target missed, or one line saying every target was met."""
    misses = []
    for row in rows:
        name = f"{row['model']} {row['variant']} [{row['noise']}]"
        if row["images_per_second"] is None:
            misses.append(f"- {name}: failed")
        elif row["variant"].startswith("(d)") and row["ratio_to_a"] <= 1.0:
            misses.append(f"- {name}: {row['ratio_to_a']:.3f} of (a), target > 1")
        elif row["variant"][:2] in ("(b", "(c") and row["ratio_to_a"] < RUNNER_TARGET:
            misses.append(f"- {name}: {row['ratio_to_a']:.3f} of (a), target >= {RUNNER_TARGET}")
        if (row.get("gmm_over_ddim") or 1.0) < GMM_TARGET:
            misses.append(f"- {name}: GMM / DDIM {row['gmm_over_ddim']:.3f}, target >= {GMM_TARGET}")
    return ["Targets missed:", *misses] if misses else ["Every target met."]


def measure_variant(
    case: Case, variant: Variant, context: torch.Tensor | None, args: argparse.Namespace, device: torch.device
) -> float:
    adapter = InMemoryAdapter(case.unet, case.shape, case.schedule, context, **variant.options).to(device)
    try:
        return images_per_second(
            runner_path(adapter, case, args.steps, variant, device), case.batch, args.repeats, device
        )
    finally:
        if variant.options.get("channels_last"):  # prepare_denoiser converted the shared UNet in place
            case.unet.to(memory_format=torch.contiguous_format)


def bench_case(case: Case, args: argparse.Namespace, device: torch.device, table: Table) -> None:
    """Every row of one architecture, into table as each is measured."""
    case.unet = case.unet.to(device).eval()
    context = None
    if case.context_dim:
        context = torch.randn(2, 77, case.context_dim, generator=torch.Generator().manual_seed(0)).to(device)
    a = images_per_second(bare_loop(case, args.steps, context, device), case.batch, args.repeats, device)
    # nfe: model evaluations per image (guided: 2 a step), so that scripts/plan.py scales the rate to other NFE
    nfe = args.steps * (2 if case.context_dim else 1)
    base = {"model": case.name, "batch": case.batch, "nfe": nfe, "small": args.small, "device": device.type}
    table.add(
        base
        | {"variant": "(a) bare diffusers loop", "noise": "one generator", "images_per_second": a, "ratio_to_a": 1.0}
    )
    measured: dict[tuple[str, str], float] = {}
    for variant in variants(args.compile):
        row = base | {"variant": variant.label, "noise": variant.noise_device}
        try:
            ips = measure_variant(case, variant, context, args, device)
        except Exception as error:  # a failed row is reported, and the others still measured
            traceback.print_exc()
            table.add(row | {"images_per_second": None, "error": describe(error)})
            continue
        measured[variant.key, variant.noise_device] = ips
        ddim = measured.get((variant.baseline_key, variant.noise_device)) if variant.baseline_key else None
        table.add(
            row | {"images_per_second": ips, "ratio_to_a": ips / a, "gmm_over_ddim": ips / ddim if ddim else None}
        )


def describe(error: Exception) -> str:
    """An error in one table cell: its type and first line."""
    first = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {first}"[:200].replace("|", "/")


def bench_model(name: str, args: argparse.Namespace, device: torch.device, table: Table) -> None:
    """One architecture's rows; where it fails as a whole (out of memory, say), one row says so."""
    torch.manual_seed(0)
    try:
        with device:  # random weights drawn where they are used: seconds, not a minute, for SD's UNet on a GPU
            case = CASES[name](args.small)
        bench_case(case, args, device, table)
    except Exception as error:  # the next architecture is still measured
        traceback.print_exc()
        table.add({"model": name, "variant": "(all)", "noise": "", "images_per_second": None, "error": describe(error)})


def title_of(args: argparse.Namespace, device: torch.device) -> str:
    return (
        f"device: {device_name(device)}; torch {torch.__version__}; {args.steps} steps; "
        f"{'small' if args.small else 'full'} sizes; median of {args.repeats}; {datetime.date.today()}. "
        f"Targets on a GPU: runner rows >= {RUNNER_TARGET} (a), GMM / DDIM ((c0)/(b), (c1)/(b1)) >= {GMM_TARGET}, "
        "(d) > (a)"
    )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="small architectures and batches (CPU check)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also torch.compile the denoiser in (d)")
    parser.add_argument("--models", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--out", help="write the table (markdown) and rows (OUT.json), row by row")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    table = Table(title_of(args, device), args.out)
    for name in args.models:
        bench_model(name, args, device, table)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the last architecture's weights and activations, freed
    table.finish(device)
    return 1 if any(row["images_per_second"] is None for row in table.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
