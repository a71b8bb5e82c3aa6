"""CPU time of the benchmark's processes, from /proc, to report what each one spends per request.

A process's CPU time is user + system of all its threads (``/proc/PID/stat`` fields 14 and 15), plus
that of its live descendants (nginx's worker under its master). wrk is the bench's own child, reaped
when it exits, so its time is the growth of ``RUSAGE_CHILDREN`` across its run.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

_TICK = os.sysconf("SC_CLK_TCK")
# The load generator, measured from the bench's own rusage rather than /proc.
WRK = "wrk"

T = TypeVar("T")


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may hold spaces: split after its closing one.
    return text.rpartition(")")[2].split()


def _children(pid: int) -> list[int]:
    """Direct children, from the per-thread children lists (Linux 3.5+); a fallback scan of /proc."""
    found: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            found += [int(child) for child in (task / "children").read_text().split()]
        return found
    except OSError:
        pass
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat_fields(int(entry.name))[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def process_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (0 for one that is gone)."""
    total = 0.0
    pending = [pid]
    while pending:
        current = pending.pop()
        try:
            fields = _stat_fields(current)
        except OSError:
            continue
        # Fields 14 (utime) and 15 (stime) of stat(5), counted from field 3 (state) here.
        total += (int(fields[11]) + int(fields[12])) / _TICK
        pending += _children(current)
    return total


def _children_rusage() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU seconds per named process over a stretch of time (one load phase)."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self._pids = dict(pids)

    def snapshot(self) -> dict[str, float]:
        seconds = {name: process_seconds(pid) for name, pid in self._pids.items()}
        seconds[WRK] = _children_rusage()
        return seconds

    def measure(self, phase: Callable[[], T]) -> tuple[T, dict[str, float]]:
        """Run ``phase``; its result and the CPU seconds each process spent meanwhile."""
        before = self.snapshot()
        result = phase()
        after = self.snapshot()
        return result, {name: max(0.0, after[name] - before[name]) for name in after}


def per_request_us(seconds: Mapping[str, float], requests: int) -> dict[str, float]:
    """CPU microseconds per completed request, per process."""
    if requests <= 0:
        return dict.fromkeys(seconds, 0.0)
    return {name: value * 1e6 / requests for name, value in seconds.items()}
