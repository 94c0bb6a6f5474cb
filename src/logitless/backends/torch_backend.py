"""Portable backend: blockwise PyTorch on any device, never holding more than one block of logits.

Rows are processed in blocks whose fp32 logits fit a memory budget chosen per device
(`block_bytes`; LOGITLESS_BLOCK_MB overrides it), never in proportion to N x V. Each block's
logits are turned into the softmax and then into the gradient of the logits in place, so one
buffer serves the whole pipeline. Blocks are laid out vocabulary-major (a transposed view), the
layout in which the matmuls of a block run fastest on BLAS: the logits as `c @ e_rows.T`, and
`P.T` contiguous for grad_c (1.5x faster than row-major logits for a 128 x 65536 block). float64
inputs are computed in float64 throughout (for `torch.autograd.gradcheck`); every other dtype
accumulates in float32.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from logitless.backends import Logits, Teacher, lse_pair

BLOCK_MB_ENV = "LOGITLESS_BLOCK_MB"
CPU_BLOCK_MB = (4.0, 64.0)
"""Bounds of a CPU block's budget: half the last-level cache, so the block stays in cache."""
CPU_MIN_ROWS = 128
"""Rows of a CPU block whatever its budget: BLAS runs the block's three matmuls far from its
peak with fewer (AMD EPYC, 1 thread, loss + backward, CPU time: 2048 x 512 x 32768 fp32 took
6.2 s at 32 rows, 4.1 s at 64, 3.3 s at 128 and 3.5 s at 256; 4096 x 512 x 65536 18.6 s at
64 rows, 16.0 s at 128)."""
DEFAULT_CPU_CACHE_MB = 32.0
"""The last-level cache assumed where the system does not say (no Linux sysfs)."""
ACCELERATOR_BLOCK_MB = (64.0, 2048.0)
"""Bounds of an accelerator block: 1/16 of its free memory (a CUDA device in deterministic mode
runs this backend; its matmuls need thousands of rows to fill the device)."""
FILTER_CHUNK = 512
"""Vocabulary columns per gradient-filtering decision."""

Coefficients = Callable[[slice, torch.Tensor], torch.Tensor]
"""(rows, their statistics (len(names), rows)) -> their coefficients (len(terms), rows)."""

TEACHER_STATISTICS = ("teacher_lse", "forward_kl")
"""First-sweep statistics that need the teacher's softmax q."""
KL_STATISTICS = ("forward_kl", "reverse_kl")
MIXTURE_STATISTICS = ("jsd", "jsd_p")
"""Second-sweep statistics: they need both log-sum-exps (`lse` and `teacher.lse`) given."""


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
    """The statistics `names` per row, (len(names), N) fp32 (see `logitless.backends`).

    `lse`, the student's, is given for the second sweep (`jsd`, `jsd_p`). With `top_k`,
    also the (N, top_k) indices of each row's largest logits, in descending order, and their
    log-probabilities.
    """
    if lse is None and _in_tiles(e, names, (), teacher, top_k):
        return _tiled_stats(e, c, bias, targets, logits, names)
    out, *_, top, top_log_probs = _sweep(
        e, c, bias, targets, logits=logits, names=names, teacher=teacher, lse=lse, top_k=top_k,
        support=support,
    )  # fmt: skip
    return (out, top, top_log_probs) if top_k else out


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
    gain = None
    if support_tail is not None:
        coefficients, support_grad, gain = _outside_over_tail(
            coefficients, terms, support_tail, support_grad
        )
    if _in_tiles(e, (), terms, teacher, 0) and support_grad is None:
        rows = dict(zip(terms, coefficients, strict=True))
        return _tiled_grads(e, c, bias, targets, lse, rows, logits, filter_eps, needs)
    _, *found, _, _ = _sweep(
        e, c, bias, targets, logits=logits, names=(), teacher=teacher, lse=lse,
        coefficients=lambda rows, _: coefficients[:, rows], terms=terms,
        filter_eps=filter_eps, needs=needs, support=support, support_grad=support_grad,
    )  # fmt: skip
    grad_e, grad_c, grad_bias = (g if g is None or gain is None else g.mul_(gain) for g in found)
    return grad_e, grad_c, grad_bias


