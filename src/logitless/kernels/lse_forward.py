"""Forward kernel: per-row log-sum-exp, target logit, (weighted) logit sum and entropy, split
over the vocabulary; on request each row's top-k logits too, or a teacher head's statistics.

Grid: (row blocks, vocabulary splits). Each program sweeps its split in BLOCK_V tiles, each tile
a dot loop over D with fp32 accumulation, and keeps an online max / rescaled sum of exponentials
per row, and with it the rescaled sum of exp(z - max) (z - max) whose ratio to the sum of
exponentials is the softmax-weighted mean of z - max (the entropy's). It writes one partial
result per (split, row); `lse_forward` merges the splits in PyTorch, in a fixed order, so the
result is deterministic and needs neither atomics nor locks. With TOP_K, each program also
keeps a running top-k per row (a tile whose largest logit beats no row's k-th is passed over
after one comparison) and writes it per split; the merge takes the top-k of the splits'
candidates.
"""

from __future__ import annotations

import inspect
import math

import torch
import triton
import triton.language as tl

from logitless._validation import triton_interpreter_on
from logitless.backends import Teacher, lse_pair
from logitless.kernels._tiles import (
    INTERPRETER_BLOCKS,
    TensorDescriptor,
    autotune_by_dtype,
    dot_options,
    launch,
    log_add_exp,
    logit_tile,
    logit_tile_from_descriptors,
    offsets,
    outside_support,
    set_descriptor_blocks,
    tensor_descriptors,
)

MAX_TOP_K = 64
"""Largest k the kernel keeps per row (registers: BLOCK_N x k values and classes per program);
a larger k comes from the portable backend."""

PROGRAMS_PER_SM = 16
"""Programs launched per streaming multiprocessor: many short waves keep the tail small."""

INTERPRETER_PROGRAMS = 8
"""Programs aimed at under the interpreter: at test shapes, splits of several tiles and an empty
one."""

PLANNED_TILE = (128, 128)
"""(BLOCK_N, BLOCK_V) the split count is planned for; the tuned tile may differ."""

HALF_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 256, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    # for launches with a teacher (two logit tiles, see TEACHER_ENTRIES_PER_THREAD):
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 64}, num_warps=8, num_stages=3),
]
"""Hopper tiles that compile for sm_90 without register spills (ptxas -v, every option on); the
last two are those a running top-k fits (TOP_K_TILE), the last the one a teacher fits."""

RANGE_FLATTENS = "flatten" in inspect.signature(tl.range.__init__).parameters
"""Whether this Triton pipelines a nested loop as one (`tl.range(..., flatten=True)`: 3.3 on)."""

if RANGE_FLATTENS:
    HALF_CONFIGS += [
        triton.Config(
            {"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 128, "FLATTEN": True},
            num_warps=8, num_stages=3,
        ),
        triton.Config(
            {"BLOCK_N": 256, "BLOCK_V": 128, "BLOCK_D": 64, "FLATTEN": True},
            num_warps=8, num_stages=3,
        ),
    ]  # fmt: skip

if TensorDescriptor is not None:  # the two chosen tiles again, read by the TMA (3.4 on)
    HALF_CONFIGS += [
        triton.Config(
            {"BLOCK_N": block_n, "BLOCK_V": 128, "BLOCK_D": block_d, "TMA": True, **flatten},
            num_warps=8, num_stages=stages, pre_hook=set_descriptor_blocks,
        )
        # the H100 chose 256 x 128 x 64 through the TMA at both model shapes: also 4 stages deep
        # (197 KB of shared memory, no spills)
        for block_n, block_d, stages in ((128, 128, 3), (256, 64, 3), (256, 64, 4))
        for flatten in ({}, {"FLATTEN": True}) if RANGE_FLATTENS or not flatten
    ]  # fmt: skip

FLOAT32_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 16}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=4, num_stages=3),
]


