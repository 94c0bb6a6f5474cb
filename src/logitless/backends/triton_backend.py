"""Triton backend: the kernels of `logitless.kernels` behind the backend contract.

`stats` is one launch of the forward kernel, deterministic (its vocabulary splits merge in a
fixed order). `grads` sweeps the vocabulary in chunks of
positions: grad_e and grad_bias accumulate in fp32 over the whole sweep, grad_c of each chunk in
an fp32 scratch of at most GRAD_C_SCRATCH_BYTES that is then cast into the output, so 16-bit
inputs never need a V x D fp32 copy. With filtering on, the vocabulary is first ordered by
average logit, so that the entries whose gradient matters gather into few tiles. Its fp32
atomics make the last bits of the gradients vary from run to run; under
`torch.use_deterministic_algorithms(True)` the gradients come from the portable backend instead,
bit-identical run after run, at its speed.
"""

from __future__ import annotations

import torch

from logitless.backends import Logits, Teacher, torch_backend
from logitless.kernels.lse_backward import lse_backward, vocabulary_alignment
from logitless.kernels.lse_forward import lse_forward

KERNEL_STATISTICS = ("lse", "target", "sum", "mean")
KERNEL_TERMS = ("p", "pz", "target", "sum")
"""What the kernels compute; the rest of the contract (a teacher's statistics and terms, a
running top-k) comes from the portable backend on the same device."""

GRAD_C_SCRATCH_BYTES = 64 * 2**20
"""Most bytes of fp32 scratch for grad_c (16-bit inputs, or a sorted vocabulary). Each chunk
re-reads e once; at D=2304 this is 7168 vocabulary rows, 36 chunks for V=256000."""


