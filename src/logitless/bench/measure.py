"""Time and peak memory of one call, as SPEC.md's "How we measure" defines them.

CUDA: CUDA-event time, and the rise of `torch.cuda.max_memory_allocated` over the call above what
was allocated before it (inputs, and nothing else left over). CPU: wall time, and the rise of the
process's peak resident memory (VmHWM, reset before each call through /proc/self/clear_refs) over
its resident memory just before the call. For that rise to be every byte the call held, freed
memory must leave the process: the benchmark starts its CPU workers with glibc's mmap threshold
fixed (`CPU_WORKER_ENV`), so every large buffer is mapped on allocation and unmapped on free.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

CPU_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
"""Environment of CPU workers: buffers of 64 KiB and more are mmap'ed and returned on free."""

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Measurement:
    times_s: list[float]
    peak_bytes: int | None
    """The largest rise of memory over one timed call; None where it cannot be measured."""
    first_peak_bytes: int | None
    """The rise of memory over the first call (a warm-up call when there is one): in a process
    that has called nothing else, what a user meets once, lazily allocated library buffers
    included."""
    memory_method: str

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


def measure(
    call: Callable[[], object], device: torch.device, *, warmup: int, repeats: int
) -> tuple[Measurement, object]:
    """Run `call` `warmup` times, then `repeats` measured times; return the last output too.

    The first call's memory is measured whether or not it is a warm-up call."""
    meter = CudaMeter(device) if device.type == "cuda" else CpuMeter()
    first_peak = None
    for i in range(warmup):
        if i == 0:
            meter.start()
        call()
        if i == 0:
            first_peak = meter.stop()[1]
    times, peaks, output = [], [], None
    for _ in range(repeats):
        output = None  # what the previous call returned is consumed, as in a training loop
        meter.start()
        output = call()
        elapsed, peak = meter.stop()
        times.append(elapsed)
        peaks.append(peak)
    peak_bytes = None if None in peaks else max(peaks)
    if not warmup:
        first_peak = peaks[0] if peaks else None
    return Measurement(times, peak_bytes, first_peak, meter.method), output


class CudaMeter:
    method = "rise of torch.cuda.max_memory_allocated over the call"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.begin = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.before = torch.cuda.memory_allocated(self.device)
        self.begin.record()

    def stop(self) -> tuple[float, int]:
        self.end.record()
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - self.before
        return self.begin.elapsed_time(self.end) / 1e3, peak


class CpuMeter:
    """Wall time and the rise of peak resident memory over a call (needs Linux /proc)."""

    def __init__(self) -> None:
        self.resettable = _reset_peak_rss()
        self.baseline = _status_bytes("VmRSS")
        if self.baseline is None:
            self.method = "not measured (needs Linux /proc)"
        elif self.resettable:
            self.method = "rise of peak resident memory (VmHWM) over the call"
        else:
            self.method = "peak resident memory (VmHWM, not resettable) over the post-warm-up RSS"

    def start(self) -> None:
        if self.resettable:
            _reset_peak_rss()
            self.baseline = _status_bytes("VmRSS")
        self.began = time.perf_counter()

    def stop(self) -> tuple[float, int | None]:
        elapsed = time.perf_counter() - self.began
        peak = _status_bytes("VmHWM")
        return elapsed, None if peak is None or self.baseline is None else peak - self.baseline


def _reset_peak_rss() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status in bytes, None where there is no /proc."""
    try:
        status = _STATUS.read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return None
