"""DTensor classifiers, FSDP2 and tensor parallelism: gloo ranks on the CPU against one process.

Each world size is one spawn (as in test_distributed.py): every rank computes every case and
saves its results; the tests compare them with one process. A classifier sharded by rows is
vocabulary parallel over its mesh dimension: with the same tokens on every rank (tensor
parallel) each rank gets the one-process loss and gradients; with different tokens (data
parallel, FSDP) each rank gets its own tokens' loss and grad_e, and the classifier gets the
average over the ranks of their gradients, as FSDP reduces every other parameter's.
"""

from __future__ import annotations

import functools
import os
import re
import time
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.multiprocessing import start_processes

from helpers import check_results, join_gloo_group, make_inputs, outputs_and_grads, rel_error
from logitless import (
    VocabParallel,
    linear_cross_entropy,
    linear_distillation_loss,
    linear_log_probs,
)
from logitless.backends.torch_backend import BLOCK_MB_ENV

DIM, VOCAB = 37, 1031
"""V is a multiple of neither 2 nor 3: the shards are uneven."""
TIMEOUT_S = 90
AGREEMENT = 2e-6
"""Allowed relative difference from one process in float32 (summation order)."""
SAME_TOKENS = {
    "mean": ((45,), {}),
    "smoothing-softcap-lse": ((45,), {"label_smoothing": 0.1, "softcap": 4.0, "return_lse": True}),
    "shift-none-zloss": ((3, 11), {"shift": 1, "reduction": "none", "z_loss": 1e-3}),
}
PLACEMENTS = {"Shard(0)": Shard(0), "Replicate()": Replicate()}
DATA_PARALLEL = {
    "mean": {},
    "smoothing-none-lse": {"label_smoothing": 0.1, "reduction": "none", "return_lse": True},
}
LOG_PROBS = {"temperature": 0.7, "return_entropy": True, "softcap": 4.0}


def _rank_inputs(rank: int):
    """This rank's own tokens (a different count per rank) and the shared classifier."""
    e, _, targets, _ = make_inputs(
        (40 - 3 * rank,), DIM, VOCAB, ignore_fraction=0.2, seed=50 + rank
    )
    _, c, _, bias = make_inputs((1,), DIM, VOCAB, bias=True, seed=3)
    return e, c, targets, bias


def _distributed_call(inputs, placement, mesh, options, function=linear_cross_entropy):
    """Outputs and gradients with c and bias distributed as `placement`; the gradients of c
    and bias are checked to come back with that placement, then gathered."""
    e, c, targets, bias = inputs
    c, bias = (distribute_tensor(x, mesh, [placement]) for x in (c, bias))
    outs, grads = outputs_and_grads(function, (e, c, targets, bias), 1, **options)
    for grad in grads[1:]:
        assert isinstance(grad, DTensor) and grad.placements == (placement,), grad
    return outs, [grads[0], *(g.full_tensor() for g in grads[1:])]


DISTILLATION = {"divergence": "forward_kl", "temperature": 1.3, "hard_weight": 0.3}


def _distillation(e, c, targets, bias, **options):
    """A distillation loss whose teacher (hidden size 2 D) has its classifier laid out as c's
    and its hidden states made from e's rows (the same rows of every rank's tokens)."""
    teacher_e = torch.cat([e.detach(), e.detach().flip(-1)], dim=-1) * 1.5
    _, teacher_c, _, teacher_bias = make_inputs((1,), 2 * DIM, VOCAB, bias=True, seed=5)
    if isinstance(c, DTensor):
        teacher_c, teacher_bias = (
            distribute_tensor(x, c.device_mesh, c.placements) for x in (teacher_c, teacher_bias)
        )
    return linear_distillation_loss(
        e, c, teacher_e, teacher_c, targets, bias, teacher_bias, **options
    )


SHARDED_CALLS = {
    "log_probs": (linear_log_probs, LOG_PROBS),
    "distillation": (_distillation, DISTILLATION),
}
"""Per-token functions whose classifier the ranks shard: (function, options)."""


