"""The portable backend against the float64 reference, for every option and dtype."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import (
    DTYPES,
    check_against_reference,
    device_for,
    gpu,
    make_inputs,
    outputs_and_grads,
    rel_error,
)
from logitless import LinearCrossEntropyLoss, linear_cross_entropy, linear_log_probs
from logitless.backends import get_backend, torch_backend
from logitless.reference import reference_linear_cross_entropy

OPTION_SETS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"return_lse": True},
    {"reduction": "none", "return_lse": True},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-2},
    {"softcap": 3.0},
    {"softcap": 2.5, "label_smoothing": 0.2, "z_loss": 1e-3},
    {"softcap": 5.0, "label_smoothing": 0.05, "reduction": "none", "return_lse": True},
    {"filter_eps": 2.0**-10},
    {"ignore_index": 7},
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTION_SETS, ids=repr)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_options_and_dtypes(dtype, options, bias):
    ignore_index = options.get("ignore_index", -100)
    inputs = make_inputs(
        (45,), 37, 1031, dtype, bias=bias, ignore_fraction=0.2, ignore_index=ignore_index, seed=3
    )
    check_against_reference(inputs, **options)


@pytest.mark.parametrize("shift", [0, 1, 3])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_shift_on_batched_sequences(shift, reduction):
    inputs = make_inputs((3, 11), 24, 513, ignore_fraction=0.1, seed=5)
    check_against_reference(inputs, shift=shift, reduction=reduction, return_lse=True)
    check_against_reference(inputs, shift=shift, reduction=reduction, label_smoothing=0.1)


def test_per_token_outputs_of_shifted_sequences_are_contiguous():
    """reduction="none", return_lse and log-probs with a shift come back contiguous, as eager's
    (a view of the unshifted shape could not be flattened with .view)."""
    e, c, targets, _ = make_inputs((2, 6), 8, 50, ignore_fraction=0.3, seed=2)
    losses, lse = linear_cross_entropy(e, c, targets, shift=1, reduction="none", return_lse=True)
    log_probs = linear_log_probs(e, c, targets, shift=1)
    for values in (losses, lse, log_probs):
        assert values.shape == (2, 5) and values.view(-1).shape == (10,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs(dtype):
    e, c, targets, bias = make_inputs((7, 13), 40, 301, dtype, bias=True, seed=9)
    e_t = e.transpose(0, 1)  # (13, 7, D) view
    c_strided = torch.randn(301, 80, dtype=dtype)[:, ::2].copy_(c)
    check_against_reference((e_t, c_strided, targets.T, bias), shift=2)
    c_columns = c.T.contiguous().T  # a classifier stored (D, V), as a transposed weight is
    check_against_reference((e, c_columns, targets, bias))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32], ids=str)
def test_targets_of_any_integer_dtype(dtype):
    """Targets are not compared with V or ignore_index in their own dtype, where those wrap
    around: a uint8 class 156 is not -100, int8 targets are not all at least V = 200."""
    e, c, targets, bias = make_inputs((9,), 16, 200, bias=True, seed=3)
    targets = targets.clamp(max=torch.iinfo(dtype).max)
    targets[0] = 156 if dtype == torch.uint8 else -100
    narrow = targets.to(dtype)
    ours = linear_cross_entropy(e, c, narrow, bias, reduction="none")
    assert torch.equal(ours, linear_cross_entropy(e, c, narrow.long(), bias, reduction="none"))
    assert (ours[0] > 0) == (dtype == torch.uint8)


def test_unbatched_single_token():
    e, c, targets, bias = make_inputs((), 16, 97, bias=True, seed=2)
    check_against_reference((e, c, targets, bias), reduction="none", return_lse=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero_loss_and_zero_gradients(reduction, dtype):
    e, c, targets, _ = make_inputs((9,), 12, 77, dtype, seed=4)
    targets.fill_(-100)
    e.requires_grad_()
    c.requires_grad_()
    loss = linear_cross_entropy(e, c, targets, reduction=reduction)
    assert torch.equal(loss, torch.zeros_like(loss))
    loss.sum().backward()
    assert torch.equal(e.grad, torch.zeros_like(e))
    assert torch.equal(c.grad, torch.zeros_like(c))


def test_empty_batch():
    e, c, _, _ = make_inputs((0,), 8, 33)
    loss = linear_cross_entropy(e, c, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0


def test_module_matches_function():
    inputs = make_inputs((2, 9), 16, 211, bias=True, seed=6)
    options = {"shift": 1, "softcap": 4.0, "z_loss": 1e-3, "label_smoothing": 0.1}
    module = LinearCrossEntropyLoss(**options)
    assert "shift=1" in repr(module)
    torch.testing.assert_close(module(*inputs), linear_cross_entropy(*inputs, **options))


def test_module_options_are_attributes_as_in_torch():
    """As torch.nn.CrossEntropyLoss's: the options read as attributes, and one set is checked
    and used from the next call (an attribute set before was silently ignored)."""
    inputs = make_inputs((2, 9), 16, 211, bias=True, seed=6)
    module, torch_module = LinearCrossEntropyLoss(), torch.nn.CrossEntropyLoss()
    for name in ("ignore_index", "reduction", "label_smoothing"):
        assert getattr(module, name) == getattr(torch_module, name)
    module.reduction, module.label_smoothing = "none", 0.1
    expected = linear_cross_entropy(*inputs, reduction="none", label_smoothing=0.1)
    torch.testing.assert_close(module(*inputs), expected)
    assert "reduction='none'" in repr(module)
    with pytest.raises(ValueError, match="reduction"):
        module.reduction = "avg"
    assert module.reduction == "none"


def test_frozen_classifier_and_int32_targets():
    e, c, targets, _ = make_inputs((31,), 20, 257, seed=8)
    e.requires_grad_()
    loss = linear_cross_entropy(e, c, targets.int())
    loss.backward()
    e_ref = e.detach().double().requires_grad_()
    reference_linear_cross_entropy(e_ref, c, targets).backward()
    torch.testing.assert_close(e.grad, e_ref.grad.float(), rtol=1e-5, atol=1e-7)


def test_gradient_filtering_skips_work_but_keeps_accuracy():
    """bf16 filtering on a peaked softmax: few tiles survive, the result still passes."""
    e, c, targets, _ = make_inputs((64,), 32, 4099, torch.bfloat16, scale=6.0, seed=11)
    check_against_reference((e, c, targets, None), filter_eps=2.0**-10)


def test_explicit_filter_threshold_bounds_the_error():
    """A float32 run with a coarse explicit threshold stays within that threshold's reach."""
    inputs = make_inputs((40,), 24, 2051, bias=True, scale=4.0, seed=13)
    exact = outputs_and_grads(linear_cross_entropy, inputs, 0, filter_eps=None)[1]
    filtered = outputs_and_grads(linear_cross_entropy, inputs, 0, filter_eps=2.0**-10)[1]
    for x, ref in zip(filtered, exact, strict=True):
        assert 0 < rel_error(x, ref) < 2.0**-6


