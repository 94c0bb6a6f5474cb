"""A few GRPO-style policy-gradient steps of a tiny Llama on the CPU, with logitless log-probs and
entropy against the same steps from the full logits.

    PYTHONPATH=src python examples/grpo_step.py [--steps 3] [--vocab 32768] [--completion 256]

Each variant runs in a fresh process from the same initial weights and data: sampled completions
(random tokens here), per-sequence advantages, the clipped importance-ratio loss with an entropy
bonus, and an SGD step. The parent prints each step's loss and the relative difference of the
gradients (the logitless process compares its gradients with those the eager one saved), and each
variant's peak resident memory over a step (forward and backward) above the memory before it
(Linux: /proc/self).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

from logitless.bench.measure import CpuMeter
from logitless.rl import completion_log_probs

CLIP, ENTROPY_BONUS, TEMPERATURE, LEARNING_RATE = 0.2, 1e-3, 0.7, 0.5


def full_logits_log_probs(model, input_ids, attention_mask, keep):
    """TRL's computation: the full logits, then log_softmax at the completion tokens."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    log_p = (logits[:, :-1][:, -keep:] / TEMPERATURE).log_softmax(-1)
    picked = log_p.gather(-1, input_ids[:, -keep:].unsqueeze(-1)).squeeze(-1)
    return picked, -(log_p.exp() * log_p).sum(-1)


def logitless_log_probs(model, input_ids, attention_mask, keep):
    return completion_log_probs(
        model, input_ids, attention_mask, keep, temperature=TEMPERATURE, return_entropy=True
    )


def run(variant: str, args) -> dict:
    """The steps of one variant: losses, peak memory, and the relative difference of each step's
    gradients from the eager run's, which that run saves under `args.grads` (a few numbers come
    back, not millions)."""
    torch.set_num_threads(args.threads)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(
        0, args.vocab, (args.batch, args.prompt + args.completion), generator=gen
    )
    attention_mask = torch.ones_like(input_ids)
    advantages = torch.randn(args.batch, 1, generator=gen)
    compute = full_logits_log_probs if variant == "eager" else logitless_log_probs
    with torch.no_grad():  # the rollout policy's log-probs
        old_log_probs, _ = compute(model, input_ids, attention_mask, args.completion)
    losses, differences, peak_mb, meter = [], [], 0.0, CpuMeter()
    for step in range(args.steps):
        model.zero_grad(set_to_none=True)
        meter.start()
        log_probs, entropy = compute(model, input_ids, attention_mask, args.completion)
        ratio = torch.exp(log_probs - old_log_probs)
        clipped = torch.clamp(ratio, 1 - CLIP, 1 + CLIP)
        policy = -torch.minimum(ratio * advantages, clipped * advantages)
        loss = (policy - ENTROPY_BONUS * entropy).mean()
        loss.backward()
        peak_mb = max(peak_mb, (meter.stop()[1] or 0) / 2**20)
        losses.append(loss.item())
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        saved = Path(args.grads) / f"step{step}.pt"
        if variant == "eager":
            torch.save(grad, saved)
        else:
            reference = torch.load(saved)
            differences.append(((grad - reference).norm() / reference.norm()).item())
        with torch.no_grad():
            for p in model.parameters():
                p -= LEARNING_RATE * p.grad
    return {"losses": losses, "grad_differences": differences, "peak_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--completion", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", choices=("eager", "logitless"), help=argparse.SUPPRESS)
    parser.add_argument("--grads", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run(args.variant, args)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as grads:
        for variant in ("eager", "logitless"):  # eager first: logitless compares with its gradients
            out = subprocess.run(
                [sys.executable, *sys.argv, "--variant", variant, "--grads", grads],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            results[variant] = json.loads(out.stdout.splitlines()[-1])
    eager, ours = results["eager"], results["logitless"]
    print(
        f"{args.batch} x {args.completion} completion tokens, V = {args.vocab}, T = {TEMPERATURE}"
    )
    print("step  loss (full logits)  loss (logitless)  gradients: relative difference")
    for step in range(args.steps):
        print(
            f"{step:4d}  {eager['losses'][step]:18.8f}  {ours['losses'][step]:16.8f}  "
            f"{ours['grad_differences'][step]:.2e}"
        )
    print(f"peak memory of a step: full logits {eager['peak_mb']:.0f} MB, "
          f"logitless {ours['peak_mb']:.0f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
