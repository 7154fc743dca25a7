"""Where a training step's time goes: seconds spent in named parts (teacher, rollout, loss) as shares of the wall
time since the last report, logged by the trainer as `xkd/<part>_time_share`.

Imports torch only. On CUDA a part's end waits for the device (one synchronize per timed part), so the seconds are
the device's, not the time to launch kernels.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class TimeShares:
    """Accumulates seconds per part; `shares()` turns them into shares of the window and opens a new one."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._since: float | None = None

    def open(self) -> None:
        """Start the window at the first step after a report (a no-op when it is open)."""
        if self._since is None:
            self._since = time.perf_counter()

    @contextmanager
    def timed(self, part: str, device: torch.device | None = None) -> Iterator[None]:
        """Add the seconds of the block to `part` (after waiting for `device` when it is a CUDA device)."""
        self.open()
        started = time.perf_counter()
        try:
            yield
        finally:
            if device is not None and device.type == "cuda":
                torch.cuda.synchronize(device)
            self.seconds[part] += time.perf_counter() - started

    def shares(self, parts: tuple[str, ...]) -> dict[str, float]:
        """{'<part>_time_share': seconds / wall seconds of the window} for each of `parts` (0 for a part not timed);
        empty before any step. Starts a new window."""
        if self._since is None:
            return {}
        elapsed = max(time.perf_counter() - self._since, 1e-9)
        logs = {f"{part}_time_share": min(self.seconds[part] / elapsed, 1.0) for part in parts}
        self._reset()
        return logs
