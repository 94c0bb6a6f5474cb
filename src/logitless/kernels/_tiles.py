"""Device helpers shared by the kernels: 64-bit offsets, fp32 dots, and the logit tile.

Both kernels build their logits with `logit_tile` or its twin that reads through tensor
descriptors (the same products of the same operands), each finished by `finish_logits`, so the
backward recomputes exactly the values whose log-sum-exp the forward took.
"""

from __future__ import annotations

import functools
import inspect

import torch
import triton
import triton.language as tl

from logitless._validation import triton_interpreter_on

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # Triton before 3.4
    TensorDescriptor = None

INTERPRETER_BLOCKS = {"BLOCK_N": 32, "BLOCK_V": 64, "BLOCK_D": 16}
"""Fixed blocks under the interpreter: small, so that tests cross them with partial tiles."""

COMPILE_OPTIONS = {"enable_fp_fusion": True}
"""Code generation options of every launch: fused multiply-adds, which Triton chose by default
through 3.9 (with a warning in 3.9) and 3.10 turns off unless asked; the kernels were measured
and checked for spills (tests/sm90_compile.py) with them."""


def dot_options(dtype: torch.dtype) -> dict[str, object]:
    """The constexprs of `mma` for inputs of `dtype`.

    float32 multiplies as PyTorch's own float32 matmuls are told to
    (`torch.set_float32_matmul_precision`, or `torch.backends.cuda.matmul.allow_tf32`): IEEE by
    default ("highest"), TF32 when the user allows it, at a TF32 product's accuracy. The
    interpreter's dot reads bfloat16 operands as raw integers, so there they are widened first;
    their products are exact in fp32 either way.
    """
    tf32 = dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    return {
        "DOT_PRECISION": "tf32" if tf32 else "ieee",
        "DOT_UPCAST": dtype == torch.bfloat16 and triton_interpreter_on(),
    }


def launch(kernel, tuned, grid, *args, **kwargs) -> None:
    """Run `kernel` with INTERPRETER_BLOCKS under the interpreter, else its autotuned version
    (`tuned()`, see `autotune_by_dtype`) on the device of its first argument (not the current
    device: an lm_head may live on cuda:1)."""
    if triton_interpreter_on():
        kernel[grid](*args, **kwargs, **INTERPRETER_BLOCKS)
        return
    with torch.cuda.device(args[0].device):
        tuned()[grid](*args, **kwargs, **COMPILE_OPTIONS)


def tensor_descriptors(e: torch.Tensor, c: torch.Tensor) -> dict[str, object]:
    """Launch arguments for the configs that read e (N, D) and c (V, D) through tensor
    descriptors (TMA): `e_desc`, `c_desc` and HAS_DESCRIPTORS, or HAS_DESCRIPTORS=False alone
    where this Triton has none (before 3.4), the GPU has no TMA (before Hopper, or not NVIDIA's)
    or a tensor is not laid out for it (rows contiguous, 16-byte aligned). Their blocks are
    INTERPRETER_BLOCKS' until `set_descriptor_blocks` makes them a config's."""
    if not (_has_tma(e.device) and _tma_layout(e) and _tma_layout(c)):
        return {"HAS_DESCRIPTORS": False}
    blocks = INTERPRETER_BLOCKS
    return {
        "e_desc": TensorDescriptor.from_tensor(e, [blocks["BLOCK_N"], blocks["BLOCK_D"]]),
        "c_desc": TensorDescriptor.from_tensor(c, [blocks["BLOCK_V"], blocks["BLOCK_D"]]),
        "HAS_DESCRIPTORS": True,
    }


def _has_tma(device: torch.device) -> bool:
    if TensorDescriptor is None:
        return False
    if triton_interpreter_on():
        return True
    return torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9


def _tma_layout(tensor: torch.Tensor) -> bool:
    """Whether a 2-D tensor's rows are contiguous, distinct (not one row expanded: a stride of
    0, which a descriptor's global strides do not describe) and start at 16-byte aligned
    addresses."""
    row_bytes = tensor.stride(0) * tensor.element_size()
    aligned = tensor.data_ptr() % 16 == 0 and row_bytes % 16 == 0
    return tensor.stride(1) == 1 and row_bytes > 0 and aligned


def set_descriptor_blocks(args: dict[str, object]) -> None:
    """Pre-hook of a TMA config: the descriptors' blocks become its tiles of e and c. (Blocks
    are part of a compiled signature: a pointer config that wins an autotuning run after a TMA
    config set them compiles once more for the blocks the next call's descriptors have.)"""
    args["e_desc"].block_shape = [args["BLOCK_N"], args["BLOCK_D"]]
    args["c_desc"].block_shape = [args["BLOCK_V"], args["BLOCK_D"]]


LARGE_TILE = 128 * 128
"""Tiles of more entries than this are tried only for plain logits (see `config_fits`)."""

SPILLING_OPTIONS = (
    "HAS_SOFTCAP", "WITH_SUM", "WITH_ENTROPY", "HAS_PLOGP", "HAS_WEIGHT", "TOP_K", "TEACHER",
    "HAS_SUPPORT", "HAS_OUTSIDE", "HAS_SUPPORT_GRAD",
)  # fmt: skip
"""Options whose extra tile math spills a large tile's registers on Hopper."""


