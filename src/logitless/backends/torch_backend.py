"""Portable backend: blockwise PyTorch on any device, never holding more than one block of logits.

Rows are processed in blocks whose fp32 logits fit a memory budget (LOGITLESS_BLOCK_MB, 20 MiB by
default), never in proportion to N x V. Each block's logits are turned into the softmax and then
into the gradient of the logits in place, so one buffer serves the whole pipeline. float64
inputs are computed in float64 throughout (for `torch.autograd.gradcheck`); every other dtype
accumulates in float32.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

BLOCK_MB_ENV = "LOGITLESS_BLOCK_MB"
DEFAULT_BLOCK_MB = 20.0
FILTER_CHUNK = 512
"""Vocabulary columns per gradient-filtering decision."""

RowGrads = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
Coefficients = Callable[[slice, torch.Tensor], RowGrads]
"""(rows, lse of those rows) -> (grad_lse, grad_target, grad_sum or None) of those rows."""


def stats(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    softcap: float | None,
    with_sum: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    lse, target_logit, logit_sum, *_ = _sweep(
        e, c, bias, targets, softcap=softcap, with_sum=with_sum
    )
    return lse, target_logit, logit_sum


def grads(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    grad_target: torch.Tensor,
    grad_sum: torch.Tensor | None,
    *,
    softcap: float | None,
    filter_eps: float | None,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    def coefficients(rows: slice, _: torch.Tensor):
        return grad_lse[rows], grad_target[rows], None if grad_sum is None else grad_sum[rows]

    *_, grad_e, grad_c, grad_bias = _sweep(
        e, c, bias, targets, softcap=softcap, with_sum=False, lse=lse,
        coefficients=coefficients, filter_eps=filter_eps, needs=needs,
    )  # fmt: skip
    return grad_e, grad_c, grad_bias


def stats_and_grads(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    coefficients: Coefficients,
    *,
    softcap: float | None,
    with_sum: bool,
    filter_eps: float | None,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, ...]:
    """`stats` and `grads` in one pass, the coefficients given per block from its lse."""
    return _sweep(
        e, c, bias, targets, softcap=softcap, with_sum=with_sum,
        coefficients=coefficients, filter_eps=filter_eps, needs=needs,
    )  # fmt: skip


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of logits, statistics and gradient sums for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows_per_block(n_rows: int, vocab: int, bytes_per_logit: int) -> int:
    """How many rows of logits fit the memory budget (at least one)."""
    budget = float(os.environ.get(BLOCK_MB_ENV, DEFAULT_BLOCK_MB)) * 2**20
    return max(1, min(n_rows, int(budget // (vocab * bytes_per_logit))))


def _sweep(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    softcap: float | None,
    with_sum: bool,
    lse: torch.Tensor | None = None,
    coefficients: Coefficients | None = None,
    filter_eps: float | None = None,
    needs: tuple[bool, bool, bool] = (False, False, False),
) -> tuple[torch.Tensor | None, ...]:
    """One pass over row blocks: the statistics when `lse` is None, gradients when asked."""
    n, dim = e.shape
    vocab = c.shape[0]
    forward = lse is None
    backward = coefficients is not None and any(needs)
    acc = accumulation_dtype(e.dtype)
    half = e.dtype != acc
    in_acc = dict(device=e.device, dtype=acc)
    size = acc.itemsize

    bytes_per_logit = size + (size if softcap and backward else 0) + (e.element_size() * half)
    block = rows_per_block(n, vocab, bytes_per_logit)
    logits_buffer = torch.empty(block, vocab, **in_acc)
    deriv_buffer = torch.empty(block, vocab, **in_acc) if softcap and backward else None
    bias32 = None if bias is None else bias.to(acc)

    target_logit = logit_sum = None
    if forward:
        lse = torch.empty(n, **in_acc)
        target_logit = torch.empty(n, **in_acc)
        logit_sum = torch.empty(n, **in_acc) if with_sum else None
    grad_e = torch.zeros(n, dim, **in_acc) if backward and needs[0] else None
    grad_c = torch.zeros(vocab, dim, **in_acc) if backward and needs[1] else None
    grad_bias = torch.zeros(vocab, **in_acc) if backward and needs[2] else None

    for start in range(0, n, block):
        rows = slice(start, min(n, start + block))
        e_rows, t = e[rows], targets[rows]
        z = _logits(e_rows, c, bias32, logits_buffer[: rows.stop - start])
        deriv = None
        if softcap:
            z.div_(softcap).tanh_()
            if deriv_buffer is not None:
                deriv = torch.mul(z, z, out=deriv_buffer[: z.shape[0]]).neg_().add_(1)
            z.mul_(softcap)
        if forward:
            target_logit[rows] = _gather_targets(z, t)
            if with_sum:
                logit_sum[rows] = z.sum(1)
            lse[rows] = _exp_in_place(z, normalize=backward)
        else:
            z.sub_(lse[rows, None]).exp_()
        if not backward:
            continue

        ranges = _kept_ranges(z, t, filter_eps) if filter_eps else [(0, vocab)]
        grad_lse, grad_target, grad_sum = coefficients(rows, lse[rows])
        d = _softmax_to_grad(z, t, grad_lse, grad_target, grad_sum, deriv)
        e_rows32 = e_rows.to(acc) if half and needs[1] else e_rows
        for lo, hi in ranges:
            d_part = d[:, lo:hi]
            if grad_e is not None:
                if half:
                    grad_e[rows] += d_part.to(e.dtype) @ c[lo:hi]
                else:
                    grad_e[rows].addmm_(d_part, c[lo:hi])
            if grad_c is not None:
                grad_c[lo:hi].addmm_(d_part.T, e_rows32)
            if grad_bias is not None:
                grad_bias[lo:hi] += d_part.sum(0)
    return lse, target_logit, logit_sum, grad_e, grad_c, grad_bias


def _logits(
    e_rows: torch.Tensor, c: torch.Tensor, bias32: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """Logits of a row block in the dtype of `out` (the accumulation dtype), written into it."""
    if e_rows.dtype == out.dtype:
        torch.mm(e_rows, c.T, out=out)
    else:
        out.copy_(e_rows @ c.T)
    if bias32 is not None:
        out.add_(bias32)
    return out


def _gather_targets(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    picked = z.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
    return picked.masked_fill_(t < 0, 0.0)


def _exp_in_place(z: torch.Tensor, *, normalize: bool) -> torch.Tensor:
    """Turn z into exp(z - max) (the softmax if `normalize`) and return the row log-sum-exp."""
    peak = z.amax(1, keepdim=True)
    z.sub_(peak).exp_()
    total = z.sum(1, keepdim=True)
    if normalize:
        z.div_(total)
    return (peak + total.log()).squeeze(1)


def _softmax_to_grad(
    p: torch.Tensor,
    t: torch.Tensor,
    grad_lse: torch.Tensor,
    grad_target: torch.Tensor,
    grad_sum: torch.Tensor | None,
    deriv: torch.Tensor | None,
) -> torch.Tensor:
    """In place: softmax p -> gradient of the pre-softcap logits."""
    d = p.mul_(grad_lse.unsqueeze(1))
    at_target = torch.where(t >= 0, grad_target, 0.0).unsqueeze(1)
    d.scatter_add_(1, t.clamp(min=0).unsqueeze(1), at_target)
    if grad_sum is not None:
        d.add_(grad_sum.unsqueeze(1))
    if deriv is not None:
        d.mul_(deriv)
    return d


def _kept_ranges(p: torch.Tensor, t: torch.Tensor, eps: float) -> list[tuple[int, int]]:
    """Column ranges to compute; the rest is skipped.

    A chunk of columns that holds no target is skipped when, in every row, its softmax mass is
    at most its share eps * width / V of the budget, so no row loses more than eps in all.
    """
    vocab = p.shape[1]
    whole = vocab // FILTER_CHUNK * FILTER_CHUNK
    masses = [p[:, :whole].unflatten(1, (-1, FILTER_CHUNK)).sum(2)] if whole else []
    if whole < vocab:
        masses.append(p[:, whole:].sum(1, keepdim=True))
    widths = torch.full((len(range(0, vocab, FILTER_CHUNK)),), FILTER_CHUNK, device=p.device)
    widths[-1] = vocab - (widths.numel() - 1) * FILTER_CHUNK
    keep = torch.cat(masses, 1).amax(0) > widths * (eps / vocab)
    keep[t[t >= 0] // FILTER_CHUNK] = True
    ranges: list[tuple[int, int]] = []
    for chunk, kept in enumerate(keep.tolist()):
        if not kept:
            continue
        lo, hi = chunk * FILTER_CHUNK, min(vocab, (chunk + 1) * FILTER_CHUNK)
        if ranges and ranges[-1][1] == lo:
            ranges[-1] = (ranges[-1][0], hi)
        else:
            ranges.append((lo, hi))
    return ranges
