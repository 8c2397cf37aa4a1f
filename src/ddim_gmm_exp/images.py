"""Images: float [0, 1] <-> uint8, PNG files by global sample index, grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats (B, C, H, W) -> uint8, rounding to the nearest level."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def png_path(sample_dir: Path, index: int) -> Path:
    return Path(sample_dir) / f"{index:06d}.png"


def save_png(image: torch.Tensor, path: Path) -> None:
    """One uint8 image (C, H, W) to PNG, written to a temporary name first so that a killed run
    never leaves a half-written file under the final name (resume trusts what exists)."""
    array = image.permute(1, 2, 0).cpu().numpy()
    if array.shape[2] == 1:
        array = array[:, :, 0]
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(array).save(tmp)
    tmp.replace(path)


def load_png(path: Path) -> torch.Tensor:
    """A PNG saved by :func:`save_png` -> uint8 (C, H, W)."""
    array = np.asarray(Image.open(path))
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def image_grid(images: torch.Tensor, pad: int = 1, min_tile: int = 32) -> torch.Tensor:
    """uint8 (B, C, H, W) -> one uint8 (C, rows*H, cols*W) grid, as square as possible.

    Tiles smaller than ``min_tile`` pixels are enlarged by an integer factor (nearest neighbour),
    so that 8x8 digits stay visible in the grid.
    """
    factor = max(1, min_tile // max(images.shape[-2:]))
    if factor > 1:
        images = images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    b, c, h, w = images.shape
    cols = math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    grid = torch.zeros(c, rows * (h + pad) + pad, cols * (w + pad) + pad, dtype=torch.uint8)
    for i in range(b):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid
