"""torch.compile(fullgraph=True) over a training step: no graph break, the eager result."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing

from helpers import device_for, make_inputs, outputs_and_grads
from logitless import (
    linear_cross_entropy,
    linear_distillation_loss,
    linear_log_probs,
    linear_top_k,
    linear_top_k_distillation_loss,
)

OPTIONS = {"shift": 1, "softcap": 5.0, "label_smoothing": 0.1, "z_loss": 1e-3}


def _step(e, c, targets, bias, **options):
    return linear_cross_entropy(e, c, targets, bias, **OPTIONS, **options)


@pytest.mark.parametrize(
    "options",
    [{}, {"return_lse": True}, {"reduction": "sum", "filter_eps": 1e-3}],
    ids=["fused", "recompute", "filtered"],
)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_compiled_step_matches_eager_without_graph_breaks(options, impl):
    torch._dynamo.reset()
    options = {**options, "impl": impl}
    inputs = make_inputs((2, 23), 16, 301, bias=True, seed=41, device=device_for(impl))
    compiled = torch.compile(_step, fullgraph=True)
    expected_outs, expected_grads = outputs_and_grads(_step, inputs, 0, **options)
    actual_outs, actual_grads = outputs_and_grads(compiled, inputs, 0, **options)
    for x, y in zip(actual_outs + actual_grads, expected_outs + expected_grads, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_compiled_target_check_still_fails_loudly():
    torch._dynamo.reset()
    e, c, targets, bias = make_inputs((2, 9), 8, 50, bias=True, seed=42)
    targets[0, 3] = 50
    compiled = torch.compile(_step, fullgraph=True)
    with pytest.raises(RuntimeError, match=r"targets must lie in \[0, V\) \(the rows of c\)"):
        compiled(e, c, targets, bias)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_compiled_distillation_step_matches_eager_without_graph_breaks(divergence):
    """The fused distillation (its custom op and its hard loss) traced whole."""
    torch._dynamo.reset()
    inputs = make_inputs((2, 23), 16, 301, bias=True, seed=41)
    teacher_e, teacher_c, _, teacher_bias = make_inputs((2, 23), 24, 301, bias=True, seed=42)

    def step(e, c, targets, bias, **options):
        return linear_distillation_loss(
            e, c, teacher_e, teacher_c, targets, bias, teacher_bias, **options
        )

    # the hard loss in a sweep of its own (T = 1.3) and in the divergence's (T = 1)
    temperature = 1.0 if divergence == "reverse_kl" else 1.3
    options = {"divergence": divergence, "hard_weight": 0.3, "temperature": temperature}
    expected_outs, expected_grads = outputs_and_grads(step, inputs, 0, **options)
    compiled = torch.compile(step, fullgraph=True)
    actual_outs, actual_grads = outputs_and_grads(compiled, inputs, 0, **options)
    for x, y in zip(actual_outs + actual_grads, expected_outs + expected_grads, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_compiled_top_k_steps_match_eager_without_graph_breaks():
    """linear_top_k's gathered dots (whose block size reads the CPU's cache size) and the cached
    top-k teacher's checks (device-side assertions when compiled) traced whole."""
    torch._dynamo.reset()
    inputs = make_inputs((2, 23), 16, 301, bias=True, seed=41)
    gen = torch.Generator().manual_seed(43)
    teacher_indices = torch.stack([torch.randperm(301, generator=gen)[:5] for _ in range(46)])
    teacher_log_probs = torch.randn(46, 5, generator=gen).log_softmax(-1) - 0.5

    def top_k(e, c, targets, bias):
        return linear_top_k(e, c, 4, bias)[0]

    def distillation(e, c, targets, bias):
        indices, log_probs = (x.view(2, 23, 5) for x in (teacher_indices, teacher_log_probs))
        return linear_top_k_distillation_loss(e, c, indices, log_probs, targets, bias)

    for step in (top_k, distillation):
        expected_outs, expected_grads = outputs_and_grads(step, inputs, 0)
        compiled = torch.compile(step, fullgraph=True)
        actual_outs, actual_grads = outputs_and_grads(compiled, inputs, 0)
        for x, y in zip(actual_outs + actual_grads, expected_outs + expected_grads, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)  # inductor's own fp32 order


def test_compiled_steps_take_any_sequence_length():
    """One graph for every length (after the first recompile, dynamo's automatic dynamic
    shapes; fullgraph fails at its recompile limit otherwise), and dynamic=True with every
    option left at its default (symbolic floats reach the option checks)."""
    torch._dynamo.reset()
    c = torch.randn(300, 8)

    def top_k(e):
        return linear_top_k(e, c, 3)[0].exp().sum()

    compiled = torch.compile(top_k, fullgraph=True)
    for length in range(5, 17):
        e = torch.randn(2, length, 8)
        torch.testing.assert_close(compiled(e), top_k(e), rtol=1e-5, atol=1e-6)
    targets = torch.randint(0, 300, (9,))
    for function in (linear_cross_entropy, linear_log_probs):
        step = lambda e, c, function=function: function(e, c, targets).sum()  # noqa: E731
        compiled = torch.compile(step, fullgraph=True, dynamic=True)
        e = torch.randn(9, 8)
        torch.testing.assert_close(compiled(e, c), step(e, c))


def test_dynamic_shapes_compile_once_for_every_vocabulary_size():
    """With dynamic=True a new V reuses the graph: the target check's message does not format
    the symbolic V (which specialized the graph to each V, up to the recompile limit)."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(linear_cross_entropy, backend=counter, fullgraph=True, dynamic=True)
    for vocab in range(50, 60):
        e, c, targets, _ = make_inputs((7,), 8, vocab, seed=vocab)
        torch.testing.assert_close(compiled(e, c, targets), linear_cross_entropy(e, c, targets))
    assert counter.frame_count == 1