def _outside_over_tail(
    coefficients: torch.Tensor,
    terms: tuple[str, ...],
    support_tail: torch.Tensor,
    support_grad: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """The coefficients with the `outside` term's o p / p_tail as p (o / p_tail), every one
    divided by the power of two (returned, a 0-d tensor: no host read) that keeps the finite
    o / p_tail under half the largest float (1 / p_tail alone reaches 8.5e37 on a confident
    row): the gradients, linear in the coefficients, are multiplied by it after. A non-finite
    row (an inf upstream gradient, a NaN input) keeps its non-finite gradients."""
    at = terms.index("outside")
    outside = coefficients[at]
    log_ratio = outside.abs().log() - support_tail
    finite = torch.where(log_ratio.isfinite(), log_ratio, 0.0)
    headroom = math.log(torch.finfo(outside.dtype).max / 2)
    largest = torch.cat((finite, finite.new_zeros(1))).max()  # 0 for no rows
    gain = torch.exp2(torch.ceil((largest - headroom) / math.log(2)).clamp(min=0))
    rows = coefficients / gain
    rows[at] *= torch.exp(-support_tail)
    return rows, None if support_grad is None else support_grad / gain, gain


def stats_and_grads(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    coefficients_of: Coefficients,
    *,
    logits: Logits,
    names: tuple[str, ...],
    terms: tuple[str, ...],
    filter_eps: float | None,
    needs: tuple[bool, bool, bool],
    teacher: Teacher | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """`stats` and `grads` in one pass, the coefficients given per block from its statistics
    (a teacher's and the JSD's included: a block holds whole rows)."""
    if _in_tiles(e, names, terms, teacher, 0):
        out = _tiled_stats(e, c, bias, targets, logits, (*names, "lse", "lse_residual"))
        out, lse = out[: len(names)], out[len(names) :]
        everyone = slice(0, e.shape[0])
        rows = dict(zip(terms, coefficients_of(everyone, out), strict=True))
        grad_e, grad_c, grad_bias = _tiled_grads(
            e, c, bias, targets, lse, rows, logits, filter_eps, needs
        )
        return out, grad_e, grad_c, grad_bias
    out, grad_e, grad_c, grad_bias, *_ = _sweep(
        e, c, bias, targets, logits=logits, names=names, teacher=teacher,
        coefficients=coefficients_of, terms=terms, filter_eps=filter_eps, needs=needs,
    )  # fmt: skip
    return out, grad_e, grad_c, grad_bias


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of logits, statistics and gradient sums for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rows_per_block(n_rows: int, vocab: int, bytes_per_logit: int, device: torch.device) -> int:
    """How many rows of logits fit the memory budget of `device` (at least one, and on a CPU at
    least `CPU_MIN_ROWS` unless LOGITLESS_BLOCK_MB is set)."""
    rows = int(block_bytes(device) // (vocab * bytes_per_logit))
    if device.type == "cpu" and _block_mb_override() is None:
        rows = max(rows, CPU_MIN_ROWS)
    return max(1, min(n_rows, rows))


def block_bytes(device: torch.device) -> float:
    """The memory of one block's buffers on `device`: LOGITLESS_BLOCK_MB (MiB) where set; on a
    CPU, half the last-level cache (so the block stays in cache between its passes; within
    `CPU_BLOCK_MB`); on an accelerator, 1/16 of its free memory (within
    `ACCELERATOR_BLOCK_MB`; 64 MiB where it does not report its free memory)."""
    override = _block_mb_override()
    if override is not None:
        return override * 2**20
    if device.type == "cpu":
        low, high = CPU_BLOCK_MB
        return min(max(_last_level_cache_mb() / 2, low), high) * 2**20
    low, high = ACCELERATOR_BLOCK_MB
    module = getattr(torch, device.type, None)
    if not hasattr(module, "mem_get_info"):
        return low * 2**20
    free, _ = module.mem_get_info(device)
    return min(max(free / 16, low * 2**20), high * 2**20)


def _block_mb_override() -> float | None:
    """LOGITLESS_BLOCK_MB in MiB, None where unset or empty; a ValueError naming it for anything
    but a positive, finite number (a zero or negative budget would run one row at a time)."""
    text = os.environ.get(BLOCK_MB_ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise ValueError(f"{BLOCK_MB_ENV} must be a positive number of MiB, got {text!r}")
    return value


def _last_level_cache_mb() -> float:
    """The largest CPU cache in MiB (`_LAST_LEVEL_CACHE_MB`)."""
    return _LAST_LEVEL_CACHE_MB


def _read_last_level_cache_mb() -> float:
    """The largest CPU cache in MiB, from Linux sysfs (`DEFAULT_CPU_CACHE_MB` elsewhere)."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        units = {"K": 2**-10, "M": 1.0, "G": 2**10}
        if text[-1:] in units and text[:-1].isdigit():
            sizes.append(int(text[:-1]) * units[text[-1]])
    return max(sizes, default=DEFAULT_CPU_CACHE_MB)


_LAST_LEVEL_CACHE_MB = _read_last_level_cache_mb()
"""Read once at import: torch.compile traces the block sizes of the ops it traces through
(a top-k distillation's gathered dots), and cannot trace a file system read."""


def _sweep(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    logits: Logits,
    names: tuple[str, ...],
    teacher: Teacher | None = None,
    lse: torch.Tensor | None = None,
    coefficients: Coefficients | None = None,
    terms: tuple[str, ...] = (),
    filter_eps: float | None = None,
    needs: tuple[bool, bool, bool] = (False, False, False),
    top_k: int = 0,
    support: torch.Tensor | None = None,
    support_grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """One pass over row blocks: the statistics `names` (the forward sweep when `lse` is None),
    and gradients when `coefficients` are given. Returns (stats, grad_e, grad_c, grad_bias,
    top-k indices, their log-probabilities)."""
    n, dim = e.shape
    vocab = c.shape[0]
    forward = lse is None
    backward = coefficients is not None and any(needs)
    acc = accumulation_dtype(e.dtype)
    half = e.dtype != acc
    fp32 = dict(device=e.device, dtype=acc)  # the accumulation dtype: float32 but for float64
    softcap, scale = logits.softcap, logits.scale
    weight32 = _column_weight(logits, acc)

    # Block-sized buffers besides the logits, which become the softmax in place:
    need_ratio = any(x in names for x in MIXTURE_STATISTICS) or "plogr" in terms
    need_gap = need_ratio or "plogpq" in terms or any(x in names for x in KL_STATISTICS)
    with_entropy = "entropy" in names
    need_z = with_entropy or "plogp" in terms or need_gap
    need_y = need_gap
    # the teacher's softmax itself (its normalizer too, unless given); a backward that has the
    # teacher's lse and needs only log q (the reverse KL's) skips its exponentials
    need_q = (
        need_ratio
        or "q" in terms
        or any(x in names for x in TEACHER_STATISTICS)
        or (need_gap and teacher.lse is None)
    )
    need_p = with_entropy or "reverse_kl" in names or need_ratio
    sizes = (need_z, need_y, need_q, need_gap, need_ratio, softcap is not None and backward)
    bytes_per_logit = acc.itemsize * (1 + sum(sizes))
    block = rows_per_block(n, vocab, bytes_per_logit, e.device)

    def buffer(needed: bool) -> torch.Tensor | None:
        return torch.empty(vocab, block, **fp32).T if needed else None

    logits_buffer, z_buffer, y_buffer, q_buffer, gap_buffer, ratio_buffer, deriv_buffer = map(
        buffer, (True, *sizes)
    )
    bias32 = None if bias is None else bias.to(acc)

    out = torch.empty(len(names), n, **fp32)
    grad_e = torch.zeros(n, dim, **fp32) if backward and needs[0] else None
    grad_c = torch.zeros(vocab, dim, **fp32) if backward and needs[1] else None
    grad_bias = torch.zeros(vocab, **fp32) if backward and needs[2] else None
    top = torch.empty(n, top_k, device=e.device, dtype=torch.int64) if top_k else None
    top_log_probs = torch.empty(n, top_k, **fp32) if top_k else None

    for start in range(0, n, block):
        rows = slice(start, min(n, start + block))
        size = rows.stop - start
        e_rows, t = e[rows], targets[rows]
        z = _logits(e_rows, c, bias32, logits_buffer[:size])
        deriv = _cap_and_scale(z, logits, None if deriv_buffer is None else deriv_buffer[:size])
        if top is not None:
            top_logits, top[rows] = z.topk(top_k, dim=1)
        found: dict[str, torch.Tensor] = {}
        z_kept = z_buffer[:size].copy_(z) if need_z else None
        if forward:
            found["target"] = _gather_targets(z, t)
            if "sum" in names:
                found["sum"] = z.sum(1) if weight32 is None else z @ weight32
            normalized = backward or need_p
            peak, log_total = _exp_in_place(z, normalize=normalized)
            found["lse"], found["lse_residual"] = lse_pair(peak, log_total)
            if "support_tail" in names:
                outside = _sum_outside(z, support[rows]).log_()
                found["support_tail"] = outside if normalized else outside.sub_(log_total)
            log_normalizer = (peak, log_total)
            if top is not None:
                top_log_probs[rows] = top_logits.sub_(peak[:, None]).sub_(log_total[:, None])
        else:
            log_normalizer = (lse[0, rows], lse[1, rows])
            _log_probs(z, log_normalizer).exp_()
        p = z  # the softmax from here on (unnormalized when nothing needs it)
        if with_entropy:  # log sum exp(z - max) - sum p (z - max): no rounding of lse or mean
            found["entropy"] = log_total - _row_dot(p, z_kept, shift=peak)
        y = q = gap = ratio = None
        if need_y or need_q:
            y_out = (y_buffer if need_y else q_buffer)[:size]
            teacher_bias = None if teacher.bias is None else teacher.bias.to(acc)
            y = _logits(teacher.e[rows], teacher.c, teacher_bias, y_out)
            if teacher.softcap:
                y.div_(teacher.softcap).tanh_().mul_(teacher.softcap)
            if scale != 1.0:
                y.mul_(scale)
        if teacher is not None and teacher.lse is not None:
            teacher_normalizer = (teacher.lse[0, rows], teacher.lse[1, rows])
        if need_q:
            q = q_buffer[:size].copy_(y) if need_y else y
            if teacher.lse is None:
                teacher_normalizer = _exp_in_place(q, normalize=True)
                found["teacher_lse"], found["teacher_lse_residual"] = lse_pair(*teacher_normalizer)
            else:
                _log_probs(q, teacher_normalizer).exp_()
        if need_gap:  # log p - log q, each log-probability formed first; y is spent
            log_q = _log_probs(y, teacher_normalizer)
            gap = _log_probs(z_kept, log_normalizer, out=gap_buffer[:size]).sub_(log_q)
        if "forward_kl" in names:
            found["forward_kl"] = -_row_dot(q, gap)
        if "reverse_kl" in names:
            found["reverse_kl"] = _row_dot(p, gap)
        if need_ratio:
            ratio, teacher_ratio = _mixture_ratios(gap, teacher.beta, ratio_buffer[:size])
            gap = None  # turned into log(m / q)
            if names:
                found["jsd_p"] = _row_dot(p, ratio)
                to_teacher = _row_dot(q, teacher_ratio)  # sum_v q log(m / q)
                found["jsd"] = -(teacher.beta * to_teacher + (1.0 - teacher.beta) * found["jsd_p"])
        for i, name in enumerate(names):
            out[i, rows] = found[name]
        if not backward:
            continue

        ranges = _kept_ranges(p, t, filter_eps) if filter_eps else [(0, vocab)]
        coefs = dict(zip(terms, coefficients(rows, out[:, rows]), strict=True))
        log_p = None
        if "plogp" in coefs:  # log p = (z - max) - log sum exp(z - max): precise near p = 1
            log_p = _log_probs(z_kept, log_normalizer)
        d = _softmax_to_grad(
            p, t, coefs, log_p, gap, q, ratio, weight32, deriv, scale,
            support=None if support is None else support[rows],
            support_grad=None if support_grad is None else support_grad[rows],
        )  # fmt: skip
        e_rows32 = e_rows.to(acc) if half and needs[1] else e_rows
        for lo, hi in ranges:
            d_part = d[:, lo:hi]
            if grad_e is not None and half:
                for start, stop, part in _upcast(c, lo, hi, acc):
                    grad_e[rows].addmm_(d[:, start:stop], part)
            elif grad_e is not None:
                grad_e[rows].addmm_(d_part, c[lo:hi])
            if grad_c is not None:
                grad_c[lo:hi].addmm_(d_part.T, e_rows32)
            if grad_bias is not None:
                grad_bias[lo:hi] += d_part.sum(0)
    return out, grad_e, grad_c, grad_bias, top, top_log_probs


def _cap_and_scale(z: torch.Tensor, logits: Logits, deriv_out: torch.Tensor | None):
    """In place: z -> scale * softcap(z). Returns the softcap's derivative written into
    `deriv_out` when it is given and there is a softcap, else None."""
    deriv = None
    if logits.softcap:
        z.div_(logits.softcap).tanh_()
        if deriv_out is not None:
            deriv = torch.mul(z, z, out=deriv_out).neg_().add_(1)
        z.mul_(logits.softcap)
    if logits.scale != 1.0:
        z.mul_(logits.scale)
    return deriv


def _column_weight(logits: Logits, dtype: torch.dtype) -> torch.Tensor | None:
    return None if logits.column_weight is None else logits.column_weight.to(dtype)


TILED_STATISTICS = frozenset(("lse", "lse_residual", "target", "sum"))
TILED_TERMS = frozenset(("p", "target", "sum"))
TILE_ROWS = {"cpu": 256}
"""Rows of a tile of the 16-bit schedule (CPU: where BLAS runs near its peak for a tile of a
few hundred columns); accelerators take `ACCELERATOR_TILE_ROWS`."""
ACCELERATOR_TILE_ROWS = 8192
TILE_SHARE_OF_BLOCK = 4
"""A tile's float32 buffers take this fraction of the device's block budget (`block_bytes`)."""


def _in_tiles(
    e: torch.Tensor,
    names: tuple[str, ...],
    terms: tuple[str, ...],
    teacher: Teacher | None,
    top_k: int,
) -> bool:
    """Whether a call runs the 16-bit schedule: a cross-entropy's statistics and terms of 16-bit
    inputs, over tiles of rows and vocabulary in two sweeps (log-sum-exp, then gradients).

    It costs a fourth matmul (the backward recomputes the logits) but holds no float32 V x D
    sum of grad_c, which a row-block sweep must keep across its blocks and which is twice the
    16-bit grad_c itself: each vocabulary chunk's grad_c is summed over every row in one tile
    and rounded once."""
    return (
        e.dtype in (torch.bfloat16, torch.float16)
        and teacher is None
        and not top_k
        and set(names) <= TILED_STATISTICS
        and set(terms) <= TILED_TERMS
    )


def _tile_shape(
    n: int, vocab: int, dim: int, device: torch.device, softcap: bool
) -> tuple[int, int]:
    """(rows, vocabulary columns) of a tile whose buffers (its logits, with a softcap their
    derivative, and a chunk of c and of grad_c) fit `TILE_SHARE_OF_BLOCK` of the device's
    block budget."""
    rows = max(1, min(n, TILE_ROWS.get(device.type, ACCELERATOR_TILE_ROWS)))
    per_column = 4 * (rows * (2 if softcap else 1) + 2 * dim)
    columns = int(block_bytes(device) / TILE_SHARE_OF_BLOCK) // per_column
    return rows, max(1, min(vocab, columns))


class _Tiles:
    """Float32 logits of (row tile, vocabulary chunk) pairs of 16-bit inputs, in reused
    buffers: `chunks` gives each chunk of c once as a matmul operand, `logits_of` forms a
    tile's logits, `operand` turns a tile's logit gradient into one.

    Operands are float32 copies, but for bf16 where the device multiplies it natively
    (`native_16_bit_matmul`): there they stay bf16, and a tile's rows are padded with zeros to
    a multiple of NATIVE_ROW_ALIGNMENT, so that the matmuls take few shapes whatever the
    number of rows (oneDNN keeps a compiled kernel of about a MiB for every shape it meets)."""

    def __init__(
        self, e: torch.Tensor, c: torch.Tensor, bias: torch.Tensor | None, logits: Logits
    ) -> None:
        self.e, self.c, self.logits = e, c, logits
        self.native = native_16_bit_matmul(e.dtype, e.device)
        self.bias32 = None if bias is None else bias.to(torch.float32)
        self.rows, self.columns = _tile_shape(
            e.shape[0], c.shape[0], e.shape[1], e.device, bool(logits.softcap)
        )
        if self.native:
            padded = _aligned(self.rows)
            self.e_rows = torch.empty(padded, e.shape[1], device=e.device, dtype=e.dtype)
            self.d_rows = torch.empty(padded, self.columns, device=e.device, dtype=e.dtype)
        fp32 = dict(device=e.device, dtype=torch.float32)
        self.z = torch.empty(self.rows * self.columns, **fp32)
        self.deriv = torch.empty(self.rows * self.columns, **fp32) if logits.softcap else None

    def chunks(self):
        """(lo, hi, c[lo:hi] as a matmul operand) over the vocabulary."""
        if not self.native:
            return _upcast(self.c, 0, self.c.shape[0], torch.float32, rows=self.columns)
        return (
            (lo, min(self.c.shape[0], lo + self.columns), self.c[lo : lo + self.columns])
            for lo in range(0, self.c.shape[0], self.columns)
        )

    def row_tiles(self):
        return (
            slice(lo, min(self.e.shape[0], lo + self.rows))
            for lo in range(0, self.e.shape[0], self.rows)
        )

    def operand(self, x: torch.Tensor, native_buffer: torch.Tensor | None = None) -> torch.Tensor:
        """A tile's rows x as a matmul operand: in float32, or natively in bf16 rows of
        `native_buffer` padded with zeros (its logit gradient's, `d_rows`, by default)."""
        if not self.native:
            return x.to(torch.float32)
        size = x.shape[0]
        out = (self.d_rows if native_buffer is None else native_buffer)[: _aligned(size)]
        out[:size, : x.shape[1]].copy_(x)
        out[size:].zero_()
        return out[:, : x.shape[1]]

    def logits_of(
        self, rows: slice, lo: int, c_op: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(e[rows] as a matmul operand, the tile's float32 logits z, the softcap's derivative
        or None)."""
        size, width = rows.stop - rows.start, c_op.shape[0]
        e_op = self.operand(self.e[rows], self.e_rows if self.native else None)
        z = self.z[: size * width].view(width, size)
        if self.native:  # bf16 products, widened
            z.copy_(torch.mm(c_op, e_op.T)[:, :size])
        else:
            torch.mm(c_op, e_op.T, out=z)
        z = z.T
        if self.bias32 is not None:
            z.add_(self.bias32[lo : lo + width])
        deriv_out = None if self.deriv is None else self.deriv[: size * width].view(width, size).T
        return e_op, z, _cap_and_scale(z, self.logits, deriv_out)


NATIVE_ROW_ALIGNMENT = 64
"""Rows of a natively multiplied tile are padded to a multiple of this: at most 256 / 64 = 4
row counts per vocabulary chunk width, at most 63 rows of zeros per tile."""


def _aligned(rows: int) -> int:
    return -(-rows // NATIVE_ROW_ALIGNMENT) * NATIVE_ROW_ALIGNMENT


def native_16_bit_matmul(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the 16-bit tiles multiply operands of `dtype` in that dtype on `device`: bfloat16
    on a CPU with bf16 dot-product instructions (AVX512-BF16 or AMX), whose bf16 matmul runs
    2-4x faster than a float32 one. Its logits are rounded to bf16, as eager's are (PyTorch's
    CPU matmul has no float32 output for bf16 operands), and the logit gradient is rounded to
    bf16 before its two products, as the Triton kernels store it; everything between them is
    float32. Elsewhere 16-bit operands are multiplied in float32: each logit keeps the float32
    sum of its products, as the kernels' accumulator does, and where bf16 is emulated that is
    also the faster way."""
    return device.type == "cpu" and dtype == torch.bfloat16 and _CPU_HAS_BF16_DOTS


def _cpu_has_bf16_dots() -> bool:
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, check, lambda: False)() for check in checks)


_CPU_HAS_BF16_DOTS = _cpu_has_bf16_dots()


def _tiled_stats(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    logits: Logits,
    names: tuple[str, ...],
) -> torch.Tensor:
    """`stats` of 16-bit inputs over tiles (see `_in_tiles`): per row, a running maximum and
    sum of exponentials (the log-sum-exp), the target logit and the (weighted) logit sum."""
    n = e.shape[0]
    fp32 = dict(device=e.device, dtype=torch.float32)
    peak = torch.full((n,), torch.finfo(torch.float32).min, **fp32)  # finite: -inf tiles stay 0
    total = torch.zeros(n, **fp32)
    found = {name: torch.zeros(n, **fp32) for name in ("target", "sum")}
    weight32 = _column_weight(logits, torch.float32)
    tiles = _Tiles(e, c, bias, logits)
    for lo, hi, c_op in tiles.chunks():
        for rows in tiles.row_tiles():
            _, z, _ = tiles.logits_of(rows, lo, c_op)
            found["target"][rows] += _gather_targets(z, _local_targets(targets[rows], lo, hi))
            if "sum" in names:
                found["sum"][rows] += z.sum(1) if weight32 is None else z @ weight32[lo:hi]
            new_peak = torch.maximum(peak[rows], z.amax(1))
            total[rows] *= (peak[rows] - new_peak).exp_()
            total[rows] += z.sub_(new_peak.unsqueeze(1)).exp_().sum(1)
            peak[rows] = new_peak
    found["lse"], found["lse_residual"] = lse_pair(peak, total.log())
    return torch.stack([found[name] for name in names])


def _tiled_grads(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    coefficients: dict[str, torch.Tensor],
    logits: Logits,
    filter_eps: float | None,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """`grads` of 16-bit inputs over tiles (see `_in_tiles`), vocabulary chunks outermost:
    each chunk's grad_c is summed over every row tile in float32 and rounded once to c's dtype.
    With `filter_eps`, a tile holding no target whose softmax mass is within its share of the
    budget in every row (as `_kept_ranges` decides for a column chunk) skips its matmuls."""
    n, dim = e.shape
    vocab = c.shape[0]
    fp32 = dict(device=e.device, dtype=torch.float32)
    tiles = _Tiles(e, c, bias, logits)
    grad_e = torch.zeros(n, dim, **fp32) if needs[0] else None
    grad_c = torch.empty(c.shape, device=c.device, dtype=c.dtype) if needs[1] else None
    grad_bias = torch.zeros(vocab, **fp32) if needs[2] else None
    chunk_grad = torch.empty(tiles.columns, dim, **fp32) if needs[1] else None
    weight32 = _column_weight(logits, torch.float32)
    for lo, hi, c_op in tiles.chunks():
        summed = None if chunk_grad is None else chunk_grad[: hi - lo].zero_()
        weight = None if weight32 is None else weight32[lo:hi]
        for rows in tiles.row_tiles():
            e_op, z, deriv = tiles.logits_of(rows, lo, c_op)
            p = _log_probs(z, (lse[0, rows], lse[1, rows])).exp_()
            local = _local_targets(targets[rows], lo, hi)
            if filter_eps and _negligible(p, local, filter_eps, vocab):
                continue
            coefs = {name: values[rows] for name, values in coefficients.items()}
            d = _softmax_to_grad(p, local, coefs, None, None, None, None, weight, deriv,
                                 logits.scale)  # fmt: skip
            d_op = tiles.operand(d)
            if grad_e is not None:
                _add_product(grad_e[rows], d_op, c_op)
            if summed is not None:
                _add_product(summed, d_op.T, e_op)
            if grad_bias is not None:
                grad_bias[lo:hi] += d.sum(0)
        if grad_c is not None:
            grad_c[lo:hi].copy_(summed)
    return grad_e, grad_c, grad_bias


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out += a @ b for float32 `out`: bf16 operands' product widened, the rows of a padded
    operand beyond out's left out."""
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    else:
        out.add_(torch.mm(a, b)[: out.shape[0]])


def _local_targets(targets: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Targets as columns of the vocabulary chunk [lo, hi); -1 where outside it."""
    local = targets - lo
    return local.masked_fill_((targets < lo) | (targets >= hi), -1)


def _negligible(p: torch.Tensor, local_targets: torch.Tensor, eps: float, vocab: int) -> bool:
    """Whether a tile of the softmax holds no target and, in every row, at most its share
    eps * width / V of the filtering budget (so that no row loses more than eps in all)."""
    kept = (local_targets >= 0).any() | (p.sum(1).amax() > eps * p.shape[1] / vocab)
    return not bool(kept)  # one host synchronization per tile


def _mixture_ratios(
    gap: torch.Tensor, beta: float, ratio_out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log(m / p), log(m / q)) per entry for m = beta q + (1 - beta) p, from the log-ratio
    `gap` = log p - log q (small where the heads agree; turned into log(m / q) in place), never
    from log m itself: the divergence and its gradient are then differences of small numbers,
    not of two log-probabilities."""
    constant = lambda x: torch.tensor(x, device=gap.device, dtype=gap.dtype)  # noqa: E731
    ratio = torch.logaddexp(math.log(beta) - gap, constant(math.log1p(-beta)), out=ratio_out)
    gap = torch.logaddexp(gap.add_(math.log1p(-beta)), constant(math.log(beta)), out=gap)
    return ratio, gap


def _log_probs(
    x: torch.Tensor, normalizer: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor | None = None
) -> torch.Tensor:
    """(x - normalizer[0]) - normalizer[1] per row, into `out` (in place without): log p from
    a log-sum-exp as two parts, (max, log sum exp(x - max)) or (lse, its residual)."""
    out = x if out is None else out.copy_(x)
    return out.sub_(normalizer[0].unsqueeze(1)).sub_(normalizer[1].unsqueeze(1))


ROW_DOT_COLUMNS = 2048
"""Vocabulary columns per product in `_row_dot`: its scratch is a few columns of the block."""


def _row_dot(
    probs: torch.Tensor, b: torch.Tensor, shift: torch.Tensor | None = None
) -> torch.Tensor:
    """sum_v probs[n, v] * (b[n, v] - shift[n]) per row of two vocabulary-major blocks (no
    shift if None), a class of probability 0 adding 0 (b may be infinite there: a class masked
    by a -inf logit), with a scratch of ROW_DOT_COLUMNS columns rather than a block-sized
    temporary."""
    out = torch.zeros(probs.shape[0], device=probs.device, dtype=probs.dtype)
    columns = min(probs.shape[1], ROW_DOT_COLUMNS)
    scratch = torch.empty(columns, probs.shape[0], device=probs.device, dtype=probs.dtype).T
    for lo in range(0, probs.shape[1], ROW_DOT_COLUMNS):
        hi = min(probs.shape[1], lo + ROW_DOT_COLUMNS)
        part = scratch[:, : hi - lo]
        if shift is None:
            torch.mul(probs[:, lo:hi], b[:, lo:hi], out=part)
        else:
            torch.sub(b[:, lo:hi], shift[:, None], out=part).mul_(probs[:, lo:hi])
        out += part.masked_fill_(probs[:, lo:hi] == 0, 0.0).sum(1)
    return out


def _logits(
    e_rows: torch.Tensor, c: torch.Tensor, bias32: torch.Tensor | None, out: torch.Tensor
) -> torch.Tensor:
    """Logits of a row block in the dtype of `out` (the accumulation dtype), written into it.

    16-bit operands are multiplied in that dtype, so that each logit keeps the float32 sum of
    its products, as the Triton kernels' accumulator does (eager PyTorch rounds it to 16 bits).
    """
    if e_rows.dtype == out.dtype:
        torch.mm(e_rows, c.T, out=out)
    else:
        e_rows = e_rows.to(out.dtype)
        for lo, hi, part in _upcast(c, 0, c.shape[0], out.dtype):
            torch.mm(e_rows, part.T, out=out[:, lo:hi])
    if bias32 is not None:
        out.add_(bias32)
    return out


UPCAST_BYTES = 2**21
"""Scratch for 16-bit rows of c multiplied in float32 (2 MiB: 1024 rows at D = 512)."""


def _upcast(c: torch.Tensor, lo: int, hi: int, dtype: torch.dtype, rows: int | None = None):
    """(start, stop, c[start:stop] in `dtype`) over the rows [lo, hi) of c, `rows` at a time
    (UPCAST_BYTES' worth by default), in one reused scratch buffer: 16-bit c multiplied in
    float32 without a float32 copy of c (on CPUs without 16-bit matrix units this is also
    faster than a bfloat16 matmul)."""
    rows = rows or max(1, UPCAST_BYTES // (c.shape[1] * dtype.itemsize))
    scratch = torch.empty(min(rows, hi - lo), c.shape[1], device=c.device, dtype=dtype)
    for start in range(lo, hi, rows):
        stop = min(hi, start + rows)
        yield start, stop, scratch[: stop - start].copy_(c[start:stop])


def _gather_targets(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    picked = z.gather(1, t.clamp(min=0).unsqueeze(1)).squeeze(1)
    return picked.masked_fill_(t < 0, 0.0)


class _Support:
    """Each row's support S, (rows, k) classes with -1 for none, as positions of a block: a -1
    stands for a class of S in its row, so that all writes to one position agree (a row
    without S writes nothing)."""

    def __init__(self, support: torch.Tensor) -> None:
        positions = torch.where(support >= 0, support, support.amax(1, keepdim=True))
        self.member = positions >= 0
        self.positions = positions.clamp(min=0)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """x at S, (rows, k)."""
        return x.gather(1, self.positions)

    def put(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """x[S] = values (as `take` gives them) in place."""
        kept = torch.where(self.member, values, x.gather(1, self.positions))
        return x.scatter_(1, self.positions, kept)


def _sum_outside(x: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """sum_{v not in S} x[n, v] per row of a block: S's entries summed as none, not subtracted
    from a total (whose rounding would swamp a small remainder), then put back."""
    inside = _Support(support)
    kept = inside.take(x)
    total = inside.put(x, torch.zeros_like(kept)).sum(1)
    inside.put(x, kept)
    return total


def _exp_in_place(z: torch.Tensor, *, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn z into exp(z - max) (the softmax if `normalize`) and return the row maximum and
    the log of the row sum of exp(z - max): their sum is the log-sum-exp. A row of -inf logits
    (a vocabulary shard all masked) keeps a finite max: its exponentials, softmax and sum are
    0 and its log-sum-exp -inf, not NaN."""
    peak = z.amax(1, keepdim=True).clamp_(min=torch.finfo(z.dtype).min)
    z.sub_(peak).exp_()
    total = z.sum(1, keepdim=True)
    if normalize:  # the max's own term makes the sum at least 1 wherever a logit is finite
        z.div_(total.clamp(min=1.0))
    return peak.squeeze(1), total.log_().squeeze(1)


def _softmax_to_grad(
    p: torch.Tensor,
    t: torch.Tensor,
    coefs: dict[str, torch.Tensor],
    log_p: torch.Tensor | None,
    gap: torch.Tensor | None,
    q: torch.Tensor | None,
    ratio: torch.Tensor | None,
    weight32: torch.Tensor | None,
    deriv: torch.Tensor | None,
    scale: float,
    support: torch.Tensor | None = None,
    support_grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """In place: softmax p -> the gradient of the pre-softcap logits,

        (p (a + b log p + b_pq log(p / q) + b_r log(m / p) + o [v not in S]) + g q
         + t onehot + sum_j u_j [v = S_j] + s w) * scale * softcap'

    with the coefficient rows present in `coefs` (`outside` there is o / p_tail,
    `_outside_over_tail`), `support` the classes S (rows, k) and
    `support_grad` their coefficients u; `gap` log p - log q (the other buffers are
    overwritten)."""
    column = lambda name: coefs[name].unsqueeze(1)  # noqa: E731
    inner = None
    impossible = p == 0 if {"plogp", "plogpq", "plogr"} & coefs.keys() else None
    for name, values in (("plogp", log_p), ("plogpq", gap), ("plogr", ratio)):
        if name in coefs:
            values.masked_fill_(impossible, 0.0)  # a masked class's -inf would make p * z NaN
            if inner is None:
                inner = values.mul_(column(name))
            else:
                inner.addcmul_(values, column(name))
    in_buffer = inner is not None  # a block buffer, written in place; else a column of `coefs`
    if "p" in coefs:
        inner = inner.add_(column("p")) if in_buffer else column("p")
    if support is not None:
        inside = _Support(support)
    if "outside" in coefs:  # S's entries keep p times the rest, o never added to them
        kept = inside.take(p) * (0.0 if inner is None else inside.take(inner.expand_as(p)))
        if in_buffer:
            inner.add_(column("outside"))
        else:
            inner = column("outside") + (0.0 if inner is None else inner)
    d = p.zero_() if inner is None else p.mul_(inner)
    if "outside" in coefs:
        inside.put(d, kept)
    if "q" in coefs:
        d.addcmul_(q, column("q"))
    if "target" in coefs:
        at_target = torch.where(t >= 0, coefs["target"], 0.0).unsqueeze(1)
        d.scatter_add_(1, t.clamp(min=0).unsqueeze(1), at_target)
    if support_grad is not None:
        d.scatter_add_(1, inside.positions, torch.where(support >= 0, support_grad, 0.0))
    if "sum" in coefs:
        if weight32 is None:
            d.add_(column("sum"))
        else:
            d.addcmul_(column("sum"), weight32.unsqueeze(0))
    if deriv is not None:
        d.mul_(deriv)
    if scale != 1.0:
        d.mul_(scale)
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