TOP_K_TILE = 64 * 128
"""The largest tile whose running top-k (MAX_TOP_K slots per row) stays in registers."""

TEACHER_ENTRIES_PER_THREAD = 16
"""Most entries of a logit tile per thread in a launch with a teacher, which holds two tiles:
larger ones spill on Hopper (sm90_compile)."""


def config_fits(config: triton.Config, options: dict[str, object]) -> bool:
    """Whether `config` compiles without spilling for the constexpr `options` of a launch:
    tiles larger than LARGE_TILE only without the tile math of SPILLING_OPTIONS, and with a
    running top-k none larger than TOP_K_TILE, and with a teacher at most
    TEACHER_ENTRIES_PER_THREAD per thread; grouped backward tiles (GROUP_N) not with
    filtering, whose tile math their index arithmetic pushes into spilling (sm90_compile);
    flattened forward sweeps (FLATTEN) and those through tensor descriptors (TMA) neither with a
    teacher, a top-k nor a support, which they omit, and TMA ones only where the launch has
    descriptors."""
    if config.kwargs.get("GROUP_N") and options.get("FILTER"):
        return False
    plain_sweep = config.kwargs.get("FLATTEN") or config.kwargs.get("TMA")
    if plain_sweep and any(options.get(name) for name in ("TEACHER", "TOP_K", "HAS_SUPPORT")):
        return False
    if config.kwargs.get("TMA") and not options.get("HAS_DESCRIPTORS"):
        return False
    entries = config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_V"]
    if options.get("TEACHER") and entries > TEACHER_ENTRIES_PER_THREAD * 32 * config.num_warps:
        return False
    if options.get("TOP_K"):
        return entries <= TOP_K_TILE
    return not (entries > LARGE_TILE and any(options.get(name) for name in SPILLING_OPTIONS))


AUTOTUNE_TAKES_A_TIMER = "do_bench" in inspect.signature(triton.autotune).parameters
"""Whether this Triton's `triton.autotune` takes a timer (`do_bench`); older ones use their own."""

TUNING_MS = 100
"""Device time the autotuner spends timing each candidate, after a compiling run and an
estimating one (at least 5 and at most 100 runs)."""


def time_candidate(kernel_call, quantiles: tuple[float, ...]) -> list[float]:
    """The autotuner's timer: the `quantiles` of a candidate's run time in ms, by device events,
    the runs queued back to back.

    Triton's own timer clears the L2 before each run by writing a buffer of 256 MB, which the
    first call of each tuning key then holds on top of the model's memory. These kernels read e
    and c, far more than an L2 holds at any shape worth tuning, so nothing is cleared here.
    """
    kernel_call()
    estimate = _time_runs(kernel_call, 1)[0]
    runs = max(5, min(100, int(TUNING_MS / max(estimate, 1e-3))))
    times = sorted(_time_runs(kernel_call, runs))
    return [times[round(q * (runs - 1))] for q in quantiles]


def _time_runs(kernel_call, runs: int) -> list[float]:
    """The device time in ms of each of `runs` calls queued back to back."""
    marks = [[torch.cuda.Event(enable_timing=True) for _ in range(2)] for _ in range(runs)]
    torch.cuda.synchronize()
    for start, end in marks:
        start.record()
        kernel_call()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in marks]


def autotune_by_dtype(
    half_configs: list[triton.Config], float32_configs: list[triton.Config], **autotune_kwargs
):
    """`triton.autotune` over the configs written for the dtype of `e_ptr` that fit the launch's
    options; the key always holds those options, so each option set is tuned on its own.

    16-bit inputs run on tensor cores with large tiles; float32 multiplies in IEEE precision on
    the FMA units, where large tiles spill registers. The decorated kernel is a function that
    builds the autotuner at its first call: Triton 3.2 and 3.3 ask for a GPU driver when an
    autotuner is made, which a machine without a GPU (the interpreter's) does not have.
    Candidates are timed by `time_candidate` where this Triton's autotune takes a timer.
    """

    def prune(configs, named_args, **kwargs):
        by_dtype = float32_configs if named_args["e_ptr"].dtype == torch.float32 else half_configs
        return [config for config in by_dtype if config_fits(config, kwargs)]

    def decorate(kernel):
        @functools.cache
        def tuned():
            options = [name for name in SPILLING_OPTIONS if name in kernel.arg_names]
            timer = {"do_bench": time_candidate} if AUTOTUNE_TAKES_A_TIMER else {}
            return triton.autotune(
                half_configs + float32_configs,
                key=[*autotune_kwargs["key"], *options],
                prune_configs_by={"early_config_prune": prune},
                **timer,
                **{name: value for name, value in autotune_kwargs.items() if name != "key"},
            )(kernel)

        return tuned

    return decorate


