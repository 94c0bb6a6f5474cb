"""torch.compile(fullgraph=True) over a training step: no graph break, the eager result."""

from __future__ import annotations

import pytest
import torch

from helpers import make_inputs
from logitless import linear_cross_entropy

OPTIONS = {"shift": 1, "softcap": 5.0, "label_smoothing": 0.1, "z_loss": 1e-3}


def _step(e, c, targets, bias, **options):
    out = linear_cross_entropy(e, c, targets, bias, **OPTIONS, **options)
    return out[0] if isinstance(out, tuple) else out


def _loss_and_grads(fn, inputs, **options):
    e, c, targets, bias = inputs
    leaves = [x.clone().requires_grad_() for x in (e, c, bias)]
    loss = fn(leaves[0], leaves[1], targets, leaves[2], **options)
    loss.backward()
    return [loss.detach()] + [x.grad for x in leaves]


@pytest.mark.parametrize(
    "options",
    [{}, {"return_lse": True}, {"reduction": "sum", "filter_eps": 1e-3}],
    ids=["fused", "recompute", "filtered"],
)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_compiled_step_matches_eager_without_graph_breaks(options, impl):
    torch._dynamo.reset()
    options = {**options, "impl": impl}
    inputs = make_inputs((2, 23), 16, 301, bias=True, seed=41)
    compiled = torch.compile(_step, fullgraph=True)
    expected = _loss_and_grads(_step, inputs, **options)
    actual = _loss_and_grads(compiled, inputs, **options)
    for x, y in zip(actual, expected, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_compiled_target_check_still_fails_loudly():
    torch._dynamo.reset()
    e, c, targets, bias = make_inputs((2, 9), 8, 50, bias=True, seed=42)
    targets[0, 3] = 50
    compiled = torch.compile(_step, fullgraph=True)
    with pytest.raises(RuntimeError, match=r"targets must lie in \[0, 50\)"):
        compiled(e, c, targets, bias)
