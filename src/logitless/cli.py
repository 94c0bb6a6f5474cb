"""The `logitless` command. `logitless bench` measures logitless against every peer, in one run."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from logitless import __version__
from logitless.bench.data import REGIMES, Shape, check_shape
from logitless.bench.methods import METHOD_NAMES, METHODS
from logitless.bench.ops import OPS
from logitless.bench.runner import PRESETS, SWEEP_VOCABS, BenchConfig, run_all

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, bench = _parsers()
    args = parser.parse_args(argv)
    if args.command != "bench":
        parser.print_help()
        return 2
    run_all(_bench_configs(args, bench, "logitless " + shlex.join(argv)))
    return 0


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    """The `logitless` parser and its `bench` subcommand's."""
    parser = argparse.ArgumentParser(prog="logitless", description=__doc__)
    parser.add_argument("--version", action="version", version=f"logitless {__version__}")
    commands = parser.add_subparsers(dest="command")
    bench = commands.add_parser(
        "bench",
        help="measure logitless against every peer on this machine",
        description="Time, memory and accuracy of logitless and its peers on identical inputs, "
        "each method in a fresh process; a table, results.csv/json and sweep plots under --out.",
    )
    bench.add_argument(
        "--device", type=_device, help="torch device (default: cuda if available, else cpu)"
    )
    bench.add_argument(
        "--dtype", choices=DTYPES, help="input dtype (default: bfloat16 on CUDA, float32 on CPU)"
    )
    bench.add_argument(
        "--preset",
        choices=PRESETS,
        nargs="+",
        help="shape N x D x V (default: gemma2-2b on CUDA, cpu-default elsewhere): "
        + ", ".join(f"{k} = {s.n}x{s.d}x{s.v}" for k, s in PRESETS.items()),
    )
    for dim in ("n", "d", "v"):
        bench.add_argument(f"--{dim}", type=_positive, help=f"{dim.upper()}, overriding the preset")
    bench.add_argument(
        "--data", choices=REGIMES, nargs="+", default=["random"],
        help="data regime (default: random)",
    )  # fmt: skip
    bench.add_argument(
        "--methods", nargs="+", choices=METHOD_NAMES, metavar="METHOD",
        help="methods to measure (default: all of each op's): "
        + "; ".join(f"{task}: {', '.join(methods)}" for task, methods in METHODS.items()),
    )  # fmt: skip
    bench.add_argument(
        "--op", choices=OPS, nargs="+", default=["loss+backward"],
        help="each call (default: loss+backward): "
        + "; ".join(f"{op.name}: {op.summary}" for op in OPS.values()),
    )  # fmt: skip
    bench.add_argument(
        "--teacher-d", type=_positive, help="the distill op's teacher hidden size (default: 2 D)"
    )
    bench.add_argument(
        "--repeats",
        type=_positive,
        help="timed calls per method (default: 2 CPU, after one call metered for memory; 20 "
        "CUDA, each metered)",
    )
    bench.add_argument(
        "--warmup", type=_non_negative, help="unmeasured calls first (default: 1 CPU, 3 CUDA)"
    )
    bench.add_argument(
        "--sweep-v", type=_positive, nargs="*", metavar="V",
        help="vocabulary sizes of the plot sweep (default: 32k 64k 128k 256k on CUDA, none on "
        "the CPU, where each point costs every torch.compile'd method a recompilation); "
        "none skips it",
    )  # fmt: skip
    bench.add_argument(
        "--threads", type=_positive, help="CPU threads of every process (default: PyTorch's)"
    )
    bench.add_argument(
        "--out", type=Path, default=Path("bench-out"),
        help="output folder (default: bench-out); with several presets, regimes or ops, one "
        "subfolder PRESET-REGIME-OP per table",
    )  # fmt: skip
    return parser, bench


def _bench_configs(args, parser: argparse.ArgumentParser, command: str) -> list[BenchConfig]:
    """One config per (preset, data regime, op) asked for: the tables of one run."""
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out}: a file, not a folder")
    ops = list(dict.fromkeys(args.op))
    for method in dict.fromkeys(args.methods or ()):
        if not any(method in METHODS[OPS[op].task] for op in ops):
            parser.error(f"--methods {method}: not a method of --op {' '.join(ops)}")
    presets = list(dict.fromkeys(args.preset or ["gemma2-2b" if cuda else "cpu-default"]))
    if len(presets) > 1 and (args.n or args.d or args.v):
        parser.error("--n, --d and --v override one preset, not several")
    tables = [
        (preset, regime, op)
        for preset in presets
        for regime in dict.fromkeys(args.data)
        for op in ops
    ]
    configs = []
    for preset, regime, op in tables:
        base = PRESETS[preset]
        shape = Shape(args.n or base.n, args.d or base.d, args.v or base.v)
        name = preset if shape == base else f"n{shape.n}-d{shape.d}-v{shape.v}"
        config = BenchConfig(
            device=device,
            dtype=DTYPES[args.dtype or ("bfloat16" if cuda else "float32")],
            shape=shape,
            regime=regime,
            methods=tuple(
                m for m in dict.fromkeys(args.methods or METHOD_NAMES) if m in METHODS[OPS[op].task]
            ),
            op=op,
            repeats=args.repeats or (20 if cuda else 2),
            warmup=args.warmup if args.warmup is not None else (3 if cuda else 1),
            out=args.out
            if len(tables) == 1
            else args.out / f"{name}-{regime}-{op.replace('+', '-')}",
            sweep_vocabs=tuple(
                dict.fromkeys(SWEEP_VOCABS if args.sweep_v is None and cuda else args.sweep_v or ())
            ),  # each point once: a point's ratios are keyed by method
            threads=args.threads,
            preset=None if shape != base else preset,
            command=command,
            teacher_d=args.teacher_d,
        )
        if not config.methods:
            parser.error(f"--op {op}: none of --methods is one of its methods")
        if config.task == "distill" and regime != "random":
            parser.error("--op distill: its teacher exists in the random data regime only")
        for checked in (config.shape, *config.sweep_shapes()):
            try:
                check_shape(config.regime, checked)
            except ValueError as error:
                sweep = "" if checked == shape else " (sweep)"
                parser.error(f"--data {config.regime}{sweep}: {error}")
        configs.append(config)
    return configs


def _device(text: str) -> torch.device:
    """A device this machine has (argparse names --device in the error)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r}") from None
    if device.type == "meta":
        raise argparse.ArgumentTypeError("meta tensors hold no data to measure")
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and not (backend is not None and backend.is_available()):
        raise argparse.ArgumentTypeError(f"{device.type} is not available here")
    return device


def _positive(text: str) -> int:
    return _at_least(1, text)


def _non_negative(text: str) -> int:
    return _at_least(0, text)


def _at_least(low: int, text: str) -> int:
    """An integer >= low (argparse names the option in the error)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
    return value