@triton.jit
def offsets(indices, stride):
    """64-bit element offsets `indices * stride`: N x V and V x D can pass 2**31."""
    return tl.cast(indices, tl.int64) * stride


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """acc + a @ b, accumulated in fp32."""
    if DOT_UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def tanh(x):
    """tanh through exp (no libdevice), without overflow for any x and to full relative precision
    near 0, where 1 - exp(-2|x|) would cancel: below |x| = 1/8 its series to x**5 (the next term
    is under 2**-22 of tanh there)."""
    magnitude = tl.abs(x)
    decay = tl.exp(-2.0 * magnitude)
    square = x * x
    series = magnitude + magnitude * square * (square * (2.0 / 15.0) - 1.0 / 3.0)
    magnitude = tl.where(magnitude < 0.125, series, (1.0 - decay) / (1.0 + decay))
    return tl.where(x < 0, -magnitude, magnitude)


@triton.jit
def logit_tile(
    e_ptr, c_ptr, bias_ptr, row_offsets, vocab, vocab_offsets, row_mask, col_mask,
    D, stride_ed, stride_cd, softcap, scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    """fp32 logits scale * softcap(e[rows] @ c[vocab].T + bias[vocab]) of one (BLOCK_N, BLOCK_V)
    tile (`scale` is 1 / temperature).

    `row_offsets` and `vocab_offsets` are the int64 offsets of the rows of e and c; masked rows
    and columns read zeros.
    """
    dims = tl.arange(0, BLOCK_D)
    e_columns = offsets(dims, stride_ed)
    c_columns = offsets(dims, stride_cd)
    e_step = offsets(BLOCK_D, stride_ed)
    c_step = offsets(BLOCK_D, stride_cd)
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        dim_mask = dims < D - start
        e_block = tl.load(
            e_ptr + row_offsets[:, None] + e_columns[None, :],
            mask=row_mask[:, None] & dim_mask[None, :],
            other=0.0,
        )
        c_block_t = tl.load(
            c_ptr + c_columns[:, None] + vocab_offsets[None, :],
            mask=dim_mask[:, None] & col_mask[None, :],
            other=0.0,
        )
        acc = mma(e_block, c_block_t, acc, DOT_PRECISION, DOT_UPCAST)
        e_columns += e_step
        c_columns += c_step
    return finish_logits(acc, bias_ptr, vocab, col_mask, softcap, scale, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def logit_tile_from_descriptors(
    e_desc, c_desc, bias_ptr, row_begin, vocab_begin, vocab, col_mask, D, softcap, scale,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    """`logit_tile` with e and c read through tensor descriptors (`tensor_descriptors`; Hopper's
    TMA): the copy engine computes the addresses, and reads past a tensor's end come back as
    zeros, as `logit_tile` reads its masked entries (the kernels' tiles end inside a tensor only
    where it ends)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        e_block = e_desc.load([row_begin, start])
        c_block = c_desc.load([vocab_begin, start])
        acc = mma(e_block, tl.trans(c_block), acc, DOT_PRECISION, DOT_UPCAST)
    return finish_logits(acc, bias_ptr, vocab, col_mask, softcap, scale, HAS_BIAS, HAS_SOFTCAP)


@triton.jit
def finish_logits(acc, bias_ptr, vocab, col_mask, softcap, scale,
                  HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr):  # fmt: skip
    """scale * softcap(acc + bias[vocab]): a tile's products made logits."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + vocab, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap * tanh(acc / softcap)
    return acc * scale


@triton.jit
def log1p(x):
    """log(1 + x) for x >= 0 to full relative precision near 0, where 1 + x rounds: log(u) times
    x / (u - 1) for u = 1 + x corrects the rounding of u (exact when u == 1: x itself)."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def log_add_exp(a, b):
    """log(exp(a) + exp(b)) for finite a and b, without overflow."""
    return tl.maximum(a, b) + log1p(tl.exp(-tl.abs(a - b)))


@triton.jit
def outside_support(support_ptr, rows, row_mask, classes, support_k):
    """Whether each class of a tile lies outside its row's support: `support_ptr` holds (N,
    support_k) classes per row, -1 for none."""
    outside = (rows[:, None] >= 0) & (classes[None, :] >= 0)
    for j in range(0, support_k):
        member = tl.load(support_ptr + rows * support_k + j, mask=row_mask, other=-1)
        outside = outside & (classes[None, :] != member[:, None])
    return outside


@triton.jit
def add_at_support(tile, support_ptr, support_grad_ptr, rows, row_mask, classes, support_k):
    """`tile` plus, at each class of each row's support (`support_ptr`, (N, support_k), -1 for
    none), its coefficient (`support_grad_ptr`, the same shape). A loop of its own rather than
    one with `outside_support`'s: accumulating into the tile, it holds no second tile (which
    spilled 1,040-1,256 bytes of the 128 x 128 bf16 backward tiles on sm_90a)."""
    for j in range(0, support_k):
        member = tl.load(support_ptr + rows * support_k + j, mask=row_mask, other=-1)
        grad = tl.load(support_grad_ptr + rows * support_k + j, mask=row_mask, other=0.0)
        tile += tl.where(classes[None, :] == member[:, None], grad[:, None], 0.0)
    return tile
