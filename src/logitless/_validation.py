"""Every argument check of the public API, in one place, before any computation runs."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from logitless.distributed import DTensor, TokenGather, VocabParallel

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
IMPLS = ("auto", "torch", "triton")
ASYNC_CHECKS_ENV = "LOGITLESS_ASYNC_CHECKS"


@dataclass(frozen=True)
class LossOptions:
    """The options of `linear_cross_entropy`, checked once at construction."""

    ignore_index: int = -100
    reduction: str = "mean"
    shift: int = 0
    softcap: float | None = None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    return_lse: bool = False
    filter_eps: float | str | None = "auto"
    impl: str = "auto"
    vocab_parallel: VocabParallel | None = None

    def __post_init__(self) -> None:
        _checked(self, "ignore_index", _check_int)
        _check_choice("reduction", self.reduction, REDUCTIONS)
        _checked(self, "shift", _check_int)
        if self.shift < 0:
            raise ValueError(f"shift must be >= 0, got {self.shift}")
        if self.softcap is not None:
            _checked(self, "softcap", _check_real)
            if not 0 < self.softcap < math.inf:
                raise ValueError(f"softcap must be a finite number > 0 or None, got {self.softcap}")
        _checked(self, "label_smoothing", _check_real)
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        _checked(self, "z_loss", _check_real)
        if not 0 <= self.z_loss < math.inf:
            raise ValueError(f"z_loss must be a finite number >= 0, got {self.z_loss}")
        check_bool("return_lse", self.return_lse)
        if isinstance(self.filter_eps, str):
            _check_choice("filter_eps", self.filter_eps, ("auto",))
        elif self.filter_eps is not None:
            _checked(self, "filter_eps", _check_real)
            if not 0.0 <= self.filter_eps < 1.0:
                raise ValueError(
                    f"filter_eps must be 'auto', None or a float in [0, 1), got {self.filter_eps}"
                )
        _check_choice("impl", self.impl, IMPLS)
        if self.vocab_parallel is not None and not isinstance(self.vocab_parallel, VocabParallel):
            raise TypeError(
                "vocab_parallel must be a logitless.VocabParallel or None, "
                f"got {type(self.vocab_parallel).__name__}"
            )

    def resolved_filter_eps(self) -> float | None:
        """The gradient-filtering budget; None means exact.

        The budget is the most softmax probability per token that skipped tiles may hold in
        all. "auto" is exact: on a trained model's data a budget that keeps eager's accuracy
        (2**-10 for bfloat16) finds almost nothing to skip, and on the GPU the filtered
        backward costs more than it saves (benchmarks/RESULTS.md, H100, 2026-11-27).
        """
        if self.filter_eps == "auto":
            return None
        return self.filter_eps or None


class Checked(NamedTuple):
    """What a call's checks learned on the way: under vocabulary parallelism the `TokenGather`
    where the ranks' tokens differ, and how many rows predict a target (read with the target
    check; None where that check ran on the device)."""

    gather: TokenGather | None
    predicting: int | None


def check_inputs(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    options: LossOptions,
    more: Callable[[], None] | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    agreed: tuple = (),
) -> Checked:
    """Raise TypeError/ValueError naming the first bad argument of a call (`more`: the call's
    further checks, such as its class weights or its teacher; a `num_items_in_batch` tensor's
    value is read with the targets', see `check_num_items_in_batch`).

    Under vocabulary parallelism every rank raises when any rank does, instead of leaving the
    others waiting in a collective, and when the ranks differ in `options`, in the dtypes, in
    which of e, c and bias need gradients or in `agreed` (the call's further options).
    """
    error = predicting = None
    try:
        predicting = _check_local_inputs(e, c, targets, bias, options, num_items_in_batch)
        if more is not None:
            more()
    except (TypeError, ValueError) as exc:
        if options.vocab_parallel is None:
            raise
        error = exc
    if options.vocab_parallel is None:
        return Checked(None, predicting)
    if error is None:
        tensors = (e, c, bias)
        needs = [torch.is_grad_enabled() and x is not None and x.requires_grad for x in tensors]
        dtypes = [None if x is None else x.dtype for x in tensors]
        agreed = (replace(options, vocab_parallel=None), dtypes, needs, *agreed)
        if options.shift:  # the targets a shift drops predict nothing: not compared either
            targets = targets.clone()
            targets[..., : options.shift] = options.ignore_index
    gather = options.vocab_parallel.check_ranks_agree(e, targets, error, agreed)
    return Checked(gather, predicting)


def check_dtensors(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    options: LossOptions,
) -> int | None:
    """Check the DTensor arguments' layouts; return the mesh dimension that shards c by rows.

    Supported: c (and bias alike) replicated, or sharded by rows (`Shard(0)`) on one mesh
    dimension and replicated on the others; e and targets local tensors or replicated DTensors.
    """
    if DTensor is None or not any(isinstance(x, DTensor) for x in (e, c, targets, bias)):
        return None
    for name, tensor in (("e", e), ("targets", targets)):
        _check_tokens_replicated(name, tensor)
    if not isinstance(c, DTensor):
        if isinstance(bias, DTensor) and not all(p.is_replicate() for p in bias.placements):
            raise ValueError(f"bias must be sharded like c (a local tensor), got {bias.placements}")
        return None
    if options.vocab_parallel is not None:
        raise ValueError(
            "vocab_parallel must be None when c is a DTensor: its placements decide the sharding"
        )
    supported = (
        "c must be a DTensor replicated, or sharded by rows (Shard(0)) on one mesh dimension and "
        "replicated on the others"
    )
    if any(not (p.is_replicate() or p.is_shard(0)) for p in c.placements):
        raise ValueError(f"{supported}, got placements {c.placements}")
    sharded = [dim for dim, p in enumerate(c.placements) if p.is_shard(0)]
    if len(sharded) > 1:
        raise ValueError(f"{supported}, got placements {c.placements}")
    if bias is not None:
        if sharded:
            layout = (getattr(bias, "device_mesh", None), getattr(bias, "placements", None))
            like_c = isinstance(bias, DTensor) and layout == (c.device_mesh, c.placements)
        else:
            like_c = not isinstance(bias, DTensor) or all(p.is_replicate() for p in bias.placements)
        if not like_c:
            raise ValueError(
                f"bias must be a DTensor on c's mesh with c's placements {c.placements}, got "
                f"{getattr(bias, 'placements', 'a local tensor')}"
            )
    return sharded[0] if sharded else None


def check_teacher_dtensors(teacher_e, teacher_c, teacher_bias, c) -> None:
    """A teacher head's DTensor layouts: teacher_c and teacher_bias hold the vocabulary rows
    that c holds (c's layout where either is sharded by rows), teacher_e this rank's tokens."""
    if DTensor is None:
        return
    _check_tokens_replicated("teacher_e", teacher_e)
    for name, x in (("teacher_c", teacher_c), ("teacher_bias", teacher_bias)):
        if x is not None and (_rows_sharded(c) or _rows_sharded(x)) and _layout(x) != _layout(c):
            raise ValueError(
                f"{name} must be laid out as c (the same vocabulary rows on each rank): c "
                f"{_layout(c)}, {name} {_layout(x)}"
            )


def _check_tokens_replicated(name: str, tensor: torch.Tensor | None) -> None:
    if isinstance(tensor, DTensor) and not all(p.is_replicate() for p in tensor.placements):
        raise ValueError(
            f"{name} must be a local tensor or a replicated DTensor, got placements "
            f"{tensor.placements}: pass this rank's tokens (to_local()) instead"
        )


def _rows_sharded(x: torch.Tensor) -> bool:
    return isinstance(x, DTensor) and any(p.is_shard(0) for p in x.placements)


def _layout(x: torch.Tensor) -> tuple | None:
    """(mesh, placements) of a DTensor; None for a local tensor."""
    return (x.device_mesh, tuple(x.placements)) if isinstance(x, DTensor) else None


def check_local_tensors(function: str, **tensors: torch.Tensor | None) -> None:
    """Refuse DTensor arguments where `function` takes local tensors only, naming the first."""
    if DTensor is None:
        return
    for name, tensor in tensors.items():
        if isinstance(tensor, DTensor):
            raise ValueError(
                f"{function} takes local tensors, got a DTensor {name} (placements "
                f"{tensor.placements}): pass its to_local() or full_tensor()"
            )


def check_no_vmap() -> None:
    """Refuse `torch.func.vmap`: the checks and the backends' control flow read tensor values.
    (torch.compile traces no functorch transform into a logitless call.)"""
    if torch.compiler.is_compiling():
        return
    stack = torch._C._functorch.get_interpreter_stack() or []
    if any(level.key() == torch._C._functorch.TransformType.Vmap for level in stack):
        raise RuntimeError(
            "logitless does not support torch.func.vmap: e and targets take any leading shape, "
            "so pass the batch as a leading dimension instead (torch.func.grad is supported)"
        )


def check_num_items_in_batch(num_items: object, options: LossOptions) -> None:
    """num_items_in_batch: None, a positive int, or a one-element real tensor; for "mean"
    only. A tensor's value is checked with the targets' (`check_inputs`): transformers passes
    one every step, and it costs no synchronization of its own."""
    if num_items is None:
        return
    if options.reduction != "mean":
        raise ValueError(
            f"num_items_in_batch replaces the divisor of reduction='mean', got "
            f"reduction={options.reduction!r}"
        )
    if isinstance(num_items, torch.Tensor):
        if num_items.device.type == "meta":
            raise ValueError("num_items_in_batch must hold a value, got a meta tensor")
        if num_items.numel() != 1 or num_items.dtype.is_complex or num_items.dtype == torch.bool:
            raise ValueError(
                "num_items_in_batch must be a one-element real tensor, got "
                f"{tuple(num_items.shape)} {num_items.dtype}"
            )
        return
    _check_int("num_items_in_batch", num_items)
    if num_items <= 0:
        raise ValueError(f"num_items_in_batch must be > 0, got {num_items}")


def check_tensors(**tensors: object) -> None:
    """A TypeError naming the first of `tensors` that is not a torch.Tensor."""
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")


def _check_local_inputs(
    e: torch.Tensor,
    c: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None,
    options: LossOptions,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> int | None:
    """The checks of this process's arguments; how many rows predict a target
    (`_check_target_range`)."""
    check_tensors(e=e, c=c, targets=targets)
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")

    if e.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"e must be float32, bfloat16, float16 or float64, got {e.dtype}")
    if c.dtype != e.dtype:
        raise ValueError(
            f"c must have the dtype of e ({e.dtype}), got {c.dtype} (under torch.autocast both "
            "are cast to its dtype)"
        )
    if bias is not None and bias.dtype != e.dtype:
        raise ValueError(f"bias must have the dtype of e ({e.dtype}), got {bias.dtype}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")

    for name, tensor in (("c", c), ("targets", targets), ("bias", bias)):
        if tensor is not None and tensor.device != e.device:
            raise ValueError(f"{name} must be on the device of e ({e.device}), got {tensor.device}")
    if e.device.type == "meta":
        raise ValueError(
            "e must hold values, got a tensor on the meta device: the checks and the backends "
            "read them (materialize the model first, e.g. to_empty() and its initialization)"
        )

    if e.dim() < 1:
        raise ValueError("e must have shape (..., D), got a 0-d tensor")
    if c.dim() != 2:
        raise ValueError(f"c must have shape (V, D), got {tuple(c.shape)}")
    vocab, dim = c.shape
    if e.shape[-1] != dim:
        raise ValueError(f"e must have hidden size D={dim} of c, got shape {tuple(e.shape)}")
    if dim == 0:
        raise ValueError(f"e and c must have a hidden size D >= 1, got shape {tuple(e.shape)}")
    if vocab == 0:
        if options.vocab_parallel is not None:
            raise ValueError(
                f"c must have at least one vocabulary row on every rank, got none on this one "
                f"(V={options.vocab_parallel.vocab_size} split over too many ranks)"
            )
        raise ValueError("c must have at least one vocabulary row, got V=0")
    if targets.shape != e.shape[:-1]:
        raise ValueError(
            f"targets must have the leading shape of e {tuple(e.shape[:-1])}, "
            f"got {tuple(targets.shape)}"
        )
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"bias must have shape ({vocab},), got {tuple(bias.shape)}")
    shard = options.vocab_parallel
    if shard is not None:
        if vocab != shard.stop - shard.start:
            raise ValueError(
                f"c must hold the {shard.stop - shard.start} rows [{shard.start}, {shard.stop}) "
                f"of this rank's vocab_parallel shard, got {vocab}"
            )
        vocab = shard.vocab_size

    if options.shift:
        if targets.dim() == 0:
            raise ValueError("shift needs a sequence dimension: e must have shape (..., T, D)")
        if options.shift >= targets.shape[-1]:
            raise ValueError(
                f"shift={options.shift} leaves no positions of a sequence of length "
                f"{targets.shape[-1]}"
            )

    return _check_target_range(targets, vocab, options, num_items_in_batch)


def _check_target_range(
    targets: torch.Tensor,
    vocab: int,
    options: LossOptions,
    num_items: int | torch.Tensor | None,
) -> int | None:
    """A ValueError for a target outside [0, vocab) that is not ignore_index, or a
    `num_items` tensor that is not positive; else how many targets predict something (neither
    ignored nor shifted out), which the row compaction needs.

    That needs the values on the host: one synchronization on an accelerator, for the check and
    the count together. Under torch.compile, or with LOGITLESS_ASYNC_CHECKS=1 off the CPU, a
    device-side assertion runs instead, with no synchronization, and the count is None; the
    assertion fails the next synchronizing call.
    """
    # shifted-out targets predict nothing, and are not checked (as F.cross_entropy on the
    # shifted slice); compared in int64, where -100 or V cannot wrap around
    targets = (targets[..., options.shift :] if options.shift else targets).long()
    ignore_index = options.ignore_index
    outside = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    if torch.compiler.is_compiling():  # formatting a symbolic V would specialize the graph to it
        message = "targets must lie in [0, V) (the rows of c) or equal ignore_index"
    else:
        message = f"targets must lie in [0, {vocab}) or equal ignore_index={ignore_index}"
    checks = [(outside, message)]
    if isinstance(num_items, torch.Tensor):
        positive = "num_items_in_batch must be finite and > 0"
        num_items = num_items.to(targets.device)
        checks.append((~((num_items > 0) & num_items.isfinite()).reshape(()), positive))
    refused, predicting = _read_checks(checks, count=(targets != ignore_index).sum())
    if refused == message:
        raise ValueError(f"{message}, found {targets[outside][0].item()}")
    if refused:
        raise ValueError(refused)
    return predicting


def _read_checks(
    checks: list[tuple[torch.Tensor, str]], count: torch.Tensor | None = None
) -> tuple[str | None, int | None]:
    """The message of the first (bad, message) check whose `bad` holds anywhere, and the value
    of `count`, read on the host in one synchronization with an accelerator for all of them.
    Under torch.compile, or with LOGITLESS_ASYNC_CHECKS=1 off the CPU, device-side assertions
    with the messages run instead, with no synchronization, and this says (None, None); they
    fail the next synchronizing call."""
    found = torch.stack([bad.any().long() for bad, _ in checks])
    asynchronous = found.device.type != "cpu" and os.environ.get(ASYNC_CHECKS_ENV) == "1"
    if torch.compiler.is_compiling() or asynchronous:
        for holds, (_, message) in zip(found, checks, strict=True):
            torch._assert_async(holds == 0, message)
        return None, None
    read = torch.cat((found, found.new_zeros(1) if count is None else count.reshape(1))).tolist()
    refused = (message for holds, (_, message) in zip(read[:-1], checks, strict=True) if holds)
    return next(refused, None), None if count is None else read[-1]


def check_weight(
    weight: torch.Tensor | None, e: torch.Tensor, c: torch.Tensor, options: LossOptions
) -> None:
    """Class weights: None, or a floating (V,) tensor on the device of e (V the full
    vocabulary under vocabulary parallelism) that autograd does not track: the loss has no
    gradient with respect to them (as F.cross_entropy)."""
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "weight must not require grad: the loss is not differentiable with respect to class "
            "weights (nor is F.cross_entropy); pass weight.detach()"
        )
    if weight.device != e.device:
        raise ValueError(f"weight must be on the device of e ({e.device}), got {weight.device}")
    shard = options.vocab_parallel
    vocab = c.shape[0] if shard is None else shard.vocab_size
    if weight.shape != (vocab,):
        where = "" if shard is None else " (the full vocabulary, on every rank of vocab_parallel)"
        raise ValueError(f"weight must have shape ({vocab},){where}, got {tuple(weight.shape)}")


def temperature_scale(temperature: float) -> float:
    """1 / temperature, for a finite temperature > 0."""
    temperature = _check_real("temperature", temperature)
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    return 1.0 / temperature


def check_top_k(k: int, vocab: int) -> int:
    """k in [1, V], as a Python int."""
    k = _check_int("k", k)
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, {vocab}] (the vocabulary of c), got {k}")
    return k


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def check_teacher(
    e: torch.Tensor,
    c: torch.Tensor,
    teacher_e: torch.Tensor,
    teacher_c: torch.Tensor,
    teacher_bias: torch.Tensor | None,
) -> None:
    """The teacher head: (..., D_t) hidden states with the leading shape of e, a (V, D_t)
    classifier with the rows of c, an optional (V,) bias; the dtype and device of e."""
    check_tensors(teacher_e=teacher_e, teacher_c=teacher_c)
    if teacher_bias is not None and not isinstance(teacher_bias, torch.Tensor):
        raise TypeError(
            f"teacher_bias must be a torch.Tensor or None, got {type(teacher_bias).__name__}"
        )
    for name, tensor in (
        ("teacher_e", teacher_e),
        ("teacher_c", teacher_c),
        ("teacher_bias", teacher_bias),
    ):
        if tensor is None:
            continue
        if tensor.dtype != e.dtype:
            raise ValueError(f"{name} must have the dtype of e ({e.dtype}), got {tensor.dtype}")
        if tensor.device != e.device:
            raise ValueError(f"{name} must be on the device of e ({e.device}), got {tensor.device}")
    if teacher_e.dim() < 1 or teacher_e.shape[:-1] != e.shape[:-1]:
        raise ValueError(
            f"teacher_e must have the leading shape of e {tuple(e.shape[:-1])}, "
            f"got {tuple(teacher_e.shape)}"
        )
    if teacher_c.dim() != 2 or teacher_c.shape != (c.shape[0], teacher_e.shape[-1]):
        raise ValueError(
            f"teacher_c must have shape ({c.shape[0]}, {teacher_e.shape[-1]}) (the rows of c, the "
            f"hidden size of teacher_e), got {tuple(teacher_c.shape)}"
        )
    if teacher_bias is not None and teacher_bias.shape != (c.shape[0],):
        raise ValueError(
            f"teacher_bias must have shape ({c.shape[0]},), got {tuple(teacher_bias.shape)}"
        )


TOP_K_MASS_TOLERANCE = 2.0**-6
"""How far above 1 a cached teacher's support mass may sum (log-probs stored in 16 bits)."""


def check_teacher_top_k(
    e: torch.Tensor, c: torch.Tensor, teacher_indices: torch.Tensor, teacher_log_probs: torch.Tensor
) -> None:
    """A cached teacher: (..., k) integer class indices in [0, V) and floating log-probs <= 0
    (-inf marks padding, whatever its index) with the leading shape of e, on its device, whose
    probabilities sum to at most 1 per token, and no class twice in a token's support
    (`_read_checks`)."""
    if not isinstance(teacher_indices, torch.Tensor):
        raise TypeError(
            f"teacher_indices must be a torch.Tensor, got {type(teacher_indices).__name__}"
        )
    if not isinstance(teacher_log_probs, torch.Tensor):
        raise TypeError(
            f"teacher_log_probs must be a torch.Tensor, got {type(teacher_log_probs).__name__}"
        )
    dtype = teacher_indices.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"teacher_indices must be an integer tensor, got {teacher_indices.dtype}")
    if not teacher_log_probs.dtype.is_floating_point:
        raise TypeError(
            f"teacher_log_probs must be a floating-point tensor, got {teacher_log_probs.dtype}"
        )
    for name, tensor in (
        ("teacher_indices", teacher_indices),
        ("teacher_log_probs", teacher_log_probs),
    ):
        if tensor.device != e.device:
            raise ValueError(f"{name} must be on the device of e ({e.device}), got {tensor.device}")
    lead = tuple(e.shape[:-1])
    if teacher_indices.dim() != len(lead) + 1 or tuple(teacher_indices.shape[:-1]) != lead:
        raise ValueError(
            f"teacher_indices must have shape (*{lead}, k) (the leading shape of e), "
            f"got {tuple(teacher_indices.shape)}"
        )
    vocab, k = c.shape[0], teacher_indices.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher_indices must hold k in [1, {vocab}] classes per token, got {k}")
    if teacher_log_probs.shape != teacher_indices.shape:
        raise ValueError(
            f"teacher_log_probs must have the shape of teacher_indices "
            f"{tuple(teacher_indices.shape)}, got {tuple(teacher_log_probs.shape)}"
        )
    indices = teacher_indices.reshape(-1, k).long()
    log_probs = teacher_log_probs.reshape(-1, k).float()
    in_support = log_probs != -math.inf
    distinct_padding = -1 - torch.arange(k, device=e.device)
    ordered = torch.where(in_support, indices, distinct_padding).sort(-1).values
    message, _ = _read_checks(
        [
            (
                ((indices < 0) | (indices >= vocab)) & in_support,
                f"teacher_indices must lie in [0, {vocab}) (the rows of c) where not padding",
            ),
            (
                log_probs.isnan() | (log_probs > 0),
                "teacher_log_probs must be log-probabilities: <= 0 (or -inf), not NaN",
            ),
            (
                log_probs.exp().sum(-1) > 1.0 + TOP_K_MASS_TOLERANCE,
                "teacher_log_probs must be log-probabilities of one distribution: their "
                "probabilities sum to more than 1 in some token",
            ),
            (
                ordered[:, 1:] == ordered[:, :-1],
                "teacher_indices must not repeat a class within a token's support",
            ),
        ]
    )
    if message:
        raise ValueError(message)


@dataclass(frozen=True)
class DistillationOptions:
    """The options of `linear_distillation_loss`, checked once at construction (its module's)."""

    divergence: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    hard_weight: float = 0.0
    teacher_softcap: float | None = None
    ignore_index: int = -100
    reduction: str = "mean"
    shift: int = 0
    softcap: float | None = None
    filter_eps: float | str | None = None
    impl: str = "auto"
    vocab_parallel: VocabParallel | None = None

    def __post_init__(self) -> None:
        shared = self.loss_options()
        for name in ("ignore_index", "shift", "softcap", "filter_eps"):
            object.__setattr__(self, name, getattr(shared, name))  # as checked: Python numbers
        _checked(self, "temperature", _check_real)
        temperature_scale(self.temperature)
        _check_choice("divergence", self.divergence, DIVERGENCES)
        _checked(self, "beta", _check_real)
        if not 0.0 < self.beta < 1.0:
            raise ValueError(f"beta must be in (0, 1), got {self.beta}")
        _checked(self, "hard_weight", _check_real)
        check_hard_weight(self.hard_weight)
        if self.teacher_softcap is not None:
            _checked(self, "teacher_softcap", _check_real)
            if not 0 < self.teacher_softcap < math.inf:
                raise ValueError(
                    "teacher_softcap must be a finite number > 0 or None, got "
                    f"{self.teacher_softcap}"
                )

    def loss_options(self) -> LossOptions:
        """The options it shares with `linear_cross_entropy`, checked."""
        return LossOptions(
            ignore_index=self.ignore_index, reduction=self.reduction, shift=self.shift,
            softcap=self.softcap, filter_eps=self.filter_eps, impl=self.impl,
            vocab_parallel=self.vocab_parallel,
        )  # fmt: skip


def check_hard_weight(hard_weight: float) -> float:
    """hard_weight in [0, 1] (the share of the hard-label cross-entropy in a distillation), as
    a Python number."""
    hard_weight = _check_real("hard_weight", hard_weight)
    if not 0.0 <= hard_weight <= 1.0:
        raise ValueError(f"hard_weight must be in [0, 1], got {hard_weight}")
    return hard_weight


def check_hard_targets(hard_weight: float, targets: torch.Tensor | None) -> None:
    """A call with hard_weight > 0 gives targets, the labels of the hard loss."""
    if hard_weight and targets is None:
        raise ValueError("hard_weight > 0 needs targets (the labels of the hard loss)")


def check_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend `impl` resolves to on `device` for inputs of `dtype` (float64: "torch")."""
    if impl == "auto":
        return "triton" if device.type == "cuda" and dtype != torch.float64 else "torch"
    if impl == "triton" and dtype == torch.float64:
        raise ValueError("impl='triton' does not take float64 inputs; use impl='torch' or 'auto'")
    if impl == "triton" and device.type != "cuda" and not triton_interpreter_on():
        raise ValueError(
            f"impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1), got device {device}"
        )
    return impl


def triton_interpreter_on() -> bool:
    """Whether Triton kernels run through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_completion(input_ids: object, logits_to_keep: object) -> None:
    """`completion_log_probs`'s own arguments, before its model runs: (B, T) integer
    `input_ids` and a completion length `logits_to_keep` in [1, T - 1] (each token is predicted
    from the one before it, so the first predicts nothing); `labelled_log_probs` checks the
    rest."""
    check_tensors(input_ids=input_ids)
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(
            f"input_ids must be a (B, T) tensor of token ids, got {input_ids.dtype} of shape "
            f"{tuple(input_ids.shape)}"
        )
    _check_int("logits_to_keep", logits_to_keep)
    length = input_ids.shape[-1]
    if not 1 <= logits_to_keep < length:
        raise ValueError(
            f"logits_to_keep must be in [1, {length - 1}] for input_ids of {length} tokens, got "
            f"{logits_to_keep}"
        )


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_int(name: str, value: object) -> int:
    """An integer, Python's or another's (NumPy's), not a bool, as a Python int, within int64
    (the range tensors and the custom ops' arguments hold)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"{name} must fit in int64, got {value}")
    return value if type(value) is int else int(value)


def _check_real(name: str, value: object) -> float:
    """A real number, Python's or another's (NumPy's), not a bool, not NaN, as a Python int or
    float. (Checks of numbers compare them rather than call math.isnan or math.isfinite, which
    torch.compile's symbolic floats, under dynamic=True, do not take.)"""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if value != value:
        raise ValueError(f"{name} must not be NaN")
    return value if type(value) in (int, float) else float(value)  # np.float64 is a float


def _checked(options: object, name: str, check: Callable[[str, object], object]) -> None:
    """Check the field `name` of a frozen options dataclass and keep the checked value (a
    NumPy scalar becomes a Python number, as the custom ops' arguments must be)."""
    object.__setattr__(options, name, check(name, getattr(options, name)))


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {choices}, got {type(value).__name__}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
