"""What the running process may use, and how its garbage collector is paced."""

from __future__ import annotations

import gc
import os


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity where the platform says), at least 1."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - platforms without affinity
        return os.cpu_count() or 1


def collect_less_often(gen0: int) -> tuple[int, int, int]:
    """Collect the young generation every ``gen0`` new objects at the most often (Python's
    default is 700). For work that makes many short-lived objects freed by reference
    counting, where collections find almost nothing. Returns the thresholds before, which
    ``gc.set_threshold(*before)`` restores."""
    before = gc.get_threshold()
    gc.set_threshold(max(before[0], gen0), *before[1:])
    return before
