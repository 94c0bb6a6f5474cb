"""The Triton backend against the float64 reference: on the CPU through Triton's interpreter at
small shapes (conftest turns it on), on CUDA when present, and at model shapes on a GPU.

Small shapes are multiples of no block size: 37 rows, D=29, V=301 cross the interpreter's 32-row,
64-column and 16-dim blocks with partial tiles, forward splits of several tiles (one split
empty) and, with the backward's buffer bound shrunk below, several vocabulary chunks.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import logitless.reference
from helpers import (
    DTYPES,
    check_against_reference,
    gpu,
    make_inputs,
    outputs_and_grads,
    rel_error,
    run_python,
)
from logitless import linear_cross_entropy, linear_log_probs
from logitless._validation import triton_interpreter_on
from logitless.backends import Logits, triton_backend
from logitless.kernels import lse_backward, lse_forward
from logitless.kernels._tiles import (
    AUTOTUNE_TAKES_A_TIMER,
    COMPILE_OPTIONS,
    INTERPRETER_BLOCKS,
    TensorDescriptor,
    config_fits,
    dot_options,
    offsets,
    tensor_descriptors,
    time_candidate,
)
from logitless.reference import reference_linear_cross_entropy
from test_functional import OPTION_SETS

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


pytestmark = pytest.mark.skipif(
    not CUDA and not triton_interpreter_on(),
    reason="needs CUDA or TRITON_INTERPRET=1",
)

ROWS, DIM, VOCAB = 37, 29, 301
DEFAULT_BUFFER_BYTES = triton_backend.LOGIT_GRAD_BUFFER_BYTES
SPILL_BYTES_EVERY_OPTION = 128
SPILL_BYTES = {"smoothing": 256, "filtered": 256, "top_k_distillation": 256}
"""Bounds above SPILL_BYTES_EVERY_OPTION: label smoothing with class weights and softcap keeps the
weighted sum term in the backward's tile math, and its 128 x 128 bf16 tiles spill up to this
much; a filtered loss with bias and softcap spills 164 bytes in the 128 x 128 bf16 backward
tiles with Triton 3.6 (the H100 machine's), 28-40 with 3.9; the mass outside a cached teacher's
support (its mask and term) 200-208 bytes in the same tiles with 3.9. Rare combinations, in
tiles the autotuner times against others that spill nothing (128 x 256 among them)."""


@pytest.fixture(autouse=True)
def small_backward_buffer(monkeypatch):
    """A buffer of about 100 fp32 columns, so the backward sweeps several vocabulary chunks."""
    monkeypatch.setattr(triton_backend, "LOGIT_GRAD_BUFFER_BYTES", 100 * 4 * ROWS)


def inputs_for(dtype=torch.float32, **kwargs):
    kwargs = {"ignore_fraction": 0.2, "seed": 3, **kwargs}
    return make_inputs((ROWS,), DIM, VOCAB, dtype, device=DEVICE, **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTION_SETS, ids=repr)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_options_and_dtypes(dtype, options, bias):
    inputs = inputs_for(dtype, bias=bias, ignore_index=options.get("ignore_index", -100))
    check_against_reference(inputs, impl="triton", **options)


@pytest.mark.parametrize("shift", [1, 3])
def test_shift_on_batched_sequences(shift):
    inputs = make_inputs((2, 19), 24, 213, bias=True, ignore_fraction=0.1, seed=5, device=DEVICE)
    check_against_reference(inputs, impl="triton", shift=shift, reduction="none", return_lse=True)


def test_strided_inputs_are_read_in_place():
    """Column-strided e, column-major c: the kernels follow the strides."""
    e, c, targets, bias = inputs_for(bias=True, seed=9)
    e_strided = torch.zeros(ROWS, 2 * DIM, device=DEVICE)[:, ::2].copy_(e)
    c_column_major = c.T.contiguous().T
    assert e_strided.stride() == (2 * DIM, 2) and c_column_major.stride() == (1, VOCAB)
    check_against_reference((e_strided, c_column_major, targets, bias), impl="triton")


def test_sorted_vocabulary_with_negligible_threshold_is_exact():
    """fp32 with a threshold nothing falls below: the sorted, chunked path must stay exact."""
    check_against_reference(inputs_for(bias=True), impl="triton", filter_eps=1e-30)


def test_partial_gradients():
    """Only e, then only c, requires a gradient (frozen classifier, frozen trunk)."""
    inputs = inputs_for(torch.bfloat16, bias=True)
    for trainable in (0, 1):
        ours, exact = ([x.clone() for x in inputs] for _ in range(2))
        for args in (ours, exact):
            args[trainable].requires_grad_()
        linear_cross_entropy(*ours, impl="triton").backward()
        reference_linear_cross_entropy(*exact).backward()
        assert rel_error(ours[trainable].grad, exact[trainable].grad) < 1e-2


def test_all_ignored_and_empty_batch():
    e, c, targets, _ = inputs_for()
    e.requires_grad_()
    loss = linear_cross_entropy(e, c, torch.full_like(targets, -100), impl="triton")
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(e.grad, torch.zeros_like(e))
    empty = torch.zeros(0, DIM, device=DEVICE)
    no_targets = torch.zeros(0, dtype=torch.long, device=DEVICE)
    assert linear_cross_entropy(empty, c, no_targets, impl="triton").item() == 0.0


def hot_vocabulary_inputs(dtype, cold_targets: int = 0):
    """A peaked softmax on 20 scattered "frequent" entries, which hold every target but the
    first `cold_targets`: those lie where every softmax entry is negligible."""
    e, c, _, _ = inputs_for(dtype)
    gen = torch.Generator().manual_seed(21)
    order = torch.randperm(VOCAB, generator=gen)
    hot, cold = order[:20], order[20:]
    bias = torch.zeros(VOCAB)
    bias[hot] = 10.0
    targets = hot[torch.randint(0, 20, (ROWS,), generator=gen)]
    targets[:cold_targets] = cold[:cold_targets]
    return e, c, targets.to(DEVICE), bias.to(device=DEVICE, dtype=dtype)


def test_filtering_skips_tiles_and_sorting_gathers_them():
    e, c, targets, bias = hot_vocabulary_inputs(torch.float32)
    lse = triton_backend.stats(e, c, bias, targets, logits=Logits(), names=("lse", "lse_residual"))

    def census(**options):
        return triton_backend.tile_census(e, c, bias, targets, lse, softcap=None, **options)

    tiles, kept, chunks, chunks_kept = census(filter_eps=0.0)
    assert kept == tiles and chunks_kept == chunks > 1
    if triton_interpreter_on():
        row_blocks = -(-ROWS // INTERPRETER_BLOCKS["BLOCK_N"])
        assert tiles == row_blocks * -(-VOCAB // INTERPRETER_BLOCKS["BLOCK_V"])
        # Sorted, the 20 hot entries fill the first tile of each row block: one chunk is left.
        assert census(filter_eps=2.0**-8) == (tiles, row_blocks, chunks, 1)
    _, kept_sorted, _, chunks_sorted = census(filter_eps=2.0**-8)
    _, kept_unsorted, _, chunks_unsorted = census(filter_eps=2.0**-8, sort_vocabulary=False)
    assert kept_sorted < tiles and 2 * kept_sorted < kept_unsorted
    assert chunks_sorted < chunks_unsorted


def test_bfloat16_filtering_meets_the_criterion():
    """Tiles without a softmax entry that matters are skipped, unless a target lies there."""
    inputs = hot_vocabulary_inputs(torch.bfloat16, cold_targets=4)
    check_against_reference(inputs, impl="triton", filter_eps=2.0**-10)


def test_coarse_threshold_changes_the_result_within_its_reach():
    inputs = hot_vocabulary_inputs(torch.float32, cold_targets=4)
    exact = outputs_and_grads(linear_cross_entropy, inputs, 0, filter_eps=None, impl="triton")[1]
    filtered = outputs_and_grads(
        linear_cross_entropy, inputs, 0, filter_eps=2.0**-10, impl="triton"
    )[1]
    for x, ref in zip(filtered, exact, strict=True):
        assert 0 < rel_error(x, ref) < 2.0**-8


@triton.jit
def _offsets_probe(out_ptr, first, stride, BLOCK: tl.constexpr):
    tl.store(out_ptr + tl.arange(0, BLOCK), offsets(first + tl.arange(0, BLOCK), stride))


def test_offsets_are_64_bit_past_two_to_the_31():
    """The offset helper every kernel uses, at the last rows of a 152064 x 16384 classifier."""
    vocab, dim, block = 152064, 16384, 16
    out = torch.empty(block, dtype=torch.int64, device=DEVICE)
    _offsets_probe[(1,)](out, vocab - block, dim, BLOCK=block)
    expected = [(vocab - block + i) * dim for i in range(block)]
    assert expected[-1] > 2**31
    assert out.tolist() == expected


@triton.jit
def _tile_coordinates_probe(out_ptr, row_blocks, vocab_blocks, GROUP_N: tl.constexpr):
    row_block, vocab_block = lse_backward._tile_coordinates(row_blocks, vocab_blocks, GROUP_N)
    tl.store(out_ptr + 2 * tl.program_id(0), row_block)
    tl.store(out_ptr + 2 * tl.program_id(0) + 1, vocab_block)


@pytest.mark.parametrize(
    ("row_blocks", "vocab_blocks", "group"), [(5, 3, 2), (4, 7, 3), (1, 5, 8), (3, 4, 3)]
)
def test_grouped_backward_tiles_cover_the_grid_in_groups_of_row_blocks(
    row_blocks, vocab_blocks, group
):
    """Every tile exactly once: a group's row blocks before the next group's (the last group
    smaller), row blocks fastest within a group."""
    tiles = row_blocks * vocab_blocks
    out = torch.empty(tiles, 2, dtype=torch.int32, device=DEVICE)
    _tile_coordinates_probe[(tiles,)](out, row_blocks, vocab_blocks, GROUP_N=group)
    order = [tuple(pair) for pair in out.tolist()]
    assert sorted(order) == [(r, v) for r in range(row_blocks) for v in range(vocab_blocks)]
    expected = [
        (first + i % len(rows), i // len(rows))
        for first in range(0, row_blocks, group)
        for rows in [range(first, min(row_blocks, first + group))]
        for i in range(len(rows) * vocab_blocks)
    ]
    assert order == expected


def _launch_every_time_with(monkeypatch, module, kernel, **constexprs) -> None:
    """Make every interpreter launch of `kernel` by `module` take `constexprs`: a config the
    autotuner would only weigh among others on CUDA, run end to end here."""
    launch = module.launch

    def with_constexprs(launched, tuned, grid, *args, **kwargs):
        if launched is kernel and triton_interpreter_on():
            kwargs.update(constexprs)
        launch(launched, tuned, grid, *args, **kwargs)

    monkeypatch.setattr(module, "launch", with_constexprs)


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "softcap": 3.0}], ids=repr)
def test_grouped_backward_meets_the_criterion(monkeypatch, options):
    """The grouped launch end to end, with the 37 rows in groups of one row block (on CUDA the
    autotuner would pick among the configs; here every launch is grouped)."""
    _launch_every_time_with(monkeypatch, lse_backward, lse_backward.lse_backward_kernel, GROUP_N=1)
    check_against_reference(inputs_for(torch.bfloat16, bias=True), impl="triton", **options)


FLATTENED = pytest.mark.skipif(not lse_forward.RANGE_FLATTENS, reason="no flattened loops here")
DESCRIBED = pytest.mark.skipif(TensorDescriptor is None, reason="no tensor descriptors here")
ALIGNED_DIM = 40
"""A hidden size whose bf16 and fp32 rows are 16-byte multiples (tensor descriptors need it),
and not a multiple of the interpreter's BLOCK_D."""


@pytest.mark.parametrize(
    "sweep",
    [
        pytest.param({"FLATTEN": True}, marks=FLATTENED),
        pytest.param({"TMA": True}, marks=DESCRIBED),
        pytest.param({"TMA": True, "FLATTEN": True}, marks=[FLATTENED, DESCRIBED]),
    ],
    ids=repr,
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "softcap": 3.0}], ids=repr)
def test_plain_sweep_variants_meet_the_criterion(monkeypatch, options, dtype, sweep):
    """The forward's flattened sweep and its sweep through tensor descriptors end to end (on
    CUDA the autotuner would pick among the bf16 configs; here every plain forward launch takes
    the variant, and float32's tolerance checks the sweep to a few ulps). The 37 rows and the 301
    classes end inside a tile, whose rows past them a descriptor reads as zeros."""
    _launch_every_time_with(monkeypatch, lse_forward, lse_forward.lse_forward_kernel, **sweep)
    inputs = make_inputs(
        (ROWS,), ALIGNED_DIM, VOCAB, dtype, bias=True, ignore_fraction=0.2, seed=3, device=DEVICE
    )
    check_against_reference(inputs, impl="triton", **options)


