"""Vocabulary parallelism: the loss of a classifier sharded by vocabulary rows across ranks.

Every loss logitless computes is an elementwise function of a few per-row statistics of the
logits (docs/statistics.md): log-sum-exps, the target logit, (weighted) sums, the entropy and
the KLs. Each rank computes them over its own rows `c[start:stop]`, and combining them costs
O(N) values: one all-reduce (max) of the partial log-sum-exps, then one all-reduce (sum) of
exp(lse_r - max), of the target logits, of the sums and of the entropies and KLs weighted by
the rank's share of the mass (`combine_stats`). In backward each rank's share of grad_e is
summed (N x D values, as for any vocabulary-parallel output layer); grad_c and grad_bias stay on
their shard. Nothing of size N x V is ever communicated.

Per call that is, in bytes, with N rows, D hidden and fp32 statistics:
    88 (argument agreement) + 4N (max) + 8N, or 12N with label smoothing (sum) + 4ND (grad_e).

A classifier that is a DTensor sharded by rows (`Shard(0)`, as FSDP2 and a colwise-parallel
lm_head leave it) implies such a shard over that mesh dimension's group. Its ranks may hold
different tokens (data parallel): then every rank's tokens are gathered (`TokenGather`) and the
classifier's gradient is the average over the ranks of each one's, as FSDP reduces it. A
classifier replicated on a mesh dimension (`Replicate()`: HSDP's replicas, a data-parallel
DTensor) gets its gradient averaged over that dimension's ranks too, as DDP and HSDP reduce it:
their tokens differ (else the mean of equal gradients is each of them).

The backends know nothing of this: they see a classifier of stop - start rows and targets already
translated to those rows (-1 where the target lives on another rank).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from logitless.backends import lse_pair

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch without distributed support, or before DTensor was public (2.5)
    DTensor = None

if TYPE_CHECKING:
    from logitless._validation import LossOptions


class VocabParallel:
    """This rank's contiguous slice [start, stop) of the vocabulary, within a process group.

    Constructing it is collective: every rank of `group` (default: the world) constructs it at
    the same point with its own slice, and the slices must tile [0, V) exactly, in any order of
    ranks. Then every rank calls the loss with `vocab_parallel=` this object, the same `e`,
    `targets` and options, its own rows `c[start:stop]` (and `bias[start:stop]`), and
    backpropagates the same loss. Each rank gets the full loss and grad_e, and the gradients of
    its own rows of c and bias.
    """

    def __init__(self, start: int, stop: int, group: dist.ProcessGroup | None = None) -> None:
        _require_initialized()
        self.group = group
        self.start, self.stop = start, stop
        self.tokens_may_differ = False
        ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (start, stop))
        mine = torch.tensor([start, stop] if ints else [-1, -1], device=self._control_device())
        shards = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(shards, mine, group=group)
        if not ints:
            raise TypeError(f"start and stop must be ints, got {start!r} and {stop!r}")
        self.vocab_size = _tiled_vocab_size([tuple(shard.tolist()) for shard in shards])

    @classmethod
    def from_vocab(cls, vocab_size: int, group: dist.ProcessGroup | None = None) -> VocabParallel:
        """Contiguous shards in rank order, as even as possible (the first V % world ranks hold
        one more row). Collective, like the constructor."""
        _require_initialized()
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
            raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        base, extra = divmod(vocab_size, world)
        start = rank * base + min(rank, extra)
        return cls(start, start + base + (rank < extra), group)

    @classmethod
    def of_row_sharding(cls, vocab_size: int, mesh, mesh_dim: int) -> VocabParallel:
        """The shard of this rank in a (V, ...) DTensor placed `Shard(0)` on `mesh_dim`: rows in
        `torch.chunk` order, as DTensor splits them; not collective. Its ranks may hold
        different tokens: calls then gather them (see `TokenGather`)."""
        shard = cls.__new__(cls)
        chunk = -(-vocab_size // mesh.size(mesh_dim))
        shard.group = mesh.get_group(mesh_dim)
        shard.start = min(vocab_size, mesh.get_local_rank(mesh_dim) * chunk)
        shard.stop = min(vocab_size, shard.start + chunk)
        shard.vocab_size = vocab_size
        shard.tokens_may_differ = True
        return shard

    def __repr__(self) -> str:
        return f"VocabParallel(start={self.start}, stop={self.stop}, vocab_size={self.vocab_size})"

    def __deepcopy__(self, memo: dict) -> VocabParallel:
        """Itself: a shard does not change, and its process group cannot be copied, so a deep
        copy of a model holding one (a reference or EMA model) shares it."""
        return self

    def check_ranks_agree(
        self,
        e: torch.Tensor,
        targets: torch.Tensor,
        local_error: Exception | None,
        agreed: tuple = (),
    ) -> TokenGather | None:
        """Raise on every rank if any rank's arguments failed their checks (`local_error` on
        that rank) or if the ranks differ in hidden size or in `agreed` (the call's options,
        dtypes and which inputs need gradients: ranks that differ there would exchange
        tensors of different sizes, or wait in different collectives), or (unless
        `tokens_may_differ`) in row count, targets or e. Where tokens may differ and do, the
        `TokenGather` for this call.

        One all-reduce of 11 integers: a failure flag and the maximum of (n, d, checksums of
        the targets, of e and of `agreed`) and of their complements, whose negation is the
        minimum, so equality is max == min. The checksums stay on the device until the one read
        of the result (a single host synchronization on an accelerator's group).
        """
        control = self._control_device()
        facts = torch.zeros(5, dtype=torch.int64, device=control)
        if local_error is None:
            sizes = torch.tensor([targets.numel(), e.shape[-1]], device=control)
            checksums = [_checksum(targets), _row_checksum(e), _fingerprint(agreed, control)]
            facts = torch.cat((sizes, torch.stack([x.to(control) for x in checksums])))
        failed = torch.tensor([local_error is not None], dtype=torch.int64, device=control)
        summary = torch.cat((failed, facts, ~facts))
        dist.all_reduce(summary, op=dist.ReduceOp.MAX, group=self.group)
        if local_error is not None:
            raise local_error
        failed, *highest = summary.tolist()
        count = facts.numel()
        highest, lowest = highest[:count], [~x for x in highest[count:]]
        if failed:
            raise ValueError(
                "vocab_parallel: another rank failed its argument checks (its error says which)"
            )
        if highest[4] != lowest[4]:
            raise ValueError(
                "vocab_parallel: the ranks differ in their options, their dtypes or which of e, "
                "c and bias need gradients (every rank must make the same call)"
            )
        if self.tokens_may_differ:
            if highest[1] != lowest[1]:
                raise ValueError(
                    "e must have the same hidden size on every rank of the classifier's mesh "
                    f"dimension, got between {lowest[1]} and {highest[1]}"
                )
            if highest == lowest:
                return None
            return TokenGather(self.group, targets.numel(), highest[0])
        if highest[0] != lowest[0]:
            raise ValueError(
                "targets must have the same number of rows on every rank of vocab_parallel, "
                f"got between {lowest[0]} and {highest[0]}"
            )
        if highest[1] != lowest[1]:
            raise ValueError(
                "e must have the same hidden size on every rank of vocab_parallel, "
                f"got between {lowest[1]} and {highest[1]}"
            )
        if highest[2] != lowest[2]:
            raise ValueError("targets must be the same on every rank of vocab_parallel")
        if highest[3] != lowest[3]:
            raise ValueError("e must be the same on every rank of vocab_parallel")
        return None

    def localize(self, row_targets: torch.Tensor) -> torch.Tensor:
        """Global row targets as indices into this rank's rows; -1 (the backends' "no target")
        where the target lives on another rank, and where it was -1 already."""
        on_shard = (row_targets >= self.start) & (row_targets < self.stop)
        return torch.where(on_shard, row_targets - self.start, -1)

    def combine_stats(self, stats: torch.Tensor, names: list[str]) -> torch.Tensor:
        """The global statistics `names` (rows of `stats`) from every rank's partial ones.

        Log-sum-exps combine by one all-reduce (max) and one (sum) of exp(lse_r - max); sums by
        the sum; the entropy, with pi_r = exp(lse_r - lse) each rank's share of the mass, as
        sum_r pi_r (entropy_r - log pi_r); the reverse KL, with rho_r the teacher's share, as
        sum_r pi_r (KL_r + log pi_r - log rho_r), the forward KL likewise under rho; a
        log-sum-exp's residual (what its rounding lost) joins its exponent, and the global one is
        formed anew. All sums go in the one all-reduce.
        """
        normalizers = [name for name in names if name in _NORMALIZERS]
        peaks = torch.stack([stats[names.index(name)] for name in normalizers])
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=self.group)
        peak = dict(zip(normalizers, peaks, strict=True))
        log_weight = {
            name: (stats[names.index(name)] - peak[name]) + _residual(stats, names, name)
            for name in normalizers
        }
        weight = {name: x.exp() for name, x in log_weight.items()}
        summed = [name for name in names if not name.endswith("_residual")]
        partials = []
        for name in summed:
            row = stats[names.index(name)]
            if name in peak:
                partials.append(weight[name])
            elif name == "entropy":  # sum_r w_r (entropy_r - log w_r), then / sum w + log sum w
                partials.append(_weighted(weight["lse"], row - log_weight["lse"]))
            elif name in _KL_WEIGHTS:  # sum_r w_r (KL_r + log w_r - log w'_r), then as above
                head, other = _KL_WEIGHTS[name]
                shift = log_weight[head] - log_weight[other]
                # mass where the other head has none on this shard: an infinite KL, not NaN
                term = torch.where(log_weight[other] > -math.inf, row + shift, math.inf)
                partials.append(_weighted(weight[head], term))
            else:
                partials.append(row)
        sums = torch.stack(partials)
        dist.all_reduce(sums, group=self.group)
        total = {name: sums[summed.index(name)] for name in normalizers}
        combined = {}
        for name, row in zip(summed, sums, strict=True):
            if name in peak:  # its residual formed anew from the combined log-sum-exp
                combined[name], combined[f"{name}_residual"] = lse_pair(peak[name], row.log())
            elif name == "entropy":
                combined[name] = row / total["lse"] + total["lse"].log()
            elif name in _KL_WEIGHTS:
                head, other = _KL_WEIGHTS[name]
                combined[name] = row / total[head] - (total[head].log() - total[other].log())
            else:
                combined[name] = row
        return torch.stack([combined[name] for name in names])

    def sum_stats(self, stats: torch.Tensor) -> torch.Tensor:
        """Statistics that are plain sums over the vocabulary, summed over the ranks."""
        stats = stats.contiguous()
        dist.all_reduce(stats, group=self.group)
        return stats

    def reduce_grad_e(self, grad_e: torch.Tensor) -> torch.Tensor:
        """The full gradient of e from every rank's share (its own vocabulary rows)."""
        grad_e = grad_e.contiguous()
        dist.all_reduce(grad_e, group=self.group)
        return grad_e

    def _control_device(self) -> torch.device:
        """Where the small agreement tensors live: the CPU if the group's backend takes CPU
        tensors (gloo, mpi, or a mixed "cpu:gloo,cuda:nccl" group), else the current GPU."""
        backend = str(dist.get_backend(self.group))
        if "gloo" in backend or backend == "mpi":
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device())


