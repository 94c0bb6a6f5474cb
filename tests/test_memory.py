"""Working memory of the portable backend as a user meets it: a fresh process, gradients None.

Measured like the benchmark (`logitless.bench.measure`): the rise of peak resident memory over a
loss + backward, minus the new gradients, with glibc returning freed buffers to the system.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import logitless
from logitless.bench.measure import CPU_WORKER_ENV

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import logitless
    from logitless.bench.measure import CpuMeter

    n, d, v, dtype = 512, 256, 16384, getattr(torch, sys.argv[1])
    x = torch.randn(256, 256, requires_grad=True)
    (x @ x).sum().backward()  # the BLAS and autograd set-up a model before the loss has done
    gen = torch.Generator().manual_seed(0)
    e = torch.randn(n, d, generator=gen).to(dtype).requires_grad_()
    c = (torch.randn(v, d, generator=gen) / d**0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)

    gradients = (e.numel() + c.numel()) * e.element_size()
    meter = CpuMeter()
    for _ in range(3):
        e.grad = c.grad = None  # as zero_grad() leaves them
        meter.start()
        logitless.linear_cross_entropy(e, c, targets).backward()
        print((meter.stop()[1] - gradients) / 2**20)
""")


@pytest.mark.parametrize("dtype", ["float32"])
def test_loss_and_backward_hold_about_one_block_beyond_the_gradients(dtype):
    """With a 1 MiB block (16 MiB of fp32 logits, 16 MiB of grad_c), a warm call holds little
    more than the block beyond the gradients: no copy of grad_c, no logit-sized buffer. The
    first call also pages in libtorch's code for each kernel and MKL's buffers (about 11 MiB
    once per process)."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak resident memory over a call needs Linux /proc")
    src = str(Path(logitless.__file__).resolve().parents[1])
    env = {**os.environ, **CPU_WORKER_ENV, "PYTHONPATH": src, "LOGITLESS_BLOCK_MB": "1"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, dtype], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    first, *warm = (float(x) for x in done.stdout.split())
    assert max(warm) < 3.0, f"{max(warm):.1f} MiB beyond the gradients in a warm call"
    assert first < 15.0, f"{first:.1f} MiB beyond the gradients in the first call"
