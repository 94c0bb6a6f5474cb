"""The public functional API: argument handling, shift, ignored tokens and reductions.

Backends only compute (see `logitless.backends`); everything a call means is decided here.
"""

from __future__ import annotations

import dataclasses

import torch

from logitless._autograd import (
    FusedLinearCrossEntropy,
    FusedLinearDivergence,
    LinearLogitStats,
    Plan,
)
from logitless._loss import (
    DIVERGENCES,
    HARD_LOSS_STATISTICS,
    TokenLoss,
    divergence_from_statistics,
    mixed_with_hard_loss,
    top_k_forward_kl,
)
from logitless._validation import (
    Checked,
    DistillationOptions,
    LossOptions,
    check_bool,
    check_dtensors,
    check_hard_targets,
    check_hard_weight,
    check_impl,
    check_inputs,
    check_local_tensors,
    check_no_vmap,
    check_num_items_in_batch,
    check_teacher,
    check_teacher_dtensors,
    check_teacher_top_k,
    check_tensors,
    check_top_k,
    check_weight,
    temperature_scale,
)
from logitless.backends import get_backend
from logitless.backends.torch_backend import accumulation_dtype
from logitless.distributed import DTensor, VocabParallel, local_inputs

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
    weight: torch.Tensor | None = None,
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
        z_loss: adds `z_loss * lse**2` per token (PaLM), reduced like the loss (with `weight`,
            weighted by the target's class weight, as the token's cross-entropy).
        return_lse: also return the per-token log-sum-exp (differentiable).
        filter_eps: gradient filtering: the most softmax probability per token that skipped
            backward tiles may hold in all: a float, or None (exact); "auto" is exact, since
            on a trained model's data filtering within eager's accuracy skips almost nothing.
        impl: "auto" (Triton on CUDA, PyTorch elsewhere), "torch" or "triton".
        vocab_parallel: this rank's vocabulary shard (`logitless.VocabParallel`): `c` and `bias`
            hold its rows only, `e` and `targets` are the same on every rank, and every rank
            gets the full loss and grad_e (see docs/distributed.md).
        num_items_in_batch: with reduction="mean", the divisor of the summed loss in place of
            this call's count of non-ignored tokens (an int or a tensor): the count over every
            micro-batch of a gradient-accumulation step, as transformers passes it.
        weight: optional (V,) class weights, as `F.cross_entropy(weight=)`: a token's loss is
            scaled by its target's weight, label smoothing weighs each class by its weight, and
            "mean" divides by the sum of the non-ignored targets' weights (unless
            `num_items_in_batch` is given). Under `vocab_parallel`, the full (V,) weights on
            every rank.

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
    return linear_cross_entropy_with_options(
        e, c, targets, bias, options, num_items_in_batch, weight=weight
    )


def linear_cross_entropy_with_options(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    options: LossOptions,
    num_items_in_batch: int | torch.Tensor | None = None,
    *,
    weight: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`linear_cross_entropy` with its options already checked into a `LossOptions`."""
    check_num_items_in_batch(num_items_in_batch, options)
    e, c, targets, bias, options = _local_inputs(e, c, targets, bias, options)
    return _linear_cross_entropy(e, c, targets, bias, options, num_items_in_batch, weight)


def _local_inputs(e, c, targets, bias, options: LossOptions):
    """The arguments as the backends take them: DTensors as this rank's local tensors (a
    row-sharded c as vocabulary parallel, see `check_dtensors`) and, under `torch.autocast`,
    e, c and bias in the autocast dtype, as `F.linear` gets them."""
    check_no_vmap()
    shard_dim = check_dtensors(e, c, targets, bias, options)
    e, c, targets, bias, options = local_inputs(e, c, targets, bias, options, shard_dim)
    e, c, bias = _under_autocast(e, c, bias)
    return e, c, targets, bias, options


def _under_autocast(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Under `torch.autocast` on their device, `tensors` in the autocast dtype (as `F.linear`
    gets them); else as they are."""
    device = tensors[0].device.type if isinstance(tensors[0], torch.Tensor) else "cpu"
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return tensors
    return tuple(_autocast(x, torch.get_autocast_dtype(device)) for x in tensors)


