"""Worker entry points for launch tests: module-level (the launcher spawns its workers, which
import them by name) and in a module that imports little, so they start fast."""

from __future__ import annotations

import os
import signal


def fail_on_rank_1() -> int:
    """Rank 1 fails as a training might (a NaN loss); the other ranks return their rank."""
    rank = int(os.environ["RANK"])
    if rank == 1:
        raise FloatingPointError(f"loss is NaN on rank {rank}")
    return rank


def killed_on_rank_1() -> int:
    """Rank 1 dies as a process killed by the kernel (out of memory) would: no exception."""
    rank = int(os.environ["RANK"])
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return rank
