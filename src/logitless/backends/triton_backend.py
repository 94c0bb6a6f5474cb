"""Triton backend: the kernels of `logitless.kernels` behind the backend contract.

`stats` is one launch of the forward kernel, deterministic (its vocabulary splits merge in a
fixed order). `grads` sweeps the vocabulary in chunks: for each, the backward kernel writes the
logits' gradient d into a buffer of at most LOGIT_GRAD_BUFFER_BYTES, then dense matmuls add
`d @ c[chunk]` into an fp32 grad_e and write `d.T @ e` as grad_c[chunk] directly in the input
dtype (fp32 accumulation, one rounding, as eager), and grad_bias[chunk] is the column sum of d.
Everything is deterministic and runs on tensor cores; no V x D fp32 copy is ever made.
float16's d is written times a power of two that keeps it out of the subnormal range. With
filtering on, the vocabulary is first ordered by average logit, so that the entries whose
gradient matters gather into few tiles, and a chunk whose tiles are all negligible skips its
matmuls: its tile counts reach the host while the next chunk's kernel runs (into a second
buffer), so the GPU never waits for that decision. docs/kernels.md has the FLOP and byte counts.
"""

from __future__ import annotations

import torch

from logitless.backends import Logits, Teacher, torch_backend
from logitless.kernels._tiles import tensor_descriptors
from logitless.kernels.lse_backward import lse_backward, vocabulary_alignment
from logitless.kernels.lse_forward import MAX_TOP_K, lse_forward