@DESCRIBED
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "softcap": 3.0}], ids=repr)
def test_backward_through_descriptors_meets_the_criterion(monkeypatch, options, dtype):
    """The backward's tiles read through tensor descriptors end to end over several vocabulary
    chunks (exact mode: a sorted vocabulary reads c through its order)."""
    _launch_every_time_with(monkeypatch, lse_backward, lse_backward.lse_backward_kernel, TMA=True)
    inputs = make_inputs(
        (ROWS,), ALIGNED_DIM, VOCAB, dtype, bias=True, ignore_fraction=0.2, seed=3, device=DEVICE
    )
    check_against_reference(inputs, impl="triton", filter_eps=None, **options)


def test_plain_sweep_variants_are_offered_to_plain_sweeps_only():
    """Flattened sweeps and those through descriptors omit the teacher's and the top-k's tile
    math, and the latter need the launch's descriptors: the autotuner must never give them a
    launch that has either, or lacks them."""
    plain = {"HAS_BIAS": True, "WITH_ENTROPY": True, "TOP_K": 0, "TEACHER": False}
    for variant in ({"FLATTEN": True}, {"TMA": True}, {"TMA": True, "FLATTEN": True}):
        config = triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_D": 128, **variant})
        assert config_fits(config, {**plain, "HAS_DESCRIPTORS": True})
        assert not config_fits(config, {"TOP_K": 5, "TEACHER": False, "HAS_DESCRIPTORS": True})
        assert not config_fits(config, {"TOP_K": 0, "TEACHER": True, "HAS_DESCRIPTORS": True})
        assert config_fits(config, plain) == ("TMA" not in variant)