def _errors(rank: int, mesh):
    e, c, targets, bias = make_inputs((9,), DIM, VOCAB, bias=True, seed=3)
    shard = functools.partial(distribute_tensor, device_mesh=mesh, placements=[Shard(0)])
    replicate = functools.partial(distribute_tensor, device_mesh=mesh, placements=[Replicate()])
    out_of_range = targets.clone()
    out_of_range[2] = VOCAB + rank  # every rank's own error, raised on all of them
    calls = {
        "c Shard(1)": lambda: linear_cross_entropy(
            e, distribute_tensor(c, mesh, [Shard(1)]), targets
        ),
        "e sharded": lambda: linear_cross_entropy(shard(e), replicate(c), targets),
        "bias replicated, c sharded": lambda: linear_cross_entropy(
            e, shard(c), targets, replicate(bias)
        ),
        "target out of range": lambda: linear_cross_entropy(e, shard(c), out_of_range),
        "vocab_parallel too": lambda: linear_cross_entropy(
            e, shard(c), targets, vocab_parallel=VocabParallel.from_vocab(VOCAB)
        ),
        "teacher sharded, c not": lambda: linear_distillation_loss(e, c, e, shard(c), targets),
    }
    outcomes = {}
    for name, call in calls.items():
        try:
            call()
            outcomes[name] = None
        except Exception as error:
            outcomes[name] = (type(error).__name__, str(error))
    return outcomes


def _bytes(inputs, mesh, **options) -> tuple[int, int]:
    """Bytes this rank sends into collectives for one loss: forward, backward."""
    e, c, targets, _ = (x.detach() if x is not None else None for x in inputs)
    e.requires_grad_()
    c = distribute_tensor(c, mesh, [Shard(0)]).requires_grad_()

    def sent() -> int:
        calls = all_reduce.call_args_list + all_gather.call_args_list
        return sum(
            sum(t.numel() * t.element_size() for t in (a if isinstance(a, list) else [a]))
            for call in calls
            for a in call.args[-1:]
        )

    with (
        mock.patch.object(dist, "all_reduce", wraps=dist.all_reduce) as all_reduce,
        mock.patch.object(dist, "all_gather", wraps=dist.all_gather) as all_gather,
    ):
        loss = linear_cross_entropy(e, c, targets, **options)
        forward = sent()
        loss.backward()
        return forward, sent() - forward


def _worker(rank: int, world: int, out_dir: str) -> None:
    os.environ[BLOCK_MB_ENV] = "0.01"
    join_gloo_group(rank, world, out_dir, TIMEOUT_S)
    try:
        mesh = init_device_mesh("cpu", (world,))
        results = {"errors": _errors(rank, mesh)}
        for name, (lead, options) in SAME_TOKENS.items():
            inputs = make_inputs(lead, DIM, VOCAB, bias=True, ignore_fraction=0.2, seed=3)
            for key, placement in PLACEMENTS.items():
                results[name, key] = _distributed_call(inputs, placement, mesh, options)
        for name, options in DATA_PARALLEL.items():
            results["dp", name] = _distributed_call(_rank_inputs(rank), Shard(0), mesh, options)
        same = make_inputs((45,), DIM, VOCAB, bias=True, ignore_fraction=0.2, seed=3)
        for name, (function, options) in SHARDED_CALLS.items():
            results[name] = _distributed_call(same, Shard(0), mesh, options, function)
            dp = _distributed_call(_rank_inputs(rank), Shard(0), mesh, options, function)
            results[name, "dp"] = dp
        same = make_inputs((45,), DIM, VOCAB, seed=3)
        results["bytes"] = {
            "same tokens": _bytes(same, mesh),
            "data parallel": _bytes(_rank_inputs(rank), mesh),
        }
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(worker, world: int, out_dir) -> list[dict]:
    """Every rank's saved results, from one spawn of `world` gloo processes."""
    context = start_processes(worker, args=(world, str(out_dir)), nprocs=world, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{world} ranks did not finish within {TIMEOUT_S} s: a collective hung")
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world)]


@pytest.fixture(scope="module", params=[2, 3], ids=lambda world: f"world{world}")
def ranks(request, tmp_path_factory) -> list[dict]:
    return spawn(_worker, request.param, tmp_path_factory.mktemp(f"world{request.param}"))