def _residual(stats: torch.Tensor, names: list[str], name: str) -> torch.Tensor | float:
    """The residual of the log-sum-exp `name` among `stats`, 0 where not computed."""
    residual = f"{name}_residual"
    return stats[names.index(residual)] if residual in names else 0.0


_NORMALIZERS = ("lse", "teacher_lse")
_KL_WEIGHTS = {"reverse_kl": ("lse", "teacher_lse"), "forward_kl": ("teacher_lse", "lse")}
"""Each KL's (weighting head, other head): the log-sum-exps of p and q for KL(p || q)."""


@dataclass(frozen=True)
class TokenGather:
    """Vocabulary shards whose ranks hold different tokens (data parallel, as under FSDP).

    Every rank computes its vocabulary rows for every rank's tokens: the rows of e and the
    targets are all-gathered (each rank's padded to `padded` rows), the statistics combined as
    for any shard, and each rank keeps its own tokens' loss. In backward the ranks sum their
    upstream coefficients (each token's comes from its owner), so each shard's gradient is
    that of every rank's loss; grad_c and grad_bias are divided by the group size (the
    average over ranks, as FSDP and DDP reduce gradients), and grad_e, summed over the shards,
    keeps each rank's own rows.
    """

    group: dist.ProcessGroup | None
    count: int
    """This rank's rows."""
    padded: int
    """Rows per rank in the gathered tensors (the most any rank holds)."""

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """(world * padded, D) every rank's rows; differentiable (backward keeps this rank's)."""
        return _GatherRows.apply(rows, self)

    def gather_targets(self, row_targets: torch.Tensor) -> torch.Tensor:
        """Every rank's row targets, padding rows without target (-1)."""
        return self._gather(row_targets, fill=-1)

    def own(self, values: torch.Tensor) -> torch.Tensor:
        """This rank's rows of gathered per-row values."""
        start = dist.get_rank(self.group) * self.padded
        return values[start : start + self.count]

    def sum_coefficients(self, *coefficients: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Per-row upstream coefficients summed over the ranks (None stays None)."""
        present = [x for x in coefficients if x is not None]
        summed = torch.stack(present)
        dist.all_reduce(summed, group=self.group)
        rows = iter(summed)
        return [None if x is None else next(rows) for x in coefficients]

    def average(self, grad: torch.Tensor) -> torch.Tensor:
        """A classifier gradient as the mean over the ranks' losses."""
        return grad.div_(self.world) if grad.numel() else grad

    def _gather(self, values: torch.Tensor, fill: float) -> torch.Tensor:
        padded = values.new_full((self.padded, *values.shape[1:]), fill)
        padded[: self.count] = values
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat(parts)


class _GatherRows(torch.autograd.Function):
    """All-gather of row blocks whose backward keeps this rank's block of an already summed
    gradient (`VocabParallel.reduce_grad_e` has summed it over the shards)."""

    @staticmethod
    def forward(rows: torch.Tensor, gather: TokenGather) -> torch.Tensor:
        return gather._gather(rows, fill=0.0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.gather = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return ctx.gather.own(grad), None


def local_inputs(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    options: LossOptions,
    shard_dim: int | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, LossOptions]:
    """DTensor arguments (layouts checked by `_validation.check_dtensors`, which gives
    `shard_dim`, the mesh dimension c is sharded on) as this rank's local tensors, taken
    differentiably so that each gradient returns as a DTensor with its input's placements; a
    row-sharded c sets `options.vocab_parallel`."""
    if DTensor is None or not any(isinstance(x, DTensor) for x in (e, c, targets, bias)):
        return e, c, targets, bias, options
    if shard_dim is not None:
        shard = VocabParallel.of_row_sharding(c.shape[0], c.device_mesh, shard_dim)
        options = replace(options, vocab_parallel=shard)
    replicas = _replica_groups(c)
    e, c, targets, bias = (
        x.to_local() if isinstance(x, DTensor) else x for x in (e, c, targets, bias)
    )
    if replicas:
        c = _ReplicaMean.apply(c, replicas)
        bias = None if bias is None else _ReplicaMean.apply(bias, replicas)
    return e, c, targets, bias, options


def _replica_groups(c: torch.Tensor) -> tuple[dist.ProcessGroup, ...]:
    """The process groups of the mesh dimensions on which a DTensor `c` is replicated (of more
    than one rank)."""
    if not isinstance(c, DTensor):
        return ()
    mesh = c.device_mesh
    return tuple(
        mesh.get_group(dim)
        for dim, placement in enumerate(c.placements)
        if placement.is_replicate() and mesh.size(dim) > 1
    )


class _ReplicaMean(torch.autograd.Function):
    """The identity, whose backward averages the gradient over each of `groups`: the mean over
    a classifier's replicas of each one's gradient, as DDP and HSDP reduce a replicated
    parameter's."""

    @staticmethod
    def forward(x: torch.Tensor, groups: tuple[dist.ProcessGroup, ...]) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.groups = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        for group in ctx.groups:
            dist.all_reduce(grad, group=group)
            grad.div_(dist.get_world_size(group))
        return grad, None


def _weighted(weight: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """weight * row, 0 where the weight is: a rank whose shard of a row is all masked (-inf
    logits) has no mass there, and its statistics of that row may be infinite."""
    return torch.where(weight > 0, weight * row, 0.0)


def _require_initialized() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "VocabParallel needs torch.distributed: call torch.distributed.init_process_group first"
        )


def _tiled_vocab_size(shards: list[tuple[int, int]]) -> int:
    """V, if the shards (one per rank) are non-empty and tile [0, V) with no gap or overlap."""
    edge = 0
    for start, stop in sorted(shards):
        if start != edge or stop <= start:
            held = ", ".join(f"rank {rank}: [{a}, {b})" for rank, (a, b) in enumerate(shards))
            raise ValueError(
                "vocab_parallel shards must be non-empty and tile [0, V) with no gap or overlap, "
                f"got {held}"
            )
        edge = stop
    return edge


def _row_checksum(e: torch.Tensor) -> torch.Tensor:
    """A checksum of e: its rows projected on a fixed vector, whose float64 bits are mixed
    (`_mixed_sum`): equal for equal tensors on equal devices, different for different batches."""
    rows = e.reshape(-1, e.shape[-1]).float()
    probe = torch.linspace(1.0, 2.0, rows.shape[1], device=rows.device)
    return _mixed_sum((rows @ probe).double().view(torch.int64))


def _fingerprint(values: tuple, device: torch.device) -> torch.Tensor:
    """A checksum of a call's options on `device`: everything but tensors by its repr (CRC-32:
    the same in every process, unlike `hash`), plus each tensor's `_mixed_sum` of its float64
    bits."""
    tensors = [x for x in values if isinstance(x, torch.Tensor)]
    described = [None if isinstance(x, torch.Tensor) else x for x in values]
    total = torch.tensor(zlib.crc32(repr(described).encode()), device=device)
    for x in tensors:
        total = total + _mixed_sum(x.detach().double().view(torch.int64)).to(device)
    return total


def _checksum(targets: torch.Tensor) -> torch.Tensor:
    """An order-sensitive checksum of the targets (`_mixed_sum`)."""
    return _mixed_sum(targets.reshape(-1).long())


_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
"""SplitMix64's constants."""


def _mixed_sum(values: torch.Tensor) -> torch.Tensor:
    """The wrapping int64 sum of each (position, value) pair mixed by SplitMix64's finalizer, a
    0-d tensor on the values' device: a sum of linear terms, such as a position-weighted sum,
    is equal for batches whose differences cancel (targets +2 at one position and -1 at the
    next)."""
    signed = [m - 2**64 for m in _MIX]  # as int64

    def xor_shift(x: torch.Tensor, bits: int) -> torch.Tensor:  # a logical shift of the bits
        return x ^ ((x >> bits) & ((1 << (64 - bits)) - 1))

    positions = torch.arange(values.numel(), device=values.device)
    x = xor_shift(values * signed[0] + positions, 30) * signed[1]
    x = xor_shift(x, 27) * signed[2]
    return xor_shift(x, 31).sum()