def stats(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    logits: Logits,
    names: tuple[str, ...],
    teacher: Teacher | None = None,
    lse: torch.Tensor | None = None,
    top_k: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The student's statistics (`lse`, `target`, `sum`, `mean`) from the forward kernel; a
    teacher's, the JSD mixture's and a running top-k from the portable backend (on the same
    device), which has them."""
    if teacher is not None or lse is not None or top_k or set(names) - set(KERNEL_STATISTICS):
        return torch_backend.stats(
            e, c, bias, targets, logits=logits, names=names, teacher=teacher, lse=lse,
            top_k=top_k,
        )  # fmt: skip
    found = lse_forward(
        e, c, bias, targets.contiguous(), softcap=logits.softcap, with_sum="sum" in names,
        scale=logits.scale, weight=logits.column_weight, with_mean="mean" in names,
    )  # fmt: skip
    return torch.stack([found[name] for name in names])


def grads(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    coefficients: torch.Tensor,
    terms: tuple[str, ...],
    *,
    logits: Logits,
    teacher: Teacher | None = None,
    filter_eps: float | None,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The gradients of the student's terms (`p`, `pz`, `target`, `sum`) from the backward
    kernel; the teacher's terms from the portable backend."""
    if torch.are_deterministic_algorithms_enabled() or set(terms) - set(KERNEL_TERMS):
        return torch_backend.grads(
            e, c, bias, targets, lse, coefficients, terms, logits=logits, teacher=teacher,
            filter_eps=filter_eps, needs=needs,
        )  # fmt: skip
    rows = dict(zip(terms, coefficients, strict=True))
    zeros = torch.zeros_like(lse)
    if "sum" in rows or "pz" in rows:
        filter_eps = None  # these gradients reach every logit: no tile is negligible
    order = vocabulary_order(e, c, bias) if filter_eps else None
    return _sweep(
        e, c, bias, targets, lse, rows.get("p", zeros), rows.get("target", zeros),
        rows.get("sum"), softcap=logits.softcap, filter_eps=filter_eps, needs=needs, order=order,
        scale=logits.scale, grad_pz=rows.get("pz"), weight=logits.column_weight,
    )  # fmt: skip


def tile_census(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    *,
    softcap: float | None,
    filter_eps: float,
    sort_vocabulary: bool = True,
) -> tuple[int, int]:
    """(tiles, tiles kept) of the backward's gradient filtering, for diagnostics.

    `lse` is the forward's per-row log-sum-exp (from `stats`).
    """
    order = vocabulary_order(e, c, bias) if sort_vocabulary else None
    counts = torch.zeros(2, device=e.device, dtype=torch.int32)
    unused = torch.zeros_like(lse)
    _sweep(
        e, c, bias, targets, lse, unused, unused, None, softcap=softcap, filter_eps=filter_eps,
        needs=(False, False, False), order=order, counts=counts,
    )  # fmt: skip
    tiles, kept = counts.tolist()
    return tiles, kept


def vocabulary_order(e: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Vocabulary rows by decreasing average logit over the rows of e (one matrix-vector
    product): the order in which the softmax entries that matter gather into few tiles."""
    mean_e = e.sum(0, dtype=torch.float32).div_(max(1, e.shape[0]))
    average_logit = torch.mv(c, mean_e.to(c.dtype)).float()
    if bias is not None:
        average_logit += bias.float()
    return torch.argsort(average_logit, descending=True)


def _sweep(
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
    order: torch.Tensor | None,
    counts: torch.Tensor | None = None,
    scale: float = 1.0,
    grad_pz: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The backward over chunks of vocabulary positions; returns (grad_e, grad_c, grad_bias)."""
    n, dim = e.shape
    vocab = c.shape[0]
    fp32 = dict(device=e.device, dtype=torch.float32)
    grad_e = torch.zeros(n, dim, **fp32) if needs[0] else None
    grad_bias = torch.zeros(vocab, **fp32) if needs[2] else None
    grad_c = scratch = None
    chunk = vocab
    # grad_c accumulates in place when it is fp32 and in vocabulary order, else chunk by chunk.
    in_place = needs[1] and e.dtype == torch.float32 and order is None
    if in_place:
        grad_c = torch.zeros(vocab, dim, **fp32)
    elif needs[1]:
        grad_c = torch.empty(vocab, dim, device=c.device, dtype=c.dtype)
        chunk = _chunk_positions(vocab, dim)
        scratch = torch.empty(min(chunk, vocab), dim, **fp32)
    target_positions = targets.contiguous() if order is None else _positions(order, targets)
    row_vectors = [x.contiguous() for x in (lse, grad_lse, grad_target)]
    grad_sum, grad_pz = (None if x is None else x.contiguous() for x in (grad_sum, grad_pz))

    for begin in range(0, vocab, chunk):
        end = min(vocab, begin + chunk)
        grad_c_rows = grad_c if in_place else None  # in place, one chunk spans the vocabulary
        if scratch is not None:
            grad_c_rows = scratch[: end - begin].zero_()
        lse_backward(
            e, c, bias, target_positions, *row_vectors, grad_sum,
            grad_e=grad_e, grad_c=grad_c_rows, grad_bias=grad_bias, order=order,
            positions=(begin, end), softcap=softcap, filter_eps=filter_eps, counts=counts,
            scale=scale, grad_pz=grad_pz, weight=weight,
        )  # fmt: skip
        if scratch is not None:
            if order is None:
                grad_c[begin:end] = grad_c_rows
            else:
                grad_c.index_copy_(0, order[begin:end], grad_c_rows.to(c.dtype))
    return grad_e, grad_c, grad_bias


def _chunk_positions(vocab: int, dim: int) -> int:
    """Vocabulary positions per grad_c chunk: the scratch bound, in whole tiles."""
    alignment = vocabulary_alignment()
    rows = GRAD_C_SCRATCH_BYTES // (4 * dim) // alignment * alignment
    return max(alignment, rows)


def _positions(order: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's target as a position in `order`, -1 where the row has none."""
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return torch.where(targets >= 0, rank[targets.clamp(min=0)], -1)
