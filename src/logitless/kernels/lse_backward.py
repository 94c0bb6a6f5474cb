"""Backward kernel: the gradients of the per-row statistics, one logit tile per program.

Grid: (row blocks, vocabulary blocks of one chunk of positions). A program recomputes its logit
tile on chip, forms the fp32 gradient of the logits

    d = (softmax * (grad_lse + grad_pz * z) + grad_target * onehot(target) + grad_sum * w)
        * scale * softcap'(x)

(the backend contract's gradient formula with the student's terms; z is the scaled logit, x
the one before softcap and scale, w the optional column weight)
and adds d @ c into grad_e, d.T @ e into grad_c and the column sums of d into grad_bias with
atomics, one BLOCK_D slice of D at a time. Vocabulary positions map to vocabulary rows through
an optional order (rows of c are read through it, never copied), so that sorting the vocabulary
by average logit gathers the entries that matter into few tiles. With filtering on, a tile that
holds no target is skipped when, in every row, its softmax mass is at most its share
`filter_eps * BLOCK_V / V` of the budget: no row then loses more than `filter_eps` in all.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from logitless._validation import triton_interpreter_on
from logitless.kernels._tiles import (
    INTERPRETER_BLOCKS,
    autotune_by_dtype,
    dot_options,
    launch,
    logit_tile,
    mma,
    offsets,
)

HALF_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 32}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_D": 64}, num_warps=8, num_stages=3),
]
"""Hopper tiles that compile for sm_90 without register spills (ptxas -v, every option on)."""

FLOAT32_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 16}, num_warps=4, num_stages=2),
    triton.Config({"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=4, num_stages=2),
]


def vocabulary_alignment() -> int:
    """A multiple of every BLOCK_V in use: chunks of positions that start at one tile evenly."""
    if triton_interpreter_on():
        return INTERPRETER_BLOCKS["BLOCK_V"]
    return max(config.kwargs["BLOCK_V"] for config in HALF_CONFIGS + FLOAT32_CONFIGS)


@triton.jit
def lse_backward_kernel(
    e_ptr, c_ptr, bias_ptr, order_ptr, target_positions_ptr, lse_ptr,
    grad_lse_ptr, grad_pz_ptr, grad_target_ptr, grad_sum_ptr, weight_ptr,
    grad_e_ptr, grad_c_ptr, grad_bias_ptr, counts_ptr,
    N, D, position_begin, position_end, stride_en, stride_ed, stride_cv, stride_cd,
    softcap, scale, filter_mass_per_entry, vocab_bucket,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SUM: tl.constexpr,
    HAS_PZ: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    SORTED: tl.constexpr, FILTER: tl.constexpr, COUNT_TILES: tl.constexpr,
    NEED_E: tl.constexpr, NEED_C: tl.constexpr, NEED_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Add one tile's gradients into grad_e (N, D), grad_c (positions, D) and grad_bias (V,).

    grad_c row r holds vocabulary position position_begin + r; the other buffers are indexed
    by row and vocabulary entry. All three are fp32. `counts_ptr` receives (tiles, tiles kept)
    when COUNT_TILES; `vocab_bucket` only keys the autotuner.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    positions = position_begin + tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = positions < position_end
    vocab = tl.load(order_ptr + positions, mask=col_mask, other=0) if SORTED else positions
    row_offsets = offsets(rows, stride_en)
    vocab_offsets = offsets(vocab, stride_cv)
    z = logit_tile(
        e_ptr, c_ptr, bias_ptr, row_offsets, vocab, vocab_offsets, row_mask, col_mask,
        D, stride_ed, stride_cd, softcap, scale,
        HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_UPCAST,
    )  # fmt: skip
    in_tile = row_mask[:, None] & col_mask[None, :]
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    probs = tl.where(in_tile, tl.exp(z - lse[:, None]), 0.0)
    target_positions = tl.load(target_positions_ptr + rows, mask=row_mask, other=-1).to(tl.int32)
    is_target = in_tile & (positions[None, :] == target_positions[:, None])

    keep = True
    if FILTER:
        tile_mass = tl.max(tl.sum(probs, axis=1))
        keep = (tile_mass > filter_mass_per_entry * BLOCK_V) | (tl.max(is_target.to(tl.int32)) > 0)
    if COUNT_TILES:
        tl.atomic_add(counts_ptr, 1, sem="relaxed")
    if keep:
        if COUNT_TILES:
            tl.atomic_add(counts_ptr + 1, 1, sem="relaxed")
        grad_lse = tl.load(grad_lse_ptr + rows, mask=row_mask, other=0.0)
        grad_target = tl.load(grad_target_ptr + rows, mask=row_mask, other=0.0)
        if HAS_PZ:
            grad_pz = tl.load(grad_pz_ptr + rows, mask=row_mask, other=0.0)
            probs *= grad_lse[:, None] + grad_pz[:, None] * z
        else:
            probs *= grad_lse[:, None]
        if HAS_SUM:
            grad_sum = tl.load(grad_sum_ptr + rows, mask=row_mask, other=0.0)
            if HAS_WEIGHT:
                column_weight = tl.load(weight_ptr + vocab, mask=col_mask, other=0.0)
                probs += grad_sum[:, None] * column_weight[None, :]
            else:
                probs += grad_sum[:, None]
        d = tl.where(is_target, probs + grad_target[:, None], probs)
        if HAS_SOFTCAP:
            capped = z * (1.0 / (softcap * scale))
            d *= (1.0 - capped * capped) * scale
        elif scale != 1.0:
            d *= scale
        d = tl.where(in_tile, d, 0.0)
        if NEED_BIAS:
            tl.atomic_add(grad_bias_ptr + vocab, tl.sum(d, axis=0), mask=col_mask, sem="relaxed")
        d_input = d.to(e_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        dims = tl.arange(0, BLOCK_D)
        c_columns = offsets(dims, stride_cd)
        e_columns = offsets(dims, stride_ed)
        c_step = offsets(BLOCK_D, stride_cd)
        e_step = offsets(BLOCK_D, stride_ed)
        grad_e_rows = offsets(rows, D)
        grad_c_rows = offsets(positions - position_begin, D)
        for start in range(0, D, BLOCK_D):
            dim_mask = dims < D - start
            if NEED_E:
                c_block = tl.load(
                    c_ptr + vocab_offsets[:, None] + c_columns[None, :],
                    mask=col_mask[:, None] & dim_mask[None, :],
                    other=0.0,
                )
                grad_e_block = mma(
                    d_input, c_block, tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32),
                    DOT_PRECISION, DOT_UPCAST,
                )  # fmt: skip
                tl.atomic_add(
                    grad_e_ptr + grad_e_rows[:, None] + (start + dims)[None, :],
                    grad_e_block,
                    mask=row_mask[:, None] & dim_mask[None, :],
                    sem="relaxed",
                )
            if NEED_C:
                e_block = tl.load(
                    e_ptr + row_offsets[:, None] + e_columns[None, :],
                    mask=row_mask[:, None] & dim_mask[None, :],
                    other=0.0,
                )
                grad_c_block = mma(
                    tl.trans(d_input), e_block, tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32),
                    DOT_PRECISION, DOT_UPCAST,
                )  # fmt: skip
                tl.atomic_add(
                    grad_c_ptr + grad_c_rows[:, None] + (start + dims)[None, :],
                    grad_c_block,
                    mask=col_mask[:, None] & dim_mask[None, :],
                    sem="relaxed",
                )
            c_columns += c_step
            e_columns += e_step


lse_backward_tuned = autotune_by_dtype(
    HALF_CONFIGS,
    FLOAT32_CONFIGS,
    key=["D", "vocab_bucket", "NEED_E", "NEED_C", "FILTER"],
    restore_value=["grad_e_ptr", "grad_c_ptr", "grad_bias_ptr", "counts_ptr"],
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
    grad_e: torch.Tensor | None,
    grad_c: torch.Tensor | None,
    grad_bias: torch.Tensor | None,
    order: torch.Tensor | None,
    positions: tuple[int, int],
    softcap: float | None,
    filter_eps: float | None,
    counts: torch.Tensor | None = None,
    scale: float = 1.0,
    grad_pz: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> None:
    """Add the gradients from vocabulary positions [begin, end) into the fp32 buffers given.

    Position p is vocabulary row `order[p]` (p itself without order); `target_positions` holds
    each row's target as a position, -1 for none; grad_c row r is position begin + r.
    `grad_lse`, `grad_pz`, `grad_target` and `grad_sum` are the coefficients a, b, t and s of
    the gradient formula, `weight` the column weight of the s term (by vocabulary row).
    `counts`, an int32 pair, receives (tiles, tiles kept) for diagnostics.
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
        lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(end - begin, meta["BLOCK_V"])),
        e, c, placeholder if bias is None else bias.contiguous(),
        optional(order), target_positions, lse,
        grad_lse, optional(grad_pz), grad_target, optional(grad_sum), optional(weight),
        *(optional(x) for x in (grad_e, grad_c, grad_bias, counts)),
        n, dim, begin, end, *e.stride(), *c.stride(),
        float(softcap or 1.0), float(scale), (filter_eps or 0.0) / c.shape[0],
        triton.next_power_of_2(c.shape[0]),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_SUM=grad_sum is not None,
        HAS_PZ=grad_pz is not None, HAS_WEIGHT=weight is not None,
        SORTED=order is not None, FILTER=filter_eps is not None, COUNT_TILES=counts is not None,
        NEED_E=grad_e is not None, NEED_C=grad_c is not None, NEED_BIAS=grad_bias is not None,
        **dot_options(e.dtype),
    )  # fmt: skip
