"""The examples' computations, run in-process with tiny settings, show what they claim."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_distill_lm_loss_curves_coincide():
    """examples/distill_lm.py: the student's loss curve with logitless equals the full-logits
    one step by step, and it falls."""
    example = load_example("distill_lm")
    args = argparse.Namespace(steps=3, vocab=1000, batch=2, seq=24, divergence="jsd", threads=1)
    threads = torch.get_num_threads()
    try:
        eager, ours = (example.run(variant, args) for variant in ("eager", "logitless"))
    finally:
        torch.set_num_threads(threads)
    for full, logitless in zip(eager["losses"], ours["losses"], strict=True):
        assert abs(full - logitless) <= 1e-5 * abs(full)
    assert eager["losses"][-1] < eager["losses"][0]
    assert ours["peak_mb"] >= 0 and eager["peak_mb"] >= 0


def test_grpo_step_gradients_agree(tmp_path):
    """examples/grpo_step.py: the logitless steps' losses equal the full-logits ones, and so do
    their gradients, which the logitless run compares with those the eager run saved; only
    their relative differences come back."""
    example = load_example("grpo_step")
    args = argparse.Namespace(
        steps=2, vocab=300, batch=2, prompt=4, completion=6, threads=1, grads=str(tmp_path)
    )
    threads = torch.get_num_threads()
    try:
        eager, ours = (example.run(variant, args) for variant in ("eager", "logitless"))
    finally:
        torch.set_num_threads(threads)
    assert set(ours) == {"losses", "grad_differences", "peak_mb"}
    for full, logitless in zip(eager["losses"], ours["losses"], strict=True):
        assert abs(full - logitless) <= 1e-5 * abs(full)
    assert len(ours["grad_differences"]) == 2 and max(ours["grad_differences"]) <= 1e-4
