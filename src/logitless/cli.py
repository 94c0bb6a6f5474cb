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
    bench.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
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
        "--methods", nargs="+", choices=METHOD_NAMES, default=list(METHOD_NAMES),
        metavar="METHOD",
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
        "--repeats", type=_positive, help="measured calls per method (default: 3 CPU, 20 CUDA)"
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
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available here")
    cuda = device.type == "cuda"
    presets = list(dict.fromkeys(args.preset or ["gemma2-2b" if cuda else "cpu-default"]))
    if len(presets) > 1 and (args.n or args.d or args.v):
        parser.error("--n, --d and --v override one preset, not several")
    tables = [
        (preset, regime, op)
        for preset in presets
        for regime in dict.fromkeys(args.data)
        for op in dict.fromkeys(args.op)
    ]
    configs = []
    for preset, regime, op in tables:
        base = PRESETS[preset]
        shape = Shape(args.n or base.n, args.d or base.d, args.v or base.v)
        config = BenchConfig(
            device=device,
            dtype=DTYPES[args.dtype or ("bfloat16" if cuda else "float32")],
            shape=shape,
            regime=regime,
            methods=tuple(m for m in dict.fromkeys(args.methods) if m in METHODS[OPS[op].task]),
            op=op,
            repeats=args.repeats or (20 if cuda else 3),
            warmup=args.warmup if args.warmup is not None else (3 if cuda else 1),
            out=args.out
            if len(tables) == 1
            else args.out / f"{preset}-{regime}-{op.replace('+', '-')}",
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


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value
