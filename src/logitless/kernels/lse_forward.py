"""Forward kernel: per-row log-sum-exp, target logit, (weighted) logit sum and softmax-weighted
mean logit, split over the vocabulary; on request each row's top-k logits too.

Grid: (row blocks, vocabulary splits). Each program sweeps its split in BLOCK_V tiles, each tile
a dot loop over D with fp32 accumulation, and keeps an online max / rescaled sum of exponentials
per row, and with it the rescaled sum of exp(z - max) * z whose ratio to the sum of
exponentials is the softmax-weighted mean. It writes one partial result per (split, row);
`lse_forward` merges the splits in PyTorch, in a fixed order, so the result is deterministic and
needs neither atomics nor locks. With TOP_K, each program also keeps a running top-k per row (a
tile whose largest logit beats no row's k-th is passed over after one comparison) and writes it
per split; the merge takes the top-k of the splits' candidates.
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
]
"""Hopper tiles that compile for sm_90 without register spills (ptxas -v, every option on); the
last is the one a running top-k fits (TOP_K_TILE)."""

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
    HAS_WEIGHT: tl.constexpr, WITH_MEAN: tl.constexpr, TOP_K: tl.constexpr,
    TOP_K_SLOTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """Partials (max, sum of exp(z - max), target logit, [logit sum], [sum of exp(z - max) z])
    of a row block on a split; the logit sum weighs column v by weight[v] when HAS_WEIGHT.

    `partials_ptr` is (3 + WITH_SUM + WITH_MEAN, splits, N) fp32; `vocab_bucket` only keys the
    autotuner. With TOP_K > 0, `top_values_ptr` (fp32) and `top_indices_ptr` (int32), both
    (splits, N, TOP_K), receive the split's TOP_K largest logits of each row and their classes
    (TOP_K_SLOTS: TOP_K rounded up to a power of two).
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
    weighted_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if TOP_K:
        slots = tl.arange(0, TOP_K_SLOTS)
        # empty slots hold -inf, padding slots +inf (never the minimum, never stored)
        top_values = tl.where(slots < TOP_K, float("-inf"), float("inf"))
        top_values = tl.zeros((BLOCK_N, TOP_K_SLOTS), dtype=tl.float32) + top_values[None, :]
        top_indices = tl.full((BLOCK_N, TOP_K_SLOTS), -1, dtype=tl.int32)
    for tile_begin in range(vocab_begin, vocab_end, BLOCK_V):
        vocab = tile_begin + tl.arange(0, BLOCK_V)
        col_mask = vocab < vocab_end
        z = logit_tile(
            e_ptr, c_ptr, bias_ptr, row_offsets, vocab, offsets(vocab, stride_cv),
            row_mask, col_mask, D, stride_ed, stride_cd, softcap, scale,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_D, DOT_PRECISION, DOT_UPCAST,
        )  # fmt: skip
        target_logit += tl.sum(tl.where(vocab[None, :] == targets[:, None], z, 0.0), axis=1)
        if WITH_SUM:
            summand = tl.where(col_mask[None, :], z, 0.0)
            if HAS_WEIGHT:
                column_weight = tl.load(weight_ptr + vocab, mask=col_mask, other=0.0)
                summand *= column_weight.to(tl.float32)[None, :]
            logit_sum += tl.sum(summand, axis=1)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        if TOP_K:
            top_values, top_indices = _merge_top_k(
                top_values, top_indices, z, vocab, col_mask, TOP_K, TOP_K_SLOTS, BLOCK_V
            )
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        # While every logit so far is -inf (a masked class), shift by 0: exp(-inf - -inf) is NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(running_max - shift)
        exps = tl.exp(z - shift[:, None])
        running_sum = running_sum * rescale + tl.sum(exps, axis=1)
        if WITH_MEAN:  # exp(z) z is 0 at a masked (-inf) logit, not NaN
            weighted_sum = weighted_sum * rescale + tl.sum(
                tl.where(exps > 0, exps * z, 0.0), axis=1
            )
        running_max = new_max

    plane = splits.to(tl.int64) * N
    out = partials_ptr + split.to(tl.int64) * N + rows
    tl.store(out, running_max, mask=row_mask)
    tl.store(out + plane, running_sum, mask=row_mask)
    tl.store(out + 2 * plane, target_logit, mask=row_mask)
    if WITH_SUM:
        tl.store(out + 3 * plane, logit_sum, mask=row_mask)
    if WITH_MEAN:
        tl.store(out + (3 + WITH_SUM) * plane, weighted_sum, mask=row_mask)
    if TOP_K:
        top = (split.to(tl.int64) * N + rows)[:, None] * TOP_K + slots[None, :]
        top_mask = row_mask[:, None] & (slots < TOP_K)[None, :]
        tl.store(top_values_ptr + top, top_values, mask=top_mask)
        tl.store(top_indices_ptr + top, top_indices, mask=top_mask)


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
    scale: float = 1.0,
    weight: torch.Tensor | None = None,
    with_mean: bool = False,
    top_k: int = 0,
) -> dict[str, torch.Tensor]:
    """fp32 per-row `lse`, `target` and, if asked, `sum` (weighted by `weight`) and `mean`
    (the softmax-weighted mean logit) of e; see `logitless.backends`. With `top_k` (at most
    MAX_TOP_K), also `top`: the (N, top_k) int64 classes of each row's largest logits, in
    descending order."""
    n, dim = e.shape
    vocab = c.shape[0]
    splits = vocabulary_splits(n, vocab, e.device)
    partials = torch.empty(
        3 + with_sum + with_mean, splits, n, device=e.device, dtype=torch.float32
    )
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
            HAS_WEIGHT=weight is not None, WITH_MEAN=with_mean,
            TOP_K=top_k, TOP_K_SLOTS=triton.next_power_of_2(max(1, top_k)),
            **dot_options(e.dtype),
        )  # fmt: skip
    split_max, split_sum = partials[0], partials[1]
    peak = split_max.amax(0)
    rescale = torch.exp(split_max - peak)
    total = (split_sum * rescale).sum(0)
    found = {"lse": peak + total.log(), "target": partials[2].sum(0)}
    if with_sum:
        found["sum"] = partials[3].sum(0)
    if with_mean:
        found["mean"] = (partials[3 + with_sum] * rescale).sum(0) / total
    if top_k:
        candidates = top_values.permute(1, 0, 2).reshape(n, splits * top_k)
        best = candidates.topk(top_k, dim=1).indices
        classes = top_indices.permute(1, 0, 2).reshape(n, splits * top_k)
        found["top"] = classes.gather(1, best).long()
    return found


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
