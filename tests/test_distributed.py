"""Vocabulary parallelism: gloo ranks on the CPU against one process and the float64 reference.

Each world size is one spawn of processes (importing torch dominates the cost): every rank
computes every case on its uneven shard and saves its results, and the tests here compare them
with the single-process computation and, by the project's criterion, with float64.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing import start_processes

import logitless.reference
from helpers import (
    TOLERANCE,
    check_results,
    join_gloo_group,
    make_inputs,
    outputs_and_grads,
    rel_error,
)
from logitless import (
    LinearCrossEntropyLoss,
    VocabParallel,
    functional,
    linear_cross_entropy,
    linear_distillation_loss,
    linear_log_probs,
)
from logitless._validation import LossOptions
from logitless.backends.torch_backend import BLOCK_MB_ENV
from logitless.distributed import _checksum, _row_checksum
from logitless.rl import verl_linear_cross_entropy
from test_functional import OPTION_SETS

ROWS, DIM, VOCAB = 45, 37, 1031
SHARDS = {2: [(0, 300), (300, VOCAB)], 3: [(600, VOCAB), (0, 517), (517, 600)]}
"""Each rank's [start, stop): uneven, and for 3 ranks not in rank order."""
GRAD_SEED = 1
TIMEOUT_S = 60
"""A spawn that takes longer has a hung collective: fail instead of stalling CI."""
AGREEMENT = {torch.float32: 2e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
"""Allowed relative difference from one process: summation order and shard-wise filtering
change fp32 results by a few ulps and 16-bit results by under one rounding."""


@dataclass
class Case:
    options: dict = field(default_factory=dict)
    dtype: torch.dtype = torch.float32
    bias: bool = False
    lead: tuple[int, ...] = (ROWS,)
    ignore_fraction: float = 0.2
    module: bool = False
    from_vocab: bool = False
    function: Callable = linear_cross_entropy
    masked_from: int | None = None
    """Classes from this one on are masked by a -inf bias (whole shards of some ranks), and
    no target is among them."""

    def inputs(self):
        ignore_index = self.options.get("ignore_index", -100)
        e, c, targets, bias = make_inputs(
            self.lead, DIM, VOCAB, self.dtype, bias=self.bias,
            ignore_fraction=self.ignore_fraction, ignore_index=ignore_index, seed=3,
        )  # fmt: skip
        if self.masked_from is not None:
            bias[self.masked_from :] = -torch.inf
            targets = torch.where(targets >= self.masked_from, targets % self.masked_from, targets)
        return e, c, targets, bias


CASES = {
    **{
        f"fp32-{'bias' if bias else 'nobias'}-{options!r}": Case(options, bias=bias)
        for options in OPTION_SETS
        for bias in (False, True)
    },
    "bf16-bias": Case({}, torch.bfloat16, bias=True),
    "bf16-smoothing-softcap-lse": Case(
        {"label_smoothing": 0.1, "softcap": 4.0, "return_lse": True}, torch.bfloat16
    ),
    "bf16-zloss-sum": Case({"z_loss": 1e-3, "reduction": "sum"}, torch.bfloat16, bias=True),
    "fp16-smoothing": Case({"label_smoothing": 0.1}, torch.float16, bias=True),
    "module-shift1": Case(
        {"shift": 1, "label_smoothing": 0.1, "reduction": "none"},
        lead=(3, 11),
        bias=True,
        module=True,
    ),
    "from_vocab-shift3": Case({"shift": 3, "return_lse": True}, lead=(3, 11), from_vocab=True),
    "all-ignored": Case({}, bias=True, ignore_fraction=1.0),
    "class-weights-smoothing": Case(
        {"weight": torch.rand(VOCAB, generator=torch.Generator().manual_seed(2)) * 2,
         "label_smoothing": 0.1, "reduction": "none"},
        bias=True,
    ),
    "class-weights-mean-softcap": Case(
        {"weight": torch.rand(VOCAB, generator=torch.Generator().manual_seed(3)) * 2,
         "label_smoothing": 0.2, "softcap": 4.0},
    ),
    "log-probs-entropy": Case(
        {"temperature": 0.7, "return_entropy": True}, bias=True, function=linear_log_probs
    ),
    "masked-shards-zloss-lse": Case(
        {"z_loss": 1e-3, "return_lse": True}, bias=True, masked_from=SHARDS[2][1][0]
    ),
    "masked-shards-log-probs-entropy": Case(
        {"return_entropy": True}, bias=True, masked_from=SHARDS[2][1][0], function=linear_log_probs
    ),
    "log-probs-entropy-softcap-shift-bf16": Case(
        {"temperature": 1.3, "return_entropy": True, "softcap": 3.0, "shift": 1},
        torch.bfloat16, lead=(3, 11), function=linear_log_probs,
    ),
}  # fmt: skip


def _error_calls(rank: int, world: int, vp: VocabParallel):
    """Calls that must raise on every rank; some get bad arguments on one rank only."""
    e, c, targets, bias = Case({}, bias=True).inputs()
    rows = slice(vp.start, vp.stop)
    call = functools.partial(linear_cross_entropy, vocab_parallel=vp)
    out_of_range = targets.clone()
    out_of_range[5] = VOCAB
    first, last = rank == 0, rank == world - 1
    teacher_e, teacher_c, _, teacher_bias = make_inputs((ROWS,), 23, VOCAB, bias=True, seed=8)
    return {
        "targets differ": lambda: call(e, c[rows], targets.flip(0) if last else targets),
        "rows differ": lambda: call(e[first:], c[rows], targets[first:]),
        "hidden size differs": lambda: call(e[:, first:], c[rows, first:], targets),
        "e differs": lambda: call(e * (1 + last), c[rows], targets),
        "softcap differs": lambda: call(e, c[rows], targets, softcap=3.0 if last else None),
        "smoothing differs": lambda: call(e, c[rows], targets, label_smoothing=0.1 * last),
        "dtype differs": lambda: call(
            *(x.double() if last else x for x in (e, c[rows])), targets, impl="torch"
        ),
        "weight differs": lambda: call(e, c[rows], targets, weight=torch.ones(VOCAB) + last),
        "e needs a gradient on one rank": lambda: call(
            e.detach().requires_grad_(last), c[rows], targets
        ),
        "temperature differs": lambda: linear_log_probs(
            e, c[rows], targets, temperature=1.0 + last, vocab_parallel=vp
        ),
        "target out of range": lambda: call(e, c[rows], out_of_range),
        "c rows": lambda: call(e, c[vp.start : vp.stop - first], targets),
        "bias length": lambda: call(e, c[rows], targets, bias[vp.start : vp.stop - last]),
        "weight length": lambda: call(e, c[rows], targets, weight=torch.ones(VOCAB - last)),
        "teacher bias length": lambda: linear_distillation_loss(
            e,
            c[rows],
            teacher_e,
            teacher_c[rows],
            targets,
            teacher_bias=teacher_bias[vp.start : vp.stop - last],
            vocab_parallel=vp,
        ),
        "shards overlap": lambda: VocabParallel(0, vp.stop),
        "shards leave a gap": lambda: VocabParallel(vp.start, vp.stop - 1),
        "vocabulary smaller than world": lambda: VocabParallel.from_vocab(world - 1),
        "start not an int": lambda: VocabParallel(float(vp.start) if first else vp.start, vp.stop),
    }


ANY_RANK = "another rank failed its argument checks"
OPTIONS_DIFFER = (
    "softcap differs", "smoothing differs", "dtype differs", "weight differs",
    "e needs a gradient on one rank", "temperature differs",
)  # fmt: skip
"""Calls whose ranks differ in options, dtypes or gradients needed: before, gloo aborted on
tensors of different sizes, or each rank computed with the options mixed."""
EXPECTED_ERRORS = {
    # name: (rank with the bad argument or None, its error, the error of the other ranks)
    "targets differ": (None, None, ("ValueError", "targets must be the same on every rank")),
    "rows differ": (None, None, ("ValueError", "same number of rows on every rank")),
    "hidden size differs": (None, None, ("ValueError", "same hidden size on every rank")),
    "e differs": (None, None, ("ValueError", "e must be the same on every rank")),
    **dict.fromkeys(OPTIONS_DIFFER, (None, None, ("ValueError", "the ranks differ in their"))),
    "target out of range": (None, None, ("ValueError", r"targets must lie in \[0, 1031\)")),
    "c rows": (0, ("ValueError", "c must hold the"), ("ValueError", ANY_RANK)),
    "bias length": (-1, ("ValueError", "bias must have shape"), ("ValueError", ANY_RANK)),
    "weight length": (-1, ("ValueError", "weight must have shape"), ("ValueError", ANY_RANK)),
    "teacher bias length": (
        -1,
        ("ValueError", "teacher_bias must have shape"),
        ("ValueError", ANY_RANK),
    ),
    "shards overlap": (None, None, ("ValueError", r"tile \[0, V\)")),
    "shards leave a gap": (None, None, ("ValueError", r"tile \[0, V\)")),
    "vocabulary smaller than world": (None, None, ("ValueError", r"tile \[0, V\)")),
    "start not an int": (0, ("TypeError", "must be ints"), ("ValueError", r"tile \[0, V\)")),
}


def _outcome(call) -> tuple[str, str] | None:
    try:
        call()
    except Exception as error:
        return type(error).__name__, str(error)
    return None


def _communicated_bytes(vp: VocabParallel) -> tuple[int, int]:
    """Bytes this rank sends into collectives for one loss with smoothing: forward, backward."""
    e, c, targets, _ = Case({}).inputs()
    e.requires_grad_()
    shard = c[vp.start : vp.stop].clone().requires_grad_()

    def sent() -> int:
        calls = all_reduce.call_args_list + all_gather.call_args_list
        return sum(call.args[-1].numel() * call.args[-1].element_size() for call in calls)

    with (
        mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce) as all_reduce,
        mock.patch.object(dist, "all_gather", wraps=dist.all_gather) as all_gather,
    ):
        loss = linear_cross_entropy(e, shard, targets, label_smoothing=0.1, vocab_parallel=vp)
        forward = sent()
        loss.backward()
        return forward, sent() - forward


