"""Tiny randomly initialised checkpoints of every pretrained diffusion family, saved offline in the
layout of the hub repositories the model configs name (conf/model), seeded, in a second or two:

    save_pixel_ddpm(path)            google/ddpm-*: UNet and scheduler config at the root (8x8 images)
    save_pixel_ddpm(path, classes=6) the same, class-conditional (5 labels and a null class)
    save_ldm(path)                   CompVis/ldm-celebahq-256: unet/, vqvae/, scheduler/ (latents 3x4x4)
    save_sd(path, "epsilon")         stable-diffusion-2-1(-base): tokenizer, text_encoder, unet, vae, scheduler
    save_dit(path)                   facebook/DiT-XL-2-256: transformer/, vae/, scheduler/ (10 classes)

(tiny_sd3.py builds the SD3 pipeline.) Decoded images are 3x8x8 for all of them.
"""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        sample_size=8,
    )


def save_pixel_ddpm(path: Path, classes: int | None = None) -> Path:
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        num_class_embeds=classes,
    ).save_pretrained(path)
    DDPMScheduler(num_train_timesteps=1000, clip_sample=True).save_pretrained(path)
    return path


def save_ldm(path: Path) -> Path:
    from diffusers import DDIMScheduler, UNet2DModel, VQModel

    torch.manual_seed(0)
    UNet2DModel(
        sample_size=4,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).save_pretrained(path / "unet")
    VQModel(
        in_channels=3,
        out_channels=3,
        latent_channels=3,
        block_out_channels=(8, 8),
        norm_num_groups=4,
        num_vq_embeddings=16,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    ).save_pretrained(path / "vqvae")
    DDIMScheduler(clip_sample=False).save_pretrained(path / "scheduler")
    return path


def save_sd(path: Path, prediction: str = "epsilon") -> Path:
    from conftest import tiny_clip_tokenizer
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer, vocab_size = tiny_clip_tokenizer(path / "tokenizer_files", max_length=8)
    tokenizer.save_pretrained(path / "tokenizer")
    torch.manual_seed(0)
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
            bos_token_id=0,
            eos_token_id=1,
        )
    ).save_pretrained(path / "text_encoder")
    UNet2DConditionModel(
        sample_size=4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).save_pretrained(path / "unet")
    tiny_vae().save_pretrained(path / "vae")
    DDIMScheduler(
        prediction_type=prediction,
        clip_sample=False,
        steps_offset=1,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
    ).save_pretrained(path / "scheduler")
    return path


def save_dit(path: Path) -> Path:
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(0)
    DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=4,
        patch_size=2,
        num_embeds_ada_norm=10,
    ).save_pretrained(path / "transformer")
    tiny_vae().save_pretrained(path / "vae")
    DDIMScheduler(clip_sample=False).save_pretrained(path / "scheduler")
    return path
