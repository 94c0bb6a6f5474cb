"""Portable backend: tiled PyTorch on any device, never holding more than one tile of logits.

The schedule is vocabulary-outer: for each chunk of classifier rows, every row of `e` in tiles,
so that each chunk of `c` is read once per sweep and each chunk of grad_c is written once, from a
bounded fp32 scratch, never as a V x D fp32 accumulator; grad_e (N x D, fp32) is the only
full-size accumulator. The forward is one sweep (online log-sum-exp), the backward another
(recompute each tile, turn it into the gradient of the logits in place, two matmuls). Tiles hold
at most `block_bytes(device)` of fp32 working memory (LOGITLESS_BLOCK_MB overrides it): on a CPU
a fraction of its last-level cache, on accelerators far more. 16-bit inputs are multiplied in
fp32 (each tile's operands are upcast), so their logits keep the fp32 accumulator's precision,
as the Triton kernels do, instead of being rounded to 16 bits as eager PyTorch rounds them.
float64 inputs are computed in float64 throughout (for `torch.autograd.gradcheck`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

BLOCK_MB_ENV = "LOGITLESS_BLOCK_MB"
CPU_CACHE_SHARE = 8
"""A CPU tile takes this fraction (1/8) of the last-level cache..."""
CPU_BLOCK_BYTES = (1 * 2**20, 16 * 2**20, 4 * 2**20)
"""...clamped to (least, most); the last is used where the cache size is unknown."""
ACCELERATOR_BLOCK_SHARE = 64
"""An accelerator tile takes this fraction of the device's memory (256 MiB without a size)."""
PREFERRED_COLUMNS = 512
"""Vocabulary rows per tile when the budget allows: wide enough for efficient matmuls."""
MIN_ROWS = 64

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
    return _statistics(Tiling(e, c, bias, softcap=softcap), targets, with_sum=with_sum)


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
    if not any(needs):
        return None, None, None
    tiling = Tiling(e, c, bias, softcap=softcap, backward=True)
    return _gradients(
        tiling, targets, lse, (grad_lse, grad_target, grad_sum), filter_eps=filter_eps, needs=needs
    )


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
) -> tuple[torch.Tensor | None, ...]:
    """`stats`, then `grads` with the coefficients of every row from its lse."""
    lse, target_logit, logit_sum = stats(e, c, bias, targets, softcap=softcap, with_sum=with_sum)
    row_grads = coefficients(slice(0, e.shape[0]), lse)
    grad_e, grad_c, grad_bias = grads(
        e, c, bias, targets, lse, *row_grads, softcap=softcap, filter_eps=filter_eps, needs=needs
    )
    return lse, target_logit, logit_sum, grad_e, grad_c, grad_bias


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of logits, statistics and gradient sums for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_bytes(device: torch.device) -> int:
    """Bytes of fp32 working memory one tile may take on `device` (LOGITLESS_BLOCK_MB wins)."""
    if BLOCK_MB_ENV in os.environ:
        return int(float(os.environ[BLOCK_MB_ENV]) * 2**20)
    if device.type == "cpu":
        least, most, unknown = CPU_BLOCK_BYTES
        cache = _last_level_cache_bytes()
        return unknown if cache is None else max(least, min(most, cache // CPU_CACHE_SHARE))
    module = getattr(torch, device.type, None)
    properties = getattr(module, "get_device_properties", None)
    try:
        total = properties(device).total_memory
    except (AttributeError, TypeError, RuntimeError):
        return 256 * 2**20
    return total // ACCELERATOR_BLOCK_SHARE


@functools.cache
def _last_level_cache_bytes() -> int | None:
    """The largest CPU cache (Linux sysfs), None where it cannot be read."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        if text[-1:] in units and text[:-1].isdigit():
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes, default=None)


def tile_shape(
    n: int,
    vocab: int,
    dim: int,
    *,
    budget: int,
    sixteen_bit: bool,
    softcap_grad: bool,
    size: int = 4,
) -> tuple[int, int]:
    """(rows, columns) of a tile whose buffers (of `size` bytes an entry) fit `budget` bytes.

    A tile holds its logits (and, for a softcap's backward, their derivative); 16-bit inputs
    add the fp32 copies of its rows of e and columns of c and the fp32 scratch of grad_c.
    Columns are PREFERRED_COLUMNS where at least MIN_ROWS rows fit beside them, fewer otherwise.
    """
    per_logit = size * (2 if softcap_grad else 1)
    per_row = size * dim if sixteen_bit else 0
    per_column = 2 * size * dim if sixteen_bit else 0

    def rows_for(columns: int) -> int:
        room = budget - columns * per_column
        return max(1, min(n, room // (columns * per_logit + per_row)))

    columns = min(vocab, PREFERRED_COLUMNS)
    if rows_for(columns) < min(n, MIN_ROWS):
        least_rows = min(n, MIN_ROWS)
        columns = (budget - least_rows * per_row) // (least_rows * per_logit + per_column)
        columns = max(1, min(vocab, columns))
    return rows_for(columns), columns


@dataclass
class Tile:
    """One tile of fp32 logits z[rows, cols] and the fp32 operands that formed it."""

    rows: slice
    cols: slice
    z: torch.Tensor
    e32: torch.Tensor
    c32: torch.Tensor
    deriv: torch.Tensor | None
    """softcap'(pre-softcap logits), for the backward through a softcap; else None."""

    def restricted(self, kept: torch.Tensor) -> Tile:
        """The tile's rows `kept` (indices), copied out: logits, derivative and rows of e."""
        deriv = None if self.deriv is None else self.deriv[kept]
        return Tile(self.rows, self.cols, self.z[kept], self.e32[kept], self.c32, deriv)


class Tiling:
    """The vocabulary-outer schedule over (rows x columns) tiles, and the buffers it reuses."""

    def __init__(
        self,
        e: torch.Tensor,
        c: torch.Tensor,
        bias: torch.Tensor | None,
        *,
        softcap: float | None,
        backward: bool = False,
    ) -> None:
        self.e, self.c, self.softcap = e, c, softcap
        n, dim = e.shape
        acc = accumulation_dtype(e.dtype)
        self.sixteen_bit = e.dtype != acc
        softcap_grad = bool(softcap) and backward
        self.rows, self.cols = tile_shape(
            n, c.shape[0], dim, budget=block_bytes(e.device), sixteen_bit=self.sixteen_bit,
            softcap_grad=softcap_grad, size=acc.itemsize,
        )  # fmt: skip
        fp32 = dict(device=e.device, dtype=acc)
        self.fp32 = fp32
        """Tensor options of the accumulation dtype (float32; float64 for float64 inputs)."""
        self.logits = torch.empty(self.rows * self.cols, **fp32)
        self.derivs = torch.empty(self.rows * self.cols, **fp32) if softcap_grad else None
        self.bias32 = None if bias is None else bias.to(acc)
        self.e32 = None
        if self.sixteen_bit:
            whole = self.rows >= n  # one row tile: upcast e once for the whole sweep
            self.e32 = e.to(acc) if whole else torch.empty(self.rows, dim, **fp32)
            self.e32_whole = whole
            self.c32 = torch.empty(self.cols, dim, **fp32)

    def columns(self) -> Iterator[tuple[slice, torch.Tensor]]:
        """Each chunk of vocabulary rows, with its fp32 rows of c."""
        vocab = self.c.shape[0]
        for lo in range(0, vocab, self.cols):
            cols = slice(lo, min(vocab, lo + self.cols))
            if self.sixteen_bit:
                yield cols, self.c32[: cols.stop - lo].copy_(self.c[cols])
            else:
                yield cols, self.c[cols]

    def tiles(self, cols: slice, c32: torch.Tensor) -> Iterator[Tile]:
        """The tiles of one chunk, row block by row block, logits formed (bias, softcap)."""
        n = self.e.shape[0]
        width = cols.stop - cols.start
        for lo in range(0, n, self.rows):
            rows = slice(lo, min(n, lo + self.rows))
            height = rows.stop - lo
            e32 = self._rows32(rows)
            z = torch.mm(e32, c32.T, out=self.logits[: height * width].view(height, width))
            if self.bias32 is not None:
                z.add_(self.bias32[cols])
            deriv = None
            if self.softcap:
                z.div_(self.softcap).tanh_()
                if self.derivs is not None:
                    deriv = self.derivs[: height * width].view(height, width)
                    torch.mul(z, z, out=deriv).neg_().add_(1)
                z.mul_(self.softcap)
            yield Tile(rows, cols, z, e32, c32, deriv)

    def _rows32(self, rows: slice) -> torch.Tensor:
        if not self.sixteen_bit:
            return self.e[rows]
        if self.e32_whole:
            return self.e32
        return self.e32[: rows.stop - rows.start].copy_(self.e[rows])


def _statistics(
    tiling: Tiling, targets: torch.Tensor, *, with_sum: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One sweep: the online log-sum-exp (running max and rescaled sum) of every row, its target
    logit and, when `with_sum`, the sum of its logits."""
    n = tiling.e.shape[0]
    peak = torch.full((n,), -torch.inf, **tiling.fp32)
    total = torch.zeros(n, **tiling.fp32)
    target_logit = torch.zeros(n, **tiling.fp32)
    logit_sum = torch.zeros(n, **tiling.fp32) if with_sum else None
    for cols, c32 in tiling.columns():
        for tile in tiling.tiles(cols, c32):
            z, rows = tile.z, tile.rows
            local = _local_targets(targets[rows], cols)
            if local is not None:
                picked = z.gather(1, local.clamp(min=0).unsqueeze(1)).squeeze(1)
                target_logit[rows] += picked.masked_fill_(local < 0, 0.0)
            if logit_sum is not None:
                logit_sum[rows] += z.sum(1)
            new_peak = torch.maximum(peak[rows], z.amax(1))
            # a row whose logits are all -inf so far keeps a zero sum (exp(nan) is avoided)
            shift = torch.where(new_peak == -torch.inf, 0.0, new_peak)
            total[rows] *= (peak[rows] - shift).exp_()
            total[rows] += z.sub_(shift.unsqueeze(1)).exp_().sum(1)
            peak[rows] = new_peak
    lse = peak + total.log()
    return torch.where(peak == -torch.inf, peak, lse), target_logit, logit_sum


def _gradients(
    tiling: Tiling,
    targets: torch.Tensor,
    lse: torch.Tensor,
    row_grads: RowGrads,
    *,
    filter_eps: float | None,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """One sweep: recompute each tile, turn it into the gradient of the logits in place, and
    add its matmuls; each chunk of grad_c is complete after its column's tiles."""
    e, c = tiling.e, tiling.c
    (n, dim), vocab = e.shape, c.shape[0]
    grad_lse, grad_target, grad_sum = row_grads
    fp32 = tiling.fp32
    grad_e = torch.zeros(n, dim, **fp32) if needs[0] else None
    grad_c = torch.empty(vocab, dim, device=c.device, dtype=c.dtype) if needs[1] else None
    grad_bias = torch.zeros(vocab, **fp32) if needs[2] else None
    scratch = torch.empty(tiling.cols, dim, **fp32) if needs[1] and tiling.sixteen_bit else None
    for cols, c32 in tiling.columns():
        width = cols.stop - cols.start
        chunk = None
        if grad_c is not None:
            chunk = grad_c[cols] if scratch is None else scratch[:width]
            chunk.zero_()
        for tile in tiling.tiles(cols, c32):
            rows = tile.rows
            local = _local_targets(targets[rows], cols)
            p = tile.z.sub_(lse[rows, None]).exp_()
            kept = None
            if filter_eps:
                kept = p.sum(1) > filter_eps * width / vocab
                if local is not None:  # skipped rows keep their target entry alone
                    skipped = torch.where(kept, -1, local)
                    _add_targets(tile, skipped, grad_target[rows], grad_e, chunk, grad_bias)
                kept = _kept_rows(kept)
                if kept is not None:
                    if kept.numel() == 0:
                        continue
                    tile = tile.restricted(kept)
                    local = None if local is None else local[kept]
            g_rows = slice(None) if kept is None else kept
            d = _softmax_to_grad(
                tile.z, local, grad_lse[rows][g_rows], grad_target[rows][g_rows],
                None if grad_sum is None else grad_sum[rows][g_rows], tile.deriv,
            )  # fmt: skip
            if grad_e is not None:
                if kept is None:
                    grad_e[rows].addmm_(d, c32)
                else:
                    grad_e[rows].index_add_(0, kept, d @ c32)
            if chunk is not None:
                chunk.addmm_(d.T, tile.e32)
            if grad_bias is not None:
                grad_bias[cols] += d.sum(0)
        if scratch is not None:
            grad_c[cols] = chunk
    return grad_e, grad_c, grad_bias


def _add_targets(
    tile: Tile,
    local: torch.Tensor,
    grad_target: torch.Tensor,
    grad_e: torch.Tensor | None,
    chunk: torch.Tensor | None,
    grad_bias: torch.Tensor | None,
) -> None:
    """The gradient of the target logits that lie in a skipped tile (a few entries)."""
    hit = (local >= 0).nonzero().squeeze(1)
    columns = local[hit]
    weight = grad_target[hit]
    if tile.deriv is not None:
        weight = weight * tile.deriv[hit, columns]
    if grad_e is not None:
        grad_e[tile.rows].index_add_(0, hit, weight.unsqueeze(1) * tile.c32[columns])
    if chunk is not None:
        chunk.index_add_(0, columns, weight.unsqueeze(1) * tile.e32[hit])
    if grad_bias is not None:
        grad_bias[tile.cols].index_add_(0, columns, weight)


def _local_targets(t: torch.Tensor, cols: slice) -> torch.Tensor | None:
    """Targets of these rows as column offsets in `cols`, -1 for rows whose target lies
    elsewhere (or that have none); None when no row's target is in `cols`."""
    inside = (t >= cols.start) & (t < cols.stop)
    if not bool(inside.any()):
        return None
    return torch.where(inside, t - cols.start, -1)


def _kept_rows(kept: torch.Tensor) -> torch.Tensor | None:
    """Indices of the tile rows to compute, None for all of them.

    Gradient filtering drops a row of a tile when its softmax mass there is at most the tile's
    share eps * width / V of the budget eps, so that no row loses more than eps in all; its
    target entry, if the tile holds it, is still added (`_add_targets`).
    """
    return None if bool(kept.all()) else kept.nonzero().squeeze(1)


def _softmax_to_grad(
    p: torch.Tensor,
    t: torch.Tensor | None,
    grad_lse: torch.Tensor,
    grad_target: torch.Tensor,
    grad_sum: torch.Tensor | None,
    deriv: torch.Tensor | None,
) -> torch.Tensor:
    """In place: softmax tile p -> gradient of its pre-softcap logits; `t` holds the tile's
    target columns (-1 outside), None when the tile holds no target."""
    d = p.mul_(grad_lse.unsqueeze(1))
    if t is not None:
        at_target = torch.where(t >= 0, grad_target, 0.0).unsqueeze(1)
        d.scatter_add_(1, t.clamp(min=0).unsqueeze(1), at_target)
    if grad_sum is not None:
        d.add_(grad_sum.unsqueeze(1))
    if deriv is not None:
        d.mul_(deriv)
    return d