LOGIT_GRAD_BUFFER_BYTES = 64 * 2**20
"""Most bytes of the buffer holding one vocabulary chunk of the logits' gradient (N x chunk, in
the input dtype): 4096 positions at N=8192 in bf16, 63 chunks for V=256000, under 6% of the
gradients' own 1.2 GB at the Gemma 2 shape; filtering holds two. Each chunk reads and writes the
fp32 grad_e once: at 32 MiB an H100 took 4% longer (benchmarks/RESULTS.md)."""
MAX_CHUNK = 2**20
"""Most vocabulary positions per chunk, so that few rows never make a launch grid too tall."""


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
    support: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The statistics from the forward kernel, a teacher's, the JSD's second sweep and the mass
    outside a support included, and a running top-k up to MAX_TOP_K; a larger top-k or support
    from the portable backend (on the same device), whose work does not grow with k as the
    kernels' (k comparisons per logit) does."""
    if top_k > MAX_TOP_K or (support is not None and support.shape[1] > MAX_TOP_K):
        return torch_backend.stats(
            e, c, bias, targets, logits=logits, names=names, teacher=teacher, lse=lse,
            top_k=top_k, support=support,
        )  # fmt: skip
    found = lse_forward(
        e, c, bias, targets.contiguous(), softcap=logits.softcap, with_sum="sum" in names,
        scale=logits.scale, weight=logits.column_weight,
        with_entropy="entropy" in names, top_k=top_k,
        teacher=teacher, lse=lse, support=support if "support_tail" in names else None,
    )  # fmt: skip
    out = torch.stack([found[name] for name in names])
    return (out, found["top"], found["top_log_probs"]) if top_k else out


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
    support: torch.Tensor | None = None,
    support_tail: torch.Tensor | None = None,
    support_grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The gradients from the backward kernel, the teacher's terms (`q`, `plogpq`, `plogr`) and
    the support's (`outside`, `support_grad`) included; those of a support of more than
    MAX_TOP_K classes from the portable backend, as `stats`."""
    if support is not None and support.shape[1] > MAX_TOP_K:
        return torch_backend.grads(
            e, c, bias, targets, lse, coefficients, terms, logits=logits, teacher=teacher,
            filter_eps=filter_eps, needs=needs, support=support, support_tail=support_tail,
            support_grad=support_grad,
        )  # fmt: skip
    rows = dict(zip(terms, coefficients, strict=True))
    zeros = torch.zeros_like(lse[0])
    teacher_terms = {term: rows[term] for term in ("q", "plogpq", "plogr") if term in rows}
    if {"sum", "plogp", "outside"} & rows.keys() or teacher_terms or support_grad is not None:
        filter_eps = None  # these gradients reach every logit, or classes no tile check knows
    order = vocabulary_order(e, c, bias) if filter_eps else None
    return _sweep(
        e, c, bias, targets, lse, rows.get("p", zeros), rows.get("target", zeros),
        rows.get("sum"), softcap=logits.softcap, filter_eps=filter_eps, needs=needs, order=order,
        scale=logits.scale, grad_plogp=rows.get("plogp"), weight=logits.column_weight,
        teacher=teacher, teacher_terms=teacher_terms, grad_outside=rows.get("outside"),
        support=support, support_tail=support_tail, support_grad=support_grad,
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
) -> tuple[int, int, int, int]:
    """(tiles, tiles kept, chunks, chunks kept) of the backward's gradient filtering.

    `lse` is the forward's per-row log-sum-exp pair (`lse`, `lse_residual` from `stats`); for
    diagnostics and tests.
    """
    order = vocabulary_order(e, c, bias) if sort_vocabulary else None
    census = [0, 0, 0, 0]
    unused = torch.zeros_like(lse[0])
    _sweep(
        e, c, bias, targets, lse, unused, unused, None, softcap=softcap, filter_eps=filter_eps,
        needs=(False, False, False), order=order, census=census,
    )  # fmt: skip
    tiles, kept, chunks, chunks_kept = census
    return tiles, kept, chunks, chunks_kept


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
    census: list[int] | None = None,
    scale: float = 1.0,
    grad_plogp: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    teacher: Teacher | None = None,
    teacher_terms: dict[str, torch.Tensor] | None = None,
    grad_outside: torch.Tensor | None = None,
    support: torch.Tensor | None = None,
    support_tail: torch.Tensor | None = None,
    support_grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The backward over chunks of vocabulary positions; returns (grad_e, grad_c, grad_bias).

    `census`, when given, receives (tiles, tiles kept, chunks, chunks kept).
    """
    n, dim = e.shape
    vocab = c.shape[0]
    filtering = filter_eps is not None
    grad_e = torch.zeros(n, dim, device=e.device, dtype=torch.float32) if needs[0] else None
    # Chunks skipped by filtering leave their rows of grad_c and grad_bias at zero.
    new = torch.zeros if filtering or n == 0 else torch.empty
    grad_c = new(c.shape, device=c.device, dtype=c.dtype) if needs[1] else None
    grad_bias = new(vocab, device=e.device, dtype=torch.float32) if needs[2] else None
    if n == 0 or vocab == 0:
        return grad_e, grad_c, grad_bias
    chunk = _chunk_positions(n, vocab, e.element_size())
    # Filtering reads each chunk's tile counts on the host while the next chunk's kernel runs,
    # so it writes two chunks' d in turn.
    buffers = [
        torch.empty(n * min(chunk, vocab), device=e.device, dtype=e.dtype)
        for _ in range(2 if filtering else 1)
    ]
    counts = torch.zeros(2, device=e.device, dtype=torch.int32) if filtering else None
    target_positions = targets.contiguous() if order is None else _positions(order, targets)
    teacher_terms = teacher_terms or {}
    # the kernel's softmax exp(z - lse[0]) times exp(-lse[1]), its rounding's correction: in the
    # coefficients of the terms that multiply p (`lse_backward`)
    correction = torch.exp(-lse[1])
    grad_lse, grad_plogp = (None if x is None else x * correction for x in (grad_lse, grad_plogp))
    # the outside term's p / p_tail, exp(z - outside_lse): at most 1 outside the support, so
    # that its coefficient bounds it as the others bound theirs (the float16 gain's premise)
    outside_lse = None if support_tail is None else (lse[0] + lse[1]) + support_tail
    teacher_terms = {
        term: x * correction if term in ("plogpq", "plogr") else x
        for term, x in teacher_terms.items()
    }
    rows = (grad_lse, grad_target, grad_sum, grad_plogp, grad_outside, support_grad)
    gains, unscale, spread = None, 1.0, None
    if e.dtype == torch.float16:
        gains, unscale, spread = _float16_gains(scale, *rows, *teacher_terms.values())
        grad_lse, grad_target, grad_sum, grad_plogp, grad_outside, support_grad = (
            None if x is None else _times_rows(x, gains) for x in rows
        )
        teacher_terms = {term: _times_rows(x, gains) for term, x in teacher_terms.items()}
    row_vectors = [lse.contiguous(), grad_lse, grad_target]
    descriptors = tensor_descriptors(e, c) if order is None else None

    def products(begin: int, end: int, d: torch.Tensor) -> None:
        rows = slice(begin, end) if order is None else order[begin:end]
        if grad_e is not None:
            _add_product(grad_e, d, c[rows])
        if spread is not None:  # each row from its own gain to the common one
            d.mul_(spread)
        if grad_c is not None:  # contiguous rows are written by the matmul itself
            in_place = grad_c[rows] if order is None else None
            product = torch.addmm(e.new_empty(()), d.T, e, beta=0, alpha=unscale, out=in_place)
            if in_place is None:
                grad_c.index_copy_(0, rows, product)
        if grad_bias is not None:
            _set_rows(grad_bias, rows, d.sum(0, dtype=torch.float32).mul_(unscale))

    def products_unless_negligible(begin, end, d, tile_counts: _HostCopy) -> None:
        tiles, kept = tile_counts.wait().tolist()
        if census is not None:
            census[:] = [census[0] + tiles, census[1] + kept, census[2] + 1, census[3] + (kept > 0)]
        if kept:
            products(begin, end, d)

    pending = None
    for index, begin in enumerate(range(0, vocab, chunk)):
        end = min(vocab, begin + chunk)
        d = buffers[index % len(buffers)][: n * (end - begin)].view(n, end - begin)
        lse_backward(
            e, c, bias, target_positions, *row_vectors, grad_sum, d=d, counts=counts,
            order=order, positions=(begin, end), softcap=softcap, filter_eps=filter_eps,
            scale=scale, grad_plogp=grad_plogp, weight=weight, teacher=teacher,
            teacher_terms=teacher_terms, descriptors=descriptors, grad_outside=grad_outside,
            outside_lse=outside_lse, support=support, support_grad=support_grad,
        )  # fmt: skip
        if counts is None:
            products(begin, end, d)
            continue
        tile_counts = _HostCopy(counts)
        counts.zero_()
        if pending is not None:
            products_unless_negligible(*pending)
        pending = (begin, end, d, tile_counts)
    if pending is not None:
        products_unless_negligible(*pending)
    if grad_e is not None and gains is not None:
        grad_e.div_(gains.unsqueeze(1))
    return grad_e, grad_c, grad_bias


