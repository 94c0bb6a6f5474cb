"""What a benchmark run leaves: the terminal table, results.csv, results.json and the sweep plots.

Ratios are taken against methods measured in the same run: eager PyTorch, and the best peer (the
fastest, and separately the least memory, among the peers that ran).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

MB = 2**20


@dataclass
class MethodResult:
    """One method on one shape: its figures, or why there are none ("n/a")."""

    method: str
    kind: str
    summary: str
    n: int
    d: int
    v: int
    reason: str = ""
    """Empty when the method ran; otherwise why it did not."""
    times_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    first_peak_bytes: int | None = None
    """The peak of the process's first call, where lazily allocated buffers show (None for the
    cases a worker measures after its first: their first call is not the process's)."""
    gradient_bytes: int = 0
    """What dE and dC take at the input dtype: the memory no method can avoid."""
    memory_method: str = ""
    loss: float | None = None
    errors: dict[str, float | None] = field(default_factory=dict)
    """Relative errors against the float64 reference: loss, grad_e and grad_c on the probe."""

    @property
    def ok(self) -> bool:
        return not self.reason

    @property
    def time_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None

    @property
    def working_bytes(self) -> int | None:
        """Peak memory beyond the gradients themselves (None where not measured)."""
        return _beyond(self.peak_bytes, self.gradient_bytes)

    @property
    def first_working_bytes(self) -> int | None:
        """The first call's peak memory beyond the gradients (None where not measured)."""
        return _beyond(self.first_peak_bytes, self.gradient_bytes)


def _beyond(peak: int | None, gradient_bytes: int) -> int | None:
    """Memory beyond the gradients; None when the meter saw less than the gradients themselves
    (on a tiny shape a CPU process reuses memory it already holds, which no rise shows)."""
    if peak is None or peak <= gradient_bytes:
        return None
    return peak - gradient_bytes


def ratios(results: list[MethodResult]) -> dict[str, dict[str, float | None]]:
    """Per method: time and working memory against eager and against the best peer."""
    peers = [r for r in results if r.ok and r.kind == "peer"]
    eager = next((r for r in peers if r.method == "eager"), None)
    best_time = min((r.time_s for r in peers), default=None)
    best_memory = min((r.working_bytes for r in peers if r.working_bytes is not None), default=None)

    def ratio(x, base):
        return None if x is None or base is None or base <= 0 else x / base

    return {
        r.method: {
            "time_vs_eager": ratio(r.time_s, eager and eager.time_s),
            "time_vs_best_peer": ratio(r.time_s, best_time),
            "memory_vs_eager": ratio(r.working_bytes, eager and eager.working_bytes),
            "memory_vs_best_peer": ratio(r.working_bytes, best_memory),
        }
        for r in results
    }


def table(results: list[MethodResult], header: list[str]) -> str:
    """The terminal table: figures, ratios and errors side by side, n/a rows with their reason."""
    columns = [
        ("method", "<"), ("time ms", ">"), ("x eager", ">"), ("x best peer", ">"),
        ("peak MB", ">"), ("work MB", ">"), ("x eager", ">"), ("x best peer", ">"),
        ("1st work MB", ">"),
        ("loss err", ">"), ("dE err", ">"), ("dC err", ">"),
    ]  # fmt: skip
    rows = []
    rel = ratios(results)
    for r in results:
        if not r.ok:
            rows.append([r.method, f"n/a: {r.reason}"])
            continue
        q = rel[r.method]
        rows.append([
            r.method, _num(r.time_s and r.time_s * 1e3), _x(q["time_vs_eager"]),
            _x(q["time_vs_best_peer"]), mb_text(r.peak_bytes), mb_text(r.working_bytes),
            _x(q["memory_vs_eager"]), _x(q["memory_vs_best_peer"]), mb_text(r.first_working_bytes),
            _err(r.errors.get("loss")), _err(r.errors.get("grad_e")), _err(r.errors.get("grad_c")),
        ])  # fmt: skip
    full = [row for row in rows if len(row) == len(columns)]
    # max of a list: a table whose methods are all n/a (so far) has no full row
    widths = [max([len(c[0]), *(len(row[i]) for row in full)]) for i, c in enumerate(columns)]
    widths[0] = max(widths[0], *(len(row[0]) for row in rows))

    def line(cells):
        if len(cells) < len(columns):  # an n/a row: its reason spans the figure columns
            return f"{cells[0]:<{widths[0]}}  {cells[1]}"
        cells = zip(cells, columns, widths, strict=True)
        return "  ".join(f"{cell:{align}{width}}" for cell, (_, align), width in cells)

    body = [line([c[0] for c in columns]), *(line(row) for row in rows)]
    legend = [f"  {r.method:<{widths[0]}}  {r.summary}" for r in results]
    return "\n".join([*header, *body, "", "methods:", *legend])


