"""Forward kernel: per-row log-sum-exp, target logit and logit sum, split over the vocabulary.

Grid: (row blocks, vocabulary splits). Each program sweeps its split in BLOCK_V tiles, each tile
a dot loop over D with fp32 accumulation, and keeps an online max / rescaled sum of exponentials
per row. It writes one partial result per (split, row); `lse_forward` merges the splits in
PyTorch, in a fixed order, so the result is deterministic and needs neither atomics nor locks.
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
    offsets,
)

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
]
"""Hopper tiles that compile for sm_90 without register spills (ptxas -v, every option on)."""

FLOAT32_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=8, num_stages=2),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 16}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_D": 32}, num_warps=4, num_stages=3),
]


@triton.jit
def lse_forward_kernel(
    e_ptr, c_ptr, bias_ptr, targets_ptr, partials_ptr,
    N, V, D, stride_en, stride_ed, stride_cv, stride_cd, softcap, vocab_bucket,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, WITH_SUM: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Partials (max, sum of exp(z - max), target logit, logit sum) of a row block on a split.

    `partials_ptr` is (3 or 4, splits, N) fp32; `vocab_bucket` only keys the autotuner.
    """
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
    for tile_begin in range(vocab_begin, vocab_end, BLOCK_V):
        vocab = tile_begin + tl.arange(0, BLOCK_V)
        col_mask = vocab < vocab_end
        z = logit_tile(
            e_ptr, c_ptr, bias_ptr, row_offsets, vocab, offsets(vocab, stride_cv),
            row_mask, col_mask, D, stride_ed, stride_cd, softcap,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_UPCAST,
        )  # fmt: skip
        target_logit += tl.sum(tl.where(vocab[None, :] == targets[:, None], z, 0.0), axis=1)
        if WITH_SUM:
            logit_sum += tl.sum(tl.where(col_mask[None, :], z, 0.0), axis=1)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        # While every logit so far is -inf (a masked class), shift by 0: exp(-inf - -inf) is NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(
            tl.exp(z - shift[:, None]), axis=1
        )
        running_max = new_max

    plane = splits.to(tl.int64) * N
    out = partials_ptr + split.to(tl.int64) * N + rows
    tl.store(out, running_max, mask=row_mask)
    tl.store(out + plane, running_sum, mask=row_mask)
    tl.store(out + 2 * plane, target_logit, mask=row_mask)
    if WITH_SUM:
        tl.store(out + 3 * plane, logit_sum, mask=row_mask)


lse_forward_tuned = autotune_by_dtype(HALF_CONFIGS, FLOAT32_CONFIGS, key=["D", "vocab_bucket"])(
    lse_forward_kernel
)


def lse_forward(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    softcap: float | None,
    with_sum: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """fp32 (lse, target logit, logit sum or None) per row of e; see `logitless.backends`."""
    n, dim = e.shape
    vocab = c.shape[0]
    splits = vocabulary_splits(n, vocab, e.device)
    partials = torch.empty(3 + with_sum, splits, n, device=e.device, dtype=torch.float32)
    if n:
        launch(
            lse_forward_kernel,
            lse_forward_tuned,
            lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits),
                e, c, e if bias is None else bias.contiguous(), targets, partials,
            n, vocab, dim, *e.stride(), *c.stride(), float(softcap or 1.0),
            triton.next_power_of_2(vocab),
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, WITH_SUM=with_sum,
            **dot_options(e.dtype),
        )  # fmt: skip
    split_max, split_sum = partials[0], partials[1]
    peak = split_max.amax(0)
    lse = peak + (split_sum * torch.exp(split_max - peak)).sum(0).log()
    logit_sum = partials[3].sum(0) if with_sum else None
    return lse, partials[2].sum(0), logit_sum


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
