"""Where the Triton backend's time goes on a GPU, and which buffer size and tiles serve it best.

    python benchmarks/tune.py [--preset gemma2-2b llama3-8b] [--buffers-mb 64 32 128]

On the benchmark's trained regime in bfloat16, per preset: the time and peak memory of the loss
and of loss+backward, exact and filtered (the bench's filtered methods' budget), at each size of
the backward's buffer for the logits' gradient; the GPU kernels of one loss and of one exact
loss+backward by total time (torch.profiler), and how long the GPU waited between them, with
what the host was doing during the longest waits; the
tiles the autotuner chose, with each candidate's time; one cuBLAS matmul of the logits' shape as
the floor. One line per figure, printed as it is measured, so that a run cut off still says what
it found.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch.autograd import DeviceType

from logitless import linear_cross_entropy
from logitless.backends import triton_backend
from logitless.bench import data
from logitless.bench.methods import FILTER_EPS
from logitless.bench.runner import PRESETS
from logitless.kernels.lse_backward import lse_backward_tuned
from logitless.kernels.lse_forward import lse_forward_tuned


def median_ms(step, repeats: int) -> tuple[float, float]:
    """(median milliseconds of `step` after one warm-up, peak MB it allocated above the start)."""
    step()
    times = []
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**20


def report_tuning(seen: list[dict]) -> None:
    """Each config's time in every autotuning run not reported yet (Triton keeps the last run's
    per kernel): how far apart the candidate tiles are on this device."""
    for label, tuned in (("forward", lse_forward_tuned), ("backward", lse_backward_tuned)):
        timings = getattr(tuned(), "configs_timings", None)
        if not timings or any(timings is reported for reported in seen):
            continue
        seen.append(timings)
        for config, measured in sorted(timings.items(), key=lambda item: _first(item[1])):
            print(f"  tuning {label}: {_first(measured) * 1e3:8.1f} us  {config}", flush=True)


def _first(measured: float | list[float]) -> float:
    return measured[0] if isinstance(measured, list | tuple) else measured


def study(preset: str, buffers_mb: list[int], repeats: int) -> None:
    """Print the figures of one preset."""
    inputs = data.make_inputs("trained", PRESETS[preset], torch.bfloat16, "cuda")
    e, c, targets = inputs.e, inputs.c, inputs.targets
    name = f"{preset} {PRESETS[preset]} bf16 trained"

    def loss_backward(filter_eps: float | None) -> None:
        ex, cx = e.detach().requires_grad_(), c.detach().requires_grad_()
        linear_cross_entropy(ex, cx, targets, impl="triton", filter_eps=filter_eps).backward()

    seen: list[dict] = []
    ms, _ = median_ms(lambda: e @ c.T, repeats)
    print(f"{name}: matmul {ms:.2f} ms", flush=True)
    with torch.no_grad():
        ms, mb = median_ms(lambda: linear_cross_entropy(e, c, targets, impl="triton"), repeats)
    print(f"{name}: loss {ms:.2f} ms, {mb:.0f} MB", flush=True)
    report_tuning(seen)
    with torch.no_grad():
        profile_one(f"{name}: one loss", lambda: linear_cross_entropy(e, c, targets, impl="triton"))
    for buffer_mb in buffers_mb:
        triton_backend.LOGIT_GRAD_BUFFER_BYTES = buffer_mb * 2**20
        for filter_eps in (None, FILTER_EPS):
            ms, mb = median_ms(lambda f=filter_eps: loss_backward(f), repeats)
            mode = "exact" if filter_eps is None else "filtered"
            print(
                f"{name}: loss+backward {mode}, buffer {buffer_mb} MiB: {ms:.2f} ms, "
                f"peak {mb:.0f} MB",
                flush=True,
            )
            report_tuning(seen)
    triton_backend.LOGIT_GRAD_BUFFER_BYTES = buffers_mb[0] * 2**20
    profile_one(
        f"{name}: one exact loss+backward, buffer {buffers_mb[0]} MiB", lambda: loss_backward(None)
    )


def profile_one(label: str, step) -> None:
    """The GPU kernels of one call of `step` by total time, and the GPU's waits between them."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profile:
        step()
        torch.cuda.synchronize()
    print(f"{label}: kernels")
    print(profile.key_averages().table(sort_by="cuda_time_total", row_limit=10), flush=True)
    report_idle(profile.events())


def report_idle(events, top: int = 6) -> None:
    """How long the GPU waited between kernels in one profiled call, and its longest waits with
    what the host was doing meanwhile (the innermost CPU ops, synchronizations included, that
    cover most of each wait)."""
    kernels = sorted(
        (event for event in events if event.device_type == DeviceType.CUDA),
        key=lambda event: event.time_range.start,
    )
    if not kernels:
        return
    gaps, busy_until, last = [], kernels[0].time_range.end, kernels[0]
    for kernel in kernels[1:]:  # kernels may overlap (memcpys, other streams)
        if kernel.time_range.start > busy_until:
            begin, end = busy_until, kernel.time_range.start
            gaps.append((end - begin, begin, end, last.name, kernel.name))
        if kernel.time_range.end > busy_until:
            busy_until, last = kernel.time_range.end, kernel
    span = kernels[-1].time_range.end - kernels[0].time_range.start
    idle = sum(gap[0] for gap in gaps)
    print(f"  GPU idle between kernels: {idle / 1e3:.2f} of {span / 1e3:.2f} ms", flush=True)
    host = [event for event in events if event.device_type == DeviceType.CPU]
    for length, begin, end, before, after in sorted(gaps, reverse=True)[:top]:
        spanning = sorted(
            (e for e in host if _overlap(e, begin, end) >= length / 2),
            key=lambda e: e.time_range.end - e.time_range.start,
        )
        doing = ", ".join(dict.fromkeys(e.name for e in spanning[:3])) or "(no op spans it)"
        print(f"  idle {length:8.0f} us after {before[:40]} before {after[:40]}: host in {doing}")


def _overlap(event, begin: float, end: float) -> float:
    return min(event.time_range.end, end) - max(event.time_range.start, begin)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", nargs="+", default=["gemma2-2b", "llama3-8b"])
    default_mb = triton_backend.LOGIT_GRAD_BUFFER_BYTES // 2**20
    parser.add_argument(
        "--buffers-mb",
        nargs="+",
        type=int,
        default=list(dict.fromkeys([default_mb, 32, 128])),
        help="sizes of the backward's buffer to time; the first is profiled (default: the "
        "library's, then 32 and 128)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), flush=True)
    for preset in args.preset:
        study(preset, args.buffers_mb, args.repeats)
    for label, tuned in (("forward", lse_forward_tuned), ("backward", lse_backward_tuned)):
        for key, config in tuned().cache.items():
            print(f"autotuned {label} {key}: {config}", flush=True)


if __name__ == "__main__":
    main()