def test_backward_twice_on_fused_path_is_a_clear_error():
    e, c, targets, _ = make_inputs((5,), 8, 50)
    e.requires_grad_(), c.requires_grad_()
    loss = linear_cross_entropy(e, c, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="logitless: a second backward"):
        loss.backward()
    loss = linear_cross_entropy(e, c, targets)
    torch.autograd.grad(loss, e, retain_graph=True)
    with pytest.raises(RuntimeError, match="reduction='none'"):
        torch.autograd.grad(loss, c)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_fused_and_recomputing_paths_agree(reduction):
    """Gradients computed in the forward pass equal those of the recomputing backward."""
    inputs = make_inputs((33,), 17, 300, bias=True, seed=12)

    def recomputing(*args, **options):
        return linear_cross_entropy(*args, return_lse=True, **options)[0]

    fused = outputs_and_grads(linear_cross_entropy, inputs, 0, reduction=reduction)
    recomputed = outputs_and_grads(recomputing, inputs, 0, reduction=reduction)
    for ours, theirs in zip(fused[0] + fused[1], recomputed[0] + recomputed[1], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit_logits_keep_the_float32_accumulator(monkeypatch, dtype):
    """Each logit of 16-bit operands multiplied in float32 (every device but a CPU with bf16 dot
    products) is their float32 dot product, not rounded to 16 bits as eager's matmul output is:
    lse and loss (fused and recomputing paths) are within float32 rounding of the float64
    result of the same 16-bit operands, as the Triton kernels are."""
    monkeypatch.setattr(torch_backend, "_CPU_HAS_BF16_DOTS", False)
    e, c, targets, _ = make_inputs((37,), 64, 301, dtype, scale=8.0, seed=5)
    exact_logits = e.double() @ c.double().T
    exact_lse = torch.logsumexp(exact_logits, 1)
    exact_loss = torch.nn.functional.cross_entropy(exact_logits, targets)
    _, lse = linear_cross_entropy(e, c, targets, reduction="none", return_lse=True, impl="torch")
    loss = linear_cross_entropy(e, c, targets, impl="torch")
    assert rel_error(lse, exact_lse) <= 1e-6
    assert rel_error(loss, exact_loss) <= 1e-5
    eager_lse = torch.logsumexp((e @ c.T).double(), 1)
    assert rel_error(eager_lse, exact_lse) > 1e-5  # what tells the two apart at this shape


def test_native_bf16_matmuls_round_as_eager_and_meet_the_criterion(monkeypatch):
    """On a CPU with bf16 dot products the tiles' matmuls run in bf16: the lse is as far from
    float64 as eager's (its logits rounded to bf16), not further; loss and gradients meet the
    criterion, fused and recomputing."""
    monkeypatch.setattr(torch_backend, "_CPU_HAS_BF16_DOTS", True)
    inputs = make_inputs((37,), 64, 301, torch.bfloat16, scale=8.0, seed=5)
    e, c, targets, _ = inputs
    exact_lse = torch.logsumexp(e.double() @ c.double().T, 1)
    eager_lse = torch.logsumexp((e @ c.T).double(), 1)
    _, lse = linear_cross_entropy(e, c, targets, reduction="none", return_lse=True, impl="torch")
    assert 1e-5 < rel_error(lse, exact_lse) <= 2 * rel_error(eager_lse, exact_lse)
    for options in ({}, {"reduction": "none", "return_lse": True}):
        check_against_reference(inputs, **options)


TILE_OPTION_SETS = [
    {},
    {"reduction": "none", "return_lse": True},
    {"softcap": 3.0, "label_smoothing": 0.1, "z_loss": 1e-3},
    {"filter_eps": None, "reduction": "sum"},
]


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of the 16-bit schedule of 24 rows and a few dozen columns (a ragged grid), with the
    row-block sweep made to fail, so that a test sees the tiles run and only them."""
    monkeypatch.setattr(torch_backend, "TILE_ROWS", {"cpu": 24})
    monkeypatch.setenv(torch_backend.BLOCK_MB_ENV, "0.05")

    def no_sweep(*args, **kwargs):
        raise AssertionError("the row-block sweep ran")

    monkeypatch.setattr(torch_backend, "_sweep", no_sweep)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("options", TILE_OPTION_SETS, ids=repr)
def test_16_bit_tiles_of_rows_and_vocabulary(small_tiles, bf16_matmul, dtype, options):
    """16-bit cross-entropy runs over (row tile, vocabulary chunk) tiles, grad_c rounded once
    per chunk: the criterion holds across tile edges, with a chunk masked out by -inf bias."""
    e, c, targets, bias = make_inputs(
        (70,), 33, 1031, dtype, bias=True, ignore_fraction=0.2, seed=21
    )
    if "label_smoothing" not in options:  # smoothing averages every logit: none may be -inf
        bias[100:200] = float("-inf")
        targets[(targets >= 100) & (targets < 200)] = 3
    check_against_reference((e, c, targets, bias), **options)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("options", TILE_OPTION_SETS, ids=repr)
def test_16_bit_tiles_on_cuda(monkeypatch, dtype, options):
    """The 16-bit tiles on a GPU, where a tile takes every row (up to 8192): several dozen
    vocabulary chunks at a 16 MiB block budget."""
    monkeypatch.setenv(torch_backend.BLOCK_MB_ENV, "16")
    inputs = make_inputs(
        (1027,), 333, 20011, dtype, bias=True, ignore_fraction=0.1, seed=4, device="cuda"
    )
    check_against_reference(inputs, impl="torch", **options)


def test_16_bit_tiles_filter_whole_tiles(small_tiles, monkeypatch):
    """On a peaked bf16 softmax (each hidden state near its target's classifier row, as in a
    trained model), filtering skips most tiles' matmuls and keeps the criterion."""
    decisions = []
    negligible = torch_backend._negligible

    def counting(*args):
        decisions.append(negligible(*args))
        return decisions[-1]

    monkeypatch.setattr(torch_backend, "_negligible", counting)
    e, c, targets, _ = make_inputs((64,), 32, 4099, seed=11)
    e = e + 64 / 32**0.5 * c[targets]
    check_against_reference((e.bfloat16(), c.bfloat16(), targets, None), filter_eps=2.0**-10)
    assert sum(decisions) > len(decisions) / 2


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("ignored", [0.0, 0.5, 1.0])
def test_rows_without_target_never_reach_the_backend(monkeypatch, ignored, impl):
    """Ignored and shifted-out rows are dropped before any kernel; per-token outputs keep their
    full shape. (Triton runs on the interpreter without CUDA.)"""
    inputs = make_inputs(
        (3, 17), 29, 301, torch.float32, bias=True, ignore_fraction=ignored,
        device=device_for(impl),
    )  # fmt: skip
    backend = get_backend(impl)
    stats, rows_seen = backend.stats, []

    def counting_stats(e, *args, **kwargs):
        rows_seen.append(e.shape[0])
        return stats(e, *args, **kwargs)

    monkeypatch.setattr(backend, "stats", counting_stats)
    check_against_reference(inputs, impl=impl, reduction="none", return_lse=True, shift=1)
    with_target = int((inputs[2][..., 1:] != -100).sum())
    assert rows_seen and set(rows_seen) == {with_target}


class HostReads(TorchDispatchMode):
    """Records the ops that read a tensor's values on the host (synchronizations with a GPU);
    `tolist`, the target check's one read, reads without an op and is not seen."""

    READS = ("aten.nonzero", "aten._local_scalar_dense", "aten.masked_select")

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, op, types, args=(), kwargs=None):
        if str(op).startswith(self.READS):
            self.reads.append(str(op))
        return op(*args, **(kwargs or {}))


