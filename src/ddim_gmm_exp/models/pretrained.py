"""Adapters for pretrained diffusers checkpoints: pixel DDPMs, latent diffusion (VQ-VAE),
Stable Diffusion (text prompts, v- or eps-prediction) and DiT (ImageNet class labels).

Each loads from a local directory (``model.path``) or a hub id (``model.id``) with diffusers'
``from_pretrained``. No download is attempted unless ``model.offline=false`` (local_files_only): with the hub out of
reach, a missing checkpoint is a ConfigError that says which repository is needed and where to put
it. Precision (fp32 | fp16 | bf16 autocast), channels_last and torch.compile apply to the denoiser.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin

from ddim_gmm_exp.errors import ConfigError
from ddim_gmm_exp.models.base import ModelAdapter

PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def checkpoint_source(path: str | None, hub_id: str | None) -> str:
    """The directory or hub id to load from."""
    if path is not None:
        if not Path(path).is_dir():
            raise ConfigError(f"model.path={path!r} does not exist: give a local diffusers checkpoint directory")
        return str(path)
    if hub_id is None:
        raise ConfigError("the model config has neither model.path nor model.id: give model.path=DIR")
    return hub_id


def load_component(cls: Any, source: str, subfolder: str | None, what: str, offline: bool) -> Any:
    """``cls.from_pretrained(source, subfolder=...)`` with one clear error when it is not available.

    offline: local files only (a directory, or the Hugging Face cache), no network call at all.
    """
    kwargs = {"local_files_only": offline} | ({"subfolder": subfolder} if subfolder else {})
    if issubclass(cls, ModelMixin):  # without accelerate, say so ourselves instead of diffusers' advice block
        kwargs["low_cpu_mem_usage"] = False
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        where = f"{source}/{subfolder}" if subfolder else source
        if Path(source).is_dir():  # a local directory: say what is wrong in it, not how to download a hub id
            missing = f"it has no {subfolder}/ folder" if subfolder and not Path(where).is_dir() else first_line(err)
            raise ConfigError(f"cannot load the {what} from model.path {where!r}: {missing}") from err
        raise ConfigError(
            f"cannot load the {what} from {where!r} offline: download the checkpoint where the hub is reachable "
            f"(hf download {source} --local-dir DIR) and pass model.path=DIR"
        ) from err


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (diffusers' errors run to paragraphs)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# SD3's T5 text encoder: optional (model.text_encoder_3=false runs without it, zeros in its place)
T5_COMPONENTS = ("text_encoder_3", "tokenizer_3")


def missing_components(directory: Path, optional: tuple[str, ...] = ()) -> list[str]:
    """The components a local pipeline directory's model_index.json lists (with a class) but has no
    folder for, ``optional`` ones left out; ["model_index.json"] when there is no index."""
    index_file = directory / "model_index.json"
    if not index_file.is_file():
        return [index_file.name]
    index = json.loads(index_file.read_text())
    listed = [name for name, value in index.items() if isinstance(value, list) and value and value[0] is not None]
    return [name for name in listed if name not in optional and not (directory / name).is_dir()]


def check_local_sd3(directory: Path, text_encoder_3: bool) -> None:
    """One ConfigError naming what a local SD3 directory lacks, before diffusers tries to load it."""
    missing = missing_components(directory, () if text_encoder_3 else T5_COMPONENTS)
    if missing == ["model_index.json"]:
        raise ConfigError(
            f"model.path={str(directory)!r} has no model_index.json: not a diffusers pipeline directory "
            "(save_pretrained or hf download --local-dir writes one)"
        )
    t5 = [name for name in missing if name in T5_COMPONENTS]
    if t5:
        raise ConfigError(
            f"model.path={str(directory)!r} has no {' or '.join(f'{name}/' for name in t5)} (the T5 text encoder "
            "its model_index.json lists): pass model.text_encoder_3=false to run without T5, or add the folders"
        )
    if missing:
        raise ConfigError(
            f"model.path={str(directory)!r} has no {', '.join(f'{name}/' for name in missing)}, which its "
            "model_index.json lists: the checkpoint is incomplete; copy the missing folders into it"
        )


def scheduler_config(source: str, subfolder: str | None, offline: bool) -> dict[str, Any]:
    """The checkpoint's scheduler config as a dict (diffusers' load_config, local or cached)."""
    from diffusers import DDIMScheduler

    kwargs = {"local_files_only": offline} | ({"subfolder": subfolder} if subfolder else {})
    try:
        return dict(DDIMScheduler.load_config(source, **kwargs))
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"no scheduler config in {source!r} (subfolder {subfolder!r}): incomplete checkpoint"
        ) from err


def square(size: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    """(H, W) from a diffusers sample_size (an int for square samples)."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


