"""Triton kernels of the `impl="triton"` backend, one per module, with their launchers."""