def _verl_call(shard: VocabParallel):
    """verl's call shape with a tensor-parallel group: log-probs, entropies and grad_e."""
    e, c, targets, _ = Case({}).inputs()
    e.requires_grad_()
    log_probs, entropy = verl_linear_cross_entropy(
        e, c[shard.start : shard.stop], targets, 0.7, "none", dist.group.WORLD
    )
    (log_probs.sum() + 0.5 * entropy.sum()).backward()
    return log_probs.detach(), entropy.detach(), e.grad


DISTILLATION = [
    {"divergence": "jsd", "beta": 0.3, "temperature": 0.7, "reduction": "none"},
    {"divergence": "forward_kl", "hard_weight": 0.4, "temperature": 1.3},
    {"divergence": "reverse_kl", "softcap": 3.0, "teacher_softcap": 4.0, "hard_weight": 0.25},
]
"""The hard loss at T = 1.3 (its own sweep) and at T = 1 (in the divergence's sweep)."""


def _distillation_inputs():
    e, c, targets, bias = Case({}, bias=True).inputs()
    teacher_e, teacher_c, _, teacher_bias = make_inputs((ROWS,), 23, VOCAB, bias=True, seed=8)
    return e, c, targets, bias, teacher_e * 2, teacher_c, teacher_bias


