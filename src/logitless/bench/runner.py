"""A benchmark run: build the inputs once, measure each method in its own process, report.

Every method reads the same inputs file, so all get identical tensors; each runs in a fresh
worker process (`logitless.bench.worker`), so one method's imports, compiled code, caches or
crash never touch another's figures. Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

import logitless
from logitless.bench import accuracy, lm, ops, report
from logitless.bench import worker as worker_module
from logitless.bench.data import Inputs, Shape, make_inputs
from logitless.bench.measure import CPU_WORKER_ENV
from logitless.bench.methods import METHODS
from logitless.bench.ops import OPS

PRESETS = {
    "cpu-default": Shape(2048, 512, 32768),
    "gemma2-2b": Shape(8192, 2304, 256000),
    "llama3-8b": Shape(8192, 4096, 128256),
    "qwen2.5-7b": Shape(8192, 3584, 152064),
}
SWEEP_VOCABS = (32768, 65536, 131072, 262144)
CPU_SWEEP_ND = (128, 128)
"""(N, D) of the vocabulary sweep on CPU, small enough to be cheap; on GPUs the run's own."""
SWEEP_REPEATS = 3
"""Timed calls per sweep point (after the warm-up): a plot needs fewer than the table."""
PACKAGES = ("torch", "triton", "cut-cross-entropy", "liger-kernel", "numpy", "matplotlib")


@dataclass(frozen=True)
class BenchConfig:
    device: torch.device
    dtype: torch.dtype
    shape: Shape
    regime: str
    methods: tuple[str, ...]
    op: str
    repeats: int
    warmup: int
    out: Path
    sweep_vocabs: tuple[int, ...]
    threads: int | None = None
    preset: str | None = None
    command: str = ""
    teacher_d: int | None = None
    """The distill op's teacher hidden size (default: twice the student's D)."""

    @property
    def task(self) -> str:
        return OPS[self.op].task

    def teacher_width(self, shape: Shape) -> int:
        return self.teacher_d or 2 * shape.d

    def sweep_shapes(self) -> list[Shape]:
        n, d = (self.shape.n, self.shape.d)
        if self.device.type == "cpu":
            n, d = min(n, CPU_SWEEP_ND[0]), min(d, CPU_SWEEP_ND[1])
        return [Shape(n, d, v) for v in self.sweep_vocabs]


@dataclass(frozen=True)
class Case:
    """One shape a worker measures: its inputs file, the op, and how many timed calls."""

    shape: Shape
    inputs: Path
    repeats: int
    op: str = "loss+backward"
    label: str = ""
    """How the worker's progress lines name this case."""


@dataclass
class _Table:
    """One config's part of a run: its cases (its shape first, then its sweep), data, and the
    results of its methods on its shape (`main`) and on the sweep."""

    config: BenchConfig
    cases: list[Case]
    reference: accuracy.Reference
    data: dict
    environment: dict
    main: list[report.MethodResult] = field(default_factory=list)
    sweep: list[report.MethodResult] = field(default_factory=list)


def run(config: BenchConfig) -> list[report.MethodResult]:
    """Measure every method of `config`, write the report files, print the table."""
    return run_all([config])[0]


def run_all(configs: list[BenchConfig]) -> list[list[report.MethodResult]]:
    """Measure every method for each config (one table each) and write every table's files.

    The configs share device, dtype, warm-up and threads; each method name runs in one worker
    process over the cases of every config that measures it (a name means that op's method of
    that name), so imports are paid once per method (each case compiles afresh, as in a fresh
    process), and inputs shared by several configs (the same shape, data and op task) are built
    once.
    """
    began = time.perf_counter()
    first = configs[0]
    if first.threads:
        torch.set_num_threads(first.threads)
    names = list(dict.fromkeys(name for config in configs for name in config.methods))
    with tempfile.TemporaryDirectory(prefix="logitless-bench-") as tmp_name:
        tmp = Path(tmp_name)
        tables = _prepare(configs, tmp)
        if first.device.type == "cuda":
            torch.cuda.empty_cache()
        for i, name in enumerate(names):
            measuring = [table for table in tables if name in table.config.methods]
            cases = [case for table in measuring for case in table.cases]
            measured = iter(_measure(name, first, cases, tmp, f"[{i + 1}/{len(names)}] {name}"))
            for table in measuring:
                (result, output), *swept = [next(measured) for _ in table.cases]
                if result.ok and result.kind != "floor":
                    result.errors = table.reference.errors(
                        result.loss, output.get("grad_e"), output.get("grad_c")
                    )
                table.main.append(result)
                table.sweep += [r for r, _ in swept]
                _write_files(table, began)  # a run cut off keeps every method it finished

    for table in tables:
        _write_outputs(table, began)
    out = Path(os.path.commonpath([config.out for config in configs]))  # every table's folder
    _progress(f"done in {time.perf_counter() - began:.0f} s; results in {out}/")
    return [table.main for table in tables]


