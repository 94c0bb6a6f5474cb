"""Differential fuzzing against the float64 reference, and run-to-run determinism.

The example budget is small in CI; LOGITLESS_FUZZ_EXAMPLES raises it for a long run.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import DTYPES, check_against_reference, device_for, make_inputs, outputs_and_grads
from logitless import linear_cross_entropy

FUZZ = settings(
    max_examples=int(os.environ.get("LOGITLESS_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize="LOGITLESS_FUZZ_EXAMPLES" not in os.environ,
)


@st.composite
def cases(draw, impl: str = "torch"):
    lead = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=3)))
    # Below about 16 classes one class often takes nearly all the probability; the loss is then
    # lse - z_target with lse ~ z_target, and its relative error reflects that cancellation.
    dim = draw(st.integers(4, 48))
    vocab = draw(st.integers(16, 700))
    dtype = draw(st.sampled_from(DTYPES))
    inputs = make_inputs(
        lead,
        dim,
        vocab,
        dtype,
        bias=draw(st.booleans()),
        ignore_fraction=draw(st.sampled_from([0.0, 0.3, 1.0])),
        scale=draw(st.sampled_from([0.5, 2.0, 8.0])),
        seed=draw(st.integers(0, 2**16)),
    )
    e, c, targets, bias = inputs
    if draw(st.booleans()):  # non-contiguous e: a transposed view of the leading dims
        e = (
            e.transpose(0, -2).contiguous().transpose(0, -2)
            if len(lead) > 1
            else e[:, None, :][:, 0]
        )
    if draw(st.booleans()):  # non-contiguous c: every other column of a wider matrix
        wide = torch.empty(vocab, 2 * dim, dtype=dtype)
        c = wide[:, ::2].copy_(c)
    options = {
        "reduction": draw(st.sampled_from(["mean", "sum", "none"])),
        "return_lse": draw(st.booleans()),
        "label_smoothing": draw(st.sampled_from([0.0, 0.1])),
        "z_loss": draw(st.sampled_from([0.0, 1e-3])),
        "softcap": draw(st.sampled_from([None, 2.0, 30.0])),
        "shift": draw(st.integers(0, min(2, lead[-1] - 1))) if len(lead) > 1 else 0,
    }
    return (e, c, targets, bias), options, impl


@FUZZ
@given(cases())
def test_portable_backend_matches_reference(case):
    inputs, options, impl = case
    check_against_reference(inputs, impl=impl, **options)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_deterministic_run_after_run(impl):
    """Bit-identical results run after run on both backends: neither accumulates with atomics."""
    inputs = make_inputs(
        (3, 37), 29, 1201, torch.bfloat16, bias=True, seed=31, device=device_for(impl)
    )
    options = {"shift": 1, "softcap": 20.0, "label_smoothing": 0.1, "z_loss": 1e-4}

    def run():
        outs, grads = outputs_and_grads(linear_cross_entropy, inputs, 0, impl=impl, **options)
        return outs + grads

    first, second = run(), run()
    check_against_reference(inputs, impl=impl, **options)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
