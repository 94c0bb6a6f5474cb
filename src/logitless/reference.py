"""The materialized-logits computation that defines what logitless computes.

In float64 it is the reference every test and benchmark compares against; at the input dtype
it is eager PyTorch as users write it (logits in the input dtype, upcast to float32 for the loss).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def reference_linear_cross_entropy(
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
    weight: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`linear_cross_entropy` through the full N x V logits and `F.cross_entropy`.

    The logits are formed in `dtype` (e, c and bias are converted to it, differentiably) and
    the loss is taken in float32 or better, as eager training code does.
    """
    flat_logits, flat_targets = reference_logits(e, c, targets, bias, shift, softcap, dtype)
    if weight is not None:
        weight = weight.to(flat_logits.dtype)
    losses = F.cross_entropy(
        flat_logits,
        flat_targets,
        weight=weight,
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=label_smoothing,
    )
    valid, classes = _valid_targets(flat_targets, ignore_index)
    if weight is not None:  # each token's target weight, 0 where ignored
        target_weights = torch.where(valid, weight[classes], 0.0)
    if z_loss or return_lse:  # only then: eager code pays for no log-sum-exp it does not use
        lse = torch.where(valid, torch.logsumexp(flat_logits, dim=-1), 0.0)
    if z_loss:  # weighted like the token's cross-entropy, by its target's weight
        scale = z_loss if weight is None else z_loss * target_weights
        losses = losses + scale * lse.square()
    shape = targets[..., shift:].shape if shift else targets.shape
    if reduction == "mean":
        if weight is None:
            loss = losses.sum() / valid.sum().clamp(min=1)
        else:  # F.cross_entropy's weighted mean: over the weights of the targets (0 if none)
            total = target_weights.sum()
            loss = losses.sum() / torch.where(total == 0, 1.0, total)
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses.view(shape)
    if return_lse:
        return loss, lse.view(shape)
    return loss