def _prepare(configs: list[BenchConfig], tmp: Path) -> list[_Table]:
    """Each config's inputs (built once per shape, data regime and op task), reference, cases."""
    built: dict[tuple, tuple[Path, accuracy.Reference, dict]] = {}
    tables = []
    for number, config in enumerate(configs):
        environment = _environment(config)
        name = _case_label(config)
        key = (config.regime, config.shape, config.task, config.teacher_width(config.shape))
        if key not in built:
            _progress(
                f"logitless bench: {config.shape}, {_dtype_name(config.dtype)}, "
                f"{config.regime} data, {config.task}, on {environment['device_name']}"
            )
            _progress("building the inputs and the float64 reference")
            inputs = make_inputs(config.regime, config.shape, config.dtype, config.device)
            tensors, notes = _op_tensors(config, config.shape, inputs)
            probe = accuracy.Probe.spread(config.shape.n, config.shape.v, inputs.e.device)
            reference = accuracy.float64_reference(config.task, tensors, probe)
            data = _describe_data(config, inputs, probe)
            data["notes"] += notes
            path = _save_inputs(tensors, probe, tmp / f"main-{len(built)}.pt")
            built[key] = (path, reference, data)
            del inputs, tensors
        path, reference, data = built[key]
        cases = [Case(config.shape, path, config.repeats, config.op, name)]
        if config.sweep_vocabs:
            vocabs = ", ".join(map(str, config.sweep_vocabs))
            _progress(f"building the sweep's inputs: V = {vocabs}")
            cases += [
                Case(
                    shape,
                    _sweep_inputs(config, shape, tmp / f"table-{number}"),
                    min(config.repeats, SWEEP_REPEATS),
                    config.op,
                    f"{name} sweep V={shape.v}",
                )
                for shape in config.sweep_shapes()
            ]
        tables.append(_Table(config, cases, reference, data, environment))
    return tables