def _distillation_calls(shard: VocabParallel | None, dtype: torch.dtype = torch.float32):
    """Distillation losses, grad_e and (this shard's) grad_c, grad_bias, both classifiers
    sharded the same way."""
    e, c, targets, bias, teacher_e, teacher_c, teacher_bias = (
        x.to(dtype) if x.is_floating_point() else x for x in _distillation_inputs()
    )
    rows = slice(None) if shard is None else slice(shard.start, shard.stop)
    results = []
    for options in DISTILLATION:
        params = [e.clone().requires_grad_(), c[rows].clone().requires_grad_(),
                  bias[rows].clone().requires_grad_()]  # fmt: skip
        loss = linear_distillation_loss(
            params[0], params[1], teacher_e, teacher_c[rows], targets, params[2],
            teacher_bias[rows], vocab_parallel=shard, **options,
        )  # fmt: skip
        gen = torch.Generator().manual_seed(GRAD_SEED)
        loss.backward(torch.randn(loss.shape, generator=gen))
        results.append((loss.detach(), *(p.grad for p in params)))
    return results


def test_distillation_matches_one_process(ranks):
    """Every rank's loss and gradients (the shards' joined) within float32's allowance of one
    process's in float64."""
    single = _distillation_calls(None, torch.float64)
    for case, expected in enumerate(single):
        by_start = sorted(ranks, key=lambda rank: rank["shard"][0])
        for rank in ranks:
            loss, grad_e = rank["distillation"][case][:2]
            assert rel_error(loss, expected[0]) <= TOLERANCE[torch.float32]
            assert rel_error(grad_e, expected[1]) <= TOLERANCE[torch.float32]
        for i in (2, 3):
            joined = torch.cat([rank["distillation"][case][i] for rank in by_start])
            assert rel_error(joined, expected[i]) <= TOLERANCE[torch.float32]


