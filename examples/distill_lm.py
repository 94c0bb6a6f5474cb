"""Distil a tiny causal teacher LM into a smaller student (another hidden size) on the CPU, with
logitless's distillation loss against the same steps through both heads' full logits.

    PYTHONPATH=src python examples/distill_lm.py [--steps 6] [--vocab 16384] [--divergence jsd]

Each variant runs in a fresh process from the same initial weights and data (random tokens):
the frozen teacher's and the student's hidden states, the divergence at a temperature with a
little hard-label cross-entropy mixed in, and an AdamW step of the student. The parent prints
each step's loss both ways and their largest difference, and each variant's peak resident
memory over a step (forward and backward) above the memory before it (Linux: /proc/self).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
from torch import nn

import logitless
from logitless.bench.measure import CpuMeter
from logitless.reference import reference_linear_distillation_loss

TEMPERATURE, HARD_WEIGHT, LEARNING_RATE = 2.0, 0.1, 1e-3


class TinyLM(nn.Module):
    """Embedding, pre-norm causal transformer layers, final norm, lm_head without bias."""

    def __init__(self, vocab: int, hidden: int, layers: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        layer = nn.TransformerEncoderLayer(
            hidden, heads, 4 * hidden, dropout=0.0, batch_first=True, norm_first=True
        )
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(input_ids.shape[1])
        return self.norm(self.body(self.embed(input_ids), mask=mask, is_causal=True))


def run(variant: str, args) -> dict:
    """The steps of one variant: losses and peak memory of a step."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = TinyLM(args.vocab, hidden=128, layers=2, heads=4).requires_grad_(False)
    with torch.no_grad():  # a confident teacher: logits of standard deviation about 3
        teacher.lm_head.weight.mul_(3.0 / teacher.lm_head.weight.std() / 128**0.5)
    student = TinyLM(args.vocab, hidden=64, layers=1, heads=2)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LEARNING_RATE)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    options = {
        "divergence": args.divergence, "temperature": TEMPERATURE, "hard_weight": HARD_WEIGHT,
        "shift": 1,
    }  # fmt: skip
    if variant == "logitless":
        loss_fn = logitless.LinearDistillationLoss(**options)
    else:  # eager PyTorch as users write it: both heads' float32 logits, then log_softmax
        loss_fn = lambda *heads: reference_linear_distillation_loss(  # noqa: E731
            *heads, dtype=torch.float32, **options
        )
    losses, peak_mb, meter = [], 0.0, CpuMeter()
    for _ in range(args.steps):
        optimizer.zero_grad(set_to_none=True)
        meter.start()
        with torch.no_grad():
            teacher_hidden = teacher.hidden_states(input_ids)
        loss = loss_fn(
            student.hidden_states(input_ids), student.lm_head.weight,
            teacher_hidden, teacher.lm_head.weight, input_ids,
        )  # fmt: skip
        loss.backward()
        peak_mb = max(peak_mb, (meter.stop()[1] or 0) / 2**20)
        losses.append(loss.item())
        optimizer.step()
    return {"losses": losses, "peak_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--divergence", choices=("forward_kl", "reverse_kl", "jsd"),
                        default="forward_kl")  # fmt: skip
    parser.add_argument("--variant", choices=("eager", "logitless"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run(args.variant, args)))
        return
    results = {}
    for variant in ("eager", "logitless"):
        out = subprocess.run(
            [sys.executable, *sys.argv, "--variant", variant], capture_output=True, text=True,
            check=True,
        )  # fmt: skip
        results[variant] = json.loads(out.stdout.splitlines()[-1])
    eager, ours = results["eager"], results["logitless"]
    print(
        f"{args.batch} x {args.seq} tokens, V = {args.vocab}, teacher D = 128, student D = 64, "
        f"{args.divergence} at T = {TEMPERATURE}, hard_weight = {HARD_WEIGHT}"
    )
    print("step  loss (full logits)  loss (logitless)")
    for step in range(args.steps):
        print(f"{step:4d}  {eager['losses'][step]:18.8f}  {ours['losses'][step]:16.8f}")
    difference = max(abs(a - b) for a, b in zip(eager["losses"], ours["losses"], strict=True))
    print(f"max loss difference: {difference:.3g}")
    print(f"peak memory of a step: full logits {eager['peak_mb']:.0f} MB, "
          f"logitless {ours['peak_mb']:.0f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