def _op_tensors(
    config: BenchConfig, shape: Shape, inputs: Inputs
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Every tensor the op's methods get (e, c, targets and the op's others), and notes."""
    extra, notes = ops.extra_inputs(
        config.task, shape.n, shape.v, config.dtype, config.teacher_width(shape)
    )
    tensors = {"e": inputs.e, "c": inputs.c, "targets": inputs.targets}
    return {**tensors, **{k: t.to(inputs.e.device) for k, t in extra.items()}}, notes


def _case_label(config: BenchConfig) -> str:
    return f"{config.preset or config.shape} {config.regime} {config.op}"


def _write_files(table: _Table, began: float) -> str:
    """table.txt, results.json and results.csv of the methods measured so far; the table."""
    config, environment = table.config, table.environment
    environment["wall_time_s"] = round(time.perf_counter() - began, 1)
    environment["load_average_end"] = os.getloadavg()
    config.out.mkdir(parents=True, exist_ok=True)
    text = report.table(table.main, _header(config, environment, table.data))
    (config.out / "table.txt").write_text(text + "\n")
    report.write_json(config.out / "results.json", environment, table.data, table.main, table.sweep)
    report.write_csv(config.out / "results.csv", environment, table.main, table.sweep)
    return text


def _write_outputs(table: _Table, began: float) -> None:
    """The table (stdout and table.txt), results.json, results.csv and the sweep plots."""
    print(_write_files(table, began))
    config, environment, sweep = table.config, table.environment, table.sweep
    if not sweep:
        return
    title = (
        f"{config.op}, N={sweep[0].n} D={sweep[0].d}, {_dtype_name(config.dtype)}, "
        f"{config.regime} data, {environment['device_name']}"
    )
    try:
        report.plot_sweep(config.out, sweep, title)
    except ModuleNotFoundError as missing:
        _progress(f"no sweep plots: {missing.name} is not installed (the CSV and JSON have it)")


def _sweep_inputs(config: BenchConfig, shape: Shape, folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    inputs = make_inputs(config.regime, shape, config.dtype, config.device)
    tensors, _ = _op_tensors(config, shape, inputs)
    probe = accuracy.Probe.spread(shape.n, shape.v, inputs.e.device)
    return _save_inputs(tensors, probe, folder / f"sweep-{shape.v}.pt")


def _measure(
    name: str,
    config: BenchConfig,
    cases: list[Case],
    tmp: Path,
    prefix: str,
) -> list[tuple[report.MethodResult, dict]]:
    """Run the method `name` of each case's op over `cases` in one worker process; n/a results
    where it cannot run.

    Returns each case's result, in the order of `cases`, with the worker's raw output (which
    holds the probed gradient rows). `config` gives the device, dtype, warm-up and threads.
    """
    itemsize = torch.empty((), dtype=config.dtype).element_size()
    results, runnable = [], []
    for case in cases:
        method = METHODS[OPS[case.op].task][name]
        shape = case.shape
        result = report.MethodResult(
            method.name, method.kind, method.summary, shape.n, shape.d, shape.v,
            gradient_bytes=(shape.n + shape.v) * shape.d * itemsize
            if OPS[case.op].backward and not method.time_only else 0,
        )  # fmt: skip
        result.reason = method.unavailable(config.device, config.dtype) or ""
        results.append(result)
        if result.ok:
            runnable.append(case)
    for reason in dict.fromkeys(r.reason for r in results if not r.ok):
        _progress(f"{prefix}: n/a: {reason}")
    if not runnable:
        return [(result, {}) for result in results]

    _progress(f"{prefix}: {len(runnable)} case(s) in one worker")
    began = time.perf_counter()
    outputs = iter(_run_worker(name, config, runnable, tmp))
    measured = []
    for result in results:
        output = next(outputs) if result.ok else {}
        measured.append((result, output))
        if not result.ok:
            continue
        if "error" in output:
            result.reason = f"failed: {output['error']}"
            continue
        result.times_s = output["times_s"]
        result.peak_bytes = output["peak_bytes"]
        result.first_peak_bytes = output.get("first_peak_bytes")
        result.memory_method = output["memory_method"]
        result.loss = output.get("loss")
    _progress(f"{prefix}: done in {time.perf_counter() - began:.0f} s")
    return measured


def _run_worker(name: str, config: BenchConfig, cases: list[Case], tmp: Path) -> list[dict]:
    result_files = [tmp / f"{name}-{i}.result.pt" for i in range(len(cases))]
    spec = {
        "method": name,
        "device": str(config.device),
        "warmup": config.warmup,
        "threads": config.threads,
        "cases": [
            {
                "inputs": str(case.inputs), "result": str(result), "repeats": case.repeats,
                "op": case.op, "label": case.label,
            }
            for case, result in zip(cases, result_files, strict=True)
        ],
    }  # fmt: skip
    spec_file = tmp / f"{name}.spec.json"
    spec_file.write_text(json.dumps(spec))
    env = dict(os.environ)
    package_root = str(Path(logitless.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    if config.device.type == "cpu":
        env.update(CPU_WORKER_ENV)
    last_line = "no output"
    began = time.perf_counter()
    with subprocess.Popen(
        [sys.executable, "-m", "logitless.bench.worker", str(spec_file)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as worker:
        for line in worker.stderr:
            if line.startswith(worker_module.PROGRESS):
                done = line.removeprefix(worker_module.PROGRESS).strip()
                so_far = time.perf_counter() - began
                _progress(f"      {name}: {done} ({so_far:.0f} s so far)")
            elif line.strip():
                last_line = line.strip()
    return [
        torch.load(path) if path.exists()
        else {"error": f"worker exited with code {worker.returncode}: {last_line}"}
        for path in result_files
    ]  # fmt: skip


def _save_inputs(tensors: dict[str, torch.Tensor], probe: accuracy.Probe, path: Path) -> Path:
    probes = {"probe_tokens": probe.tokens, "probe_vocab": probe.vocab}
    torch.save({k: v.cpu() for k, v in {**tensors, **probes}.items()}, path)
    return path


def _describe_data(config: BenchConfig, inputs: Inputs, probe: accuracy.Probe) -> dict:
    """The regime, how it was built, and its softmax statistics (also before any extension)."""
    data = {
        "regime": config.regime,
        "notes": inputs.notes,
        "softmax": asdict(accuracy.softmax_statistics(inputs, probe.tokens)),
    }
    model = lm.DEFAULT_CONFIG
    native = Shape(config.shape.n, model.width, model.vocab_size)
    if config.regime == "trained" and native != config.shape:
        unextended = make_inputs("trained", native, config.dtype, config.device)
        data["softmax_before_extension"] = {
            "shape": str(native),
            **asdict(accuracy.softmax_statistics(unextended, probe.tokens)),
        }
    return data


def _header(config: BenchConfig, environment: dict, data: dict) -> list[str]:
    stats = data["softmax"]
    lines = [
        f"logitless bench  {config.op}  {config.shape}  {_dtype_name(config.dtype)}  "
        f"{config.regime} data  ({config.preset or 'custom shape'})",
        f"device: {environment['device_name']} ({environment['device']}, "
        f"{environment['threads']} threads)  torch {environment['versions']['torch']}  "
        f"commit {environment['commit']}  {environment['date']}",
        f"op: {OPS[config.op].summary}",
        *(f"data: {note}" for note in data["notes"]),
        f"softmax: {_softmax_line(stats)}",
    ]
    if "softmax_before_extension" in data:
        before = data["softmax_before_extension"]
        lines.append(f"softmax before extension ({before['shape']}): {_softmax_line(before)}")
    lines.append(
        "time: median of "
        f"{config.repeats} after {config.warmup} warm-up; memory: {_memory_method(config)}; "
        "work = peak - gradients (1st: the process's first call, - where its worker ran an "
        "earlier table first; - where below the meter's reach); err = relative error vs float64 "
        "(dE, dC on a probe; the loss's relative to its mean |per-token term|)"
    )
    return [*lines, ""]


def _softmax_line(stats: dict) -> str:
    return (
        f"{100 * stats['fraction_above_threshold']:.2f}% of entries > 2^-12, mean entropy "
        f"{stats['mean_entropy']:.2f} nats (uniform: {stats['max_entropy']:.2f})"
    )


def _memory_method(config: BenchConfig) -> str:
    if config.device.type == "cuda":
        return "rise of torch.cuda.max_memory_allocated over the call"
    return (
        "rise of peak resident memory over a call after the warm-up, each method in a fresh "
        "process whose freed buffers leave it (the timed calls after it reuse them, as glibc "
        "does by default)"
    )


def _environment(config: BenchConfig) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "command": config.command,
        "device": str(config.device),
        "device_name": _device_name(config.device),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {"logitless": logitless.__version__, **_versions()},
        "dtype": _dtype_name(config.dtype),
        "op": config.op,
        "op_summary": OPS[config.op].summary,
        "teacher_d": config.teacher_width(config.shape) if config.task == "distill" else None,
        "regime": config.regime,
        "preset": config.preset,
        "shape": asdict(config.shape),
        "repeats": config.repeats,
        "warmup": config.warmup,
        "lm": asdict(lm.DEFAULT_CONFIG) if config.regime == "trained" else None,
        "sweep": {
            "shapes": [asdict(shape) for shape in config.sweep_shapes()],
            "repeats": min(config.repeats, SWEEP_REPEATS),
        },
        "load_average_start": os.getloadavg(),
    }


def _versions() -> dict[str, str | None]:
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    versions["torch"] = torch.__version__
    return versions


def _git_commit() -> str:
    source = Path(logitless.__file__).resolve().parent
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=source, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return described.stdout.strip() or "unknown"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