def test_verl_call_shape_with_a_process_group(ranks):
    e, c, targets, _ = Case({}).inputs()
    e.requires_grad_()
    log_probs, entropy = linear_log_probs(e, c, targets, temperature=0.7, return_entropy=True)
    (log_probs.sum() + 0.5 * entropy.sum()).backward()
    for rank in ranks:
        for ours, expected in zip(rank["verl"], (log_probs, entropy, e.grad), strict=True):
            assert rel_error(ours, expected.detach()) <= AGREEMENT[torch.float32]


def _shifted_out_loss(rank: int, vp: VocabParallel) -> torch.Tensor | str:
    """The loss of targets that differ between ranks only where shift=1 drops them (or the
    error raised)."""
    e, c, targets, _ = Case({}).inputs()
    targets[0] = rank
    try:
        return linear_cross_entropy(e, c[vp.start : vp.stop], targets, shift=1, vocab_parallel=vp)
    except ValueError as error:
        return str(error)


def _worker(rank: int, world: int, out_dir: str) -> None:
    """One rank: every case on its shard, the error calls, the bytes sent; saved to out_dir."""
    os.environ[BLOCK_MB_ENV] = "0.01"  # as conftest's small_blocks: cross block boundaries
    join_gloo_group(rank, world, out_dir, TIMEOUT_S)
    try:
        vp = VocabParallel(*SHARDS[world][rank])
        # Errors first: the cases after them show that a failed call leaves the group usable.
        results = {
            "errors": {name: _outcome(call) for name, call in _error_calls(rank, world, vp).items()}
        }
        even = VocabParallel.from_vocab(VOCAB)
        for name, case in CASES.items():
            shard = even if case.from_vocab else vp
            e, c, targets, bias = case.inputs()
            rows = slice(shard.start, shard.stop)
            inputs = (e, c[rows], targets, None if bias is None else bias[rows])
            if case.module:
                loss = LinearCrossEntropyLoss(vocab_parallel=shard, **case.options)
                outs, grads = outputs_and_grads(loss, inputs, GRAD_SEED)
            else:
                loss = functools.partial(case.function, vocab_parallel=shard)
                outs, grads = outputs_and_grads(loss, inputs, GRAD_SEED, **case.options)
            results[name] = ((shard.start, shard.stop), outs, grads)
        results["bytes"] = _communicated_bytes(vp)
        results["verl"] = _verl_call(even)
        results["distillation"] = _distillation_calls(vp)
        results["shard"] = (vp.start, vp.stop)
        results["shifted_out"] = _shifted_out_loss(rank, vp)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=sorted(SHARDS), ids=lambda world: f"world{world}")
def ranks(request, tmp_path_factory) -> list[dict]:
    """Every rank's results, from one spawn of that many gloo processes."""
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"world{world}")
    context = start_processes(_worker, args=(world, str(out_dir)), nprocs=world, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world} ranks did not finish within {TIMEOUT_S} s: a collective hung")
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world)]


@functools.cache
def _one_process(name: str):
    """A case's outputs and gradients computed by one process (shared by the world sizes)."""
    case = CASES[name]
    return outputs_and_grads(case.function, case.inputs(), GRAD_SEED, **case.options)


@pytest.mark.parametrize("name", list(CASES))
def test_every_rank_matches_one_process(ranks, name):
    """Loss, lse and grad_e on every rank, and the grad_c / grad_bias shards put together."""
    case = CASES[name]
    single_outs, single_grads = _one_process(name)
    results = [rank[name] for rank in ranks]
    by_start = sorted(results, key=lambda result: result[0])
    grad_e = results[0][2][0]
    shard_grads = [torch.cat([r[2][i] for r in by_start]) for i in range(1, len(single_grads))]
    ours = (results[0][1], [grad_e, *shard_grads])
    reference = getattr(logitless.reference, f"reference_{case.function.__name__}")
    check_results(ours, case.inputs(), grad_seed=GRAD_SEED, reference=reference, **case.options)
    out_names = ["loss", "lse"][: len(single_outs)]
    names = out_names + ["grad_e", "grad_c", "grad_bias"][: len(single_grads)]
    for what, x, expected in zip(names, ours[0] + ours[1], single_outs + single_grads, strict=True):
        assert x.shape == expected.shape and x.dtype == expected.dtype, what
        error = rel_error(x, expected)
        assert error <= AGREEMENT[case.dtype], f"{what}: {error:.3g} from one process"
    for rank, (_, outs, grads) in enumerate(results[1:], start=1):
        for what, x, first in zip(
            [*out_names, "grad_e"], [*outs, grads[0]], [*ours[0], grad_e], strict=True
        ):
            assert torch.equal(x, first), f"rank {rank}'s {what} differs from rank 0's"


