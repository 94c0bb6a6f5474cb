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
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`linear_cross_entropy` through the full N x V logits and `F.cross_entropy`.

    The logits are formed in `dtype` (e, c and bias are converted to it, differentiably) and
    the loss is taken in float32 or better, as eager training code does.
    """
    logits = e.to(dtype) @ c.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    if shift:
        logits, targets = logits[..., :-shift, :], targets[..., shift:]
    logits = logits.float() if dtype.itemsize < 4 else logits
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    losses = F.cross_entropy(
        flat_logits,
        flat_targets,
        ignore_index=ignore_index,
        reduction="none",
        label_smoothing=label_smoothing,
    )
    valid = flat_targets != ignore_index
    if z_loss or return_lse:  # only then: eager code pays for no log-sum-exp it does not use
        lse = torch.where(valid, torch.logsumexp(flat_logits, dim=-1), 0.0)
    if z_loss:
        losses = losses + z_loss * lse.square()
    if reduction == "mean":
        loss = losses.sum() / valid.sum().clamp(min=1)
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses.view(targets.shape)
    if return_lse:
        return loss, lse.view(targets.shape)
    return loss


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (the plain difference when ref is 0; inf on NaN or Inf)."""
    x, ref = x.double().cpu(), ref.double().cpu()
    if not (torch.isfinite(x).all() and torch.isfinite(ref).all()):
        return math.inf
    diff, norm = (x - ref).norm().item(), ref.norm().item()
    return diff / norm if norm else diff
