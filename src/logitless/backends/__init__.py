"""Backends: the computation of per-token logit statistics and of their gradients.

A backend works on flat rows: `e` (N, D), `c` (V, D), `bias` (V,) or None, and `targets` (N,)
int64 where -1 marks a row without target (ignored, shifted out, or held by another vocabulary
shard). It checks nothing: `logitless.functional` has done that. With `z = softcap(e @ c.T + bias)`
it provides

    stats(e, c, bias, targets, *, softcap, with_sum) -> (lse, target_logit, logit_sum | None)

        the fp32 per-row log-sum-exp of z, z[n, targets[n]] (0 without target) and, when
        `with_sum`, the sum of z over the vocabulary;

    grads(e, c, bias, targets, lse, grad_lse, grad_target, grad_sum, *,
          softcap, filter_eps, needs) -> (grad_e, grad_c, grad_bias)

        the gradients of sum_n grad_lse[n] * lse[n] + grad_target[n] * target_logit[n]
        + grad_sum[n] * logit_sum[n], for the inputs flagged in `needs` (None for the others).
        `grad_sum` is None unless softcap is set: without softcap the caller adds that
        rank-one term itself. With `filter_eps`, tiles whose softmax entries all lie below it and
        that hold no target are skipped. Gradients may come back in float32.

A backend may also provide `stats_and_grads`, which computes both in one pass when the gradient
coefficients are known during the forward pass (see `logitless._autograd`).
"""

from __future__ import annotations

from types import ModuleType


def get_backend(impl: str) -> ModuleType:
    """The backend module for a resolved `impl` ("torch" or "triton")."""
    if impl == "triton":
        from logitless.backends import triton_backend

        return triton_backend
    from logitless.backends import torch_backend

    return torch_backend
