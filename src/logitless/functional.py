"""The public functional API: argument handling, shift, ignored tokens and reductions.

Backends only compute (see `logitless.backends`); everything a call means is decided here.
"""

from __future__ import annotations

import torch

from logitless._autograd import FusedLinearCrossEntropy, LinearLogitStats, Plan
from logitless._loss import TokenLoss
from logitless._validation import LossOptions, check_impl, check_inputs
from logitless.backends import get_backend
from logitless.distributed import VocabParallel

NO_TARGET = -1
"""Row target that backends skip: ignored, shifted out, or (vocabulary parallel) off-shard."""


def linear_cross_entropy(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    shift: int = 0,
    softcap: float | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    return_lse: bool = False,
    filter_eps: float | str | None = "auto",
    impl: str = "auto",
    vocab_parallel: VocabParallel | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the logits `e @ c.T + bias` against `targets`, without forming them.

    Equals `F.cross_entropy(e @ c.T + bias, targets, ...)` up to the rounding of the input
    dtype, with memory in O(N + V) beyond the gradients.

    Args:
        e: (..., D) hidden states, float32, bfloat16 or float16.
        c: (V, D) classifier (the lm_head weight), same dtype and device as `e`.
        targets: (...) integer targets, the leading shape of `e`.
        bias: optional (V,) classifier bias.
        ignore_index: targets equal to this contribute nothing.
        reduction: "mean" over non-ignored tokens, "sum", or "none" (one loss per token).
        shift: k > 0 makes `e[..., t, :]` predict `targets[..., t + k]` (causal LM: 1).
        softcap: s applies `s * tanh(logits / s)` to the logits (Gemma 2).
        label_smoothing: as in `F.cross_entropy`.
        z_loss: adds `z_loss * lse**2` per token (PaLM), reduced like the loss.
        return_lse: also return the per-token log-sum-exp (differentiable).
        filter_eps: gradient filtering: the most softmax probability per token that skipped
            backward tiles may hold in all; "auto" (2**-10 for bfloat16, 2**-13 for float16,
            exact for float32), a float, or None (exact).
        impl: "auto" (Triton on CUDA, PyTorch elsewhere), "torch" or "triton".
        vocab_parallel: this rank's vocabulary shard (`logitless.VocabParallel`): `c` and `bias`
            hold its rows only, `e` and `targets` are the same on every rank, and every rank
            gets the full loss and grad_e (see docs/vocab_parallel.md).

    Returns:
        The loss (a scalar, or the shape of `targets[..., shift:]` for reduction="none", ignored
        positions 0), and with `return_lse=True` also the per-token lse of that shape.
    """
    options = LossOptions(
        ignore_index=ignore_index,
        reduction=reduction,
        shift=shift,
        softcap=softcap,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        return_lse=return_lse,
        filter_eps=filter_eps,
        impl=impl,
        vocab_parallel=vocab_parallel,
    )
    return linear_cross_entropy_with_options(e, c, targets, bias, options)


def linear_cross_entropy_with_options(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    options: LossOptions,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`linear_cross_entropy` with its options already checked into a `LossOptions`."""
    check_inputs(e, c, targets, bias, options)
    impl = check_impl(options.impl, e.device)
    rows = e.reshape(-1, e.shape[-1])
    row_targets = _row_targets(targets, options)
    valid = row_targets != NO_TARGET
    shard = options.vocab_parallel
    vocab = c.shape[0] if shard is None else shard.vocab_size
    token_loss = TokenLoss(options.label_smoothing, options.z_loss, vocab)
    plan = Plan(
        impl=impl,
        softcap=options.softcap,
        with_sum=options.label_smoothing > 0,
        filter_eps=_filter_eps(options, e.dtype, c.shape[0]),
        vocab_parallel=shard,
    )

    if _fuses(options, get_backend(impl), e, c, bias):
        weights = valid.float()
        if options.reduction == "mean":
            weights = weights / valid.sum().clamp(min=1)
        return FusedLinearCrossEntropy.apply(rows, c, bias, row_targets, weights, plan, token_loss)

    backend_targets = row_targets if shard is None else shard.localize(row_targets)
    lse, target_logit, logit_sum = LinearLogitStats.apply(rows, c, bias, backend_targets, plan)
    losses = torch.where(valid, token_loss(lse, target_logit, logit_sum), 0.0)
    if options.reduction == "mean":
        loss = losses.sum() / valid.sum().clamp(min=1)
    elif options.reduction == "sum":
        loss = losses.sum()
    else:
        loss = _per_token(losses, targets, options.shift)
    if options.return_lse:
        return loss, _per_token(torch.where(valid, lse, 0.0), targets, options.shift)
    return loss


def _row_targets(targets: torch.Tensor, options: LossOptions) -> torch.Tensor:
    """Flat int64 targets, one per row of e, NO_TARGET where a row predicts nothing."""
    row_targets = targets.long().masked_fill(targets == options.ignore_index, NO_TARGET)
    if options.shift:
        dropped = row_targets.new_full((*targets.shape[:-1], options.shift), NO_TARGET)
        row_targets = torch.cat((row_targets[..., options.shift :], dropped), dim=-1)
    return row_targets.reshape(-1)


def _per_token(values: torch.Tensor, targets: torch.Tensor, shift: int) -> torch.Tensor:
    """Row values in the shape of `targets[..., shift:]`."""
    values = values.view(targets.shape)
    return values[..., : targets.shape[-1] - shift] if shift else values


def _filter_eps(options: LossOptions, dtype: torch.dtype, vocab_rows: int) -> float | None:
    """The filtering budget the backend gets for its `vocab_rows` classes: under vocabulary
    parallelism each shard gets its share, so that a token loses at most filter_eps in all."""
    if options.label_smoothing and options.softcap is not None:
        return None  # the smoothing gradient passes the softcap: no tile is negligible
    eps = options.resolved_filter_eps(dtype)
    shard = options.vocab_parallel
    if eps is None or shard is None:
        return eps
    return eps * vocab_rows / shard.vocab_size


def _fuses(options: LossOptions, backend, *inputs: torch.Tensor | None) -> bool:
    """Whether the gradients can be computed in the forward pass (a reduced loss alone, on one
    process: the fused pass needs each row's lse, which vocabulary shards only know combined)."""
    return (
        options.vocab_parallel is None
        and hasattr(backend, "stats_and_grads")
        and torch.is_grad_enabled()
        and any(x is not None and x.requires_grad for x in inputs)
        and options.reduction != "none"
        and not options.return_lse
    )
