"""Working memory of the portable backend as a user meets it: a fresh process, gradients None.

Measured like the benchmark (`logitless.bench.measure`): the rise of peak resident memory over a
loss + backward, minus the new gradients, with glibc returning freed buffers to the system; and
minus the library code a first call pages in.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

import logitless
from helpers import run_python
from logitless.backends import torch_backend
from logitless.bench.measure import CPU_WORKER_ENV

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    import logitless
    from logitless.bench.measure import CpuMeter, _status_bytes

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
        code, data = _status_bytes("RssFile"), _status_bytes("RssAnon")
        meter.start()
        logitless.linear_cross_entropy(e, c, targets).backward()
        paged_in = _status_bytes("RssFile") - code  # library code run for the first time
        kept = _status_bytes("RssAnon") - data - gradients  # held on after the call
        print((meter.stop()[1] - gradients - paged_in) / 2**20, kept / 2**20)
""")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loss_and_backward_hold_about_one_block_beyond_the_gradients(dtype):
    """With a 1 MiB block (16 MiB of fp32 logits, 16 MiB of grad_c), every call, the first of
    the process included, holds little more than the block beyond the gradients: no copy of
    grad_c, no logit-sized buffer, no float32 sum of a 16-bit grad_c. The library code a first
    call pages in (about 10 MiB of libtorch, which the benchmark's resident memory counts) is
    left out: it is not memory the call holds. So are the compiled kernels oneDNN keeps for
    the shapes of natively multiplied bf16 tiles (`native_16_bit_matmul`; a few MiB, once per
    process and tile shape), which stay after the call; nothing else may."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak resident memory over a call needs Linux /proc")
    done = run_python("-c", SCRIPT, dtype, **CPU_WORKER_ENV, LOGITLESS_BLOCK_MB="1")
    assert done.returncode == 0, done.stderr
    calls = [tuple(map(float, line.split())) for line in done.stdout.splitlines()]
    (first, first_kept), *warm = calls
    assert max(peak for peak, _ in warm) < 3.0, f"{warm} MiB beyond the gradients, warm calls"
    native = torch_backend.native_16_bit_matmul(getattr(torch, dtype), torch.device("cpu"))
    assert first_kept < (6.0 if native else 2.0), f"{first_kept:.1f} MiB kept after the call"
    assert first - max(0.0, first_kept) < 3.0, f"{first:.1f} MiB beyond the gradients, 1st call"


def test_block_budget_follows_the_device(monkeypatch):
    """LOGITLESS_BLOCK_MB where set; else half a CPU's last-level cache, or 1/16 of an
    accelerator's free memory, each within its bounds."""
    mib = 2**20
    monkeypatch.setenv(torch_backend.BLOCK_MB_ENV, "3")
    assert torch_backend.block_bytes(torch.device("cpu")) == 3 * mib
    monkeypatch.delenv(torch_backend.BLOCK_MB_ENV)
    for cache_mb, expected_mb in ((32, 16), (2, 4), (1024, 64)):
        monkeypatch.setattr(torch_backend, "_last_level_cache_mb", lambda mb=cache_mb: mb)
        assert torch_backend.block_bytes(torch.device("cpu")) == expected_mb * mib
    for free_mb, expected_mb in ((8192, 512), (100, 64), (2**20, 2048)):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda _, mb=free_mb: (mb * mib, 0))
        assert torch_backend.block_bytes(torch.device("cuda")) == expected_mb * mib
    assert torch_backend.block_bytes(torch.device("meta")) == 64 * mib  # no free memory told
    cuda_rows = torch_backend.rows_per_block(10**6, 2**16, 4, torch.device("cuda"))
    assert cuda_rows == 2048 * mib // 2**18
    assert torch_backend.rows_per_block(1000, 2**20, 4, torch.device("cpu")) == 128
    assert torch_backend.rows_per_block(100, 2**20, 4, torch.device("cpu")) == 100
    monkeypatch.setenv(torch_backend.BLOCK_MB_ENV, "4")  # exactly the budget set
    assert torch_backend.rows_per_block(1000, 2**20, 4, torch.device("cpu")) == 1


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "inf"])
def test_a_block_budget_that_is_no_positive_number_is_refused(monkeypatch, value):
    monkeypatch.setenv(torch_backend.BLOCK_MB_ENV, value)
    e, c = torch.randn(5, 8), torch.randn(11, 8)
    with pytest.raises(ValueError, match=f"LOGITLESS_BLOCK_MB must be a positive .* {value!r}"):
        logitless.linear_cross_entropy(e, c, torch.randint(0, 11, (5,)), impl="torch")


def test_an_empty_block_budget_means_the_device_default(monkeypatch):
    monkeypatch.setenv(torch_backend.BLOCK_MB_ENV, " ")
    monkeypatch.setattr(torch_backend, "_last_level_cache_mb", lambda: 32)
    assert torch_backend.block_bytes(torch.device("cpu")) == 16 * 2**20


def test_the_last_level_cache_is_read_as_a_size():
    assert 0.25 <= torch_backend._last_level_cache_mb() <= 2**12