def _linear_cross_entropy(e, c, targets, bias, options, num_items_in_batch, weight):
    """The loss of checked local tensors."""
    checked = check_inputs(
        e, c, targets, bias, options, more=lambda: check_weight(weight, e, c, options),
        num_items_in_batch=num_items_in_batch, agreed=(weight,),
    )  # fmt: skip
    impl = check_impl(options.impl, e.device, e.dtype)
    rows, row_targets, kept = _backend_rows(e, targets, options, checked)
    gather = checked.gather
    shard = options.vocab_parallel
    valid = row_targets != NO_TARGET
    vocab = c.shape[0] if shard is None else shard.vocab_size
    target_weights = column_weight = weight_total = None
    if weight is not None:
        weight32 = weight.to(accumulation_dtype(e.dtype))
        target_weights = torch.where(valid, weight32[row_targets.clamp(min=0)], 0.0)
        column_weight = weight32 if shard is None else weight32[shard.start : shard.stop]
        weight_total = weight32.sum()
    token_loss = TokenLoss(options.label_smoothing, options.z_loss, vocab, weight_total)
    plan = Plan(
        impl=impl,
        softcap=options.softcap,
        filter_eps=_filter_eps(options, c.shape[0]),
        vocab_parallel=shard,
        column_weight=column_weight,
        token_gather=gather,
    )

    if _fuses(options, get_backend(impl), e, c, bias):
        weights = valid.to(accumulation_dtype(e.dtype))
        if options.reduction == "mean":
            weights = weights / _divisor(valid, num_items_in_batch, target_weights)
        needs = tuple(x is not None and x.requires_grad for x in (e, c, bias))
        return FusedLinearCrossEntropy.apply(
            rows, c, bias, row_targets, weights, target_weights, plan, token_loss, needs
        )[0]

    backend_targets = row_targets if shard is None else shard.localize(row_targets)
    names = ("lse", "target", "lse_residual", *(("sum",) if options.label_smoothing > 0 else ()))
    stats = _stats(rows, c, bias, backend_targets, plan, names)
    if gather is not None:  # this rank's loss is that of its own tokens
        stats = {name: gather.own(x) for name, x in stats.items()}
        valid = gather.own(valid)
        target_weights = None if target_weights is None else gather.own(target_weights)
    lse = stats["lse"]
    losses = token_loss(
        lse, stats["target"], stats.get("sum"), target_weights, stats["lse_residual"]
    )
    losses = torch.where(valid, losses, 0.0)
    if options.reduction == "mean":
        loss = losses.sum() / _divisor(valid, num_items_in_batch, target_weights)
    elif options.reduction == "sum":
        loss = losses.sum()
    else:
        loss = _per_token(losses, targets, options.shift, kept)
    if options.return_lse:
        return loss, _per_token(torch.where(valid, lse, 0.0), targets, options.shift, kept)
    return loss