def reference_linear_log_probs(
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
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`linear_log_probs` through the full logits: log_softmax(logits / T) at the targets and
    the entropy, as RL frameworks compute them (logits in `dtype`, then float32 or better)."""
    flat_logits, flat_targets = reference_logits(e, c, targets, bias, shift, softcap, dtype)
    log_p = torch.log_softmax(flat_logits / temperature, dim=-1)
    valid, classes = _valid_targets(flat_targets, ignore_index)
    picked = log_p.gather(1, classes.unsqueeze(1)).squeeze(1)
    shape = targets[..., shift:].shape if shift else targets.shape
    log_probs = torch.where(valid, picked, 0.0).view(shape)
    if not return_entropy:
        return log_probs
    entropy = -_expected(log_p.exp(), log_p)
    return log_probs, torch.where(valid, entropy, 0.0).view(shape)


def reference_linear_top_k(
    e: torch.Tensor,
    c: torch.Tensor,
    k: int,
    bias: torch.Tensor | None = None,
    *,
    temperature: float = 1.0,
    softcap: float | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`linear_top_k` through the full logits: the top k of log_softmax(logits / T)."""
    targets = torch.zeros(e.shape[:-1], dtype=torch.long, device=e.device)
    flat_logits, _ = reference_logits(e, c, targets, bias, 0, softcap, dtype)
    values, indices = torch.log_softmax(flat_logits / temperature, dim=-1).topk(k, dim=-1)
    return values.view(*e.shape[:-1], k), indices.view(*e.shape[:-1], k)


def reference_linear_distillation_loss(
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
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """`linear_distillation_loss` through both heads' full logits (the teacher detached)."""
    if targets is None:
        targets = torch.zeros(e.shape[:-1], dtype=torch.long, device=e.device)
    student, flat_targets = reference_logits(e, c, targets, bias, shift, softcap, dtype)
    teacher, _ = reference_logits(
        teacher_e.detach(), teacher_c.detach(), targets,
        None if teacher_bias is None else teacher_bias.detach(), shift, teacher_softcap, dtype,
    )  # fmt: skip
    log_p = torch.log_softmax(student / temperature, dim=-1)
    log_q = torch.log_softmax(teacher / temperature, dim=-1)
    if divergence == "forward_kl":
        losses = _expected(log_q.exp(), log_q - log_p)
    elif divergence == "reverse_kl":
        losses = _expected(log_p.exp(), log_p - log_q)
    else:
        both_masked = (log_q == -math.inf) & (log_p == -math.inf)  # else NaN gradients
        mixed = torch.stack((log_q + math.log(beta), log_p + math.log1p(-beta)))
        log_m = torch.where(
            both_masked, -math.inf, torch.logsumexp(mixed.masked_fill(both_masked, 0.0), dim=0)
        )
        losses = beta * _expected(log_q.exp(), log_q - log_m)
        losses = losses + (1 - beta) * _expected(log_p.exp(), log_p - log_m)
    return _mix_hard_and_reduce(
        losses, student, flat_targets, targets, hard_weight, ignore_index, reduction, shift
    )


def reference_linear_top_k_distillation_loss(
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
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """`linear_top_k_distillation_loss` through the student's full logits: the KL of the
    teacher's k classes and its tail bucket, the student's tail mass summed over the classes
    outside the support (not 1 minus its support mass)."""
    if targets is None:
        targets = torch.zeros(e.shape[:-1], dtype=torch.long, device=e.device)
    student, flat_targets = reference_logits(e, c, targets, bias, shift, softcap, dtype)
    if shift:
        teacher_indices = teacher_indices[..., :-shift, :]
        teacher_log_probs = teacher_log_probs[..., :-shift, :]
    k = teacher_indices.shape[-1]
    log_q = teacher_log_probs.detach().reshape(-1, k).to(student.dtype)
    log_p = torch.log_softmax(student / temperature, dim=-1)
    in_support = log_q != -math.inf
    indices = torch.where(in_support, teacher_indices.reshape(-1, k).long(), 0)  # any padding
    outside = torch.zeros_like(log_p).scatter_add(1, indices, in_support.to(log_p.dtype)) == 0
    q = torch.where(in_support, log_q.exp(), 0.0)
    losses = (q * (torch.where(in_support, log_q, 0.0) - log_p.gather(1, indices))).sum(-1)
    q_tail = torch.clamp(1.0 - q.sum(-1), min=0.0)
    p_tail = torch.where(outside, log_p.exp(), 0.0).sum(-1)
    losses = losses + torch.xlogy(q_tail, q_tail) - torch.xlogy(q_tail, p_tail)
    return _mix_hard_and_reduce(
        losses, student, flat_targets, targets, hard_weight, ignore_index, reduction, shift
    )


def _mix_hard_and_reduce(
    losses: torch.Tensor,
    student: torch.Tensor,
    flat_targets: torch.Tensor,
    targets: torch.Tensor,
    hard_weight: float,
    ignore_index: int,
    reduction: str,
    shift: int,
) -> torch.Tensor:
    """A distillation's per-row losses, (1 - h) of them plus h times the cross-entropy of the
    student's logits (at T = 1), ignored rows 0, reduced."""
    valid, classes = _valid_targets(flat_targets, ignore_index)
    if hard_weight:
        hard = F.cross_entropy(student, classes, reduction="none")
        losses = (1 - hard_weight) * losses + hard_weight * hard
    losses = torch.where(valid, losses, 0.0)
    if reduction == "mean":
        return losses.sum() / valid.sum().clamp(min=1)
    if reduction == "sum":
        return losses.sum()
    return losses.view(targets[..., shift:].shape if shift else targets.shape)


def reference_logits(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    shift: int,
    softcap: float | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat (rows, V) logits formed in `dtype` (then float32 or better, softcapped) and the flat
    targets they predict under `shift`."""
    logits = e.to(dtype) @ c.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    if shift:
        logits, targets = logits[..., :-shift, :], targets[..., shift:]
    logits = logits.float() if dtype.itemsize < 4 else logits
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).long()


def _valid_targets(
    flat_targets: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which rows have a target, and the targets with ignored rows at class 0, safe to index
    with (ignore_index may be any int: negative, or V and above)."""
    valid = flat_targets != ignore_index
    return valid, torch.where(valid, flat_targets, 0)


def _expected(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum_v probs * values per row, a class of probability 0 adding 0 (a class masked by a -inf
    logit has an infinite or NaN value), and no NaN in the gradient either."""
    return (probs * torch.where(probs > 0, values, 0.0)).sum(-1)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (the plain difference when ref is 0; inf on NaN or Inf)."""
    x, ref = x.double().cpu(), ref.double().cpu()
    if not (torch.isfinite(x).all() and torch.isfinite(ref).all()):
        return math.inf
    diff, norm = (x - ref).norm().item(), ref.norm().item()
    return diff / norm if norm else diff
