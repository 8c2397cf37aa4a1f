"""Count the reads of tensor values back to the host: each one is a GPU synchronisation.

    with HostReads() as reads:
        x = scheduler.step(out, t, x).prev_sample
    assert reads.count == 0, reads.calls

A read is any ``aten._local_scalar_dense`` (what ``Tensor.item``, ``float(t)``, ``int(t)``,
``bool(t)`` and ``t.__index__`` reach, also from inside torch) and any ``Tensor.tolist`` or
``Tensor.numpy`` call (which read memory directly, without the dispatcher). It counts reads of
CPU tensors too, so a CPU run shows the reads a GPU run would stall on; on a GPU,
``torch.cuda.set_sync_debug_mode("error")`` is the direct check.
"""

from __future__ import annotations

import traceback
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_DIRECT = ("tolist", "numpy")


class HostReads(TorchDispatchMode):
    """A context manager that counts host reads (``count``) and keeps where each came from (``calls``)."""

    def __init__(self, active: bool = True) -> None:
        super().__init__()
        self.active = active  # False: count from when it is set True (e.g. at the first model call)
        self.calls: list[str] = []
        self._originals: dict[str, Any] = {}

    @property
    def count(self) -> int:
        return len(self.calls)

    def _record(self, what: str) -> None:
        if not self.active:
            return
        frames = [f for f in traceback.extract_stack()[:-2] if "host_reads.py" not in f.filename]
        where = next((f for f in reversed(frames) if "/torch/" not in f.filename), frames[-1])
        self.calls.append(f"{what} at {where.filename}:{where.lineno} ({where.name})")

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten._local_scalar_dense.default:
            self._record("item")
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> HostReads:
        for name in _DIRECT:
            original = getattr(torch.Tensor, name)
            self._originals[name] = original

            def counted(tensor: torch.Tensor, *args: Any, _name: str = name, _original: Any = original) -> Any:
                self._record(_name)
                return _original(tensor, *args)

            setattr(torch.Tensor, name, counted)
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        self._originals = {}
