"""Backward kernel: the gradient of the logits of one vocabulary chunk, written to a buffer.

Grid: one program per (row block, vocabulary block) tile of one chunk of positions, on a 2-D
grid or, for a grouped config, a 1-D grid ordered in groups of row blocks (`_tile_coordinates`).
A program recomputes its logit tile on chip and forms the fp32 gradient of the logits

    d = (softmax * (grad_lse + grad_plogp * log(softmax)) + grad_target * onehot(target)
         + grad_sum * w)
        * scale * softcap'(x)

(the backend contract's gradient formula with the student's terms; z is the scaled logit, x the
one before softcap and scale, w the optional column weight)

which it stores, rounded to the input dtype as eager PyTorch rounds the logits' gradient, into a
bounded (rows, chunk) buffer. The caller turns the buffer into gradients with dense matmuls
(`d @ c[chunk]` into grad_e, `d.T @ e` as grad_c[chunk]): tensor cores, no atomics, deterministic.
Vocabulary positions map to vocabulary rows through an optional order (rows of c are read through
it, never copied), so that sorting the vocabulary by average logit gathers the entries that matter
into few tiles. With filtering on, a tile that holds no target is zeroed when, in every row, its
softmax mass is at most its share `filter_eps * BLOCK_V / V` of the budget (no row then loses more
than `filter_eps` in all), and only kept tiles are counted, so that a chunk whose tiles are all
negligible skips its matmuls.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from logitless._validation import triton_interpreter_on
from logitless.backends import Teacher
from logitless.kernels._tiles import (
    INTERPRETER_BLOCKS,
    TensorDescriptor,
    add_at_support,
    autotune_by_dtype,
    dot_options,
    launch,
    log_add_exp,
    logit_tile,
    logit_tile_from_descriptors,
    offsets,
    outside_support,
    set_descriptor_blocks,
)

HALF_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    # for launches with a teacher (two logit tiles, see TEACHER_ENTRIES_PER_THREAD):
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 64}, num_warps=8, num_stages=3),
    # the H100's choice in groups of 8 row blocks, for launches without filtering (config_fits)
    triton.Config(
        {"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_D": 64, "GROUP_N": 8}, num_warps=8, num_stages=3
    ),
]
"""Hopper tiles that compile for sm_90 without register spills (ptxas -v, every option on). The
grouped one is a candidate the autotuner weighs against the rest on the device."""

if TensorDescriptor is not None:
    # the H100's choice read by the TMA (3.4 on); grouped, it spills 116-152 bytes (sm90_compile)
    HALF_CONFIGS.append(
        triton.Config(
            {"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_D": 64, "TMA": True},
            num_warps=8, num_stages=3, pre_hook=set_descriptor_blocks,
        )
    )  # fmt: skip

FLOAT32_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 16}, num_warps=4, num_stages=3),
]


def vocabulary_alignment() -> int:
    """A multiple of every BLOCK_V in use: chunks of positions that start at one tile evenly."""
    if triton_interpreter_on():
        return INTERPRETER_BLOCKS["BLOCK_V"]
    return max(config.kwargs["BLOCK_V"] for config in HALF_CONFIGS + FLOAT32_CONFIGS)


@triton.jit
def lse_backward_kernel(
    e_ptr, c_ptr, bias_ptr, order_ptr, target_positions_ptr, lse_ptr,
    grad_lse_ptr, grad_plogp_ptr, grad_target_ptr, grad_sum_ptr, weight_ptr, d_ptr, counts_ptr,
    N, D, position_begin, position_end, stride_en, stride_ed, stride_cv, stride_cd, stride_dn,
    softcap, scale, filter_mass_per_entry, row_bucket, vocab_bucket,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SUM: tl.constexpr,
    HAS_PLOGP: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    SORTED: tl.constexpr, FILTER: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    teacher_e_ptr=None, teacher_c_ptr=None, teacher_bias_ptr=None, teacher_lse_ptr=None,
    grad_q_ptr=None, grad_plogpq_ptr=None, grad_plogr_ptr=None, D_t=0, stride_ten=0, stride_ted=0,
    stride_tcv=0, stride_tcd=0, teacher_softcap=1.0, log_beta=0.0, log_one_minus_beta=0.0,
    TEACHER: tl.constexpr = False, TEACHER_BIAS: tl.constexpr = False,
    TEACHER_SOFTCAP: tl.constexpr = False, HAS_Q: tl.constexpr = False,
    HAS_PLOGPQ: tl.constexpr = False, HAS_PLOGR: tl.constexpr = False,
    GROUP_N: tl.constexpr = 0,
    e_desc=None, c_desc=None, HAS_DESCRIPTORS: tl.constexpr = False, TMA: tl.constexpr = False,
    grad_outside_ptr=None, outside_lse_ptr=None, support_ptr=None, support_k=0,
    HAS_OUTSIDE: tl.constexpr = False,
    support_grad_ptr=None, HAS_SUPPORT_GRAD: tl.constexpr = False,
):  # fmt: skip
    """Write one tile of d into `d_ptr` (rows, positions - position_begin), zeros if filtered.

    When FILTER, `counts_ptr` (int32 pair) counts (tiles, tiles kept); `row_bucket` and
    `vocab_bucket` only key the autotuner. With TEACHER, the teacher's logit tile y (its own
    D_t, bias and softcap) adds the terms g q (HAS_Q), p b_pq log(p / q) (HAS_PLOGPQ) and
    p b_r log(m / p) (HAS_PLOGR) of the gradient formula, q = exp(y - teacher_lse),
    m = beta q + (1 - beta) p. HAS_OUTSIDE adds o exp(z - l) [v not in S] (o from
    `grad_outside_ptr`, l the log-sum-exp outside S from `outside_lse_ptr`, S each row's
    support: `support_ptr`, (N, support_k) classes, -1 for none), HAS_SUPPORT_GRAD
    sum_j u_j [v = S_j] (u from `support_grad_ptr`, (N, support_k)): a gathered log-prob's
    one-hot, formed in the tile with its p term and rounded once with it.
    TMA (neither SORTED nor TEACHER) reads e and c through `e_desc` and `c_desc`
    (`tensor_descriptors`; their presence, HAS_DESCRIPTORS, keys the autotuner).
    """
    tl.static_assert(not TMA or (HAS_DESCRIPTORS and not (SORTED or TEACHER)), "TMA: plain rows")
    row_block, vocab_block = _tile_coordinates(
        tl.cdiv(N, BLOCK_N), tl.cdiv(position_end - position_begin, BLOCK_V), GROUP_N
    )
    rows = row_block.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    positions = position_begin + vocab_block * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = positions < position_end
    vocab = tl.load(order_ptr + positions, mask=col_mask, other=0) if SORTED else positions
    if TMA:
        z = logit_tile_from_descriptors(
            e_desc, c_desc, bias_ptr, row_block * BLOCK_N, position_begin + vocab_block * BLOCK_V,
            vocab, col_mask, D, softcap, scale, HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D,
            DOT_PRECISION, DOT_UPCAST,
        )  # fmt: skip
    else:
        z = logit_tile(
            e_ptr, c_ptr, bias_ptr, offsets(rows, stride_en), vocab, offsets(vocab, stride_cv),
            row_mask, col_mask, D, stride_ed, stride_cd, softcap, scale,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_UPCAST,
        )  # fmt: skip
    # lse_ptr: a (2, N) pair, the log-sum-exp and what its rounding lost (`logitless.backends`);
    # the p terms' coefficients carry the softmax's factor exp(-lost) (`lse_backward`), so the
    # second part is read only where log p is formed
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    if HAS_PLOGP or HAS_PLOGPQ or HAS_PLOGR:
        lse_lo = tl.load(lse_ptr + N + rows, mask=row_mask, other=0.0)
    target_positions = tl.load(target_positions_ptr + rows, mask=row_mask, other=-1).to(tl.int32)
    probs = tl.exp(z - lse[:, None])
    if FILTER:
        row_mass = tl.sum(tl.where(col_mask[None, :], probs, 0.0), axis=1)
        tile_mass = tl.max(tl.where(row_mask, row_mass, 0.0))
        tile_begin = position_begin + vocab_block * BLOCK_V
        holds_target = (target_positions >= tile_begin) & (target_positions < tile_begin + BLOCK_V)
        keep = (tile_mass > filter_mass_per_entry * BLOCK_V) | (
            tl.max(holds_target.to(tl.int32)) > 0
        )
    if TEACHER:
        y = logit_tile(
            teacher_e_ptr, teacher_c_ptr, teacher_bias_ptr, offsets(rows, stride_ten), vocab,
            offsets(vocab, stride_tcv), row_mask, col_mask, D_t, stride_ted, stride_tcd,
            teacher_softcap, scale, TEACHER_BIAS, TEACHER_SOFTCAP,
            BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_UPCAST,
        )  # fmt: skip
        teacher_terms = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
        teacher_lse = tl.load(teacher_lse_ptr + rows, mask=row_mask, other=0.0)
        teacher_lse_lo = tl.load(teacher_lse_ptr + N + rows, mask=row_mask, other=0.0)
        log_q = (y - teacher_lse[:, None]) - teacher_lse_lo[:, None]
        if HAS_Q:
            grad_q = tl.load(grad_q_ptr + rows, mask=row_mask, other=0.0)
            teacher_terms += tl.exp(log_q) * grad_q[:, None]
        if HAS_PLOGPQ or HAS_PLOGR:
            gap = ((z - lse[:, None]) - lse_lo[:, None]) - log_q  # log p - log q
        if HAS_PLOGPQ:
            grad_plogpq = tl.load(grad_plogpq_ptr + rows, mask=row_mask, other=0.0)
            # where(probs > 0, ...): a class a -inf logit masks has p = 0 and an infinite log p,
            # log q or log(m / p), whose product with p would be NaN
            teacher_terms += probs * grad_plogpq[:, None] * tl.where(probs > 0, gap, 0.0)
        if HAS_PLOGR:
            grad_plogr = tl.load(grad_plogr_ptr + rows, mask=row_mask, other=0.0)
            to_student = log_add_exp(log_beta - gap, log_one_minus_beta)  # log(m / p)
            teacher_terms += probs * grad_plogr[:, None] * tl.where(probs > 0, to_student, 0.0)
    if HAS_SOFTCAP:
        capped = z * (1.0 / (softcap * scale))
        slope = (1.0 - capped * capped) * scale
    grad_lse = tl.load(grad_lse_ptr + rows, mask=row_mask, other=0.0)
    grad_target = tl.load(grad_target_ptr + rows, mask=row_mask, other=0.0)
    is_target = positions[None, :] == target_positions[:, None]
    if HAS_OUTSIDE:
        grad_outside = tl.load(grad_outside_ptr + rows, mask=row_mask, other=0.0)
        outside_lse = tl.load(outside_lse_ptr + rows, mask=row_mask, other=0.0)
        outside = outside_support(support_ptr, rows, row_mask, vocab, support_k)
        # exp(z - outside_lse) = p / p_tail: a product p * (1 / p_tail) could overflow
        outside_terms = tl.where(outside, tl.exp(z - outside_lse[:, None]), 0.0)
        outside_terms *= grad_outside[:, None]
    if HAS_PLOGP:
        grad_plogp = tl.load(grad_plogp_ptr + rows, mask=row_mask, other=0.0)
        log_p = tl.where(probs > 0, (z - lse[:, None]) - lse_lo[:, None], 0.0)
        probs *= grad_lse[:, None] + grad_plogp[:, None] * log_p
    else:
        probs *= grad_lse[:, None]
    if HAS_SUM:
        grad_sum = tl.load(grad_sum_ptr + rows, mask=row_mask, other=0.0)
        if HAS_WEIGHT:
            column_weight = tl.load(weight_ptr + vocab, mask=col_mask, other=0.0)
            probs += grad_sum[:, None] * column_weight[None, :]
        else:
            probs += grad_sum[:, None]
    if TEACHER:
        probs += teacher_terms
    if HAS_OUTSIDE:
        probs += outside_terms
    if HAS_SUPPORT_GRAD:
        probs = add_at_support(
            probs, support_ptr, support_grad_ptr, rows, row_mask, vocab, support_k
        )
    d = tl.where(is_target, probs + grad_target[:, None], probs)
    if HAS_SOFTCAP:
        d *= slope
    elif scale != 1.0:
        d *= scale
    if FILTER:
        d = tl.where(keep, d, 0.0)
        tl.atomic_add(counts_ptr, 1, sem="relaxed")
        tl.atomic_add(counts_ptr + 1, keep.to(tl.int32), sem="relaxed")
    columns = (positions - position_begin).to(tl.int64)
    tl.store(
        d_ptr + offsets(rows, stride_dn)[:, None] + columns[None, :],
        d.to(d_ptr.dtype.element_ty, fp_downcast_rounding="rtne"),
        mask=row_mask[:, None] & col_mask[None, :],
    )


@triton.jit
def _tile_coordinates(row_blocks, vocab_blocks, GROUP_N: tl.constexpr):
    """(row block, vocabulary block) of this program. GROUP_N = 0: the two axes of a 2-D grid
    (row blocks fastest across all of them). Else a 1-D grid's tiles in groups of GROUP_N row
    blocks, row blocks fastest within a group, so that the programs running at once share a
    few rows of e and of c in L2."""
    if GROUP_N == 0:
        row_block = tl.program_id(0)
        vocab_block = tl.program_id(1)
    else:
        tile = tl.program_id(0)
        group_rows = tl.minimum(row_blocks, GROUP_N)
        per_group = group_rows * vocab_blocks
        first = tile // per_group * group_rows
        rows_here = tl.minimum(row_blocks - first, group_rows)
        within = tile % per_group
        row_block = first + within % rows_here
        vocab_block = within // rows_here
    return row_block, vocab_block


lse_backward_tuned = autotune_by_dtype(
    HALF_CONFIGS,
    FLOAT32_CONFIGS,
    key=["D", "row_bucket", "vocab_bucket", "FILTER", "HAS_DESCRIPTORS"],
    restore_value=["counts_ptr"],
)(lse_backward_kernel)


def lse_backward(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    target_positions: torch.Tensor,
    lse: torch.Tensor,
    grad_lse: torch.Tensor,
    grad_target: torch.Tensor,
    grad_sum: torch.Tensor | None,
    *,
    d: torch.Tensor,
    counts: torch.Tensor | None,
    order: torch.Tensor | None,
    positions: tuple[int, int],
    softcap: float | None,
    filter_eps: float | None,
    scale: float = 1.0,
    grad_plogp: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    teacher: Teacher | None = None,
    teacher_terms: dict[str, torch.Tensor] | None = None,
    descriptors: dict[str, object] | None = None,
    grad_outside: torch.Tensor | None = None,
    outside_lse: torch.Tensor | None = None,
    support: torch.Tensor | None = None,
    support_grad: torch.Tensor | None = None,
) -> None:
    """Write the logits' gradient at vocabulary positions [begin, end) into `d` (N, end - begin).

    `lse` is the (2, N) log-sum-exp pair of `logitless.backends.grads` (a teacher's too); the
    kernel's softmax is exp(z - lse[0]), so the coefficients of the p terms (`grad_lse`,
    `grad_plogp`, and the teacher's `plogpq` and `plogr`) come multiplied by exp(-lse[1]).
    `grad_lse`, `grad_plogp`, `grad_target` and `grad_sum` are the coefficients a, b, t and s of
    the gradient formula, `weight` the column weight of the s term (by vocabulary row).
    `teacher_terms` holds the teacher's coefficient rows present (`q`, `plogpq`, `plogr`: g, b_pq
    and b_r), with `teacher` (whose `lse` the `q` and `plogr` terms need); `grad_outside` is o,
    the coefficient of p / p_tail outside each row's `support` ((N, k) classes, -1 for none),
    `outside_lse` (N,) the log-sum-exp of the logits there (lse + log p_tail), and
    `support_grad` (N, k) the coefficients u of its one-hot term.

    Position p is vocabulary row `order[p]` (p itself without order); `target_positions` holds
    each row's target as a position, -1 for none. With `filter_eps`, negligible tiles are written
    as zeros and `counts` (an int32 pair) is raised by (tiles, tiles kept). `descriptors` are
    `tensor_descriptors(e, c)`, made once for every chunk of a backward (none with an order).
    """
    n, dim = e.shape
    begin, end = positions
    if n == 0 or end <= begin:
        return
    placeholder = lse
    optional = lambda x: placeholder if x is None else x  # noqa: E731
    launch(
        lse_backward_kernel,
        lse_backward_tuned,
        lambda meta: _grid(meta, n, end - begin),
        e, c, placeholder if bias is None else bias.contiguous(),
        placeholder if order is None else order, target_positions, lse,
        grad_lse, optional(grad_plogp), grad_target, optional(grad_sum),
        placeholder if weight is None else weight.contiguous(),
        d, optional(counts),
        n, dim, begin, end, *e.stride(), *c.stride(), d.stride(0),
        float(softcap or 1.0), float(scale), (filter_eps or 0.0) / c.shape[0],
        triton.next_power_of_2(n), triton.next_power_of_2(c.shape[0]),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_SUM=grad_sum is not None,
        HAS_PLOGP=grad_plogp is not None, HAS_WEIGHT=weight is not None,
        SORTED=order is not None, FILTER=filter_eps is not None,
        **dot_options(e.dtype), **_teacher_arguments(teacher, teacher_terms or {}, placeholder),
        **_support_arguments(support, grad_outside, outside_lse, support_grad),
        **(descriptors if descriptors and order is None else {"HAS_DESCRIPTORS": False}),
    )  # fmt: skip


def _grid(meta: dict, n: int, positions: int) -> tuple[int, ...]:
    """(row blocks, vocabulary blocks), or their product for a grouped launch (GROUP_N)."""
    blocks = (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(positions, meta["BLOCK_V"]))
    return (blocks[0] * blocks[1],) if meta.get("GROUP_N") else blocks


def _support_arguments(
    support: torch.Tensor | None,
    grad_outside: torch.Tensor | None,
    outside_lse: torch.Tensor | None,
    support_grad: torch.Tensor | None,
) -> dict[str, object]:
    """The kernel's arguments for the support's terms, `outside` and the one-hot (none
    without)."""
    if grad_outside is None and support_grad is None:
        return {}
    support = support.contiguous()
    arguments = {"support_ptr": support, "support_k": support.shape[1]}
    if grad_outside is not None:
        arguments.update(
            grad_outside_ptr=grad_outside.contiguous(),
            outside_lse_ptr=outside_lse.contiguous(),
            HAS_OUTSIDE=True,
        )
    if support_grad is not None:
        arguments.update(support_grad_ptr=support_grad.contiguous(), HAS_SUPPORT_GRAD=True)
    return arguments


def _teacher_arguments(
    teacher: Teacher | None, terms: dict[str, torch.Tensor], placeholder: torch.Tensor
) -> dict[str, object]:
    """The kernel's teacher arguments for the coefficient rows in `terms` (none without)."""
    if teacher is None or not terms:
        return {}
    teacher_e, teacher_c = teacher.e, teacher.c
    optional = lambda x: placeholder if x is None else x.contiguous()  # noqa: E731
    return dict(
        teacher_e_ptr=teacher_e, teacher_c_ptr=teacher_c, teacher_bias_ptr=optional(teacher.bias),
        teacher_lse_ptr=optional(teacher.lse), grad_q_ptr=optional(terms.get("q")),
        grad_plogpq_ptr=optional(terms.get("plogpq")), grad_plogr_ptr=optional(terms.get("plogr")),
        D_t=teacher_e.shape[1], stride_ten=teacher_e.stride(0), stride_ted=teacher_e.stride(1),
        stride_tcv=teacher_c.stride(0), stride_tcd=teacher_c.stride(1),
        teacher_softcap=float(teacher.softcap or 1.0), log_beta=math.log(teacher.beta),
        log_one_minus_beta=math.log1p(-teacher.beta), TEACHER=True,
        TEACHER_BIAS=teacher.bias is not None, TEACHER_SOFTCAP=teacher.softcap is not None,
        HAS_Q="q" in terms, HAS_PLOGPQ="plogpq" in terms, HAS_PLOGR="plogr" in terms,
    )  # fmt: skip
