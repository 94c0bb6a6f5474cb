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
from typing import TYPE_CHECKING

import torch

from logitless import _ops as ops
from logitless._loss import TokenLoss

if TYPE_CHECKING:
    from logitless.distributed import VocabParallel


@dataclass(frozen=True)
class Plan:
    """How one call runs: the backend, the options the backend sees, and the vocabulary shard
    (the backend then sees its rows only, and the statistics are combined across ranks)."""

    impl: str
    softcap: float | None
    with_sum: bool
    filter_eps: float | None
    vocab_parallel: VocabParallel | None = None


class LinearLogitStats(torch.autograd.Function):
    """(lse, target logit, logit sum) per row; backward recomputes the logits block by block."""

    @staticmethod
    def forward(ctx, e, c, bias, targets, plan: Plan):
        lse, target_logit, logit_sum = ops.stats(
            e, c, bias, targets, plan.impl, plan.softcap, plan.with_sum
        )
        if plan.vocab_parallel is not None:
            lse, target_logit, summed = plan.vocab_parallel.combine_stats(
                lse, target_logit, logit_sum if plan.with_sum else None
            )
            logit_sum = logit_sum if summed is None else summed  # zeros without smoothing
        ctx.plan = plan
        ctx.save_for_backward(e, c, bias, targets, lse)
        ctx.mark_non_differentiable(targets)
        return lse, target_logit, logit_sum

    @staticmethod
    def backward(ctx, grad_lse, grad_target, grad_sum):
        e, c, bias, targets, lse = ctx.saved_tensors
        plan: Plan = ctx.plan
        needs = ctx.needs_input_grad[:3]
        grad_e, grad_c, grad_bias = ops.grads(
            e, c, bias, targets, lse, grad_lse, grad_target,
            grad_sum if plan.with_sum else None,
            plan.impl, plan.softcap, plan.filter_eps, list(needs),
        )  # fmt: skip
        if plan.vocab_parallel is not None and needs[0]:
            grad_e = plan.vocab_parallel.reduce_grad_e(grad_e)
        return *_present((grad_e.to(e.dtype), grad_c, grad_bias), needs), None, None


class FusedLinearCrossEntropy(torch.autograd.Function):
    """A reduced loss whose gradients the forward pass computes; backward only scales them.

    `token_weights` (N,) holds each row's weight in the reduction (0 for ignored rows). The
    gradients are scaled in place, so a second backward through the same graph is refused by
    autograd's check of modified saved tensors.
    """

    @staticmethod
    def forward(ctx, e, c, bias, targets, token_weights, plan: Plan, token_loss: TokenLoss):
        needs = ctx.needs_input_grad[:3]
        lse, target_logit, logit_sum, grad_e, grad_c, grad_bias = ops.stats_and_grads(
            e, c, bias, targets, token_weights, plan.impl, plan.softcap, plan.with_sum,
            plan.filter_eps, token_loss.label_smoothing, token_loss.z_loss, token_loss.vocab,
            list(needs),
        )  # fmt: skip
        losses = token_loss(lse, target_logit, logit_sum)
        loss = torch.where(token_weights != 0, token_weights * losses, 0.0).sum()
        ctx.needs = needs
        ctx.save_for_backward(grad_e.to(e.dtype), grad_c, grad_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        scaled = [g.mul_(grad_loss.to(g.dtype)) for g in ctx.saved_tensors]
        return *_present(scaled, ctx.needs), None, None, None, None


def _present(grads, needs):
    """None for the gradients that were not asked for (the ops return empty tensors there)."""
    return tuple(g if need else None for g, need in zip(grads, needs, strict=True))
