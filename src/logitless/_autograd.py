"""Autograd functions over a backend: per-token logit statistics, and the fused loss.

Every loss logitless offers is an elementwise function of three per-token statistics of the
logits z = softcap(e @ c.T + bias): lse = logsumexp(z), the target logit, and the sum of z. So one
differentiable op computes those three (`LinearLogitStats`), and plain PyTorch combines them
into the loss, its reductions and `return_lse`. When the loss is reduced and nothing else is
asked for, the gradient coefficients are known during the forward pass and the backend can
produce the gradients in the same sweep (`FusedLinearCrossEntropy`), saving one matmul.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from logitless.distributed import VocabParallel


@dataclass(frozen=True)
class Plan:
    """How one call runs: the backend, the options the backend sees, and the vocabulary shard
    (the backend then sees its rows only, and the statistics are combined across ranks)."""

    backend: ModuleType
    softcap: float | None
    with_sum: bool
    filter_eps: float | None
    vocab_parallel: VocabParallel | None = None

    @property
    def sum_in_tiles(self) -> bool:
        """Whether the logit-sum gradient must be applied tile by tile (it passes the softcap)."""
        return self.with_sum and self.softcap is not None


class LinearLogitStats(torch.autograd.Function):
    """(lse, target logit, logit sum) per row; backward recomputes the logits block by block."""

    @staticmethod
    def forward(ctx, e, c, bias, targets, plan: Plan):
        lse, target_logit, logit_sum = plan.backend.stats(
            e, c, bias, targets, softcap=plan.softcap, with_sum=plan.with_sum
        )
        if plan.vocab_parallel is not None:
            lse, target_logit, logit_sum = plan.vocab_parallel.combine_stats(
                lse, target_logit, logit_sum
            )
        if logit_sum is None:
            logit_sum = torch.zeros_like(lse)
        ctx.plan = plan
        ctx.save_for_backward(e, c, bias, targets, lse)
        ctx.mark_non_differentiable(targets)
        return lse, target_logit, logit_sum

    @staticmethod
    def backward(ctx, grad_lse, grad_target, grad_sum):
        e, c, bias, targets, lse = ctx.saved_tensors
        plan: Plan = ctx.plan
        grad_e, grad_c, grad_bias = plan.backend.grads(
            e, c, bias, targets, lse, grad_lse, grad_target,
            grad_sum if plan.sum_in_tiles else None,
            softcap=plan.softcap, filter_eps=plan.filter_eps, needs=tuple(ctx.needs_input_grad[:3]),
        )  # fmt: skip
        if plan.with_sum and not plan.sum_in_tiles:
            add_uniform_gradient(grad_e, grad_c, grad_bias, e, c, grad_sum)
        if plan.vocab_parallel is not None and grad_e is not None:
            grad_e = plan.vocab_parallel.reduce_grad_e(grad_e)
        return *cast_like((grad_e, grad_c, grad_bias), (e, c, bias)), None, None


@dataclass(frozen=True)
class TokenLoss:
    """The loss of one token from its logit statistics, and the derivatives the fused path uses.

    loss = lse - (1 - label_smoothing) * target_logit - label_smoothing / V * logit_sum
           + z_loss * lse**2
    which is F.cross_entropy with label smoothing plus PaLM's z-loss.
    """

    label_smoothing: float
    z_loss: float
    vocab: int

    def __call__(self, lse, target_logit, logit_sum):
        loss = lse - (1.0 - self.label_smoothing) * target_logit
        if self.label_smoothing:
            loss = loss - (self.label_smoothing / self.vocab) * logit_sum
        if self.z_loss:
            loss = loss + self.z_loss * lse.square()
        return loss

    def coefficients(self, lse, weights):
        """d(weights * loss) / d(lse, target_logit, logit_sum)."""
        grad_lse = weights * (1.0 + 2.0 * self.z_loss * lse) if self.z_loss else weights
        return (
            grad_lse,
            -(1.0 - self.label_smoothing) * weights,
            (-(self.label_smoothing / self.vocab) * weights),
        )


class FusedLinearCrossEntropy(torch.autograd.Function):
    """A reduced loss whose gradients the forward pass computes; backward only scales them.

    `token_weights` (N,) holds each row's weight in the reduction (0 for ignored rows).
    """

    @staticmethod
    def forward(ctx, e, c, bias, targets, token_weights, plan: Plan, token_loss: TokenLoss):
        def coefficients(rows: slice, lse_rows: torch.Tensor):
            grad_lse, grad_target, grad_sum = token_loss.coefficients(lse_rows, token_weights[rows])
            return grad_lse, grad_target, grad_sum if plan.sum_in_tiles else None

        lse, target_logit, logit_sum, grad_e, grad_c, grad_bias = plan.backend.stats_and_grads(
            e, c, bias, targets, coefficients, softcap=plan.softcap, with_sum=plan.with_sum,
            filter_eps=plan.filter_eps, needs=tuple(ctx.needs_input_grad[:3]),
        )  # fmt: skip
        if plan.with_sum and not plan.sum_in_tiles:
            grad_sum = token_loss.coefficients(lse, token_weights)[2]
            add_uniform_gradient(grad_e, grad_c, grad_bias, e, c, grad_sum)
        losses = token_loss(lse, target_logit, logit_sum)
        loss = torch.where(token_weights != 0, token_weights * losses, 0.0).sum()
        ctx.grads = cast_like((grad_e, grad_c, grad_bias), (e, c, bias))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError(
                "logitless computed this loss's gradients during the forward pass and has "
                "handed them out already; to backward twice, pass return_lse=True or "
                "reduction='none', which recompute them"
            )
        grads, ctx.grads = ctx.grads, None
        scaled = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads]
        return *scaled, None, None, None, None


def add_uniform_gradient(grad_e, grad_c, grad_bias, e, c, grad_sum) -> None:
    """Add, in place, the gradient of sum_n grad_sum[n] * sum_v z[n, v] for z = e @ c.T + bias.

    It is rank one: every logit of row n gets grad_sum[n], so it never needs a logit tile, and
    gradient filtering can never drop it.
    """
    if grad_e is not None:
        grad_e.add_(torch.outer(grad_sum, c.sum(0, dtype=torch.float32)).to(grad_e.dtype))
    if grad_c is not None:
        grad_c.add_((grad_sum.unsqueeze(0) @ e.float()).to(grad_c.dtype))
    if grad_bias is not None:
        grad_bias.add_(grad_sum.sum().to(grad_bias.dtype))


def cast_like(grads, inputs):
    """Gradients in the dtypes of their inputs (backends may return float32)."""
    return tuple(None if g is None else g.to(x.dtype) for g, x in zip(grads, inputs, strict=True))
