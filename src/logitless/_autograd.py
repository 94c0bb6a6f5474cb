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
    from logitless.distributed import TokenGather, VocabParallel


@dataclass(frozen=True)
class Plan:
    """How one call runs: the backend, the options the backend sees, and the vocabulary shard
    (the backend then sees its rows only, and the statistics are combined across ranks); with
    `token_gather`, the rows are every rank's tokens (see `logitless.distributed.TokenGather`)."""

    impl: str
    softcap: float | None
    with_sum: bool
    filter_eps: float | None
    vocab_parallel: VocabParallel | None = None
    token_gather: TokenGather | None = None


class LinearLogitStats(torch.autograd.Function):
    """(lse, target logit, logit sum) per row; backward recomputes the logits block by block."""

    @staticmethod
    def forward(e, c, bias, targets, plan: Plan):
        lse, target_logit, logit_sum = ops.stats(
            e, c, bias, targets, plan.impl, plan.softcap, plan.with_sum
        )
        if plan.vocab_parallel is not None:
            lse, target_logit, summed = plan.vocab_parallel.combine_stats(
                lse, target_logit, logit_sum if plan.with_sum else None
            )
            logit_sum = logit_sum if summed is None else summed  # zeros without smoothing
        return lse, target_logit, logit_sum

    @staticmethod
    def setup_context(ctx, inputs, output):
        e, c, bias, targets, plan = inputs
        ctx.plan = plan
        ctx.save_for_backward(e, c, bias, targets, output[0])
        ctx.mark_non_differentiable(targets)

    @staticmethod
    def backward(ctx, grad_lse, grad_target, grad_sum):
        check_not_double_backward()
        e, c, bias, targets, lse = ctx.saved_tensors
        plan: Plan = ctx.plan
        needs = ctx.needs_input_grad[:3]
        if plan.token_gather is not None:  # every rank's tokens get every rank's coefficients
            grad_lse, grad_target, grad_sum = plan.token_gather.sum_coefficients(
                grad_lse, grad_target, grad_sum if plan.with_sum else None
            )
        with torch.no_grad():  # under torch.func.grad too: the result is not differentiated
            grad_e, grad_c, grad_bias = ops.grads(
                e, c, bias, targets, lse, grad_lse, grad_target,
                grad_sum if plan.with_sum else None,
                plan.impl, plan.softcap, plan.filter_eps, list(needs),
            )  # fmt: skip
        if plan.vocab_parallel is not None and needs[0]:
            grad_e = plan.vocab_parallel.reduce_grad_e(grad_e)
        if plan.token_gather is not None:
            grad_c, grad_bias = (plan.token_gather.average(g) for g in (grad_c, grad_bias))
        grads = (grad_e.to(e.dtype), grad_c, grad_bias.to(c.dtype))
        return *_present(grads, needs), None, None


class FusedLinearCrossEntropy(torch.autograd.Function):
    """A reduced loss whose gradients the forward pass computes; backward only scales them.

    `token_weights` (N,) holds each row's weight in the reduction (0 for ignored rows), `needs`
    which of (e, c, bias) get a gradient. Forward returns the loss and those gradients (the
    caller keeps the loss only): grad_e and grad_bias in the accumulation dtype, grad_c in c's.
    Backward multiplies them by the upstream gradient in float32 (or float64) and rounds once.
    They are scaled in place, so a second backward through the same graph is refused by
    autograd's check of modified saved tensors. 16-bit gradients are rounded before that
    multiplication, which costs range in float16 (a GradScaler's scale would overflow or its
    small gradients flush to zero); `logitless.functional` does not fuse float16 inputs.
    """

    @staticmethod
    def forward(e, c, bias, targets, token_weights, plan: Plan, token_loss: TokenLoss, needs):
        lse, target_logit, logit_sum, *grads = ops.stats_and_grads(
            e, c, bias, targets, token_weights, plan.impl, plan.softcap, plan.with_sum,
            plan.filter_eps, token_loss.label_smoothing, token_loss.z_loss, token_loss.vocab,
            list(needs),
        )  # fmt: skip
        losses = token_loss(lse, target_logit, logit_sum)
        loss = torch.where(token_weights != 0, token_weights * losses, 0.0).sum()
        return loss, *grads

    @staticmethod
    def setup_context(ctx, inputs, output):
        e, c, needs = inputs[0], inputs[1], inputs[-1]
        _, *grads = output
        ctx.needs, ctx.dtypes = needs, (e.dtype, c.dtype)
        ctx.mark_non_differentiable(*grads)
        ctx.save_for_backward(*grads)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        check_not_double_backward()
        grad_e, grad_c, grad_bias = ctx.saved_tensors
        e_dtype, c_dtype = ctx.dtypes
        scaled = (
            _scale_in_place(grad_e, grad_loss).to(e_dtype),
            _scale_in_place(grad_c, grad_loss),
            _scale_in_place(grad_bias, grad_loss).to(c_dtype),
        )
        return *_present(scaled, ctx.needs), None, None, None, None, None


SCALE_CHUNK_ELEMENTS = 2**22
"""Elements per chunk when scaling a 16-bit gradient through float32 (16 MiB of scratch)."""


def _scale_in_place(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad *= scale, the product taken in float32 or better and rounded once to grad's dtype;
    chunked so that a 16-bit V x D gradient never needs a float32 copy of itself."""
    scale = scale.to(torch.promote_types(grad.dtype, torch.float32))
    if grad.dtype == scale.dtype or grad.numel() == 0:
        return grad.mul_(scale)
    flat = grad.view(-1)
    for start in range(0, flat.numel(), SCALE_CHUNK_ELEMENTS):
        part = flat[start : start + SCALE_CHUNK_ELEMENTS]
        part.copy_(part.to(scale.dtype).mul_(scale))
    return grad


def check_not_double_backward() -> None:
    """Refuse to be differentiated twice: logitless's gradients are not themselves
    differentiable, and autograd would otherwise return them without a graph.

    Backward runs with grad mode on under `create_graph=True`, and also under one
    `torch.func.grad` (functorch level 1), which is allowed: its result is not differentiated.
    """
    if not torch.is_grad_enabled():
        return
    if torch._C._functorch.maybe_current_level() == 1:
        return
    raise RuntimeError(
        "logitless: double backward (create_graph=True, or torch.func.grad nested in another "
        "transform) is not supported: its gradients are not differentiable. Take the gradient "
        "penalty through eager PyTorch (logitless.reference.reference_linear_cross_entropy) or "
        "leave create_graph off."
    )


def _present(grads, needs):
    """None for the gradients that were not asked for (the ops return empty tensors there)."""
    return tuple(g if need else None for g, need in zip(grads, needs, strict=True))