class PretrainedAdapter(ModelAdapter):
    """What every diffusers-based adapter shares: precision, memory format, compilation, decoding."""

    def __init__(self, precision: str = "fp32", channels_last: bool = False, compile: bool = False) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ConfigError(f"model.precision={precision!r} is not allowed: choose one of {tuple(PRECISIONS)}")
        self.precision = precision
        self.channels_last = channels_last
        self.compile = compile
        # latent families: their first-stage decoder (VAE or VQ-VAE) and the factor latents were scaled by
        self.autoencoder: torch.nn.Module | None = None
        self.latent_scale = 1.0

    def prepare_denoiser(self, module: torch.nn.Module) -> torch.nn.Module:
        module = module.eval().requires_grad_(False)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if self.compile:
            module = torch.compile(module)
        return module

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The denoiser's output in float32, under the configured precision."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast(x.device):
            return self.denoiser(x, t, **kwargs).sample.float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Samples -> images in [0, 1], through the family's autoencoder where it has one."""
        images = latents if self.autoencoder is None else self.autoencoder.decode(latents / self.latent_scale).sample
        return ((images + 1) / 2).clamp(0, 1)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Decode in chunks (VAE decoders are the memory peak of latent models)."""
        with torch.no_grad():
            return torch.cat([self.decode_latents(chunk).float() for chunk in x.split(self.decode_chunk)])

    decode_chunk = 16


class PixelDDPMAdapter(PretrainedAdapter):
    """A diffusers UNet2DModel in pixel space (google/ddpm-cifar10-32, ddpm-cat-256, ddpm-ema-celebahq-256).

    A class-conditional UNet (num_class_embeds) takes labels; ``null_class`` names the embedding
    trained as "no label", without which classifier-free guidance is refused.
    """

    def __init__(
        self,
        path: str | None = None,
        id: str | None = None,
        offline: bool = True,
        null_class: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        from diffusers import UNet2DModel

        source = checkpoint_source(path, id)
        subfolder = "unet" if path is not None and (Path(path) / "unet").is_dir() else None
        unet = load_component(UNet2DModel, source, subfolder, "UNet", offline)
        self.denoiser = self.prepare_denoiser(unet)
        self.scheduler_config = scheduler_config(source, "scheduler" if subfolder else None, offline)
        self.sample_shape = (unet.config.in_channels, *square(unet.config.sample_size))
        embeds = int(unet.config.num_class_embeds or 0)
        if null_class is not None and not 0 <= null_class < embeds:
            raise ConfigError(
                f"model.adapter.null_class={null_class} is not allowed: the UNet has {embeds} class embeddings"
            )
        self.num_classes = embeds - 1 if null_class == embeds - 1 else embeds
        self._null_class = null_class

    @property
    def null_label(self) -> int | None:
        return self._null_class

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        if self._null_class is None:
            raise ConfigError("this UNet has no null class: classifier-free guidance needs model.adapter.null_class")
        return torch.full_like(cond, self._null_class)

    def model_output(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if not self.num_classes:
            return self.denoise(x, t)
        if cond is None:  # unconditional (data.labels=null, or guidance 0): the null class
            cond = self.null_condition(torch.zeros(x.shape[0], dtype=torch.long, device=x.device))
        return self.denoise(x, t, class_labels=cond)


class LatentDDPMAdapter(PretrainedAdapter):
    """Unconditional latent diffusion with a VQ-VAE (CompVis/ldm-celebahq-256: unet/, vqvae/, scheduler/)."""

    def __init__(self, path: str | None = None, id: str | None = None, offline: bool = True, **options: Any) -> None:
        super().__init__(**options)
        from diffusers import UNet2DModel, VQModel

        source = checkpoint_source(path, id)
        unet = load_component(UNet2DModel, source, "unet", "UNet", offline)
        self.autoencoder = load_component(VQModel, source, "vqvae", "VQ-VAE", offline).eval().requires_grad_(False)
        # latent_scale stays 1.0 whatever vqvae.config.scaling_factor says (diffusers' default 0.18215):
        # CompVis trained this model on unscaled VQ latents (celebahq-ldm-vq-4.yaml sets no scale_factor),
        # and diffusers' LDMPipeline, which divides by it, gives broken images (docs/models.md)
        self.denoiser = self.prepare_denoiser(unet)
        self.scheduler_config = scheduler_config(source, "scheduler", offline)
        self.sample_shape = (unet.config.in_channels, *square(unet.config.sample_size))

    def model_output(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        return self.denoise(x, t)


class StableDiffusionAdapter(PretrainedAdapter):
    """Text-to-image latent diffusion (stabilityai/stable-diffusion-2-1-base, -2-1): prompts, CFG, VAE."""

    takes_prompts = True

    def __init__(
        self,
        path: str | None = None,
        id: str | None = None,
        offline: bool = True,
        resolution: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        source = checkpoint_source(path, id)
        self.tokenizer = load_component(CLIPTokenizer, source, "tokenizer", "tokenizer", offline)
        self.text_encoder = load_component(CLIPTextModel, source, "text_encoder", "text encoder", offline).eval()
        self.autoencoder = load_component(AutoencoderKL, source, "vae", "VAE", offline).eval().requires_grad_(False)
        self.latent_scale = self.autoencoder.config.scaling_factor
        unet = load_component(UNet2DConditionModel, source, "unet", "UNet", offline)
        self.denoiser = self.prepare_denoiser(unet)
        self.scheduler_config = scheduler_config(source, "scheduler", offline)
        vae_scale = 2 ** (len(self.autoencoder.config.block_out_channels) - 1)
        size = resolution or unet.config.sample_size * vae_scale
        self.sample_shape = (unet.config.in_channels, size // vae_scale, size // vae_scale)

    @torch.no_grad()
    def embed(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder(tokens.input_ids.to(device))[0]

    def encode_condition(self, labels: Any, prompts: list[str] | None, device: torch.device) -> torch.Tensor:
        if prompts is None:
            raise ConfigError("a text-to-image model needs prompts: give data.prompts_file")
        return self.embed(prompts, device)

    def null_condition(self, cond: torch.Tensor) -> torch.Tensor:
        return self.embed([""], cond.device).expand_as(cond)

    def model_output(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.denoise(x, t, encoder_hidden_states=cond)


class DiTAdapter(PretrainedAdapter):
    """Class-conditional latent DiT (facebook/DiT-XL-2-256): ImageNet labels, null class 1000, VAE decode."""

    def __init__(self, path: str | None = None, id: str | None = None, offline: bool = True, **options: Any) -> None:
        super().__init__(**options)
        from diffusers import AutoencoderKL, DiTTransformer2DModel

        source = checkpoint_source(path, id)
        transformer = load_component(DiTTransformer2DModel, source, "transformer", "DiT transformer", offline)
        self.autoencoder = load_component(AutoencoderKL, source, "vae", "VAE", offline).eval().requires_grad_(False)
        self.latent_scale = self.autoencoder.config.scaling_factor
        self.denoiser = self.prepare_denoiser(transformer)
        self.scheduler_config = scheduler_config(source, "scheduler", offline)
        size = transformer.config.sample_size
        self.latent_channels = transformer.config.in_channels
        self.sample_shape = (self.latent_channels, size, size)
        self.num_classes = int(transformer.config.num_embeds_ada_norm)

    def model_output(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            cond = torch.full((x.shape[0],), self.null_label, device=x.device, dtype=torch.long)
        out = self.denoise(x, t, class_labels=cond)
        return out[:, : self.latent_channels]  # DiT also predicts a variance: keep eps


def ddpm_cifar10_unet(block_out_channels: tuple[int, ...] = (128, 256, 256, 256)) -> torch.nn.Module:
    """A UNet2DModel with google/ddpm-cifar10-32's architecture (35.7M parameters), random weights,
    for benchmarks (narrower with other block_out_channels)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=block_out_channels,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_eps=1e-6,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
    )


