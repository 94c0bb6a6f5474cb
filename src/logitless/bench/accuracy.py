"""The float64 answer every method is checked against, and the softmax statistics of a regime.

The op's scalar is its objective (`ops.per_token`, on `logitless.reference`) in float64 over all
tokens, computed block by block of tokens so it never holds N x V float64 logits. Gradients are
checked on a probe: the dE rows of a spread of tokens (their own block) and the dC rows of a
spread of vocabulary entries, summed over the blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from logitless.bench import ops
from logitless.bench.data import Inputs
from logitless.reference import relative_error

SOFTMAX_THRESHOLD = 2.0**-12
"""The paper's negligibility threshold for bf16: the share of entries above it shows how peaked
a regime's softmax is."""
PROBE_TOKENS = 256
PROBE_VOCAB = 512
BLOCK_BYTES = 64 * 2**20
"""float64 logits held at once while computing the reference."""


@dataclass
class Probe:
    """The token rows of dE and vocabulary rows of dC that are compared with the reference."""

    tokens: torch.Tensor
    vocab: torch.Tensor

    @classmethod
    def spread(cls, n: int, v: int, device: torch.device) -> Probe:
        return cls(_spread(n, PROBE_TOKENS, device), _spread(v, PROBE_VOCAB, device))


@dataclass
class SoftmaxStatistics:
    """How peaked a regime's softmax is, on the probed tokens."""

    fraction_above_threshold: float
    """Fraction of softmax entries above SOFTMAX_THRESHOLD (2^-12)."""
    mean_entropy: float
    """In nats; log(V) is the uniform distribution's."""
    max_entropy: float


@dataclass
class Reference:
    """The float64 loss (mean over tokens), the mean size of its per-token terms, and dE and dC
    on the probe."""

    loss: float
    term_size: float
    grad_e: torch.Tensor
    grad_c: torch.Tensor

    def errors(self, loss: float, grad_e: torch.Tensor | None, grad_c: torch.Tensor | None):
        """Relative errors of a method's results (None where it gave no gradient). The loss's is
        relative to the mean |per-token term|: the relative error of a mean of positive terms,
        and for the logprobs op's terms of either sign one that their cancellation (a mean
        near 0) does not inflate."""
        return {
            "loss": abs(loss - self.loss) / (self.term_size or 1.0),
            "grad_e": None if grad_e is None else relative_error(grad_e, self.grad_e),
            "grad_c": None if grad_c is None else relative_error(grad_c, self.grad_c),
        }


def float64_reference(task: str, tensors: dict[str, torch.Tensor], probe: Probe) -> Reference:
    """The mean of `task`'s per-token terms and its probed gradients, in float64."""
    x = {k: t.double() if t.is_floating_point() else t for k, t in tensors.items()}
    tokens = ops.TOKEN_KEYS[task]
    n, v = len(x["targets"]), len(x["c"])
    c = x["c"].requires_grad_()
    rows = max(1, BLOCK_BYTES // (8 * v))
    total, size, grad_c = 0.0, 0.0, 0.0
    for start in range(0, n, rows):
        block = {**x, **{k: x[k][start : start + rows] for k in tokens}}
        terms = ops.per_token(task, block, torch.float64)
        total, size = total + terms.sum().item(), size + terms.abs().sum().item()
        grad_c = grad_c + torch.autograd.grad(terms.sum(), c)[0][probe.vocab]
    probed = {**x, **{k: x[k][probe.tokens] for k in tokens}}
    e = probed["e"].requires_grad_()
    (grad_e,) = torch.autograd.grad(ops.per_token(task, probed, torch.float64).sum(), e)
    return Reference(total / n, size / n, (grad_e / n).cpu(), (grad_c / n).cpu())


@torch.no_grad()
def softmax_statistics(inputs: Inputs, tokens: torch.Tensor) -> SoftmaxStatistics:
    """The float64 softmax statistics of `inputs` over the rows `tokens`."""
    log_probs = torch.log_softmax(inputs.e[tokens].double() @ inputs.c.double().T, dim=-1)
    probs = log_probs.exp()
    return SoftmaxStatistics(
        fraction_above_threshold=(probs > SOFTMAX_THRESHOLD).double().mean().item(),
        mean_entropy=-(probs * log_probs).sum(-1).mean().item(),
        max_entropy=math.log(inputs.c.shape[0]),
    )


def _spread(size: int, count: int, device: torch.device) -> torch.Tensor:
    """`count` indices spread evenly over range(size) (all of them when size <= count)."""
    return torch.linspace(0, size - 1, min(size, count), device=device).round().long().unique()
