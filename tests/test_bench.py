"""The benchmark end to end at a tiny shape, and the parts its honesty rests on.

The figures of a benchmark are not asserted here (performance is judged by running it); what is
asserted: every output file exists and parses, n/a methods carry their reason, errors against
float64 are columns, the float64 probe is the reference's gradient, the trained regime's
extension keeps every logit, and the memory meter sees an allocation of known size.
"""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import run_python
from logitless import cli
from logitless.bench import accuracy, corpus, data, lm, methods, ops, report, runner, worker
from logitless.bench.measure import CPU_WORKER_ENV

TINY_LM = lm.LMConfig(vocab_size=256, width=16, layers=1, heads=2, context=32, batch=4, steps=20)


@pytest.fixture
def tiny_trained_regime(monkeypatch, tmp_path):
    """A byte-level LM (vocabulary 256) trained for a few steps on stdlib text, cached in tmp."""
    monkeypatch.setenv("LOGITLESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(lm, "DEFAULT_CONFIG", TINY_LM)
    text = "".join(corpus.texts(max_bytes=200_000)).encode("utf-8")
    monkeypatch.setattr(corpus, "token_ids", lambda vocab_size: torch.tensor(list(text)))


@pytest.mark.parametrize(
    ("regime", "methods"),
    [("random", ["logitless", "eager", "liger", "matmul"]), ("trained", ["eager", "liger"])],
)
def test_bench_end_to_end(regime, methods, tiny_trained_regime, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["bench", "--device", "cpu", "--n", "70", "--d", "40", "--v", "300", "--data", regime,
            "--methods", *methods, "--repeats", "2", "--sweep-v", "260", "520",
            "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0

    table = capsys.readouterr().out
    assert "x eager" in table and "x best peer" in table and "loss err" in table
    results = json.loads((out / "results.json").read_text())
    assert results["environment"]["shape"] == {"n": 70, "d": 40, "v": 300}
    assert results["environment"]["versions"]["torch"] == torch.__version__
    rows = {r["method"]: r for r in results["results"]}
    assert list(rows) == methods

    for name in {"logitless", "eager"} & set(methods):
        row = rows[name]
        assert row["reason"] == "", row["reason"]
        assert len(row["times_s"]) == 2 and row["peak_bytes"] is not None
        assert row["errors"]["loss"] < 1e-5
        assert row["errors"]["grad_e"] < 1e-4 and row["errors"]["grad_c"] < 1e-4
        assert f"{row['errors']['loss']:.1e}" in table
    assert rows["eager"]["time_vs_eager"] == 1.0
    if "matmul" in rows:
        assert rows["matmul"]["peak_bytes"] is None and rows["matmul"]["errors"] == {}
    if not torch.cuda.is_available():
        assert rows["liger"]["reason"] == "needs CUDA"
        assert "liger" in table and "n/a: needs CUDA" in table

    stats = results["data"]["softmax"]
    assert 0 < stats["fraction_above_threshold"] <= 1
    assert 0 < stats["mean_entropy"] <= stats["max_entropy"]
    if regime == "trained":
        notes = " ".join(results["data"]["notes"])
        assert "vocabulary 256 -> 300" in notes and "width 17 -> 40" in notes
        assert "softmax_before_extension" in results["data"]

    with (out / "results.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(methods) * 3  # the run's shape and two sweep points
    assert {r["v"] for r in csv_rows} == {"300", "260", "520"}
    assert all(r["commit"] and r["device"] == "cpu" for r in csv_rows)
    for plot in ("sweep_time.png", "sweep_memory.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failing_method_reports_its_error(tmp_path):
    shape = data.Shape(8, 4, 16)
    config = runner.BenchConfig(
        device=torch.device("cpu"), dtype=torch.float32, shape=shape, regime="random",
        methods=("eager",), op="loss+backward", repeats=1, warmup=0, out=tmp_path,
        sweep_vocabs=(),
    )  # fmt: skip
    case = runner.Case(shape, tmp_path / "missing.pt", repeats=1)
    [(result, _)] = runner._measure("eager", config, [case], tmp_path, "test")
    assert result.reason.startswith("failed: FileNotFoundError"), result.reason
    assert not result.ok and result.time_s is None


@pytest.mark.parametrize("task", ["cross-entropy", "logprobs", "distill"])
def test_float64_probe_is_the_reference_gradient(task, monkeypatch):
    """Block by block (three blocks here) and on the probe, the float64 reference equals
    autograd of the op's objective over all tokens at once."""
    shape = data.Shape(37, 11, 53)
    inputs = data.make_inputs("random", shape, torch.float32)
    extra, _ = ops.extra_inputs(task, shape.n, shape.v, torch.float32, teacher_d=13)
    tensors = {"e": inputs.e, "c": inputs.c, "targets": inputs.targets, **extra}
    probe = accuracy.Probe(torch.tensor([0, 5, 36]), torch.tensor([1, 7, 52]))
    x = {k: t.double() if t.is_floating_point() else t for k, t in tensors.items()}
    e, c = x["e"].requires_grad_(), x["c"].requires_grad_()
    loss = ops.objective(task, x, torch.float64)
    grad_e, grad_c = torch.autograd.grad(loss, (e, c))

    monkeypatch.setattr(accuracy, "BLOCK_BYTES", 8 * shape.v * 15)  # 15 rows a block
    ref = accuracy.float64_reference(task, tensors, probe)
    assert ref.loss == pytest.approx(loss.item(), rel=1e-12)
    torch.testing.assert_close(ref.grad_e, grad_e[probe.tokens], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ref.grad_c, grad_c[probe.vocab], rtol=1e-10, atol=1e-14)
    errors = ref.errors(loss.item() * 1.01, grad_e[probe.tokens], None)
    if task != "logprobs":  # terms >= 0: the loss's error is its relative error
        assert ref.term_size == pytest.approx(loss.item(), rel=1e-12)
    assert errors["loss"] == pytest.approx(0.01 * abs(loss.item()) / ref.term_size)
    assert errors["grad_e"] < 1e-12
    assert errors["grad_c"] is None


def test_extension_keeps_every_logit_of_the_model():
    gen = torch.Generator().manual_seed(3)
    e, c = torch.randn(29, 8, generator=gen), torch.randn(50, 8, generator=gen)
    counts = torch.randint(0, 100, (50,), generator=gen)
    wide_e, wide_c, notes = data.extend(e, c, counts, data.Shape(29, 24, 90))
    assert wide_e.shape == (29, 24) and wide_c.shape == (90, 24) and len(notes) == 2
    logits = wide_e.double() @ wide_c.double().T
    torch.testing.assert_close(logits[:, :50], e.double() @ c.double().T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="D > 8"):
        data.extend(e, c, counts, data.Shape(29, 8, 90))


def test_cpu_memory_meter_sees_each_allocation(tmp_path):
    """A worker-like process measures 96 MB, then 16 MB, then 96 MB buffers (within 3 MB)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak resident memory over a call needs Linux /proc")
    script = textwrap.dedent("""
        import torch
        from logitless.bench.measure import measure
        for mb in (96, 16, 96):
            m, _ = measure(lambda: torch.ones(mb * 2**18).add_(1), torch.device("cpu"),
                           warmup=1, repeats=2)
            print(m.peak_bytes / 2**20)
    """)
    done = run_python("-c", script, **CPU_WORKER_ENV)
    assert done.returncode == 0, done.stderr
    measured = [float(x) for x in done.stdout.split()]
    assert measured == pytest.approx([96, 16, 96], abs=3)


def test_first_call_memory_is_measured_beside_the_warm_one(tmp_path):
    """A call that fills a 64 MB cache once and then uses 16 MB: 80 MB first, 16 MB warm."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak resident memory over a call needs Linux /proc")
    script = textwrap.dedent("""
        import torch
        from logitless.bench.measure import measure
        cache = []
        def call():
            if not cache:
                cache.append(torch.ones(64 * 2**18))
            return torch.ones(16 * 2**18).add_(1).sum()
        for warmup in (1, 0):
            cache.clear()
            m, _ = measure(call, torch.device("cpu"), warmup=warmup, repeats=2)
            print(m.first_peak_bytes / 2**20, m.peak_bytes / 2**20)
    """)
    done = run_python("-c", script, **CPU_WORKER_ENV)
    assert done.returncode == 0, done.stderr
    measured = [float(x) for x in done.stdout.split()]
    assert measured == pytest.approx([80, 16, 80, 80], abs=6)  # + lazy first-call set-up


def test_cpu_timed_calls_follow_a_settling_call():
    """On the CPU the metered call returns what it frees to the system; the call after it faults
    its buffers in again and is not timed (a median of 2 held that cold call: eager measured
    10.6 and 6.7 ms, then 4.5-5.9 ms warm, at 256 x 64 x 4096)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak resident memory over a call needs Linux /proc")
    script = textwrap.dedent("""
        import torch
        from logitless.bench.measure import measure
        calls = []
        m, _ = measure(lambda: calls.append(1), torch.device("cpu"), warmup=1, repeats=3)
        print(len(calls), len(m.times_s))
    """)
    done = run_python("-c", script, **CPU_WORKER_ENV)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["6", "3"]  # warm-up, metered, settling, 3 timed


def test_cpu_matmul_floor_multiplies_in_float32():
    """A CPU's 16-bit matmuls are emulated, slower than the methods the floor bounds (21.9 ms
    against logitless's 11.5 at 256 x 64 x 4096 in float16): the floor multiplies in float32."""
    matmul = methods.METHODS["cross-entropy"]["matmul"]
    e, c = torch.randn(5, 8, dtype=torch.float16), torch.randn(7, 8, dtype=torch.float16)
    assert matmul.build()({"e": e, "c": c}).dtype == torch.float32


def test_working_memory_is_never_negative_or_zero():
    result = report.MethodResult("m", "peer", "", 8, 4, 16, peak_bytes=100, gradient_bytes=120)
    assert result.working_bytes is None and result.first_working_bytes is None
    result.peak_bytes, result.first_peak_bytes = 150, 300
    assert (result.working_bytes, result.first_working_bytes) == (30, 180)


def test_a_table_of_unavailable_methods_only_is_printed():
    """A table with no figures yet (its methods n/a, or the first one failed: the files are
    rewritten after every method) still prints each method with its reason."""
    results = [report.MethodResult("cce", "peer", "cut-cross-entropy", 8, 4, 16, "needs CUDA")]
    text = report.table(results, ["header"])
    assert "cce     n/a: needs CUDA" in text


def _worker_spec(tmp_path: Path, method: str, op: str, vocabs: list[int]) -> tuple[Path, list]:
    """A worker spec measuring `method` on one random case (N=8, D=4) per vocabulary size, and
    the files its results will be in."""
    cases = []
    for v in vocabs:
        shape = data.Shape(8, 4, v)
        inputs = data.make_inputs("random", shape, torch.float32)
        tensors = {"e": inputs.e, "c": inputs.c, "targets": inputs.targets}
        probe = accuracy.Probe.spread(shape.n, shape.v, torch.device("cpu"))
        path = runner._save_inputs(tensors, probe, tmp_path / f"inputs-{v}.pt")
        result = tmp_path / f"result-{v}.pt"
        cases.append(
            {"inputs": str(path), "result": str(result), "repeats": 1, "op": op, "label": str(v)}
        )
    spec = {"method": method, "device": "cpu", "warmup": 1, "threads": None, "cases": cases}
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    return spec_file, [Path(case["result"]) for case in cases]


def test_first_call_memory_only_for_the_worker_first_case(tmp_path):
    """A worker measures every table of a method in one process: only its first case's first
    call is the process's first call; a later case reports none rather than a warm one."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak resident memory over a call needs Linux /proc")
    spec_file, result_files = _worker_spec(tmp_path, "eager", "loss+backward", [16, 32])
    assert worker.main([str(spec_file)]) == 0
    first, second = (torch.load(path) for path in result_files)
    assert first["first_peak_bytes"] is not None
    assert second["peak_bytes"] is not None and second["first_peak_bytes"] is None


def test_each_case_compiles_its_shape_as_a_fresh_process_would(tmp_path):
    """torch.compile makes dynamic-shape code of the second shape it sees and reuses it for the
    third: each case of a worker compiles its own static graph, as at one shape in a run."""
    from torch._dynamo.utils import counters

    spec_file, _ = _worker_spec(tmp_path, "torch-compile", "loss", [50, 60, 70])
    torch.compiler.reset()
    graphs_before = counters["stats"]["unique_graphs"]
    assert worker.main([str(spec_file)]) == 0
    assert counters["stats"]["unique_graphs"] - graphs_before == 3


def test_small_ratios_keep_their_digits():
    ratios = [report._x(r) for r in (None, 1.0, 0.587, 0.0039886)]
    assert ratios == ["-", "1.00x", "0.59x", "0.004x"]


def test_cli_rejects_bad_options(capsys, tmp_path):
    for argv in (["bench", "--n", "0"], ["bench", "--methods", "nope"], ["bench", "--op", "x"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
    assert "invalid" in capsys.readouterr().err
    a_file = tmp_path / "table.txt"
    a_file.write_text("")
    for argv, expected in (  # each named before any method runs (tracebacks or waste before)
        (["--device", "banana"], "argument --device: not a torch device: 'banana'"),
        (["--device", "meta"], "argument --device: meta tensors hold no data"),
        (["--n", "abc"], "argument --n: must be an integer >= 1, got 'abc'"),
        (["--methods", "eager", "trl"], "--methods trl: not a method of --op loss+backward"),
        (["--out", str(a_file)], f"--out {a_file}: a file, not a folder"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["bench", *argv])
        assert exit_info.value.code == 2 and expected in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--op", "logprobs", "distill", "--methods", "trl"])
    assert "--op distill: none of --methods is one of its methods" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--op", "distill", "--data", "trained"])
    assert "random data regime only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--data", "trained", "--d", "8"])
    model = lm.DEFAULT_CONFIG
    expected = f"the trained regime needs V >= {model.vocab_size} and D >= {model.width}"
    assert expected in capsys.readouterr().err


def test_a_sweep_point_given_twice_is_measured_once():
    """A V given twice would put two results of each method in one sweep point, whose ratios are
    keyed by method name: eager came out at 0.84x eager."""
    parser, bench = cli._parsers()
    args = parser.parse_args(["bench", "--device", "cpu", "--sweep-v", "260", "520", "260"])
    [config] = cli._bench_configs(args, bench, "")
    assert config.sweep_vocabs == (260, 520)


def test_one_run_measures_several_tables(tmp_path, capsys):
    """Several ops in one run: one subfolder per table, one worker per method for all of them
    (none for a method that cannot run: filtering at float32)."""
    out = tmp_path / "out"
    argv = ["bench", "--device", "cpu", "--n", "40", "--d", "16", "--v", "100", "--methods",
            "eager", "matmul", "logitless-filtered", "--op", "loss", "loss+backward", "--repeats",
            "1", "--warmup", "0", "--sweep-v", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    progress = capsys.readouterr().err
    for op, folder in (("loss", "n40-d16-v100-random-loss"),
                       ("loss+backward", "n40-d16-v100-random-loss-backward")):  # fmt: skip
        results = json.loads((out / folder / "results.json").read_text())
        assert results["environment"]["op"] == op
        rows = {r["method"]: r for r in results["results"]}
        assert rows["eager"]["reason"] == "" and rows["eager"]["errors"]["loss"] < 1e-5
        assert "for 16-bit inputs" in rows["logitless-filtered"]["reason"]
        assert (rows["eager"]["errors"]["grad_e"] is not None) == (op == "loss+backward")
        assert f"eager: N=40 D=16 V=100 random {op}: " in progress
    assert progress.count("case(s) in one worker") == 2
    assert progress.rstrip().endswith(f"; results in {out}/")  # the folder of every table


def test_a_run_cut_off_keeps_the_methods_it_finished(tmp_path, monkeypatch):
    """Each table's files are written after every method, so a run stopped at a time limit (as
    on a lent GPU) still leaves the tables, errors included, of the methods before the stop."""
    measure = runner._measure

    def stop_at_matmul(name, *args, **kwargs):
        if name == "matmul":
            raise KeyboardInterrupt
        return measure(name, *args, **kwargs)

    monkeypatch.setattr(runner, "_measure", stop_at_matmul)
    out = tmp_path / "out"
    argv = ["bench", "--device", "cpu", "--n", "40", "--d", "16", "--v", "100", "--methods",
            "eager", "matmul", "--op", "loss+backward", "--repeats", "1", "--warmup", "0",
            "--sweep-v", "--out", str(out)]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    results = json.loads((out / "results.json").read_text())
    [row] = results["results"]
    assert row["method"] == "eager" and row["reason"] == ""
    assert row["errors"]["loss"] < 1e-5 and row["errors"]["grad_e"] < 1e-4
    assert "eager" in (out / "table.txt").read_text()


def test_logprobs_and_distill_ops_end_to_end(tmp_path, capsys):
    """Both ops in one run through the runner and a worker per method: each table's scalar is
    the float64 objective of the op on the very inputs (rebuilt here), within float32 rounding,
    and its ratios are the ratios of its own figures."""
    out = tmp_path / "out"
    shape = data.Shape(45, 24, 203)
    argv = ["bench", "--device", "cpu", "--n", str(shape.n), "--d", str(shape.d), "--v",
            str(shape.v), "--op", "logprobs", "distill", "--teacher-d", "40", "--methods",
            "eager", "logitless", "--repeats", "1", "--warmup", "0", "--out", str(out)]  # fmt: skip
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    tables = captured.out
    inputs = data.make_inputs("random", shape, torch.float32)
    for op in ("logprobs", "distill"):
        folder = f"n{shape.n}-d{shape.d}-v{shape.v}-random-{op}"  # the shape, not the preset's
        results = json.loads((out / folder / "results.json").read_text())
        assert results["environment"]["op"] == op
        assert results["environment"]["teacher_d"] == (40 if op == "distill" else None)
        extra, _ = ops.extra_inputs(ops.OPS[op].task, shape.n, shape.v, torch.float32, 40)
        x = {"e": inputs.e, "c": inputs.c, "targets": inputs.targets, **extra}
        x = {k: t.double() if t.is_floating_point() else t for k, t in x.items()}
        expected = ops.objective(ops.OPS[op].task, x, torch.float64).item()
        rows = {r["method"]: r for r in results["results"]}
        assert list(rows) == ["eager", "logitless"]  # the order of --methods
        for row in rows.values():
            assert row["reason"] == "", row["reason"]
            assert row["loss"] == pytest.approx(expected, rel=1e-5, abs=1e-6)
            assert row["errors"]["grad_e"] < 1e-4 and row["errors"]["grad_c"] < 1e-4
            assert row["time_s"] > 0 and row["peak_bytes"] is not None
            assert row["gradient_bytes"] == (shape.n + shape.v) * shape.d * 4
            assert row["time_vs_eager"] == pytest.approx(row["time_s"] / rows["eager"]["time_s"])
        assert ops.OPS[op].summary in tables
        for method in rows:  # a line when the first call is done, with the time so far
            assert f"{method}: N=45 D=24 V=203 random {op}: first call done (" in captured.err
