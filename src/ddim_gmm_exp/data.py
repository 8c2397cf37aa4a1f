"""The predict dataset: global sample indices, and what each index means.

Index i of a run is sample i: its seed is ``data.seed + i`` (its own generator draws its initial
noise, every step's noise and its mixture components), its class label is ``labels[i % len]``
and its prompt ``prompts[i % len]``. Lightning's predict sampler shards the indices over ranks
without padding, so every index is sampled once, on whichever rank, with the same result.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from ddim_gmm_exp.errors import ConfigError


class SampleIndexDataset(Dataset):
    """The global indices still to be sampled."""

    def __init__(self, indices: Sequence[int]) -> None:
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> int:
        return self.indices[position]


def sample_seeds(indices: torch.Tensor, base_seed: int) -> list[int]:
    """The per-sample seeds of a batch of global indices."""
    return [base_seed + int(i) for i in indices]


def resolve_labels(labels: str | Sequence[int] | None, num_classes: int) -> list[int] | None:
    """'balanced' -> 0, 1, ..., C-1 repeated; a list -> itself (checked); None -> unconditional."""
    if labels is None:
        return None
    # the default: class i % C for sample i, so every class equally often only when num_samples is a
    # multiple of C (1005 samples of 10 classes: 101 of classes 0-4, 100 of 5-9; the runner warns)
    if labels == "balanced":
        return list(range(num_classes)) if num_classes else None
    if num_classes == 0:
        raise ConfigError(f"data.labels={labels!r} given but the model is unconditional: use data.labels=null")
    if isinstance(labels, str):
        raise ConfigError(f"data.labels={labels!r} is not allowed: use 'balanced', a list of class ids, or null")
    out = [int(x) for x in labels]
    bad = [x for x in out if not 0 <= x < num_classes]
    if not out or bad:
        raise ConfigError(f"data.labels has {bad or 'no labels'}: class ids must lie in [0, {num_classes - 1}]")
    return out


def read_prompts(path: str | None) -> list[str] | None:
    """One prompt a line (blank lines skipped), or None when no prompts file is given."""
    if path is None:
        return None
    file = Path(path)
    try:
        prompts = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"data.prompts_file={path!r} cannot be read: {err.strerror or err}") from err
    if not prompts:
        raise ConfigError(f"data.prompts_file={path!r} holds no prompts: write one prompt a line")
    return prompts


def labels_of(indices: torch.Tensor, labels: list[int] | None) -> torch.Tensor | None:
    if labels is None:
        return None
    return torch.tensor([labels[int(i) % len(labels)] for i in indices], dtype=torch.long)


def prompts_of(indices: torch.Tensor, prompts: list[str] | None) -> list[str] | None:
    if prompts is None:
        return None
    return [prompts[int(i) % len(prompts)] for i in indices]