@triton.jit
def lse_forward_kernel(
    e_ptr, c_ptr, bias_ptr, weight_ptr, targets_ptr, partials_ptr,
    N, V, D, stride_en, stride_ed, stride_cv, stride_cd, softcap, scale, vocab_bucket,
    top_values_ptr, top_indices_ptr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_SUM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, WITH_ENTROPY: tl.constexpr, TOP_K: tl.constexpr,
    TOP_K_SLOTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    teacher_e_ptr=None, teacher_c_ptr=None, teacher_bias_ptr=None, lse_ptr=None,
    teacher_lse_ptr=None, D_t=0, stride_ten=0, stride_ted=0, stride_tcv=0, stride_tcd=0,
    teacher_softcap=1.0, log_beta=0.0, log_one_minus_beta=0.0,
    TEACHER: tl.constexpr = False, TEACHER_BIAS: tl.constexpr = False,
    TEACHER_SOFTCAP: tl.constexpr = False, MIXTURE: tl.constexpr = False,
    FLATTEN: tl.constexpr = False,
    e_desc=None, c_desc=None, HAS_DESCRIPTORS: tl.constexpr = False, TMA: tl.constexpr = False,
    support_ptr=None, support_k=0, HAS_SUPPORT: tl.constexpr = False,
):  # fmt: skip
    """Partials (max, sum of exp(z - max), target logit, [logit sum], [sum of exp(z - max)
    (z - max)]) of a row block on a split; the logit sum weighs column v by weight[v] when
    HAS_WEIGHT.

    `partials_ptr` is (3 + WITH_SUM + WITH_ENTROPY [+ 4 | + 2], splits, N) fp32; `vocab_bucket`
    only keys the autotuner. With TOP_K > 0, `top_values_ptr` (fp32) and `top_indices_ptr`
    (int32), both (splits, N, TOP_K), receive the split's TOP_K largest logits of each row and
    their classes (TOP_K_SLOTS: TOP_K rounded up to a power of two).

    With TEACHER, the teacher's logit tile y (its own D_t, bias and softcap, the same scale)
    adds the partials (sum of exp(z - max) ((z - max) - (y - teacher max)), sum of
    exp(y - teacher max) ((y - teacher max) - (z - max)), teacher max, sum of
    exp(y - teacher max)): each head's weighted log-ratio, formed per entry relative to both
    running maxima (moved with them), so that heads at far-apart levels sum small numbers; with
    MIXTURE instead, given both log-sum-exps, the JSD's sums (sum p log(m / p), sum q
    log(m / q)) for m = beta q + (1 - beta) p.

    With HAS_SUPPORT, the partials have one more plane before the teacher's: the sum of
    exp(z - max) over the classes outside each row's support (`support_ptr`, (N, support_k)
    classes, -1 for none), summed as such so that a small remainder keeps its digits.

    FLATTEN (neither TEACHER, TOP_K nor HAS_SUPPORT) sweeps the split as one software-pipelined
    loop over (tile, D step), so that the next tile's loads overlap the current tile's softmax
    update.
    TMA (idem) reads e and c through `e_desc` and `c_desc` (`tensor_descriptors`; their presence,
    HAS_DESCRIPTORS, keys the autotuner).
    """
    tl.static_assert(not ((FLATTEN or TMA) and (TEACHER or TOP_K or HAS_SUPPORT)), "plain only")
    tl.static_assert(not TMA or HAS_DESCRIPTORS, "TMA reads through e_desc and c_desc")
    row_block = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    rows = row_block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    row_offsets = offsets(rows, stride_en)
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1).to(tl.int32)

    tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), splits)
    vocab_begin = split * tiles_per_split * BLOCK_V
    vocab_end = tl.minimum(V, vocab_begin + tiles_per_split * BLOCK_V)

    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    logit_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    weighted_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    outside_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if TEACHER:
        teacher_rows = offsets(rows, stride_ten)
        teacher_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
        teacher_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        student_weighted = tl.zeros((BLOCK_N,), dtype=tl.float32)  # weighted by p
        teacher_weighted = tl.zeros((BLOCK_N,), dtype=tl.float32)  # weighted by q
        if MIXTURE:  # each a (2, N) pair: the log-sum-exp and what its rounding lost
            lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
            lse_lo = tl.load(lse_ptr + N + rows, mask=row_mask, other=0.0)
            teacher_lse = tl.load(teacher_lse_ptr + rows, mask=row_mask, other=0.0)
            teacher_lse_lo = tl.load(teacher_lse_ptr + N + rows, mask=row_mask, other=0.0)
    if TOP_K:
        slots = tl.arange(0, TOP_K_SLOTS)
        # empty slots hold -inf, padding slots +inf (never the minimum, never stored)
        top_values = tl.where(slots < TOP_K, float("-inf"), float("inf"))
        top_values = tl.zeros((BLOCK_N, TOP_K_SLOTS), dtype=tl.float32) + top_values[None, :]
        top_indices = tl.full((BLOCK_N, TOP_K_SLOTS), -1, dtype=tl.int32)
    # Two loops, not one with flatten=FLATTEN: Triton before 3.3 cannot compile the argument,
    # and does not compile a branch its constexpr condition turns off.
    if FLATTEN:
        for tile_begin in tl.range(vocab_begin, vocab_end, BLOCK_V, flatten=True):
            z, vocab, col_mask = _student_tile(
                e_ptr, c_ptr, e_desc, c_desc, bias_ptr, row_block, row_offsets, row_mask,
                tile_begin, vocab_end, D, stride_ed, stride_cv, stride_cd, softcap, scale,
                HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_UPCAST, TMA,
            )  # fmt: skip
            _, _, _, running_max, running_sum, target_logit, logit_sum, weighted_sum = _fold_tile(
                z, vocab, col_mask, targets, weight_ptr, running_max, running_sum, target_logit,
                logit_sum, weighted_sum, WITH_SUM, HAS_WEIGHT, WITH_ENTROPY,
            )  # fmt: skip
    else:
        for tile_begin in range(vocab_begin, vocab_end, BLOCK_V):
            z, vocab, col_mask = _student_tile(
                e_ptr, c_ptr, e_desc, c_desc, bias_ptr, row_block, row_offsets, row_mask,
                tile_begin, vocab_end, D, stride_ed, stride_cv, stride_cd, softcap, scale,
                HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_UPCAST, TMA,
            )  # fmt: skip
            previous_max, previous_sum = running_max, running_sum
            z, exps, rescale, running_max, running_sum, target_logit, logit_sum, weighted_sum = (
                _fold_tile(
                    z, vocab, col_mask, targets, weight_ptr, running_max, running_sum,
                    target_logit, logit_sum, weighted_sum, WITH_SUM, HAS_WEIGHT, WITH_ENTROPY,
                )
            )  # fmt: skip
            if HAS_SUPPORT:
                outside = outside_support(support_ptr, rows, row_mask, vocab, support_k)
                outside_sum = outside_sum * rescale + tl.sum(tl.where(outside, exps, 0.0), axis=1)
            if TOP_K:
                top_values, top_indices = _merge_top_k(
                    top_values, top_indices, z, vocab, col_mask, TOP_K, TOP_K_SLOTS, BLOCK_V
                )
            if TEACHER:
                y = logit_tile(
                    teacher_e_ptr, teacher_c_ptr, teacher_bias_ptr, teacher_rows, vocab,
                    offsets(vocab, stride_tcv), row_mask, col_mask, D_t, stride_ted, stride_tcd,
                    teacher_softcap, scale, TEACHER_BIAS, TEACHER_SOFTCAP,
                    BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_UPCAST,
                )  # fmt: skip
                if MIXTURE:  # sum p log(m / p) and sum q log(m / q)
                    log_p = (z - lse[:, None]) - lse_lo[:, None]
                    log_q = (y - teacher_lse[:, None]) - teacher_lse_lo[:, None]
                    gap = tl.where(col_mask[None, :], log_p - log_q, 0.0)
                    to_student = log_add_exp(log_beta - gap, log_one_minus_beta)
                    to_teacher = log_add_exp(gap + log_one_minus_beta, log_beta)
                    p = tl.where(col_mask[None, :], tl.exp(log_p), 0.0)
                    q = tl.where(col_mask[None, :], tl.exp(log_q), 0.0)
                    # a class both heads mask (p = q = 0) has a NaN gap: it adds 0
                    student_weighted += tl.sum(p * tl.where(p > 0, to_student, 0.0), axis=1)
                    teacher_weighted += tl.sum(q * tl.where(q > 0, to_teacher, 0.0), axis=1)
                else:
                    y = tl.where(col_mask[None, :], y, float("-inf"))
                    new_teacher_max = tl.maximum(teacher_max, tl.max(y, axis=1))
                    teacher_shift = tl.where(new_teacher_max == float("-inf"), 0.0, new_teacher_max)
                    teacher_rescale = tl.exp(teacher_max - teacher_shift)
                    teacher_exps = tl.exp(y - teacher_shift[:, None])
                    # each head relative to its own max, per entry: (z - max) - (y - teacher max)
                    # is small where the heads agree, whatever their levels; the earlier sums
                    # move by how much the two maxima moved
                    shift = tl.where(running_max == float("-inf"), 0.0, running_max)
                    gap = (z - shift[:, None]) - (y - teacher_shift[:, None])
                    moved = (tl.where(previous_max == float("-inf"), 0.0, previous_max) - shift) - (
                        tl.where(teacher_max == float("-inf"), 0.0, teacher_max) - teacher_shift
                    )
                    student_weighted = (student_weighted + moved * previous_sum) * rescale + tl.sum(
                        exps * tl.where(exps > 0, gap, 0.0), axis=1
                    )
                    teacher_weighted = (
                        teacher_weighted - moved * teacher_sum
                    ) * teacher_rescale + tl.sum(
                        teacher_exps * tl.where(teacher_exps > 0, -gap, 0.0), axis=1
                    )
                    teacher_sum = teacher_sum * teacher_rescale + tl.sum(teacher_exps, axis=1)
                    teacher_max = new_teacher_max

    plane = splits.to(tl.int64) * N
    out = partials_ptr + split.to(tl.int64) * N + rows
    tl.store(out, running_max, mask=row_mask)
    tl.store(out + plane, running_sum, mask=row_mask)
    tl.store(out + 2 * plane, target_logit, mask=row_mask)
    if WITH_SUM:
        tl.store(out + 3 * plane, logit_sum, mask=row_mask)
    if WITH_ENTROPY:
        tl.store(out + (3 + WITH_SUM) * plane, weighted_sum, mask=row_mask)
    if HAS_SUPPORT:
        tl.store(out + (3 + WITH_SUM + WITH_ENTROPY) * plane, outside_sum, mask=row_mask)
    if TEACHER:
        out += (3 + WITH_SUM + WITH_ENTROPY + HAS_SUPPORT) * plane
        tl.store(out, student_weighted, mask=row_mask)
        tl.store(out + plane, teacher_weighted, mask=row_mask)
        if not MIXTURE:
            tl.store(out + 2 * plane, teacher_max, mask=row_mask)
            tl.store(out + 3 * plane, teacher_sum, mask=row_mask)
    if TOP_K:
        top = (split.to(tl.int64) * N + rows)[:, None] * TOP_K + slots[None, :]
        top_mask = row_mask[:, None] & (slots < TOP_K)[None, :]
        tl.store(top_values_ptr + top, top_values, mask=top_mask)
        tl.store(top_indices_ptr + top, top_indices, mask=top_mask)


