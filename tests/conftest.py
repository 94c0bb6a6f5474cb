import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through Triton's interpreter; it must be on before import.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of a few rows, so every test crosses block boundaries of the portable backend."""
    monkeypatch.setenv("LOGITLESS_BLOCK_MB", "0.01")


@pytest.fixture(params=["native", "float32"])
def bf16_matmul(request, monkeypatch):
    """Each way the portable backend multiplies bf16 on a CPU (`native_16_bit_matmul`),
    whatever this CPU has (a CPU without bf16 dot products emulates them, slowly but exactly)."""
    from logitless.backends import torch_backend

    monkeypatch.setattr(torch_backend, "_CPU_HAS_BF16_DOTS", request.param == "native")
    return request.param
