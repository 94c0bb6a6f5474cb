"""The backend calls as PyTorch custom ops, so that torch.compile sees opaque, shape-known ops.

Backends loop over blocks, sync on filter decisions and launch Triton kernels: nothing
torch.compile should trace into. Registered as `torch.library.custom_op`s with fake (meta)
implementations, a compiled training step keeps them in its graph without a break. Ops cannot
return None, so a gradient that is not needed comes back as an empty tensor. They run with
autocast off: `logitless.functional` has cast the inputs already, and the backends' matmuls must
keep their dtypes (a backward called inside an autocast region would otherwise run in bf16).
"""

from __future__ import annotations

import torch
from torch import Tensor

from logitless._loss import TokenLoss
from logitless.backends import get_backend
from logitless.backends.torch_backend import accumulation_dtype


@torch.library.custom_op("logitless::stats", mutates_args=())
def stats(
    e: Tensor,
    c: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    impl: str,
    softcap: float | None,
    with_sum: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    with _no_autocast(e):
        lse, target_logit, logit_sum = get_backend(impl).stats(
            e, c, bias, targets, softcap=softcap, with_sum=with_sum
        )
    return lse, target_logit, torch.zeros_like(lse) if logit_sum is None else logit_sum


@stats.register_fake
def _(e, c, bias, targets, impl, softcap, with_sum):
    return tuple(e.new_empty(e.shape[0], dtype=accumulation_dtype(e.dtype)) for _ in range(3))


@torch.library.custom_op("logitless::grads", mutates_args=())
def grads(
    e: Tensor,
    c: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    grad_lse: Tensor,
    grad_target: Tensor,
    grad_sum: Tensor | None,
    impl: str,
    softcap: float | None,
    filter_eps: float | None,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor]:
    in_tiles = grad_sum if softcap is not None else None
    with _no_autocast(e):
        out = get_backend(impl).grads(
            e, c, bias, targets, lse, grad_lse, grad_target, in_tiles,
            softcap=softcap, filter_eps=filter_eps, needs=tuple(needs),
        )  # fmt: skip
        if grad_sum is not None and in_tiles is None:
            add_uniform_gradient(*out, e, c, grad_sum)
    return _finish(out, e, c, bias)


@grads.register_fake
def _(e, c, bias, targets, lse, grad_lse, grad_target, grad_sum, impl, softcap, filter_eps, needs):
    return _fake_grads(e, c, bias, needs)


@torch.library.custom_op("logitless::stats_and_grads", mutates_args=())
def stats_and_grads(
    e: Tensor,
    c: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    token_weights: Tensor,
    impl: str,
    softcap: float | None,
    with_sum: bool,
    filter_eps: float | None,
    label_smoothing: float,
    z_loss: float,
    vocab: int,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    token_loss = TokenLoss(label_smoothing, z_loss, vocab)
    sum_in_tiles = with_sum and softcap is not None

    def coefficients(rows: slice, lse_rows: Tensor):
        grad_lse, grad_target, grad_sum = token_loss.coefficients(lse_rows, token_weights[rows])
        return grad_lse, grad_target, grad_sum if sum_in_tiles else None

    with _no_autocast(e):
        lse, target_logit, logit_sum, *out = get_backend(impl).stats_and_grads(
            e, c, bias, targets, coefficients, softcap=softcap, with_sum=with_sum,
            filter_eps=filter_eps, needs=tuple(needs),
        )  # fmt: skip
        if with_sum and not sum_in_tiles:
            add_uniform_gradient(*out, e, c, token_loss.coefficients(lse, token_weights)[2])
    logit_sum = torch.zeros_like(lse) if logit_sum is None else logit_sum
    return lse, target_logit, logit_sum, *_finish(out, e, c, bias)


@stats_and_grads.register_fake
def _(e, c, bias, targets, token_weights, impl, softcap, with_sum, filter_eps, label_smoothing,
      z_loss, vocab, needs):  # fmt: skip
    row = tuple(e.new_empty(e.shape[0], dtype=accumulation_dtype(e.dtype)) for _ in range(3))
    return *row, *_fake_grads(e, c, bias, needs)


def add_uniform_gradient(grad_e, grad_c, grad_bias, e, c, grad_sum) -> None:
    """Add, in place, the gradient of sum_n grad_sum[n] * sum_v z[n, v] for z = e @ c.T + bias.

    It is rank one: every logit of row n gets grad_sum[n], so it never needs a logit tile, and
    gradient filtering can never drop it.
    """
    if grad_e is not None:
        grad_e.add_(torch.outer(grad_sum, c.sum(0, dtype=grad_sum.dtype)).to(grad_e.dtype))
    if grad_c is not None:
        grad_c.add_((grad_sum.unsqueeze(0) @ e.to(grad_sum.dtype)).to(grad_c.dtype))
    if grad_bias is not None:
        grad_bias.add_(grad_sum.sum().to(grad_bias.dtype))


def _no_autocast(e: Tensor) -> torch.autocast:
    return torch.autocast(e.device.type, enabled=False)


def _finish(grads_out, e: Tensor, c: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """grad_e and grad_bias in the accumulation dtype (vocabulary shards sum grad_e before
    rounding; the fused path scales both before rounding), grad_c in c's dtype (no V x D float32
    copy); an empty tensor for a gradient not computed."""
    dtypes = (accumulation_dtype(e.dtype), c.dtype, accumulation_dtype(e.dtype))
    return tuple(
        e.new_empty(0) if g is None else g.to(dtype)
        for g, dtype in zip(grads_out, dtypes, strict=True)
    )


def _fake_grads(e, c, bias, needs):
    shapes = (e.shape, c.shape, None if bias is None else bias.shape)
    dtypes = (accumulation_dtype(e.dtype), c.dtype, accumulation_dtype(e.dtype))
    return tuple(
        e.new_empty(shape, dtype=dtype) if need else e.new_empty(0)
        for shape, dtype, need in zip(shapes, dtypes, needs, strict=True)
    )


def _outside_compile(op):
    """`op` through the dispatcher only while torch.compile traces; eagerly its Python function.

    A custom op's first eager call imports torch._dynamo (about 140 MB of resident memory, once
    per process, for a call that needs none of it); eager calls skip the dispatcher instead.
    """

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        return op._init_fn(*args)

    call.op = op
    return call


stats, grads, stats_and_grads = map(_outside_compile, (stats, grads, stats_and_grads))
