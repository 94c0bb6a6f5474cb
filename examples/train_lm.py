"""Train a small causal LM on real text with and without logitless; plot both loss curves.

A randomly initialized transformers Llama learns the Python standard library's sources
(`logitless.bench.corpus`: a 32k-token BPE trained on them). The model is small next to its
vocabulary, so the loss layer dominates: eager PyTorch materializes the N x V logits, their
log-softmax and their gradient in every step, logitless none of them. Each run is a fresh
process, from the same seed on the same batches in the same order, so the two loss curves
differ only by floating-point rounding and the peak resident memory of each is its own.

    PYTHONPATH=src python examples/train_lm.py --plot docs/train_lm.png  # the README's figure:
                                                                          # ~10 min on 2 cores
    PYTHONPATH=src python examples/train_lm.py --steps 20   # a quick look

Prints the figures, and with --plot writes a PNG of both loss curves.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VOCAB = 32768
RUNS = {"eager": "transformers as is (eager PyTorch loss)", "logitless": "logitless.transformers"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--hidden", type=int, default=128, help="model width")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, help="write both loss curves to this PNG")
    parser.add_argument("--run", choices=RUNS, help=argparse.SUPPRESS)  # one training process
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.run:
        args.result.write_text(json.dumps(train(args)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "batches.pt"
        torch.save(batches(args.steps, args.batch, args.length, args.seed), data)
        results = {}
        for run in RUNS:
            result = Path(tmp) / f"{run}.json"
            command = [sys.executable, __file__, *sys.argv[1:], "--run", run, "--data", str(data)]
            subprocess.run([*command, "--result", str(result)], check=True)
            results[run] = json.loads(result.read_text())
    report(results, args)
    if args.plot:
        plot(results, args)


def batches(steps: int, batch: int, length: int, seed: int) -> torch.Tensor:
    """(steps, batch, length) windows of the corpus's token ids at seeded random offsets."""
    from logitless.bench import corpus

    ids = corpus.token_ids(VOCAB)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (steps, batch, 1), generator=gen)
    return ids[starts + torch.arange(length)]


def train(args: argparse.Namespace) -> dict:
    """One training run in this process: its losses, peak memory and time."""
    import transformers

    import logitless.transformers

    transformers.logging.set_verbosity_error()
    data = torch.load(args.data)
    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 32,
        max_position_embeddings=args.length,
    )
    model = transformers.LlamaForCausalLM(config).train()
    if args.run == "logitless":
        logitless.transformers.patch(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / warmup)
            * (0.55 + 0.45 * math.cos(math.pi * min(step, args.steps) / args.steps))
        ),
    )

    baseline = _reset_peak_rss()
    losses, start = [], time.perf_counter()
    for step, tokens in enumerate(data):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 25 == 0 or step == len(data) - 1:
            print(f"{args.run:>9} step {step:4d}  loss {losses[-1]:.4f}", flush=True)
    return {
        "losses": losses,
        "seconds": time.perf_counter() - start,
        "peak_mb": _peak_rss_mb() - baseline,
        "baseline_mb": baseline,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _reset_peak_rss() -> float:
    """Restart the kernel's peak-RSS count (Linux) and return the current RSS in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    return _status_mb("VmHWM")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _tail_mean(losses: list[float], count: int = 20) -> float:
    tail = losses[-count:]
    return sum(tail) / len(tail)


def report(results: dict[str, dict], args: argparse.Namespace) -> None:
    tokens = args.batch * args.length
    print(
        f"\nLlama, {results['eager']['parameters'] / 1e6:.1f}M parameters, vocabulary {VOCAB}, "
        f"width {args.hidden}, {args.layers} layers; {args.steps} steps of {args.batch} x "
        f"{args.length} = {tokens} tokens (logits {tokens * VOCAB * 4 / 2**20:.0f} MB in float32)"
    )
    print(
        f"{'run':<10}{'final loss':>11}{'last-20 mean':>14}{'set-up MB':>11}{'peak +MB':>10}"
        f"{'time s':>8}"
    )
    for run, result in results.items():
        losses = result["losses"]
        print(
            f"{run:<10}{losses[-1]:>11.4f}{_tail_mean(losses):>14.4f}"
            f"{result['baseline_mb']:>11.0f}{result['peak_mb']:>10.0f}{result['seconds']:>8.0f}"
        )
    gap = max(abs(a - b) for a, b in zip(*(r["losses"] for r in results.values()), strict=True))
    print(f"largest loss difference between the runs: {gap:.2e}")
    print(f"peak memory above the set-up model and data: {_ratio(results):.1f}x lower")


def _ratio(results: dict[str, dict]) -> float:
    return results["eager"]["peak_mb"] / results["logitless"]["peak_mb"]


def plot(results: dict[str, dict], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, difference) = plt.subplots(
        2, 1, figsize=(7, 5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    for (run, result), style in zip(results.items(), ("-", "--"), strict=True):
        label = f"{RUNS[run]}: peak memory +{result['peak_mb']:.0f} MB"
        curves.plot(result["losses"], style, linewidth=1.2, label=label)
    steps = range(len(results["eager"]["losses"]))
    gap = [b - a for a, b in zip(*(r["losses"] for r in results.values()), strict=True)]
    difference.plot(steps, gap, color="black", linewidth=0.8)
    curves.set_ylabel("training loss")
    curves.set_title(
        f"Llama {results['eager']['parameters'] / 1e6:.1f}M, vocabulary {VOCAB}, "
        f"{args.batch}x{args.length} tokens/step, CPU",
        fontsize=10,
    )
    curves.legend(fontsize=8)
    curves.grid(alpha=0.3)
    difference.set_ylabel("logitless - eager", fontsize=8)
    difference.set_xlabel("step")
    difference.grid(alpha=0.3)
    figure.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.plot, dpi=90)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
