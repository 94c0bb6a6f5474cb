"""Every method the benchmark compares, as an adapter with one call: (e, c, targets) -> mean loss.

A method says why it cannot run on a device (`Method.unavailable`) instead of disappearing; if it
fails while running, the runner reports the error in its place. `build` runs inside the worker
process that measures the method, so imports and compilation stay out of the other methods'
memory.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _runs_anywhere(device: torch.device, dtype: torch.dtype) -> None:
    return None


@dataclass(frozen=True)
class Method:
    name: str
    kind: str
    """"logitless", "peer", or "floor" (a time-only bound, not a loss)."""
    summary: str
    build: Callable[[], LossFn]
    unavailable: Callable[[torch.device, torch.dtype], str | None] = _runs_anywhere
    """Why the method cannot run on (device, dtype), or None."""

    @property
    def time_only(self) -> bool:
        return self.kind == "floor"


def _logitless(impl: str, filter_eps: float | str | None) -> Callable[[], LossFn]:
    def build() -> LossFn:
        from logitless import linear_cross_entropy

        return lambda e, c, t: linear_cross_entropy(e, c, t, filter_eps=filter_eps, impl=impl)

    return build


def _eager() -> LossFn:
    from logitless.reference import reference_linear_cross_entropy

    return lambda e, c, t: reference_linear_cross_entropy(e, c, t, dtype=e.dtype)


def _torch_compile() -> LossFn:
    return torch.compile(_eager())


def _torch_linear_cross_entropy() -> LossFn:
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda e, c, t: F.linear_cross_entropy(e, c, t, options=options)


def _cce(impl: str, **options) -> Callable[[], LossFn]:
    def build() -> LossFn:
        from cut_cross_entropy import linear_cross_entropy

        return lambda e, c, t: linear_cross_entropy(e, c, t, impl=impl, **options)

    return build


def _liger() -> LossFn:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda e, c, t: loss(c, e, t)


def _matmul() -> LossFn:
    return lambda e, c, t: torch.mm(e, c.T)


def _needs(*, module: str | None = None, pip: str | None = None, cuda: bool = False):
    """An `unavailable` check: the module importable, and a CUDA device when `cuda`."""

    def unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
        if module is not None and importlib.util.find_spec(module) is None:
            return f"not installed (pip install {pip or module})"
        if cuda and device.type != "cuda":
            return "needs CUDA"
        return None

    return unavailable


def _logitless_triton(device: torch.device, dtype: torch.dtype) -> str | None:
    if reason := _needs(module="triton", cuda=True)(device, dtype):
        return reason
    if importlib.util.find_spec("logitless.backends.triton_backend") is None:
        return "this build of logitless has no Triton backend"
    return None


def _same_as_default(device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype == torch.float32:
        return "same as logitless here: filter_eps='auto' filters nothing at float32"
    return None


def _logitless_triton_exact(device: torch.device, dtype: torch.dtype) -> str | None:
    return _logitless_triton(device, dtype) or _same_as_default(device, dtype)


def _torch_has_linear_cross_entropy(device: torch.device, dtype: torch.dtype) -> str | None:
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"needs torch >= 2.13 (this is {torch.__version__})"
    return None


METHODS = {
    m.name: m
    for m in (
        Method("logitless", "logitless", "impl='torch', filter_eps='auto'",
               _logitless("torch", "auto")),
        Method("logitless-exact", "logitless", "impl='torch', filter_eps=None",
               _logitless("torch", None), _same_as_default),
        Method("logitless-triton", "logitless", "impl='triton', filter_eps='auto'",
               _logitless("triton", "auto"), _logitless_triton),
        Method("logitless-triton-exact", "logitless", "impl='triton', filter_eps=None",
               _logitless("triton", None), _logitless_triton_exact),
        Method("eager", "peer", "logits in the input dtype, F.cross_entropy in float32",
               _eager),
        Method("torch-compile", "peer", "torch.compile of eager", _torch_compile),
        Method("torch-lce", "peer", "F.linear_cross_entropy, LinearCrossEntropyOptions()",
               _torch_linear_cross_entropy, _torch_has_linear_cross_entropy),
        Method("cce", "peer", "cut-cross-entropy impl='cce'", _cce("cce"),
               _needs(module="cut_cross_entropy", pip="cut-cross-entropy", cuda=True)),
        Method("cce-exact", "peer", "cut-cross-entropy impl='cce', filter_eps=None",
               _cce("cce", filter_eps=None),
               _needs(module="cut_cross_entropy", pip="cut-cross-entropy", cuda=True)),
        Method("cce-torch-compile", "peer", "cut-cross-entropy impl='torch_compile'",
               _cce("torch_compile"), _needs(module="cut_cross_entropy", pip="cut-cross-entropy")),
        Method("liger", "peer", "liger-kernel LigerFusedLinearCrossEntropyLoss", _liger,
               _needs(module="liger_kernel", pip="liger-kernel", cuda=True)),
        Method("matmul", "floor", "torch.mm (N x D) @ (D x V), forward only: time floor",
               _matmul),
    )
}  # fmt: skip