@DESCRIBED
def test_tensor_descriptors_only_for_rows_laid_out_for_them():
    """Descriptors need contiguous rows at 16-byte aligned addresses; anything else reads through
    pointers (HAS_DESCRIPTORS=False prunes the TMA configs)."""
    c = torch.randn(50, ALIGNED_DIM, dtype=torch.bfloat16, device=DEVICE)
    wide = torch.randn(9, ALIGNED_DIM + 1, dtype=torch.bfloat16, device=DEVICE)
    shifted = torch.randn(9 * ALIGNED_DIM + 1, dtype=torch.bfloat16, device=DEVICE)[1:]
    assert tensor_descriptors(wide[:, :ALIGNED_DIM], c)["HAS_DESCRIPTORS"] is False  # 82-byte rows
    assert tensor_descriptors(shifted.view(9, ALIGNED_DIM), c)["HAS_DESCRIPTORS"] is False
    assert tensor_descriptors(c.t().contiguous().t(), c)["HAS_DESCRIPTORS"] is False  # columns
    assert tensor_descriptors(c[:1].expand(9, -1), c)["HAS_DESCRIPTORS"] is False  # one row
    found = tensor_descriptors(c[2:], c)
    assert found["HAS_DESCRIPTORS"] is True
    assert list(found["e_desc"].shape) == [48, ALIGNED_DIM]


