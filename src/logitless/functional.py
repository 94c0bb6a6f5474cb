"""The public functional API: argument handling, shift, ignored tokens and reductions.

Backends only compute (see `logitless.backends`); everything a call means is decided here.
"""

from __future__ import annotations

import torch

from logitless._autograd import FusedLinearCrossEntropy, LinearLogitStats, Plan
from logitless._loss import TokenLoss
from logitless._validation import (
    LossOptions,
    check_dtensors,
    check_impl,
    check_inputs,
    check_no_vmap,
    check_num_items_in_batch,
)
from logitless.backends import get_backend
from logitless.backends.torch_backend import accumulation_dtype
from logitless.distributed import VocabParallel, local_inputs

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
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the logits `e @ c.T + bias` against `targets`, without forming them.

    Equals `F.cross_entropy(e @ c.T + bias, targets, ...)` up to the rounding of the input
    dtype, with memory in O(N + V) beyond the gradients.

    Under `torch.autocast`, `e`, `c` and `bias` are cast to the autocast dtype as `F.linear`
    casts them, and each gradient comes back in its input's own dtype.

    Args:
        e: (..., D) hidden states, float32, bfloat16 or float16 (float64 with impl="torch").
        c: (V, D) classifier (the lm_head weight), same dtype and device as `e`. A DTensor
            sharded by rows (`Shard(0)`) over one mesh dimension is vocabulary parallel over
            that dimension's group; a replicated one is used locally (docs/distributed.md).
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
            gets the full loss and grad_e (see docs/distributed.md).
        num_items_in_batch: with reduction="mean", the divisor of the summed loss in place of
            this call's count of non-ignored tokens (an int or a tensor): the count over every
            micro-batch of a gradient-accumulation step, as transformers passes it.

    Returns:
        The loss (a scalar, or the shape of `targets[..., shift:]` for reduction="none", ignored
        positions 0), and with `return_lse=True` also the per-token lse of that shape; float32,
        or float64 for float64 inputs.
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
    return linear_cross_entropy_with_options(e, c, targets, bias, options, num_items_in_batch)