def _assert_agrees(ours, expected, what: str) -> None:
    for i, (x, y) in enumerate(zip(ours[0] + ours[1], expected[0] + expected[1], strict=True)):
        assert x.shape == y.shape and x.dtype == y.dtype, (what, i)
        error = rel_error(x, y)
        assert error <= AGREEMENT, f"{what}, output {i}: {error:.3g} from one process"


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("name", list(SAME_TOKENS))
def test_same_tokens_on_every_rank_match_one_process(ranks, name, placement):
    lead, options = SAME_TOKENS[name]
    inputs = make_inputs(lead, DIM, VOCAB, bias=True, ignore_fraction=0.2, seed=3)
    expected = outputs_and_grads(linear_cross_entropy, inputs, 1, **options)
    for rank, results in enumerate(ranks):
        ours = results[name, placement]
        _assert_agrees(ours, expected, f"rank {rank}")
        check_results(ours, inputs, grad_seed=1, **options)


@pytest.mark.parametrize("name", list(DATA_PARALLEL))
def test_different_tokens_per_rank_average_the_classifier_gradient(ranks, name):
    """Each rank: its own tokens' loss and grad_e; c and bias: the mean of the ranks' grads."""
    options = DATA_PARALLEL[name]
    singles = [
        outputs_and_grads(linear_cross_entropy, _rank_inputs(rank), 1, **options)
        for rank in range(len(ranks))
    ]
    mean_grads = [sum(single[1][i] for single in singles) / len(ranks) for i in (1, 2)]
    for rank, results in enumerate(ranks):
        outs, grads = singles[rank]
        _assert_agrees(results["dp", name], (outs, [grads[0], *mean_grads]), f"rank {rank}")


@pytest.mark.parametrize("name", ["log_probs", "distillation"])
def test_per_token_functions_of_a_sharded_classifier(ranks, name):
    """Log-probs with entropy, and distillation (both classifiers sharded by rows). Same
    tokens: one process's values and gradients; different tokens: each rank's own values and
    grad_e, and the mean of the ranks' classifier gradients."""
    function, options = SHARDED_CALLS[name]
    same = make_inputs((45,), DIM, VOCAB, bias=True, ignore_fraction=0.2, seed=3)
    expected = outputs_and_grads(function, same, 1, **options)
    singles = [
        outputs_and_grads(function, _rank_inputs(rank), 1, **options) for rank in range(len(ranks))
    ]
    mean_grads = [sum(single[1][i] for single in singles) / len(ranks) for i in (1, 2)]
    for rank, results in enumerate(ranks):
        _assert_agrees(results[name], expected, f"rank {rank}")
        outs, grads = singles[rank]
        _assert_agrees(results[name, "dp"], (outs, [grads[0], *mean_grads]), f"rank {rank}")


def test_bad_layouts_raise_on_every_rank(ranks):
    expected = {
        "c Shard(1)": r"c must be a DTensor replicated, or sharded by rows \(Shard\(0\)\)",
        "e sharded": "e must be a local tensor or a replicated DTensor",
        "bias replicated, c sharded": "bias must be a DTensor on c's mesh with c's placements",
        "target out of range": r"targets must lie in \[0, 1031\)",
        "vocab_parallel too": "vocab_parallel must be None when c is a DTensor",
        "teacher sharded, c not": r"teacher_c must be laid out as c \(the same vocabulary rows",
    }
    for rank, results in enumerate(ranks):
        for name, pattern in expected.items():
            outcome = results["errors"][name]
            assert outcome is not None and outcome[0] == "ValueError", (rank, name, outcome)
            assert re.search(pattern, outcome[1]), (rank, name, outcome)


def test_communication(ranks):
    """Same tokens: the vocabulary-parallel bytes with an 11-integer agreement (88 B) and no
    gathering. Different tokens: also the gathered rows and targets forward, the summed
    coefficients and the all-reduce of every rank's grad_e rows backward."""
    world = len(ranks)
    rows, padded = 45, 40
    for results in ranks:
        same, data_parallel = results["bytes"]["same tokens"], results["bytes"]["data parallel"]
        assert same == (88 + 4 * rows + 8 * rows, 4 * rows * DIM)
        gathered = world * padded  # rows of every rank, each rank's padded to the longest
        forward = 88 + padded * (4 * DIM + 8) + 12 * gathered  # + own rows and targets sent
        assert data_parallel == (forward, 8 * gathered + 4 * gathered * DIM)


