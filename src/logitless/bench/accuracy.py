"""The float64 answer every method is checked against, and the softmax statistics of a regime.

The loss is the float64 reference (`logitless.reference`) over all tokens, computed block by block
so it never holds N x V float64 logits. Gradients are checked on a probe: the dE rows of a spread
of tokens and the dC rows of a spread of vocabulary entries, which need only those rows' logits
and the per-token log-sum-exp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from logitless.bench.data import Inputs
from logitless.reference import reference_linear_cross_entropy, relative_error

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
    """The float64 loss (mean over tokens), and dE and dC on the probe."""

    loss: float
    grad_e: torch.Tensor
    grad_c: torch.Tensor

    def errors(self, loss: float, grad_e: torch.Tensor | None, grad_c: torch.Tensor | None):
        """Relative errors of a method's results (None where it gave no gradient)."""
        return {
            "loss": relative_error(_float64(loss), _float64(self.loss)),
            "grad_e": None if grad_e is None else relative_error(grad_e, self.grad_e),
            "grad_c": None if grad_c is None else relative_error(grad_c, self.grad_c),
        }


@torch.no_grad()
def float64_reference(inputs: Inputs, probe: Probe) -> Reference:
    """The mean loss, the probed gradients and the statistics of `inputs` in float64."""
    e, c, targets = inputs.e.double(), inputs.c.double(), inputs.targets
    n, v = len(targets), len(c)
    rows = max(1, BLOCK_BYTES // (8 * v))
    loss_sum = 0.0
    lse = torch.empty(n, dtype=torch.float64, device=e.device)
    for start in range(0, n, rows):
        block = slice(start, start + rows)
        losses, lse[block] = reference_linear_cross_entropy(
            e[block], c, targets[block], reduction="none", return_lse=True
        )
        loss_sum += losses.sum().item()

    d_rows = torch.softmax(e[probe.tokens] @ c.T, dim=-1)  # softmax - onehot, on probed rows
    d_rows.scatter_add_(1, targets[probe.tokens, None], -torch.ones_like(d_rows[:, :1]))
    d_cols = (e @ c[probe.vocab].T - lse[:, None]).exp_()  # the same, on probed columns
    d_cols -= (targets[:, None] == probe.vocab[None, :]).double()
    return Reference(loss_sum / n, (d_rows @ c / n).cpu(), (d_cols.T @ e / n).cpu())


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


def _float64(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def _spread(size: int, count: int, device: torch.device) -> torch.Tensor:
    """`count` indices spread evenly over range(size) (all of them when size <= count)."""
    return torch.linspace(0, size - 1, min(size, count), device=device).round().long().unique()