def write_json(path: Path, environment: dict, data: dict, main, sweep) -> None:
    def records(results: list[MethodResult]):
        rel = ratios(results)
        return [
            {**dataclasses.asdict(r), "time_s": r.time_s, "working_bytes": r.working_bytes,
             "first_working_bytes": r.first_working_bytes,
             **rel[r.method]}
            for r in results
        ]  # fmt: skip

    sweep_records = [rec for group in _by_shape(sweep) for rec in records(group)]
    payload = {"environment": environment, "data": data, "results": records(main),
               "sweep": sweep_records}  # fmt: skip
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


CSV_FIELDS = [
    "date", "commit", "device", "device_name", "torch", "logitless", "dtype", "op", "regime",
    "case", "n", "d", "v", "method", "kind", "status", "reason", "time_ms", "time_ms_min",
    "time_ms_max", "repeats", "peak_mb", "working_mb", "first_peak_mb", "first_working_mb",
    "gradients_mb", "loss", "loss_rel_err",
    "grad_e_rel_err", "grad_c_rel_err", "time_vs_eager", "time_vs_best_peer", "memory_vs_eager",
    "memory_vs_best_peer",
]  # fmt: skip


def write_csv(path: Path, environment: dict, main, sweep) -> None:
    versions = environment["versions"]
    common = {
        "date": environment["date"], "commit": environment["commit"],
        "device": environment["device"], "device_name": environment["device_name"],
        "torch": versions["torch"], "logitless": versions["logitless"],
        "dtype": environment["dtype"], "op": environment["op"], "regime": environment["regime"],
    }  # fmt: skip
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        for case, results in [("main", main)] + [("sweep", g) for g in _by_shape(sweep)]:
            rel = ratios(results)
            for r in results:
                times_ms = [t * 1e3 for t in r.times_s]
                writer.writerow({
                    **common, **rel[r.method], "case": case, "n": r.n, "d": r.d, "v": r.v,
                    "method": r.method, "kind": r.kind, "status": "ok" if r.ok else "n/a",
                    "reason": r.reason, "time_ms": r.time_s and r.time_s * 1e3,
                    "time_ms_min": min(times_ms, default=None),
                    "time_ms_max": max(times_ms, default=None), "repeats": len(times_ms),
                    "peak_mb": _in_mb(r.peak_bytes), "working_mb": _in_mb(r.working_bytes),
                    "first_peak_mb": _in_mb(r.first_peak_bytes),
                    "first_working_mb": _in_mb(r.first_working_bytes),
                    "gradients_mb": _in_mb(r.gradient_bytes), "loss": r.loss,
                    "loss_rel_err": r.errors.get("loss"), "grad_e_rel_err": r.errors.get("grad_e"),
                    "grad_c_rel_err": r.errors.get("grad_c"),
                })  # fmt: skip


def plot_sweep(out: Path, sweep: list[MethodResult], title: str) -> list[Path]:
    """sweep_time.png and sweep_memory.png: each method against the vocabulary size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    vocabs = sorted({r.v for r in sweep})
    names = list(dict.fromkeys(r.method for r in sweep))
    missing = dict.fromkeys(f"{r.method} ({r.reason})" for r in sweep if not r.ok)
    bound = sorted({(r.v, _in_mb(r.gradient_bytes)) for r in sweep if r.gradient_bytes})
    paths = []
    for quantity, label, value in (
        ("time", "time per call (ms)", lambda r: r.time_s and r.time_s * 1e3),
        ("memory", "peak memory over the inputs (MB)", lambda r: _in_mb(r.peak_bytes)),
    ):
        fig, ax = plt.subplots(figsize=(8, 5.5))
        for name, marker in zip(names, "osD^v<>ph*Xd", strict=False):
            points = [(r.v, value(r)) for r in sweep if r.method == name and r.ok]
            points = [(v, y) for v, y in points if y is not None and y > 0]
            if points:
                vocab, values = zip(*points, strict=True)
                style = "--" if name == "matmul" else "-"
                ax.plot(vocab, values, style, marker=marker, markerfacecolor="none", label=name)
        if quantity == "memory" and bound:
            vocab, values = zip(*bound, strict=True)
            ax.plot(vocab, values, ":", color="black", label="dE + dC (lower bound)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(vocabs, [f"{v / 1024:g}k" for v in vocabs])
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
        ax.minorticks_off()
        ax.set_xlabel("vocabulary size V")
        ax.set_ylabel(label)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
        if missing:
            fig.subplots_adjust(bottom=0.2)
            fig.text(0.02, 0.02, "not shown: " + "; ".join(missing), fontsize=7, wrap=True)
        path = out / f"sweep_{quantity}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def _by_shape(results: list[MethodResult]) -> list[list[MethodResult]]:
    groups: dict[tuple[int, int, int], list[MethodResult]] = {}
    for r in results:
        groups.setdefault((r.n, r.d, r.v), []).append(r)
    return list(groups.values())


def _in_mb(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / MB


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def mb_text(nbytes: int | None) -> str:
    """Bytes as the tables print them: MB to 3 significant digits ("-" for none)."""
    return _num(_in_mb(nbytes))


def _x(r: float | None) -> str:
    """A ratio: two decimals, or two significant digits below 0.1 (0.004x, not 0.00x)."""
    if r is None:
        return "-"
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"


def _err(e: float | None) -> str:
    return "-" if e is None else f"{e:.1e}"