@triton.jit
def _student_tile(
    e_ptr, c_ptr, e_desc, c_desc, bias_ptr, row_block, row_offsets, row_mask, tile_begin,
    vocab_end, D, stride_ed, stride_cv, stride_cd, softcap, scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """The logit tile of the row block at `tile_begin`, its classes and their mask (the split
    ends at `vocab_end`), read through the descriptors when TMA."""
    vocab = tile_begin + tl.arange(0, BLOCK_V)
    col_mask = vocab < vocab_end
    if TMA:
        z = logit_tile_from_descriptors(
            e_desc, c_desc, bias_ptr, row_block * BLOCK_N, tile_begin, vocab, col_mask, D,
            softcap, scale, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION,
            DOT_UPCAST,
        )  # fmt: skip
    else:
        z = logit_tile(
            e_ptr, c_ptr, bias_ptr, row_offsets, vocab, offsets(vocab, stride_cv), row_mask,
            col_mask, D, stride_ed, stride_cd, softcap, scale, HAS_BIAS, HAS_SOFTCAP, BLOCK_N,
            BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_UPCAST,
        )  # fmt: skip
    return z, vocab, col_mask


@triton.jit
def _fold_tile(z, vocab, col_mask, targets, weight_ptr, running_max, running_sum, target_logit,
               logit_sum, weighted_sum, WITH_SUM: tl.constexpr, HAS_WEIGHT: tl.constexpr,
               WITH_ENTROPY: tl.constexpr):  # fmt: skip
    """A logit tile folded into its rows' statistics. Returns the tile with its padding columns
    at -inf, its exponentials, the rescale of the earlier sums, and the new max, sum of
    exponentials, target logit, logit sum and sum of exp(z - max) (z - max)."""
    target_logit += tl.sum(tl.where(vocab[None, :] == targets[:, None], z, 0.0), axis=1)
    if WITH_SUM:
        summand = tl.where(col_mask[None, :], z, 0.0)
        if HAS_WEIGHT:
            column_weight = tl.load(weight_ptr + vocab, mask=col_mask, other=0.0)
            summand *= column_weight.to(tl.float32)[None, :]
        logit_sum += tl.sum(summand, axis=1)
    z = tl.where(col_mask[None, :], z, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(z, axis=1))
    # While every logit so far is -inf (a masked class), shift by 0: exp(-inf - -inf) is NaN.
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    rescale = tl.exp(running_max - shift)
    exps = tl.exp(z - shift[:, None])
    if WITH_ENTROPY:  # relative to the shift, moved with it; 0 at a masked (-inf) logit, not NaN
        moved = tl.where(running_max == float("-inf"), 0.0, running_max) - shift
        weighted_sum = (weighted_sum + moved * running_sum) * rescale + tl.sum(
            exps * tl.where(exps > 0, z - shift[:, None], 0.0), axis=1
        )
    running_sum = running_sum * rescale + tl.sum(exps, axis=1)
    return z, exps, rescale, new_max, running_sum, target_logit, logit_sum, weighted_sum


@triton.jit
def _merge_top_k(top_values, top_indices, z, vocab, col_mask, TOP_K: tl.constexpr,
                 TOP_K_SLOTS: tl.constexpr, BLOCK_V: tl.constexpr):  # fmt: skip
    """The running top-k of each row merged with a logit tile: TOP_K times, a row's largest
    remaining logit replaces its smallest kept one if larger. A masked class (-inf logit) ranks
    as the lowest finite value, above empty slots and the tile's padding columns."""
    slots = tl.arange(0, TOP_K_SLOTS)
    keys = tl.where(col_mask[None, :], tl.maximum(z, -3.4028234663852886e38), float("-inf"))
    if tl.max(tl.max(keys, axis=1) - tl.min(top_values, axis=1)) > 0:
        for _ in range(TOP_K):
            best = tl.max(keys, axis=1)
            best_at = tl.argmax(keys, axis=1)
            worst_at = tl.argmin(top_values, axis=1)
            take = best > tl.min(top_values, axis=1)
            slot = take[:, None] & (slots[None, :] == worst_at[:, None])
            column = take[:, None] & (tl.arange(0, BLOCK_V)[None, :] == best_at[:, None])
            chosen = tl.sum(tl.where(column, vocab[None, :], 0), axis=1)
            top_values = tl.where(slot, best[:, None], top_values)
            top_indices = tl.where(slot, chosen[:, None].to(tl.int32), top_indices)
            keys = tl.where(column, float("-inf"), keys)
    return top_values, top_indices


lse_forward_tuned = autotune_by_dtype(
    HALF_CONFIGS, FLOAT32_CONFIGS, key=["D", "vocab_bucket", "HAS_DESCRIPTORS"]
)(lse_forward_kernel)


def lse_forward(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    softcap: float | None,
    with_sum: bool,
    scale: float = 1.0,
    weight: torch.Tensor | None = None,
    with_entropy: bool = False,
    top_k: int = 0,
    teacher: Teacher | None = None,
    lse: torch.Tensor | None = None,
    support: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """fp32 per-row `lse` (with `lse_residual`), `target` and, if asked, `sum` (weighted by
    `weight`) and `entropy` of e; see `logitless.backends`. With `top_k` (at most
    MAX_TOP_K), also `top`: the (N, top_k) int64 classes of each row's largest logits, in
    descending order, and `top_log_probs`: their log-probabilities, from the kernel's logits.

    With a `teacher`, also `teacher_lse` (and its residual), `forward_kl` and `reverse_kl`;
    with the student's `lse` given (and the teacher's in `teacher.lse`),
    each a (2, N) pair with its residual, the second sweep's `jsd` and `jsd_p` instead. With a
    `support` ((N, k) classes per row, -1 for none), also `support_tail`: the log of the softmax
    mass outside it.
    """
    n, dim = e.shape
    vocab = c.shape[0]
    splits = vocabulary_splits(n, vocab, e.device)
    mixture = lse is not None
    teacher_planes = 0 if teacher is None else 2 if mixture else 4
    with_support = support is not None
    planes = 3 + with_sum + with_entropy + with_support + teacher_planes
    partials = torch.empty(planes, splits, n, device=e.device, dtype=torch.float32)
    teacher_args = {}
    if teacher is not None:
        teacher_e, teacher_c = teacher.e, teacher.c
        teacher_args = dict(
            teacher_e_ptr=teacher_e, teacher_c_ptr=teacher_c,
            teacher_bias_ptr=teacher_e if teacher.bias is None else teacher.bias.contiguous(),
            lse_ptr=lse.contiguous() if mixture else partials,
            teacher_lse_ptr=teacher.lse.contiguous() if mixture else partials,
            D_t=teacher_e.shape[1], stride_ten=teacher_e.stride(0),
            stride_ted=teacher_e.stride(1), stride_tcv=teacher_c.stride(0),
            stride_tcd=teacher_c.stride(1), teacher_softcap=float(teacher.softcap or 1.0),
            log_beta=math.log(teacher.beta), log_one_minus_beta=math.log1p(-teacher.beta),
            TEACHER=True, TEACHER_BIAS=teacher.bias is not None,
            TEACHER_SOFTCAP=teacher.softcap is not None, MIXTURE=mixture,
        )  # fmt: skip
    top_values = torch.empty(splits, n, top_k, device=e.device, dtype=torch.float32)
    top_indices = torch.empty(splits, n, top_k, device=e.device, dtype=torch.int32)
    if n:
        launch(
            lse_forward_kernel,
            lse_forward_tuned,
            lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits),
            e, c, e if bias is None else bias.contiguous(),
            e if weight is None else weight.contiguous(), targets, partials,
            n, vocab, dim, *e.stride(), *c.stride(), float(softcap or 1.0), float(scale),
            triton.next_power_of_2(vocab), top_values, top_indices,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, WITH_SUM=with_sum,
            HAS_WEIGHT=weight is not None, WITH_ENTROPY=with_entropy,
            TOP_K=top_k, TOP_K_SLOTS=triton.next_power_of_2(max(1, top_k)),
            **dot_options(e.dtype), **tensor_descriptors(e, c), **teacher_args,
            **_support_arguments(support),
        )  # fmt: skip
    split_max, split_sum = partials[0], partials[1]
    peak, rescale, total = _merged_sums(split_max, split_sum)
    log_total = total.log()
    found = {"target": partials[2].sum(0)}
    found["lse"], found["lse_residual"] = lse_pair(peak, log_total)
    if with_sum:
        found["sum"] = partials[3].sum(0)
    if with_entropy:  # each split's sum exp(z - its max) (z - its max), moved to the row's max
        shifted = torch.where(rescale > 0, (split_max - peak) * split_sum, 0.0)
        relative_mean = _softmax_mean(partials[3 + with_sum] + shifted, rescale, total)
        found["entropy"] = log_total - relative_mean
    if with_support:  # both sums relative to the same maxima: no lse's rounding in between
        outside = (partials[3 + with_sum + with_entropy] * rescale).sum(0)
        found["support_tail"] = outside.log() - log_total
    if teacher is not None:
        student = (split_max, split_sum, peak, rescale, total)
        teacher_planes = partials[3 + with_sum + with_entropy + with_support :]
        found.update(_teacher_statistics(teacher_planes, student, teacher.beta, mixture))
    if top_k:
        candidates = top_values.permute(1, 0, 2).reshape(n, splits * top_k)
        best_logits, best = candidates.topk(top_k, dim=1)
        classes = top_indices.permute(1, 0, 2).reshape(n, splits * top_k)
        found["top"] = classes.gather(1, best).long()
        # The kernel ranks a masked class (a -inf logit) as the lowest finite value.
        best_logits.masked_fill_(best_logits == torch.finfo(torch.float32).min, float("-inf"))
        found["top_log_probs"] = best_logits.sub_(peak[:, None]).sub_(log_total[:, None])
    return found


def _support_arguments(support: torch.Tensor | None) -> dict[str, object]:
    """The kernels' arguments for a support (none without)."""
    if support is None:
        return {}
    support = support.contiguous()
    return {"support_ptr": support, "support_k": support.shape[1], "HAS_SUPPORT": True}


def _teacher_statistics(
    partials: torch.Tensor, student: tuple[torch.Tensor, ...], beta: float, mixture: bool
) -> dict[str, torch.Tensor]:
    """The teacher's statistics from its planes of the splits' partials; `student` holds the
    student's (split max, split sum of exponentials, row max, splits' factors to it, row sum of
    exponentials)."""
    if mixture:
        jsd_p, to_teacher = partials[0].sum(0), partials[1].sum(0)
        return {"jsd_p": jsd_p, "jsd": -(beta * to_teacher + (1.0 - beta) * jsd_p)}
    split_max, split_sum, peak, rescale, total = student
    teacher_peak, teacher_rescale, teacher_total = _merged_sums(partials[2], partials[3])
    teacher_lse, teacher_lse_residual = lse_pair(teacher_peak, teacher_total.log())
    # each split's sums, relative to its two maxima (0 for one still -inf, as in the kernel),
    # moved to the rows' maxima: keyed on the maxima, not on the factors, which underflow to 0
    # for a split ~104 below the row's and would drop its shift
    moved = torch.where(split_max > -math.inf, split_max - peak, 0.0) - torch.where(
        partials[2] > -math.inf, partials[2] - teacher_peak, 0.0
    )
    student_gap = _softmax_mean(partials[0] + moved * split_sum, rescale, total)
    teacher_gap = _softmax_mean(partials[1] - moved * partials[3], teacher_rescale, teacher_total)
    log_totals = total.log() - teacher_total.log()  # (lse - max) - (teacher_lse - teacher max)
    return {
        "teacher_lse": teacher_lse,
        "teacher_lse_residual": teacher_lse_residual,
        "reverse_kl": student_gap - log_totals,
        "forward_kl": teacher_gap + log_totals,
    }


def _merged_sums(
    split_max: torch.Tensor, split_sum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(each row's max over the splits, each split's factor to it, the row's sum of
    exponentials) from the splits' (max, sum of exp(z - max)). A row whose logits are all
    -inf (a vocabulary shard all masked) gets factors and a sum of 0, whose log is its lse."""
    peak = split_max.amax(0)
    rescale = torch.exp(split_max - peak.clamp(min=torch.finfo(torch.float32).min))
    return peak, rescale, (split_sum * rescale).sum(0)


def _softmax_mean(sums: torch.Tensor, rescale: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """A softmax-weighted mean from the splits' sums of exp(z - the split's max) x, moved to the
    row's max by `rescale` and divided by the row's sum of exponentials: at least 1 wherever a
    logit is finite (the max's own term), 1 where none is, whose mean is then 0 and not NaN."""
    return (sums * rescale).sum(0) / total.clamp(min=1.0)


def vocabulary_splits(n: int, vocab: int, device: torch.device) -> int:
    """How many vocabulary splits fill the device at this row count (at least one)."""
    if triton_interpreter_on():
        programs = INTERPRETER_PROGRAMS
        block_n, block_v = INTERPRETER_BLOCKS["BLOCK_N"], INTERPRETER_BLOCKS["BLOCK_V"]
    else:
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        programs, block_n, block_v = PROGRAMS_PER_SM * sm_count, *PLANNED_TILE
    row_blocks = max(1, triton.cdiv(n, block_n))
    return max(1, min(triton.cdiv(vocab, block_v), triton.cdiv(programs, row_blocks)))
