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