class StableDiffusion3Adapter(PretrainedAdapter):
    """Stable Diffusion 3 / 3.5 (rectified flow, MMDiT), text-to-image: prompts through the
    pipeline's own ``encode_prompt`` (two CLIPs, and T5 where the checkpoint has it and
    ``text_encoder_3`` is on; without it SD3 uses zeros), the scheduler's own shifted sigmas
    (SD3's shift, dynamic shifting with the pipeline's mu where configured), VAE decode with its
    scaling and shift factors. The model is called at t = sigma * 1000 and predicts v = x1 - x0."""

    family = "flow"
    takes_prompts = True

    def __init__(
        self,
        path: str | None = None,
        id: str | None = None,
        offline: bool = True,
        resolution: int | None = None,
        text_encoder_3: bool = True,
        max_sequence_length: int = 256,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        from diffusers import StableDiffusion3Pipeline

        source = checkpoint_source(path, id)
        if path is not None:
            check_local_sd3(Path(path), text_encoder_3)
        kwargs: dict[str, Any] = {"local_files_only": offline, "low_cpu_mem_usage": False}
        if not text_encoder_3:  # SD3 runs without T5 (zeros in its place): far less memory
            kwargs |= {"text_encoder_3": None, "tokenizer_3": None}
        try:
            pipe = StableDiffusion3Pipeline.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as err:
            if path is not None:  # every listed folder is there: say what diffusers could not read
                raise ConfigError(
                    f"cannot load the Stable Diffusion 3 pipeline from model.path={path!r}: {first_line(err)}"
                ) from err
            raise ConfigError(
                f"cannot load the Stable Diffusion 3 pipeline from {source!r} offline: download the checkpoint "
                f"where the hub is reachable (hf download {source} --local-dir DIR) and pass model.path=DIR"
            ) from err
        pipe.set_progress_bar_config(disable=True)
        self.pipeline = pipe  # not a Module: its modules are registered below, so .to(device) moves them
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = (
            pipe.text_encoder,
            pipe.text_encoder_2,
            pipe.text_encoder_3,
        )
        self.autoencoder = pipe.vae.eval().requires_grad_(False)
        self.latent_scale = pipe.vae.config.scaling_factor
        self.latent_shift = pipe.vae.config.get("shift_factor") or 0.0
        self.denoiser = self.prepare_denoiser(pipe.transformer)
        self.scheduler_config = dict(pipe.scheduler.config)
        self.max_sequence_length = max_sequence_length
        vae_scale = pipe.vae_scale_factor
        size = resolution or pipe.transformer.config.sample_size * vae_scale
        self.sample_shape = (pipe.transformer.config.in_channels, size // vae_scale, size // vae_scale)
        self.patch_size = pipe.transformer.config.patch_size

    def flow_sigmas(self, steps: int) -> list[float]:
        """The pipeline's own time grid for ``steps``: FlowMatchEulerDiscreteScheduler.set_timesteps,
        with SD3's shift, and dynamic shifting's mu computed as the pipeline computes it."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler_config)
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting"):
            seq_len = (self.sample_shape[1] // self.patch_size) * (self.sample_shape[2] // self.patch_size)
            kwargs["mu"] = calculate_shift(
                seq_len,
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        scheduler.set_timesteps(steps, **kwargs)
        return [float(s) for s in scheduler.sigmas]

    @torch.no_grad()
    def embed(self, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        return {"embeds": embeds, "pooled": pooled}

    def encode_condition(self, labels: Any, prompts: list[str] | None, device: torch.device) -> dict[str, torch.Tensor]:
        if prompts is None:
            raise ConfigError("a text-to-image model needs prompts: give data.prompts_file")
        return self.embed(prompts, device)

    def null_condition(self, cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        empty = self.embed([""], cond["embeds"].device)
        return {k: v.expand_as(cond[k]) for k, v in empty.items()}

    def model_output(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.autocast(x.device):
            out = self.denoiser(
                hidden_states=x,
                timestep=t,
                encoder_hidden_states=cond["embeds"],
                pooled_projections=cond["pooled"],
                return_dict=False,
            )[0]
        return out.float()

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.autoencoder.decode(latents / self.latent_scale + self.latent_shift).sample
        return ((images + 1) / 2).clamp(0, 1)