def linear_cross_entropy_with_options(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    options: LossOptions,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`linear_cross_entropy` with its options already checked into a `LossOptions`."""
    check_no_vmap()
    check_num_items_in_batch(num_items_in_batch, options)
    shard_dim = check_dtensors(e, c, targets, bias, options)
    e, c, targets, bias, options = local_inputs(e, c, targets, bias, options, shard_dim)
    device = e.device.type if isinstance(e, torch.Tensor) else "cpu"
    if torch.is_autocast_enabled(device):
        e, c, bias = (_autocast(x, torch.get_autocast_dtype(device)) for x in (e, c, bias))
    return _linear_cross_entropy(e, c, targets, bias, options, num_items_in_batch)


def _linear_cross_entropy(e, c, targets, bias, options, num_items_in_batch):
    """The loss of checked local tensors."""
    gather = check_inputs(e, c, targets, bias, options)
    impl = check_impl(options.impl, e.device, e.dtype)
    rows = e.reshape(-1, e.shape[-1])
    row_targets = _row_targets(targets, options)
    kept = None
    shard = options.vocab_parallel
    if gather is not None:  # vocabulary shards whose ranks hold different tokens
        rows, row_targets = gather.gather_rows(rows), gather.gather_targets(row_targets)
    else:
        rows, row_targets, kept = _rows_with_target(rows, row_targets)
    valid = row_targets != NO_TARGET
    vocab = c.shape[0] if shard is None else shard.vocab_size
    token_loss = TokenLoss(options.label_smoothing, options.z_loss, vocab)
    plan = Plan(
        impl=impl,
        softcap=options.softcap,
        with_sum=options.label_smoothing > 0,
        filter_eps=_filter_eps(options, e.dtype, c.shape[0]),
        vocab_parallel=shard,
        token_gather=gather,
    )

    if _fuses(options, get_backend(impl), e, c, bias):
        weights = valid.to(accumulation_dtype(e.dtype))
        if options.reduction == "mean":
            weights = weights / _divisor(valid, num_items_in_batch)
        needs = tuple(x is not None and x.requires_grad for x in (e, c, bias))
        return FusedLinearCrossEntropy.apply(
            rows, c, bias, row_targets, weights, plan, token_loss, needs
        )[0]

    backend_targets = row_targets if shard is None else shard.localize(row_targets)
    stats = LinearLogitStats.apply(rows, c, bias, backend_targets, plan)
    if gather is not None:  # this rank's loss is that of its own tokens
        stats, valid = (gather.own(x) for x in stats), gather.own(valid)
    lse, target_logit, logit_sum = stats
    losses = torch.where(valid, token_loss(lse, target_logit, logit_sum), 0.0)
    if options.reduction == "mean":
        loss = losses.sum() / _divisor(valid, num_items_in_batch)
    elif options.reduction == "sum":
        loss = losses.sum()
    else:
        loss = _per_token(losses, targets, options.shift, kept)
    if options.return_lse:
        return loss, _per_token(torch.where(valid, lse, 0.0), targets, options.shift, kept)
    return loss


def _rows_with_target(
    rows: torch.Tensor, row_targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The rows that predict something, their targets, and their indices (None when no row is
    dropped): ignored and shifted-out rows cost no kernel time. Counting them synchronizes with
    a GPU once; inside torch.compile, where that count would break the graph, nothing is dropped.
    """
    if torch.compiler.is_compiling():
        return rows, row_targets, None
    kept = (row_targets != NO_TARGET).nonzero().squeeze(1)
    if len(kept) == len(row_targets):
        return rows, row_targets, None
    return rows.index_select(0, kept), row_targets[kept], kept


def _row_targets(targets: torch.Tensor, options: LossOptions) -> torch.Tensor:
    """Flat int64 targets, one per row of e, NO_TARGET where a row predicts nothing."""
    row_targets = targets.long().masked_fill(targets == options.ignore_index, NO_TARGET)
    if options.shift:
        dropped = row_targets.new_full((*targets.shape[:-1], options.shift), NO_TARGET)
        row_targets = torch.cat((row_targets[..., options.shift :], dropped), dim=-1)
    return row_targets.reshape(-1)


def _divisor(valid: torch.Tensor, num_items_in_batch: int | torch.Tensor | None):
    """The mean's divisor: the count of non-ignored tokens (at least 1), or the caller's."""
    if num_items_in_batch is None:
        return valid.sum().clamp(min=1)
    if isinstance(num_items_in_batch, torch.Tensor):
        return num_items_in_batch.to(valid.device).reshape(())
    return num_items_in_batch


def _autocast(x: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`x` cast (differentiably) to the autocast dtype, as autocast casts the inputs of
    `F.linear`: float64 and non-float tensors are left alone."""
    if x is None or not x.is_floating_point() or x.dtype == torch.float64:
        return x
    return x.to(dtype)


def _per_token(
    values: torch.Tensor, targets: torch.Tensor, shift: int, kept: torch.Tensor | None
) -> torch.Tensor:
    """Values of the `kept` rows (all rows when None) in the shape of `targets[..., shift:]`,
    zeros elsewhere."""
    if kept is not None:
        values = values.new_zeros(targets.numel()).index_copy(0, kept, values)
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
    """Whether the gradients are computed in the forward pass (a reduced loss alone, on one
    process: the fused pass needs each row's lse, which vocabulary shards only know combined).

    It saves the recomputation of the logits in backward (a third of the work), at the price of
    holding grad_e (float32) and grad_c from the forward until backward, and of computing them
    even if no backward follows. float16 is not fused: its gradients, rounded before the
    upstream gradient scales them, would lose a GradScaler's range. Nor is float64, whose use
    is checking (`gradcheck` runs backward twice over one graph; the fused one allows one).
    """
    return (
        options.vocab_parallel is None
        and inputs[0].dtype in (torch.float32, torch.bfloat16)
        and hasattr(backend, "stats_and_grads")
        and torch.is_grad_enabled()
        and any(x is not None and x.requires_grad for x in inputs)
        and options.reduction != "none"
        and not options.return_lse
    )