def _hybrid_worker(rank: int, world: int, out_dir: str) -> None:
    """A classifier as HSDP lays it out, replicated over the first dimension of a (2, 2) mesh
    and sharded by rows over the second, and a replicated one over the whole mesh (DDP's
    layout); each rank its own tokens."""
    os.environ[BLOCK_MB_ENV] = "0.01"
    join_gloo_group(rank, world, out_dir, TIMEOUT_S)
    try:
        mesh = init_device_mesh("cpu", (2, world // 2))
        inputs = _rank_inputs(rank)
        results = {}
        for name, placements in (("hsdp", [Replicate(), Shard(0)]), ("ddp", [Replicate()] * 2)):
            e, c, targets, bias = inputs
            c, bias = (distribute_tensor(x, mesh, placements) for x in (c, bias))
            outs, grads = outputs_and_grads(linear_cross_entropy, (e, c, targets, bias), 1)
            results[name] = outs, [grads[0], *(g.full_tensor() for g in grads[1:])]
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_replicated_mesh_dimensions_average_the_classifier_gradient(tmp_path):
    """Under HSDP (and DDP's layout) the classifier's gradient is the mean over every rank's
    tokens, not over its shard group's only (before: each replica kept its own group's mean,
    so replicas drifted apart after a step)."""
    world = 4
    ranks = spawn(_hybrid_worker, world, tmp_path)
    singles = [outputs_and_grads(linear_cross_entropy, _rank_inputs(r), 1) for r in range(world)]
    mean_grads = [sum(single[1][i] for single in singles) / world for i in (1, 2)]
    for rank, results in enumerate(ranks):
        outs, grads = singles[rank]
        for name in ("hsdp", "ddp"):
            _assert_agrees(results[name], (outs, [grads[0], *mean_grads]), f"{name} rank {rank}")


def _tiny_llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def _batch(rank: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(70 + rank))


def _step(model, ids: torch.Tensor) -> torch.Tensor:
    """One training step's loss through logitless: decoder hidden states and the head weight."""
    hidden = model.model(ids).last_hidden_state
    return linear_cross_entropy(hidden, model.lm_head.weight, ids, shift=1)


def _model_worker(rank: int, world: int, out_dir: str) -> None:
    """FSDP2 (every layer, the decoder, the lm_head on its own, the model; each rank its own
    batch) and tensor parallelism (a colwise lm_head; the same batch): one SGD step each."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    join_gloo_group(rank, world, out_dir, TIMEOUT_S)
    try:
        mesh = init_device_mesh("cpu", (world,))
        results = {}
        fsdp = _tiny_llama()
        for layer in fsdp.model.layers:
            fully_shard(layer, mesh=mesh)
        for module in (fsdp.model, fsdp.lm_head, fsdp):
            fully_shard(module, mesh=mesh)
        tp = parallelize_module(_tiny_llama(), mesh, {"lm_head": ColwiseParallel()})
        for name, model, ids in (("fsdp", fsdp, _batch(rank)), ("tp", tp, _batch(0))):
            optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
            loss = _step(model, ids)
            loss.backward()
            optimizer.step()
            params = {
                key: p.full_tensor() if isinstance(p, DTensor) else p.detach()
                for key, p in model.named_parameters()
            }
            results[name] = (loss.detach(), params)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _unsharded_step(batches: list[torch.Tensor]):
    """One process: the step on the mean of the batches' losses, as data parallelism means."""
    model = _tiny_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = [_step(model, ids) for ids in batches]
    (sum(losses) / len(losses)).backward()
    optimizer.step()
    return [loss.detach() for loss in losses], dict(model.named_parameters())


def test_fsdp2_and_tensor_parallel_steps_equal_the_unsharded_step(tmp_path):
    """Losses and every parameter after the step (the lm_head's included) equal one process."""
    world = 2
    ranks = spawn(_model_worker, world, tmp_path)
    fsdp_losses, fsdp_params = _unsharded_step([_batch(rank) for rank in range(world)])
    tp_losses, tp_params = _unsharded_step([_batch(0)])
    for name, losses, expected in (
        ("fsdp", fsdp_losses, fsdp_params),
        ("tp", tp_losses * world, tp_params),
    ):
        for rank in range(world):
            loss, params = ranks[rank][name]
            assert rel_error(loss, losses[rank]) < AGREEMENT, (name, rank)
            for key, value in params.items():
                error = rel_error(value, expected[key])
                assert error < 1e-5, f"{name} rank {rank} {key}: {error:.3g}"