class _HostCopy:
    """A copy of a small device tensor on its way to the host: the stream goes on meanwhile, and
    `wait` waits for this copy only, not for the work queued after it."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.event = None
        if tensor.is_cuda:
            self.tensor = tensor.to("cpu", non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.tensor = tensor.clone()

    def wait(self) -> torch.Tensor:
        if self.event is not None:
            self.event.synchronize()
        return self.tensor


def _set_rows(out: torch.Tensor, rows: slice | torch.Tensor, values: torch.Tensor) -> None:
    """out[rows] = values, for a slice or an index tensor of rows."""
    if isinstance(rows, slice):
        out[rows] = values
    else:
        out.index_copy_(0, rows, values)


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b for an fp32 `out`, accumulating in fp32 without rounding the product
    to the inputs' dtype (cuBLAS with an fp32 output for 16-bit inputs on CUDA)."""
    if a.dtype == torch.float32:
        out.addmm_(a, b)
    elif out.is_cuda:
        torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
    else:
        out.addmm_(a.float(), b.float())


MAX_GAIN_EXPONENT = 126
"""The largest gain is 2^126: coefficients below float32's normal range (2^-126) stay finite."""


def _float16_gains(
    scale: float, *coefficients: torch.Tensor | None
) -> tuple[torch.Tensor, float, torch.Tensor | None]:
    """Per-row powers of two that lift each row's largest coefficient (times the logits' scale,
    which the kernel applies after them) into [1, 2); returns (gains, 1 / the smallest gain,
    None or each row's factor from its gain to the smallest).

    float16's normal range ends at 6e-5: a logit gradient of softmax / N is mostly subnormal at a
    large vocabulary and loses its digits when stored. The backward writes each row's d times
    its gain, so that rows whose upstream gradients lie far apart keep their digits alike; grad_e
    divides the gains out of its fp32 rows. grad_c and grad_bias sum over rows, so the rows of
    each chunk of d are brought to the smallest gain first and it is divided out of their fp32
    matmul; all exact (powers of two). One synchronization reads the smallest and largest gain.
    Gains are at most 2^MAX_GAIN_EXPONENT, so that fp32 coefficients below its normal range (an
    upstream gradient of 1e-38) stay finite, not inf (whose product with 0 is NaN); rows with no
    finite nonzero coefficient take the smallest.
    """
    largest = torch.stack(
        [x.abs().reshape(x.shape[0], -1).amax(1) for x in coefficients if x is not None]
    ).amax(0).float() * scale  # fmt: skip
    usable = largest.isfinite() & (largest > 0)
    exponent = (1 - torch.frexp(largest).exponent).clamp(max=MAX_GAIN_EXPONENT)
    bounds = [exponent.where(usable, 2**30).amin(), exponent.where(usable, -(2**30)).amax()]
    smallest, most = torch.stack(bounds).tolist()
    if not most >= smallest:  # no usable row: nothing to lift
        smallest = most = 0
    exponent = exponent.where(usable, smallest)
    gains = torch.ldexp(torch.ones_like(largest), exponent)
    spread = torch.ldexp(torch.ones_like(largest), smallest - exponent).unsqueeze(1)
    return gains, 2.0**-smallest, spread if most > smallest else None


def _times_rows(x: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """A row coefficient (N,) or (N, k) times each row's gain, contiguous for the kernel."""
    return (x * gains.view(-1, *[1] * (x.dim() - 1))).contiguous()


def _chunk_positions(n: int, vocab: int, itemsize: int) -> int:
    """Vocabulary positions per chunk: the buffer bound, in whole tiles."""
    alignment = vocabulary_alignment()
    positions = LOGIT_GRAD_BUFFER_BYTES // (itemsize * n) // alignment * alignment
    return min(MAX_CHUNK, max(alignment, positions))


def _positions(order: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each row's target as a position in `order`, -1 where the row has none."""
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return torch.where(targets >= 0, rank[targets.clamp(min=0)], -1)