@pytest.mark.parametrize("name", list(EXPECTED_ERRORS))
def test_bad_arguments_raise_on_every_rank(ranks, name):
    culprit, culprit_error, others_error = EXPECTED_ERRORS[name]
    culprit = None if culprit is None else range(len(ranks))[culprit]
    for rank, results in enumerate(ranks):
        outcome = results["errors"][name]
        expected_type, pattern = culprit_error if rank == culprit else others_error
        assert outcome is not None, f"rank {rank} did not raise"
        assert outcome[0] == expected_type, f"rank {rank}: {outcome}"
        assert re.search(pattern, outcome[1]), f"rank {rank}: {outcome}"


def test_targets_a_shift_drops_may_differ_between_ranks(ranks):
    """They predict nothing: not range-checked, and not compared between ranks either (every
    rank refused the call as holding different targets)."""
    e, c, targets, _ = Case({}).inputs()
    expected = linear_cross_entropy(e, c, targets, shift=1)
    for rank in ranks:
        assert isinstance(rank["shifted_out"], torch.Tensor), rank["shifted_out"]
        assert rel_error(rank["shifted_out"], expected) <= AGREEMENT[torch.float32]


def test_communication_is_linear_in_rows_not_in_vocabulary(ranks):
    """For the N rows with a target (ignored rows are dropped first): 4N (max) + 12N (sums, with
    smoothing) + 88 (agreement) forward, 4ND (grad_e) backward."""
    rows = int((Case({}).inputs()[2] != -100).sum())
    assert rows < ROWS
    for forward, backward in (rank["bytes"] for rank in ranks):
        assert forward == 88 + 4 * rows + 12 * rows
        assert backward == 4 * rows * DIM


def test_needs_an_initialized_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        VocabParallel(0, VOCAB)


def test_vocab_parallel_must_be_a_vocab_parallel():
    e, c, targets, _ = Case({}).inputs()
    with pytest.raises(TypeError, match=r"vocab_parallel must be a logitless\.VocabParallel"):
        linear_cross_entropy(e, c, targets, vocab_parallel=(0, VOCAB))


def test_each_shard_gets_its_share_of_the_filtering_budget():
    """A token may lose filter_eps of softmax mass in all, not filter_eps on every rank."""
    shard = object.__new__(VocabParallel)  # its fields only: no process group needed here
    shard.start, shard.stop, shard.vocab_size = 300, VOCAB, VOCAB
    options = LossOptions(filter_eps=2.0**-10, vocab_parallel=shard)
    share = functional._filter_eps(options, VOCAB - 300)
    assert share == 2.0**-10 * (VOCAB - 300) / VOCAB
    assert functional._filter_eps(LossOptions(filter_eps=2.0**-10), 300) == 2.0**-10


def test_a_deep_copy_of_a_module_shares_its_shard():
    """copy.deepcopy(model) (a reference or EMA model) of a model whose loss module holds a
    shard: its process group can be neither copied nor pickled (TypeError before)."""
    shard = object.__new__(VocabParallel)
    shard.start, shard.stop, shard.vocab_size = 0, VOCAB, VOCAB
    shard.group = threading.Lock()  # as uncopyable as a ProcessGroup
    module = LinearCrossEntropyLoss(vocab_parallel=shard)
    assert copy.deepcopy(module).vocab_parallel is shard


def test_token_checksums_tell_apart_changes_that_cancel():
    """Identical hidden states with different targets on two ranks must not pass as the same
    tokens: a position-weighted sum of the targets took +2 at one position and -1 at the next
    for no change (the ranks then summed each other's target logits)."""
    targets = torch.tensor([10, 20, 30, 40, 50, 5])
    assert _checksum(targets) == _checksum(targets.clone())
    assert _checksum(targets) != _checksum(torch.tensor([12, 19, 30, 40, 50, 5]))
    e = torch.randn(6, 4)
    assert _row_checksum(e) == _row_checksum(e.clone()) != _row_checksum(e.flip(0))
