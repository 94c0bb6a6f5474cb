"""One method measured in a fresh process: `python -m logitless.bench.worker SPEC.json`.

The spec names the method, device, warm-up count and CPU threads, and the cases: each an
inputs file written by the runner, its op and label, its number of timed calls, and the file to
write the result to (figures, the loss and the probed gradient rows, or the error the method
raised). A line on stderr after the first call of each case (which compiles, where a method
compiles) and after each case, starting with PROGRESS, says where the worker is, so that a long
case shows it is moving and a run cut off midway still shows how far it got.

Each case after the first starts from a reset compiler, so that a compiled method compiles its
shape as a fresh process would (not as dynamic-shape code, which is what torch.compile makes of a
second shape); its first-call memory is reported for the first case only, the one call in the
process that meets what the library allocates once.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch

from logitless.bench.measure import measure
from logitless.bench.methods import METHODS, LossFn
from logitless.bench.ops import OPS
from logitless.bench.report import mb_text

PROGRESS = "progress: "


def main(argv: list[str] | None = None) -> int:
    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    _start_libraries(torch.device(spec["device"]))
    built: dict[str, LossFn | Exception] = {}  # per task: the method's call, or why it has none
    fresh = True  # no case has called the method yet
    for case in spec["cases"]:
        task = OPS[case["op"]].task
        if task not in built:
            try:
                built[task] = METHODS[task][spec["method"]].build()
            except Exception as error:  # reported in place of every figure of the task
                built[task] = error
        loss_fn = built[task]
        if isinstance(loss_fn, Exception):
            result = {"error": _describe(loss_fn)}
        else:
            if not fresh:
                torch.compiler.reset()
            try:
                result = _run_case(loss_fn, case, spec, fresh)
            except Exception as error:
                result = {"error": _describe(error)}
            fresh = False
        torch.save(result, case["result"])
        _report(case["label"], result)
    return 0


def _start_libraries(device: torch.device) -> None:
    """One small matmul and backward, as the model before a loss layer would have run: the
    memory PyTorch and its BLAS take once per process (about 11 MB on a CPU) then does not count
    in any method's first call. A CUDA device becomes the current one, which the timing events
    and synchronizations use (a `--device cuda:1` would otherwise time GPU 0)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    x = torch.randn(256, 256, device=device, requires_grad=True)
    (x @ x).sum().backward()


def _report(label: str, result: dict) -> None:
    if "error" in result:
        summary = f"failed: {result['error']}"
    else:
        summary = f"{statistics.median(result['times_s']) * 1e3:.1f} ms"
        if result["peak_bytes"] is not None:
            summary += f", peak {mb_text(result['peak_bytes'])} MB"
    _progress(f"{label}: {summary}")


def _progress(message: str) -> None:
    print(f"{PROGRESS}{message}", file=sys.stderr, flush=True)


def _run_case(loss_fn: LossFn, case: dict, spec: dict, fresh: bool) -> dict:
    """The case's figures; its first call's memory only when `fresh`: the process's first call."""
    device = torch.device(spec["device"])
    method = METHODS[OPS[case["op"]].task][spec["method"]]
    data = torch.load(case["inputs"])
    inputs = {k: t.to(device) for k, t in data.items() if not k.startswith("probe_")}
    e, c = inputs["e"], inputs["c"]
    with_grad = OPS[case["op"]].backward and not method.time_only
    e.requires_grad_(with_grad)
    c.requires_grad_(with_grad)

    calls = []

    def call():
        with torch.set_grad_enabled(with_grad):
            loss = loss_fn(inputs)
            output = loss, torch.autograd.grad(loss, (e, c)) if with_grad else None
        if not calls:
            _progress(f"{case['label']}: first call done")
        calls.append(None)
        return output

    measurement, (loss, grads) = measure(
        call, device, warmup=spec["warmup"], repeats=case["repeats"]
    )
    memory = not method.time_only
    result = {
        "times_s": measurement.times_s,
        "peak_bytes": measurement.peak_bytes if memory else None,
        "first_peak_bytes": measurement.first_peak_bytes if memory and fresh else None,
        "memory_method": measurement.memory_method,
    }
    if not method.time_only:
        result["loss"] = loss.float().item()
    if grads is not None:
        result["grad_e"] = grads[0][data["probe_tokens"].to(device)].cpu()
        result["grad_c"] = grads[1][data["probe_vocab"].to(device)].cpu()
    return result


def _describe(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


if __name__ == "__main__":
    raise SystemExit(main())