def linear_log_probs(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    shift: int = 0,
    softcap: float | None = None,
    filter_eps: float | str | None = None,
    impl: str = "auto",
    vocab_parallel: VocabParallel | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of `targets` (and the entropy) under
    `softmax(softcap(e @ c.T + bias) / temperature)`, without forming the logits.

    Both outputs are differentiable with any upstream gradient (policy-gradient losses weight
    each token differently). The values are never filtered: `filter_eps` only lets the backward
    skip negligible tiles, and its default here is None (exact gradients), because RL compares
    these log-probs and their gradients with an inference engine's and the entropy's gradient
    p (mean - z) is not bounded by a skipped mass; with `return_entropy` filtering is off anyway.

    Args:
        e, c, targets, bias, ignore_index, shift, softcap, impl, vocab_parallel: as in
            `linear_cross_entropy`.
        temperature: T > 0 divides the (softcapped) logits.
        return_entropy: also return each token's entropy, `lse - sum_v p_v z_v`, formed as
            `log sum_v exp(z_v - max z) - sum_v p_v (z_v - max z)`.
        filter_eps: as in `linear_cross_entropy`; None (exact) by default.

    Returns:
        float32 log-probs (float64 for float64 inputs) shaped like `targets[..., shift:]` (0 at
        ignored positions), and with `return_entropy` the entropies of that shape (0 at ignored
        positions).
    """
    options = LossOptions(
        ignore_index=ignore_index, shift=shift, softcap=softcap, filter_eps=filter_eps,
        impl=impl, vocab_parallel=vocab_parallel,
    )  # fmt: skip
    scale = temperature_scale(temperature)
    check_bool("return_entropy", return_entropy)
    e, c, targets, bias, options = _local_inputs(e, c, targets, bias, options)
    checked = check_inputs(e, c, targets, bias, options, agreed=(scale, return_entropy))
    rows, row_targets, kept = _backend_rows(e, targets, options, checked)
    gather = checked.gather
    valid = row_targets != NO_TARGET
    shard = options.vocab_parallel
    backend_targets = row_targets if shard is None else shard.localize(row_targets)
    plan = Plan(
        impl=check_impl(impl, e.device, e.dtype),
        softcap=options.softcap,
        filter_eps=_filter_eps(options, c.shape[0]),
        vocab_parallel=shard,
        token_gather=gather,
        scale=scale,
    )
    names = ("lse", "lse_residual", "target", *(("entropy",) if return_entropy else ()))
    found = _stats(rows, c, bias, backend_targets, plan, names)
    if gather is not None:  # this rank's values are those of its own tokens
        found = {name: gather.own(x) for name, x in found.items()}
        valid = gather.own(valid)
    # near 0 on a confident token, and precise there
    log_prob = (found["target"] - found["lse"]) - found["lse_residual"]
    log_probs = _per_token(torch.where(valid, log_prob, 0.0), targets, shift, kept)
    if not return_entropy:
        return log_probs
    entropy = torch.where(valid, found["entropy"], 0.0)
    return log_probs, _per_token(entropy, targets, shift, kept)


def linear_top_k(
    e: torch.Tensor,
    c: torch.Tensor,
    k: int,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely classes of each row of `e` under
    `softmax(softcap(e @ c.T + bias) / temperature)`, without forming the logits.

    One sweep over the vocabulary keeps a running top-k of the logits and their log-sum-exp,
    and gives the values as log_softmax does. They are differentiable in e, c and bias: their
    gradient, a one-hot at each class less the softmax, is one more sweep that recomputes the
    logits and forms both parts in one tile before any 16-bit rounding (a confident class's
    1 - p keeps its digits). k = 1 gives argmax predictions (and accuracy) without logits.

    Returns:
        (values, indices), both (..., k): float32 log-probabilities (float64 for float64 inputs)
        in descending order and their int64 class indices.
    """
    options = LossOptions(softcap=softcap, impl=impl)
    scale = temperature_scale(temperature)
    check_tensors(e=e)
    no_targets = torch.full(e.shape[:-1], NO_TARGET, dtype=torch.long, device=e.device)
    e, c, _, bias, local = _local_inputs(e, c, no_targets, bias, options)
    if local.vocab_parallel is not None:
        raise ValueError("c must not be sharded by rows for linear_top_k: pass c.full_tensor()")
    check_inputs(e, c, no_targets, bias, dataclasses.replace(options, ignore_index=NO_TARGET))
    k = check_top_k(k, c.shape[0])
    rows = e.reshape(-1, e.shape[-1])
    plan = Plan(
        impl=check_impl(impl, e.device, e.dtype),
        softcap=options.softcap,
        filter_eps=None,
        scale=scale,
    )
    _, indices, values, _ = LinearLogitStats.apply(
        rows, c, bias, no_targets.reshape(-1), None, None, None, plan, ("lse",), k
    )
    lead = e.shape[:-1]
    return values.reshape(*lead, k), indices.reshape(*lead, k)


def linear_distillation_loss(
    e: torch.Tensor,
    c: torch.Tensor,
    teacher_e: torch.Tensor,
    teacher_c: torch.Tensor,
    targets: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    *,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    teacher_softcap: float | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    shift: int = 0,
    softcap: float | None = None,
    filter_eps: float | str | None = None,
    impl: str = "auto",
    vocab_parallel: VocabParallel | None = None,
) -> torch.Tensor:
    """A divergence between the teacher's and the student's softmax over one vocabulary, at a
    temperature, without forming either head's logits; the teacher gets no gradient.

    P_s = softmax(softcap(e @ c.T + bias) / T), P_t likewise from the teacher head (hidden
    size D_t may differ from D). `divergence` is "forward_kl" KL(P_t || P_s), "reverse_kl"
    KL(P_s || P_t), or "jsd" beta KL(P_t || M) + (1 - beta) KL(P_s || M) with
    M = beta P_t + (1 - beta) P_s (no implicit T**2 factor). With `hard_weight` h, the loss is
    (1 - h) divergence + h cross-entropy of the student's logits (at T = 1) against `targets`;
    at T = 1 it costs no sweep of its own. See docs/statistics.md for the statistics each
    divergence needs and its sweeps.

    Args:
        e, c, bias: the student (gradients flow to these).
        teacher_e, teacher_c, teacher_bias: the teacher head, (..., D_t), (V, D_t), (V,).
        targets: optional: ignore_index marks tokens left out, shift aligns them, and they are
            the labels of the hard loss.
        reduction, ignore_index, shift, softcap, impl, vocab_parallel: as in
            `linear_cross_entropy` (DTensors and torch.autocast included); under vocabulary
            parallelism both classifiers hold the same rows (a DTensor teacher_c is laid out
            as c).
        filter_eps: None (exact) by default; the divergences' gradients reach every logit, so
            only the hard loss could skip tiles.

    Returns:
        The float32 loss (float64 for float64 inputs): a scalar, or per token (the shape of
        `targets[..., shift:]`).
    """
    distillation = DistillationOptions(
        divergence=divergence, beta=beta, temperature=temperature, hard_weight=hard_weight,
        teacher_softcap=teacher_softcap, ignore_index=ignore_index, reduction=reduction,
        shift=shift, softcap=softcap, filter_eps=filter_eps, impl=impl,
        vocab_parallel=vocab_parallel,
    )  # fmt: skip
    options = distillation.loss_options()
    beta, hard_weight, teacher_softcap = (
        distillation.beta,
        distillation.hard_weight,
        distillation.teacher_softcap,
    )
    scale = 1.0 / distillation.temperature
    check_hard_targets(hard_weight, targets)
    labels, options = _labels(e, targets, options)
    check_teacher_dtensors(teacher_e, teacher_c, teacher_bias, c)
    teacher_e, teacher_c, teacher_bias = _under_autocast(
        *(
            x.to_local() if isinstance(x, DTensor) else x
            for x in (teacher_e, teacher_c, teacher_bias)
        )
    )
    e, c, labels, bias, options = _local_inputs(e, c, labels, bias, options)
    teacher_layout = [  # the hidden size and dtypes (bias shards may differ in length)
        teacher_e.shape[-1] if isinstance(teacher_e, torch.Tensor) and teacher_e.dim() else None,
        *(getattr(x, "dtype", None) for x in (teacher_e, teacher_c, teacher_bias)),
    ]
    checked = check_inputs(
        e, c, labels, bias, options,
        more=lambda: check_teacher(e, c, teacher_e, teacher_c, teacher_bias),
        agreed=(dataclasses.replace(distillation, vocab_parallel=None), teacher_layout),
    )  # fmt: skip
    rows, row_targets, kept = _backend_rows(e, labels, options, checked)
    gather = checked.gather
    teacher_rows = teacher_e.detach().reshape(-1, teacher_e.shape[-1])
    if gather is not None:
        teacher_rows = gather.gather_rows(teacher_rows)
    elif kept is not None:
        teacher_rows = teacher_rows.index_select(0, kept)
    teacher = (
        teacher_rows,
        teacher_c.detach(),
        None if teacher_bias is None else teacher_bias.detach(),
    )
    valid = row_targets != NO_TARGET
    shard = options.vocab_parallel
    backend_targets = row_targets if shard is None else shard.localize(row_targets)
    plan = Plan(
        impl=check_impl(impl, e.device, e.dtype), softcap=options.softcap, filter_eps=None,
        vocab_parallel=shard, token_gather=gather, scale=scale, teacher_softcap=teacher_softcap,
        beta=beta,
    )  # fmt: skip
    weights = DIVERGENCES[divergence]
    shared = hard_weight if scale == 1.0 else 0.0  # the hard loss's statistics in the same sweep
    hard_plan = dataclasses.replace(plan, scale=1.0, filter_eps=_filter_eps(options, c.shape[0]))
    if _fuses(options, get_backend(plan.impl), e, c, bias):
        token_weights = valid.to(accumulation_dtype(e.dtype))
        if reduction == "mean":
            token_weights = token_weights / _divisor(valid, None)
        needs = tuple(x is not None and x.requires_grad for x in (e, c, bias))
        apart = hard_weight - shared
        loss = FusedLinearDivergence.apply(
            rows, c, bias, backend_targets, *teacher, token_weights * (1.0 - apart), plan,
            weights, shared, needs,
        )[0]  # fmt: skip
        if apart:
            loss = loss + FusedLinearCrossEntropy.apply(
                rows, c, bias, backend_targets, token_weights * apart, None, hard_plan,
                TokenLoss(0.0, 0.0, c.shape[0]), needs,
            )[0]  # fmt: skip
        return loss
    names = tuple(dict.fromkeys((*weights, *(HARD_LOSS_STATISTICS if shared else ()))))
    found, *_ = LinearLogitStats.apply(rows, c, bias, backend_targets, *teacher, plan, names, 0)
    values = dict(zip(names, found, strict=True))
    losses = _with_hard_loss(
        divergence_from_statistics(weights, values), values, hard_weight, shared,
        (rows, c, bias, backend_targets, hard_plan),
    )  # fmt: skip
    if gather is not None:  # this rank's loss is that of its own tokens
        losses, valid = gather.own(losses), gather.own(valid)
    return _reduce(torch.where(valid, losses, 0.0), valid, reduction, labels, shift, kept)


def linear_top_k_distillation_loss(
    e: torch.Tensor,
    c: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    targets: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    shift: int = 0,
    softcap: float | None = None,
    filter_eps: float | str | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Forward KL from a cached teacher, known by its top-k log-probabilities per token (as
    offline distillation stores them), to the student, without forming the student's logits.

    The teacher's mass outside its k classes, 1 - sum exp(teacher_log_probs), is one more
    bucket, compared with the student's mass outside them: the loss is the KL divergence of
    the k + 1 buckets,

        sum_{i in S} q_i (log q_i - log p_i) + q_tail (log q_tail - log p_tail),

    the full KL when the teacher's tail is empty, never more than it otherwise, and 0 only
    when the student matches the teacher on S and in total outside it. Unlike renormalizing
    both over S, it keeps pushing the student's mass out of classes the teacher finds
    unlikely. The student needs its log-sum-exp (one sweep over the vocabulary, whose
    gradient is one more) and its logits at the k classes and the target (N x (k + 1) dot
    products, in row blocks), the target's log-prob from the sweep anchoring the others'.

    Args:
        e, c, bias: the student (gradients flow to these); P_s = softmax(softcap(e @ c.T +
            bias) / temperature).
        teacher_indices: (..., k) integer classes of the teacher's support, the leading
            shape of e (row t: the teacher's prediction at position t, like e's).
        teacher_log_probs: (..., k) the teacher's log-probabilities of those classes, at
            `temperature` (taken as given: a cached teacher cannot be re-tempered); -inf
            marks padding (fewer than k classes; its index may be anything, -1 say). Gets no
            gradient.
        targets: optional: ignore_index marks tokens left out, shift aligns them, and they are
            the labels of the hard loss.
        temperature: T > 0 divides the student's (softcapped) logits.
        hard_weight: h mixes in the student's cross-entropy at T = 1:
            (1 - h) divergence + h cross-entropy.
        reduction, ignore_index, shift, softcap, impl: as in `linear_cross_entropy`.
        filter_eps: taken for a uniform signature; no tile is skipped (the gradient of the
            student's tail reaches every class outside the support).

    Returns:
        The float32 loss (float64 for float64 inputs): a scalar, or per token (the shape of
        `targets[..., shift:]`).
    """
    options = LossOptions(
        ignore_index=ignore_index, reduction=reduction, shift=shift, softcap=softcap,
        filter_eps=filter_eps, impl=impl,
    )  # fmt: skip
    scale = temperature_scale(temperature)
    hard_weight = check_hard_weight(hard_weight)
    check_hard_targets(hard_weight, targets)
    check_local_tensors(
        "linear_top_k_distillation_loss", e=e, c=c, targets=targets, bias=bias,
        teacher_log_probs=teacher_log_probs,
    )  # fmt: skip
    check_no_vmap()
    e, c, bias = _under_autocast(e, c, bias)
    labels, options = _labels(e, targets, options)
    checked = check_inputs(e, c, labels, bias, options)
    check_teacher_top_k(e, c, teacher_indices, teacher_log_probs)
    if targets is None:  # the teacher's likeliest class anchors the support's log-probs
        likeliest = teacher_log_probs.argmax(-1, keepdim=True)
        labels = teacher_indices.gather(-1, likeliest).squeeze(-1).long().clamp(min=0)
        if options.shift:  # row t's where the shift reads row t's
            labels = labels.roll(options.shift, dims=-1)
    rows, row_targets, kept = _rows_with_target(
        e.reshape(-1, e.shape[-1]), _row_targets(labels, options), checked.predicting
    )
    k = teacher_indices.shape[-1]
    teacher_log_q = teacher_log_probs.detach().reshape(-1, k).to(accumulation_dtype(e.dtype))
    support = teacher_indices.reshape(-1, k).long().masked_fill(teacher_log_q.isneginf(), -1)
    if kept is not None:
        support, teacher_log_q = support[kept], teacher_log_q[kept]
    valid = row_targets != NO_TARGET
    plan = Plan(
        impl=check_impl(impl, e.device, e.dtype), softcap=options.softcap,
        filter_eps=_filter_eps(options, c.shape[0]), scale=scale, support=support,
    )  # fmt: skip
    shared = hard_weight if scale == 1.0 else 0.0  # the hard loss's statistics in the same sweep
    names = (*HARD_LOSS_STATISTICS, "support_tail")
    stats, _, log_p, _ = LinearLogitStats.apply(
        rows, c, bias, row_targets, None, None, None, plan, names, 0
    )
    found = dict(zip(names, stats, strict=True))
    divergence = top_k_forward_kl(teacher_log_q, log_p, found["support_tail"])
    losses = _with_hard_loss(
        divergence, found, hard_weight, shared,
        (rows, c, bias, row_targets, dataclasses.replace(plan, scale=1.0, support=None)),
    )  # fmt: skip
    return _reduce(torch.where(valid, losses, 0.0), valid, reduction, labels, shift, kept)


def _with_hard_loss(
    divergence: torch.Tensor,
    found: dict[str, torch.Tensor],
    hard_weight: float,
    shared: float,
    sweep_at_one: tuple,
) -> torch.Tensor:
    """(1 - h) divergence + h cross-entropy per row, the cross-entropy's statistics from the
    divergence's sweep `found` where it shares them (T = 1), else from a sweep of their own:
    `_stats` of (rows, c, bias, targets, its plan at T = 1)."""
    hard = found
    if hard_weight and not shared:
        hard = _stats(*sweep_at_one, HARD_LOSS_STATISTICS)
    return mixed_with_hard_loss(divergence, hard, hard_weight)


def _stats(
    rows, c, bias, backend_targets, plan: Plan, names: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """The statistics `names` of the student alone, each (N,), differentiable."""
    found = LinearLogitStats.apply(rows, c, bias, backend_targets, None, None, None, plan, names, 0)
    return dict(zip(names, found[0], strict=True))


def _reduce(
    losses: torch.Tensor,
    valid: torch.Tensor,
    reduction: str,
    targets: torch.Tensor,
    shift: int,
    kept: torch.Tensor | None,
) -> torch.Tensor:
    """Per-row losses (0 where not `valid`) reduced: the mean over valid rows, the sum, or per
    token in the shape of `targets[..., shift:]`."""
    if reduction == "mean":
        return losses.sum() / valid.sum().clamp(min=1)
    if reduction == "sum":
        return losses.sum()
    return _per_token(losses, targets, shift, kept)


def _labels(
    e: torch.Tensor, targets: torch.Tensor | None, options: LossOptions
) -> tuple[torch.Tensor, LossOptions]:
    """A distillation's `targets` and options, or without targets zeros in their place and no
    ignore_index: every row predicts (an ignore_index of 0 would have ignored them all)."""
    if targets is not None:
        return targets, options
    check_tensors(e=e)
    zeros = torch.zeros(e.shape[:-1], dtype=torch.long, device=e.device)
    return zeros, dataclasses.replace(options, ignore_index=NO_TARGET)


def _backend_rows(
    e: torch.Tensor, targets: torch.Tensor, options: LossOptions, checked: Checked
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The rows of e the backend gets, their targets (NO_TARGET for none) and the indices of
    the kept rows (see `_rows_with_target`): every rank's rows where vocabulary shards hold
    different tokens (`checked.gather`), else this call's rows that have a target."""
    rows, row_targets = e.reshape(-1, e.shape[-1]), _row_targets(targets, options)
    if checked.gather is not None:
        gather = checked.gather
        return gather.gather_rows(rows), gather.gather_targets(row_targets), None
    return _rows_with_target(rows, row_targets, checked.predicting)


def _rows_with_target(
    rows: torch.Tensor, row_targets: torch.Tensor, predicting: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The rows that predict something, their targets, and their indices in order (None when
    no row is dropped): ignored and shifted-out rows cost no kernel time.

    Their count, `predicting`, comes with the target check's host read; where that check ran on
    the device (None) it is read here, one synchronization with a GPU. Inside torch.compile,
    where a count would break the graph, nothing is dropped.
    """
    if torch.compiler.is_compiling():
        return rows, row_targets, None
    dropped = row_targets == NO_TARGET
    if predicting is None:
        predicting = len(row_targets) - int(dropped.sum())
    if predicting == len(row_targets):
        return rows, row_targets, None
    kept = dropped.to(torch.uint8).argsort(stable=True)[:predicting]  # a stable sort: in order
    return rows.index_select(0, kept), row_targets[kept], kept


def _row_targets(targets: torch.Tensor, options: LossOptions) -> torch.Tensor:
    """Flat int64 targets, one per row of e, NO_TARGET where a row predicts nothing."""
    row_targets = targets.long()  # not compared in a narrower dtype, where -100 wraps around
    row_targets = row_targets.masked_fill(row_targets == options.ignore_index, NO_TARGET)
    if options.shift:
        dropped = row_targets.new_full((*targets.shape[:-1], options.shift), NO_TARGET)
        row_targets = torch.cat((row_targets[..., options.shift :], dropped), dim=-1)
    return row_targets.reshape(-1)


def _divisor(
    valid: torch.Tensor,
    num_items_in_batch: int | torch.Tensor | None,
    target_weights: torch.Tensor | None = None,
):
    """The mean's divisor: the count of non-ignored tokens (at least 1), with class weights the
    sum of their targets' weights (1 if 0), or the caller's `num_items_in_batch`."""
    if num_items_in_batch is None and target_weights is not None:
        total = target_weights.sum()
        return torch.where(total == 0, 1.0, total)
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
    return values[..., : targets.shape[-1] - shift].contiguous() if shift else values


def _filter_eps(options: LossOptions, vocab_rows: int) -> float | None:
    """The filtering budget the backend gets for its `vocab_rows` classes: under vocabulary
    parallelism each shard gets its share, so that a token loses at most filter_eps in all."""
    if options.label_smoothing and options.softcap is not None:
        return None  # the smoothing gradient passes the softcap: no tile is negligible
    eps = options.resolved_filter_eps()
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