def test_dropping_rows_reads_nothing_beyond_the_target_check():
    """The count of rows with a target comes with the target check's host read: no read of its
    own (a second GPU synchronization per call before)."""
    e, c, targets, bias = make_inputs((3, 17), 29, 301, bias=True, ignore_fraction=0.5, seed=9)
    e.requires_grad_()
    with HostReads() as recorded:
        losses = linear_cross_entropy(e, c, targets, bias, shift=1, reduction="none")
        losses.sum().backward()
        linear_log_probs(e, c, targets, bias, shift=1, return_entropy=True)
    assert recorded.reads == []
    expected = reference_linear_cross_entropy(
        e.detach(), c, targets, bias, shift=1, reduction="none"
    )
    assert rel_error(losses, expected) < 1e-6


@gpu
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_a_cuda_call_synchronizes_once(impl):
    """One host synchronization per loss + backward on CUDA with half the rows ignored: the
    target check's, which also reads how many rows to keep."""
    e, c, targets, bias = make_inputs(
        (4, 129), 64, 1031, bias=True, ignore_fraction=0.5, device="cuda"
    )
    e.requires_grad_()
    c.requires_grad_()

    def call():
        linear_cross_entropy(e, c, targets, bias, shift=1, impl=impl).backward()

    call()  # compiles and autotunes the kernels
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs
