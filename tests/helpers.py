"""Shared test machinery: random inputs, and the comparison against the float64 reference.

The criterion (from SPEC.md): logitless's loss and gradients are no further from the float64
reference than eager PyTorch at the input dtype, plus a small stated tolerance.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import logitless.reference
from logitless import linear_cross_entropy
from logitless.reference import reference_linear_cross_entropy
from logitless.reference import relative_error as rel_error

TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
"""Allowed relative error beyond eager PyTorch's own: two roundings of a 16-bit dtype (a gradient
rounded to the dtype before its matmul, and the matmul's output), and a few float32 ulps of
summation order for float32."""

DTYPES = list(TOLERANCE)


def gpu(test):
    """The `gpu` marker, and a clean skip without CUDA."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    return pytest.mark.gpu(skip(test))


def device_for(impl: str) -> str:
    """Where a test of `impl` runs: the Triton kernels on CUDA when present (else on the
    interpreter, on the CPU), everything else on the CPU."""
    return "cuda" if impl == "triton" and torch.cuda.is_available() else "cpu"


def make_inputs(
    lead: tuple[int, ...],
    dim: int,
    vocab: int,
    dtype: torch.dtype = torch.float32,
    *,
    bias: bool = False,
    ignore_fraction: float = 0.0,
    ignore_index: int = -100,
    scale: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
):
    """Fresh random (e, c, targets, bias) with logits of standard deviation about `scale`."""
    gen = torch.Generator().manual_seed(seed)
    e = torch.randn(*lead, dim, generator=gen) * (scale / dim**0.25)
    c = torch.randn(vocab, dim, generator=gen) / dim**0.25
    targets = torch.randint(0, vocab, lead, generator=gen)
    if ignore_fraction:
        targets[torch.rand(lead, generator=gen) < ignore_fraction] = ignore_index
    b = torch.randn(vocab, generator=gen) * 0.5 if bias else None
    move = lambda x: None if x is None else x.to(device=device, dtype=dtype)  # noqa: E731
    return move(e), move(c), targets.to(device), move(b)


def confident_targets(device: str = "cpu"):
    """(e, c, targets, bias) whose targets hold all but about 2e-5 of the mass, every logit
    offset by +100: lse's float32 rounding (8e-6) is then as large as the log-probs."""
    e, c, targets, _ = make_inputs((61,), 24, 701, seed=11, device=device)
    bias = torch.full((701,), 100.0, device=device)
    return e + 24.0 / 24**0.5 * c[targets], c, targets, bias


def first_input_gradient(loss, inputs, dtype: torch.dtype) -> torch.Tensor:
    """The gradient of the scalar `loss(*inputs)` with respect to inputs[0], every floating
    input cast to `dtype`, in float64 on the CPU."""
    x, *rest = (t.to(dtype, copy=True) if t.is_floating_point() else t for t in inputs)
    loss(x.requires_grad_(), *rest).backward()
    return x.grad.double().cpu()


def outputs_and_grads(fn, inputs, grad_seed: int, upstream_scale: float = 1.0, **options):
    """Outputs and input gradients of `fn` under a random upstream gradient (times
    `upstream_scale`, as a loss scale or gradient-accumulation factor multiplies it)."""
    e, c, targets, bias = (
        x.detach().requires_grad_(x.is_floating_point()) if x is not None else None for x in inputs
    )
    out = fn(e, c, targets, bias, **options)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(grad_seed)
    floating = [o for o in outs if o.is_floating_point()]  # not the indices of a top-k
    upstream = [torch.randn(o.shape, generator=gen).to(o.device) * upstream_scale for o in floating]
    params = [x for x in (e, c, bias) if x is not None]
    grads = torch.autograd.grad(
        [o.float() for o in floating], params, [u.float() for u in upstream], allow_unused=True
    )
    return [o.detach() for o in outs], [
        torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
    ]


def run_python(*args: str, timeout: float = 300, **env: str | None):
    """`python *args` in a fresh process that imports this checkout's logitless, its output
    captured as text; `env` sets environment variables (None removes one)."""
    environ = {**os.environ, "PYTHONPATH": str(Path(logitless.reference.__file__).parents[1])}
    for name, value in env.items():
        if value is None:
            environ.pop(name, None)
        else:
            environ[name] = value
    return subprocess.run(
        [sys.executable, *args], env=environ, capture_output=True, text=True, timeout=timeout
    )


MASKED_CLASSES = [3, 100, 250]
"""Classes a -inf bias masks in the masked-class tests (no target among them)."""


def masked(inputs):
    """`inputs` with MASKED_CLASSES masked by a -inf bias and no target among them."""
    e, c, targets, bias = inputs
    bias[MASKED_CLASSES] = float("-inf")
    for masked_class in MASKED_CLASSES:
        targets[targets == masked_class] = masked_class + 1
    return e, c, targets, bias


def check_against_reference(
    inputs,
    *,
    impl: str = "torch",
    grad_seed: int = 1,
    upstream_scale: float = 1.0,
    function=linear_cross_entropy,
    **options,
):
    """Assert the criterion for every output and gradient of `function` (one of logitless's,
    compared with the reference of the same name); return the errors for reporting."""
    ours = outputs_and_grads(function, inputs, grad_seed, upstream_scale, impl=impl, **options)
    reference = getattr(logitless.reference, f"reference_{function.__name__}")
    return check_results(
        ours, inputs, grad_seed=grad_seed, upstream_scale=upstream_scale, reference=reference,
        **options,
    )  # fmt: skip


def check_results(
    ours,
    inputs,
    *,
    grad_seed: int = 1,
    upstream_scale: float = 1.0,
    reference=reference_linear_cross_entropy,
    **options,
):
    """`check_against_reference` for results computed elsewhere (`outputs_and_grads`' form),
    against `reference` (a function of `logitless.reference`) in float64 and at the input
    dtype. Integer outputs (indices) must equal the float64 reference's for float32 inputs."""
    dtype = inputs[0].dtype
    semantics = {k: v for k, v in options.items() if k != "filter_eps"}
    reference = functools.partial(outputs_and_grads, reference, inputs, grad_seed, upstream_scale)
    exact = reference(**semantics)
    eager = reference(dtype=dtype, **semantics)
    names = [f"output {i}" for i in range(len(ours[0]))]
    names += ["grad_e", "grad_c", "grad_bias"][: len(ours[1])]
    errors = {}
    for name, x, ref, base in zip(
        names, ours[0] + ours[1], exact[0] + exact[1], eager[0] + eager[1], strict=True
    ):
        assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
        if not x.is_floating_point():  # indices: 16-bit logits may order near-ties otherwise
            assert dtype != torch.float32 or torch.equal(x, ref), f"{name}: differs from float64"
            continue
        expected_dtype = torch.float32 if name.startswith("output") else dtype
        assert x.dtype == expected_dtype, f"{name}: dtype {x.dtype} != {expected_dtype}"
        ours_err, eager_err = rel_error(x, ref), rel_error(base, ref)
        bound = eager_err + TOLERANCE[dtype]
        if math.isinf(eager_err) and ref.isfinite().all():  # eager overflows, float64 does not
            bound = TOLERANCE[dtype]
        assert ours_err <= bound, (
            f"{name}: relative error {ours_err:.3g} > eager {eager_err:.3g} + {TOLERANCE[dtype]}"
            f" ({dtype}, {options})"
        )
        errors[name] = (ours_err, eager_err)
    return errors


def join_gloo_group(rank: int, world: int, out_dir: str, timeout_s: float = 60) -> None:
    """Join a `world`-rank gloo group that meets in `out_dir`, one thread per rank (the ranks
    share the cores; spinning thread pools would fight); a hung collective fails in `timeout_s`."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )  # fmt: skip
