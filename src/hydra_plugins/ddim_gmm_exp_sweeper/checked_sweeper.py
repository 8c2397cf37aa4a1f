"""Hydra's basic sweeper, checking every job of the sweep before the first one starts.

    hydra.sweeper._target_: hydra_plugins.ddim_gmm_exp_sweeper.checked_sweeper.CheckedSweeper  (conf/hydra/default.yaml)

Hydra loads sweepers only from the hydra_plugins namespace package; the checks are
ddim_gmm_exp.sweeper's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper


class CheckedSweeper(BasicSweeper):
    """BasicSweeper whose per-batch validation also resolves and checks each job and plans its repeats."""

    def __init__(self, max_batch_size: int | None = None, params: dict[str, str] | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.planned: list[dict[str, Any]] = []

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        from ddim_gmm_exp.sweeper import check_batch

        self.planned = check_batch(self.hydra_context.config_loader, self.config, batch, self.planned)
