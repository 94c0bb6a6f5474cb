"""Time and peak memory of one call, as SPEC.md's "How we measure" defines them.

CUDA: CUDA-event time, and the rise of `torch.cuda.max_memory_allocated` over the call above what
was allocated before it (inputs, and nothing else left over). CPU: wall time, and the rise of the
process's peak resident memory (VmHWM, reset before each call through /proc/self/clear_refs) over
its resident memory just before the call. For that rise to be every byte the call held, freed
memory must leave the process: the benchmark starts its CPU workers with glibc's mmap threshold
fixed (`CPU_WORKER_ENV`), so every large buffer is mapped on allocation and unmapped on free.
That slows a method that allocates many mid-size buffers (TRL's log-probs took 1.6x its time),
so on the CPU the warm-up and one more call are metered, and the timed calls after them run
with glibc's reuse of freed memory back (`CpuMeter.time_only`).
"""

from __future__ import annotations

import ctypes
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

_METERED_MMAP_THRESHOLD = 64 * 1024
CPU_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(_METERED_MMAP_THRESHOLD)}
"""Environment of CPU workers: buffers of 64 KiB and more are mmap'ed and returned on free."""

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
"""glibc's mallopt parameters (malloc.h)."""
_DYNAMIC_MMAP_THRESHOLD_MAX = 32 * 2**20
"""The highest mmap threshold glibc's dynamic scheme reaches on 64-bit (its trim threshold
follows at twice it)."""
_DEFAULT_TRIM_THRESHOLD = 128 * 1024

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass
class Measurement:
    times_s: list[float]
    peak_bytes: int | None
    """The largest rise of memory over one call after the warm-up (CUDA: each timed call; CPU:
    the call before them); None where it cannot be measured."""
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
    """Run `call` `warmup` times, then (on the CPU) once more for its memory and once to settle,
    then `repeats` timed times; return the last output too.

    The first call's memory is measured whether or not it is a warm-up call. The metered call
    returns all it frees to the system (`CPU_WORKER_ENV`), so the call after it faults its
    buffers in again: it is not timed, or a median of few calls would hold one cold call."""
    meter = CudaMeter(device) if device.type == "cuda" else CpuMeter()
    first_peak = None
    for i in range(warmup):
        if i == 0:
            meter.start()
        call()
        if i == 0:
            first_peak = meter.stop()[1]
    times, peaks, output = [], [], None
    separate = meter.separates_memory()  # CPU: one more call, metered and not timed
    for i in range(repeats + separate):
        output = None  # what the previous call returned is consumed, as in a training loop
        meter.start()
        output = call()
        elapsed, peak = meter.stop()
        peaks.append(peak)
        if separate and i == 0:
            meter.time_only()
            output = None
            output = call()  # refills glibc's pool for reuse, as the timed calls find it
        else:
            times.append(elapsed)
    metered = [peak for peak in peaks if peak is not None]
    peak_bytes = max(metered) if metered else None
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

    def separates_memory(self) -> bool:
        """Every call is metered on CUDA (its caching allocator does not slow it)."""
        return False


class CpuMeter:
    """Wall time and the rise of peak resident memory over a call (needs Linux /proc)."""

    def __init__(self) -> None:
        self.glibc = _glibc()
        if self.glibc is not None:  # `CPU_WORKER_ENV`'s setting again, after an earlier time_only
            self.glibc.mallopt(_M_MMAP_THRESHOLD, _METERED_MMAP_THRESHOLD)
            self.glibc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
            self.glibc.malloc_trim(0)  # and what it kept for reuse returned
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
        if self.baseline is None:  # time only
            return elapsed, None
        peak = _status_bytes("VmHWM")
        return elapsed, None if peak is None else peak - self.baseline

    def separates_memory(self) -> bool:
        """Whether a call metered before the timed ones can be followed by `time_only` (glibc)."""
        return self.baseline is not None and self.glibc is not None

    def time_only(self) -> None:
        """From now on time calls only, with glibc keeping freed memory for reuse (mmap and trim
        thresholds at its dynamic scheme's 64-bit ceiling), as in a process without
        `CPU_WORKER_ENV`."""
        self.glibc.mallopt(_M_MMAP_THRESHOLD, _DYNAMIC_MMAP_THRESHOLD_MAX)
        self.glibc.mallopt(_M_TRIM_THRESHOLD, 2 * _DYNAMIC_MMAP_THRESHOLD_MAX)
        self.resettable, self.baseline = False, None


def _glibc() -> ctypes.CDLL | None:
    """glibc, for its mallopt and malloc_trim; None elsewhere."""
    try:
        glibc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return glibc if hasattr(glibc, "mallopt") and hasattr(glibc, "malloc_trim") else None


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