def test_kernels_import_and_interpret_without_making_an_autotuner():
    """Triton 3.2 and 3.3 ask for a GPU driver when an autotuner is made: the kernels' modules
    must not make one at import, nor the interpreter's launches at all."""
    script = textwrap.dedent(
        """
        import torch, triton

        def refuse(*args, **kwargs):
            raise RuntimeError("an autotuner was made")

        triton.autotune = refuse
        import logitless
        from logitless.kernels import lse_backward, lse_forward
        e = torch.randn(9, 8, dtype=torch.bfloat16, requires_grad=True)
        c = torch.randn(70, 8, dtype=torch.bfloat16, requires_grad=True)
        logitless.linear_cross_entropy(e, c, torch.randint(0, 70, (9,)), impl="triton").backward()
        print(e.grad.isfinite().all().item(), c.grad.isfinite().all().item())
        """
    )
    result = run_python("-c", script, TRITON_INTERPRET="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["True", "True"]


def test_kernels_compile_for_hopper_without_spills():
    """Code generation for sm_90a, which the interpreter never exercises, in a clean process."""
    script = Path(__file__).with_name("sm90_compile.py")
    result = run_python(str(script), timeout=600, TRITON_INTERPRET=None)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FP_FUSION" not in result.stderr  # each compile names its fp fusion (COMPILE_OPTIONS)
    variants = [json.loads(line) for line in result.stdout.splitlines()]
    assert {(v["kernel"], v["dtype"]) for v in variants} == {
        (kernel, dtype) for kernel in ("forward", "backward") for dtype in ("bf16", "fp32")
    }
    if any(v["spill_bytes"] is None for v in variants):
        pytest.skip("compiled, but no ptxas here reports register spills")
    # A plain loss spills nothing; every option at once (bias, softcap, smoothing with class
    # weights or entropy, sorted vocabulary, filtering) may spill a few words of the largest tiles.
    assert [v for v in variants if v["spill_bytes"] and not v["every_option"]] == []
    for variant in variants:
        bound = SPILL_BYTES.get(variant["variant"], SPILL_BYTES_EVERY_OPTION)
        assert variant["spill_bytes"] <= bound, variant


@gpu
def test_first_launches_warn_nothing():
    """A fresh process's first loss and backward compile both kernels without a warning (Triton
    3.9 warns once per process about a compile that leaves fp fusion to its default)."""
    script = textwrap.dedent(
        """
        import warnings, torch, logitless
        e = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        c = torch.randn(1000, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            targets = torch.randint(0, 1000, (300,), device="cuda")
            logitless.linear_cross_entropy(e, c, targets, impl="triton").backward()
            torch.cuda.synchronize()
        print(len(caught), *(str(w.message)[:200] for w in caught), sep="\\n")
        """
    )
    result = run_python("-c", script, TRITON_INTERPRET=None)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == "0", result.stdout


def test_candidate_timer_reports_quantiles_of_back_to_back_runs(monkeypatch):
    """The autotuner's timer, its device clock replaced by one that each run advances by a
    scripted time: a compiling run, an estimating run, then TUNING_MS worth of runs."""
    clock, durations = [0.0], iter([50.0, 10.0, *map(float, range(10, 0, -1))])

    class ScriptedEvent:
        def __init__(self, enable_timing: bool) -> None:
            self.time = None

        def record(self) -> None:
            self.time = clock[0]

        def elapsed_time(self, end: ScriptedEvent) -> float:
            return end.time - self.time

    def run() -> None:
        clock[0] += next(durations)

    monkeypatch.setattr(torch.cuda, "Event", ScriptedEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    assert time_candidate(run, (0.5, 0.2, 0.8)) == [5.0, 3.0, 8.0]  # of runs 10, 9, ..., 1 ms
    assert next(durations, None) is None  # TUNING_MS / 10 ms = 10 runs after the first two


def test_both_autotuners_are_given_the_candidate_timer(monkeypatch):
    """Where this Triton's autotune takes a timer, each kernel's autotuner gets
    `time_candidate` (made afresh here with a recording `triton.autotune`)."""
    timers = []

    def recording_autotune(*args, **kwargs):
        timers.append(kwargs.get("do_bench"))
        return lambda kernel: kernel

    monkeypatch.setattr(triton, "autotune", recording_autotune)
    for tuned in (lse_forward.lse_forward_tuned, lse_backward.lse_backward_tuned):
        tuned.__wrapped__()
    assert timers == [time_candidate if AUTOTUNE_TAKES_A_TIMER else None] * 2


@gpu
@pytest.mark.skipif(not AUTOTUNE_TAKES_A_TIMER, reason="this Triton's autotune takes no timer")
def test_autotuning_holds_no_cache_clearing_buffer():
    """Tuning both kernels afresh adds no more memory than the call itself uses: Triton's own
    timer would write a 256 MB buffer to clear the L2 before timing each candidate."""
    e, c, targets, _ = make_inputs((517,), 200, 5003, torch.bfloat16, device="cuda", seed=31)
    tuners = [tuned() for tuned in (lse_forward.lse_forward_tuned, lse_backward.lse_backward_tuned)]
    for tuner in tuners:
        tuner.cache.clear()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    linear_cross_entropy(e.requires_grad_(), c.requires_grad_(), targets, impl="triton").backward()
    torch.cuda.synchronize()
    assert all(tuner.cache for tuner in tuners)  # both tuned in this call
    assert torch.cuda.max_memory_allocated() - base < 64 * 2**20


FORCED_CANDIDATES = [
    (module, config)
    for module in (lse_forward, lse_backward)
    for config in module.HALF_CONFIGS
    if config.kwargs.get("TMA") or config.kwargs.get("FLATTEN")
]
"""Autotuning candidates with code paths of their own (TMA reads, the flattened sweep): the
autotuner runs a config only where it is the fastest, so each is forced once here."""


def _config_id(module, config: triton.Config) -> str:
    flags = "".join(f"-{name}" for name in ("TMA", "FLATTEN") if config.kwargs.get(name))
    tile = "x".join(str(config.kwargs[name]) for name in ("BLOCK_N", "BLOCK_V", "BLOCK_D"))
    return f"{module.__name__.rsplit('_', 1)[1]}-{tile}-s{config.num_stages}{flags}"


@pytest.mark.gpu  # in the GPU call's first part; on the interpreter elsewhere
@pytest.mark.parametrize(
    ("module", "config"), FORCED_CANDIDATES, ids=[_config_id(*pair) for pair in FORCED_CANDIDATES]
)
def test_each_forced_candidate_meets_the_criterion(monkeypatch, module, config):
    """Every launch of the module's kernel that `config` fits takes it, its own tile included
    (exact mode, so that the backward's vocabulary is unsorted), at a ragged shape whose bf16
    rows are 16-byte aligned: larger on CUDA, where the config is compiled as the autotuner
    would."""
    kernel = getattr(module, module.__name__.rsplit(".", 1)[1] + "_kernel")
    launch = module.launch

    def forced(launched, tuned, grid, *args, **kwargs):
        if launched is not kernel or not config_fits(config, kwargs):
            return launch(launched, tuned, grid, *args, **kwargs)
        if config.pre_hook is not None:
            named = dict(zip(kernel.arg_names, args, strict=False))
            config.pre_hook({**named, **kwargs, **config.kwargs})
        if triton_interpreter_on():
            kernel[grid](*args, **kwargs, **config.kwargs)
        else:
            with torch.cuda.device(args[0].device):
                kernel[grid](*args, **kwargs, **config.all_kwargs(), **COMPILE_OPTIONS)
        forced.launches += 1

    forced.launches = 0
    monkeypatch.setattr(module, "launch", forced)
    shape = (1027, 336, 20011) if CUDA else (ROWS, ALIGNED_DIM, VOCAB)
    inputs = make_inputs(
        shape[:1], *shape[1:], torch.bfloat16, bias=True, ignore_fraction=0.1, seed=4, device=DEVICE
    )
    check_against_reference(inputs, impl="triton", filter_eps=None)
    assert forced.launches > 0


@gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", OPTION_SETS, ids=repr)
def test_criterion_at_larger_shapes(dtype, options):
    inputs = make_inputs(
        (1027,), 333, 20011, dtype, bias=True, ignore_fraction=0.1, seed=4, device="cuda",
        ignore_index=options.get("ignore_index", -100),
    )  # fmt: skip
    check_against_reference(inputs, impl="triton", **options)


@gpu
@pytest.mark.parametrize(
    ("n", "dim", "vocab"), [(8192, 2304, 256000), (8192, 4096, 128256)], ids=["gemma2", "llama3"]
)
@pytest.mark.parametrize("filter_eps", [2.0**-10, None], ids=["filtered", "exact"])
def test_model_shapes_against_blockwise_float32(monkeypatch, n, dim, vocab, filter_eps):
    """bf16 at model shapes against the portable backend in float32 on the same values."""
    monkeypatch.setenv("LOGITLESS_BLOCK_MB", "1024")
    monkeypatch.setattr(triton_backend, "LOGIT_GRAD_BUFFER_BYTES", DEFAULT_BUFFER_BYTES)
    e, c, targets, _ = make_inputs((n,), dim, vocab, torch.bfloat16, seed=7, device="cuda")
    ours = _loss_and_grads(e, c, targets, impl="triton", filter_eps=filter_eps)
    ref = _loss_and_grads(e.float(), c.float(), targets, impl="torch", filter_eps=None)
    assert rel_error(ours[0], ref[0]) < 1e-5
    for grad, grad_ref in zip(ours[1:], ref[1:], strict=True):
        assert rel_error(grad, grad_ref) < 1e-2


@gpu
@pytest.mark.parametrize(
    ("n", "dim", "vocab"), [(9000, 256, 262144), (64, 4096, 600000)], ids=["NxV", "VxD"]
)
def test_index_arithmetic_past_two_to_the_31(n, dim, vocab):
    """N x V, then V x D, above 2^31 elements: a 32-bit offset anywhere would corrupt results."""
    e, c, targets, _ = make_inputs((n,), dim, vocab, torch.bfloat16, seed=8, device="cuda")
    ours = _loss_and_grads(e, c, targets, impl="triton", filter_eps=None)
    ref = _loss_and_grads(e.float(), c.float(), targets, impl="torch", filter_eps=None)
    assert rel_error(ours[0], ref[0]) < 1e-5
    for grad, grad_ref in zip(ours[1:], ref[1:], strict=True):
        assert rel_error(grad, grad_ref) < 1e-2


def _loss_and_grads(e, c, targets, **options):
    outs, grads = outputs_and_grads(linear_cross_entropy, (e, c, targets, None), 0, **options)
    return *outs, *grads


def test_masked_classes_at_the_start_of_a_split_leave_the_loss_finite():
    """-inf bias over the first tiles: each split's running max starts at -inf there."""
    e, c, targets, bias = inputs_for(torch.float32, bias=True)
    bias[: 2 * INTERPRETER_BLOCKS["BLOCK_V"]] = float("-inf")
    targets[targets < 2 * INTERPRETER_BLOCKS["BLOCK_V"]] = -100
    check_against_reference((e, c, targets, bias), impl="triton")


def test_softcap_far_above_the_logits_keeps_full_precision():
    """tanh(x) for x near 0 must not lose the bits that 1 - exp(-2x) cancels."""
    check_against_reference(inputs_for(torch.float32), impl="triton", softcap=1e4)


def test_float32_dots_follow_torch_matmul_precision():
    previous = torch.get_float32_matmul_precision()
    try:
        assert dot_options(torch.float32)["DOT_PRECISION"] == "ieee"
        torch.set_float32_matmul_precision("high")
        assert dot_options(torch.float32)["DOT_PRECISION"] == "tf32"
        # eager's float32 matmul is then TF32 too, and the criterion holds against it
        check_against_reference(inputs_for(torch.float32), impl="triton")
    finally:
        torch.set_float32_matmul_precision(previous)
    assert dot_options(torch.bfloat16)["DOT_PRECISION"] == "tf32"


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}], ids=repr)
def test_float16_gradients_below_the_normal_range_keep_their_digits(options):
    """A small upstream gradient (a loss scale below 1, a large batch or vocabulary) leaves most
    of float16's logit gradient subnormal: eager loses its digits there; the backward scales d
    into the normal range and back, and stays accurate (the GPU failure at V=20011)."""
    inputs = inputs_for(torch.float16, bias=True)
    errors = check_against_reference(inputs, impl="triton", upstream_scale=1e-3, **options)
    ours, eager = errors["grad_e"]
    assert ours < eager / 4


