"""A tiny Stable Diffusion 3 pipeline, built and saved offline in a second (no downloads).

    pipe = tiny_sd3_pipeline()                     # in memory, seeded weights
    path = save_tiny_sd3(tmp_path / "sd3")         # a directory StableDiffusion3Pipeline.from_pretrained reads
    pipe = load_tiny_sd3(path)

Two CLIP text encoders (CLIPTextModelWithProjection from a tiny CLIPTextConfig) with hand-written
CLIPTokenizer files (a character vocabulary, no merges), no T5 (text_encoder_3=None, which SD3
replaces by zeros), a one-layer SD3Transformer2DModel and a one-level AutoencoderKL; the
scheduler is diffusers' FlowMatchEulerDiscreteScheduler (shift 3.0, as SD3 ships it) unless given.
Latents are (4, H/2, W/2) for (3, H, W) images: 16x16 images give D = 4*8*8 = 256.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import diffusers
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]
MAX_LENGTH = 16  # CLIP's 77 tokens are not needed for tests
LATENT_CHANNELS = 4
VAE_SCALE = 2  # one down-sampling in the VAE: latents are H/2 x W/2


def write_clip_tokenizer(directory: Path) -> Path:
    """vocab.json and merges.txt of a character-level CLIP BPE: every letter and digit, alone
    and word-final (``a</w>``), plus the two special tokens; no merges."""
    directory.mkdir(parents=True, exist_ok=True)
    symbols = list(string.ascii_lowercase + string.digits + string.punctuation)
    tokens = SPECIAL_TOKENS + symbols + [f"{c}</w>" for c in symbols]
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return directory


def clip_tokenizer(directory: Path) -> CLIPTokenizer:
    write_clip_tokenizer(directory)
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=MAX_LENGTH)


def clip_text_encoder(seed: int) -> CLIPTextModelWithProjection:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=32,
        hidden_act="gelu",
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_transformer(seed: int = 0) -> diffusers.SD3Transformer2DModel:
    torch.manual_seed(seed)
    return diffusers.SD3Transformer2DModel(
        sample_size=32,
        patch_size=1,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=64,  # the two CLIPs' hidden states side by side (32 + 32)
        pooled_projection_dim=64,  # the two CLIPs' pooled projections side by side
    ).eval()


def tiny_vae(seed: int = 0) -> diffusers.AutoencoderKL:
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    ).eval()


def tiny_sd3_pipeline(
    scheduler: diffusers.FlowMatchEulerDiscreteScheduler | None = None,
) -> diffusers.StableDiffusion3Pipeline:
    """The pipeline in memory; weights are fixed by seeds, so two calls build the same pipeline."""
    with tempfile.TemporaryDirectory(prefix="tiny_sd3_tokenizer_") as tokenizer_dir:
        tokenizer = clip_tokenizer(Path(tokenizer_dir))  # reads its files once, here
        tokenizer_2 = clip_tokenizer(Path(tokenizer_dir))
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=tiny_transformer(0),
        scheduler=scheduler or diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(0),
        text_encoder=clip_text_encoder(1),
        tokenizer=tokenizer,
        text_encoder_2=clip_text_encoder(2),
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_tiny_sd3(path: Path) -> Path:
    """Build the tiny pipeline and save it with save_pretrained; returns ``path``."""
    path = Path(path)
    tiny_sd3_pipeline().save_pretrained(path)
    return path


def load_tiny_sd3(path: Path, **kwargs) -> diffusers.StableDiffusion3Pipeline:
    """The saved pipeline, read offline (``kwargs`` go to from_pretrained, e.g. scheduler=...)."""
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(
        path, text_encoder_3=None, tokenizer_3=None, local_files_only=True, **kwargs
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latent_dim(height: int = 16, width: int = 16) -> int:
    """D of the latents for (height, width) images: what a GMM for this pipeline is built for."""
    return LATENT_CHANNELS * (height // VAE_SCALE) * (width // VAE_SCALE)