def test_float16_gradients_of_a_tiny_upstream_are_finite():
    """An upstream gradient of 1e-38 (a loss term weighted that small) puts every coefficient
    below float32's normal range: the gain that lifts them was 2^131, inf in float32, and every
    gradient NaN. Now zeros where float16 cannot hold the values, as eager's."""
    check_against_reference(
        inputs_for(torch.float16, bias=True), impl="triton", upstream_scale=1e-38
    )


def row_errors(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Each row's relative error (the norm of its difference over the norm of the row)."""
    x, ref = x.double(), ref.double()
    return (x - ref).norm(dim=1) / ref.norm(dim=1)


@pytest.mark.parametrize(
    ("function", "options", "upstream_range"),
    [
        (linear_cross_entropy, {"reduction": "none", "z_loss": 1e-3}, (1e-4, 1e4)),
        (linear_log_probs, {"return_entropy": True}, (1e-4, 1e4)),
        (linear_log_probs, {"temperature": 1e-5}, (1e-8, 1e-3)),
    ],
    ids=["cross-entropy", "log-probs-entropy", "temperature-1e-5"],
)
def test_float16_rows_of_far_apart_upstream_gradients_keep_their_digits(
    function, options, upstream_range
):
    """Upstream gradients 1e8 apart across rows (per-token weights or advantages): each row's
    float16 logit gradient is stored times its own power of two, not one gain for all rows set
    by the largest, which flushed every other row of grad_e to 0; and the gain takes the
    temperature's 1 / T into account, which had overflowed float16 below T of about 3e-5."""
    e, c, targets, bias = inputs_for(torch.float16, bias=True, ignore_fraction=0.0)
    upstream = torch.full((ROWS,), upstream_range[0], device=DEVICE)
    upstream[0] = upstream_range[1]
    reference = getattr(logitless.reference, f"reference_{function.__name__}")
    grads = {}
    for name, fn, kwargs in [
        ("ours", function, {"impl": "triton"}),
        ("exact", reference, {}),
        ("eager", reference, {"dtype": torch.float16}),
    ]:
        leaves = [x.detach().requires_grad_() for x in (e, c, bias)]
        outputs = fn(leaves[0], leaves[1], targets, leaves[2], **options, **kwargs)
        first = outputs[0] if isinstance(outputs, tuple) else outputs
        grads[name] = torch.autograd.grad(first.float(), leaves, upstream)
    assert all(x.isfinite().all() for x in grads["exact"])
    ours, eager = (row_errors(grads[name][0], grads["exact"][0]) for name in ("ours", "eager"))
    assert (ours <= eager + 2.0**-10).all(), (ours.max().item(), eager.max().item())
    for ours, exact, eager in list(zip(*grads.values(), strict=True))[1:]:  # grad_c, grad_bias
        assert rel_error(ours, exact) <= rel_error(eager, exact) + 2.0**-10


@pytest.mark.parametrize("k", [1, 17])
def test_top_k_comes_from_the_forward_kernel(monkeypatch, k):
    """The running top-k of the forward kernel (no portable fallback), across splits and tiles,
    with masked classes (-inf bias) among the candidates: the float64 top-k classes in order."""
    e, c, _, bias = inputs_for(torch.float32, bias=True)
    bias[VOCAB // 3 : VOCAB // 3 + 70] = float("-inf")

    def portable(*args, **kwargs):
        raise AssertionError("the top-k came from the portable backend")

    monkeypatch.setattr(triton_backend.torch_backend, "stats", portable)
    no_targets = torch.full((ROWS,), -1, dtype=torch.long, device=DEVICE)
    found, top, log_probs = triton_backend.stats(
        e, c, bias, no_targets, logits=Logits(softcap=3.0), names=("lse",), top_k=k
    )
    logits = 3.0 * torch.tanh((e.double() @ c.double().T + bias.double()) / 3.0)
    assert top.dtype == torch.int64 and torch.equal(top, logits.topk(k, dim=1).indices)
    assert rel_error(found[0], torch.logsumexp(logits, 1)) < 1e-6
    assert rel_error(log_probs, torch.log_softmax(logits, 1).topk(k, dim=1).values) < 1e-6
