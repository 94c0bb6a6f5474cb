"""Every method the benchmark compares, per op task, as an adapter with one call: the inputs
(a dict of tensors: e, c, targets and the task's others, see `ops`) -> the op's scalar.

Each task (`ops.Op.task`) has its own registry in `METHODS`; a name such as "eager" means the
same kind of method in each. A method says why it cannot run on a device (`Method.unavailable`)
instead of disappearing; if it fails while running, the runner reports the error in its place.
`build` runs inside the worker process that measures the method, so imports and compilation stay
out of the other methods' memory.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from logitless.bench import ops

Tensors = dict[str, torch.Tensor]
LossFn = Callable[[Tensors], torch.Tensor]

TRL_SEQUENCE = 256
"""Tokens per sequence in TRL's per-sequence loop (GRPO's default completion length)."""


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

        return lambda x: linear_cross_entropy(
            x["e"], x["c"], x["targets"], filter_eps=filter_eps, impl=impl
        )

    return build


def _eager(task: str) -> Callable[[], LossFn]:
    return lambda: lambda x: ops.objective(task, x, x["e"].dtype)


def _torch_compile(task: str) -> Callable[[], LossFn]:
    return lambda: torch.compile(_eager(task)())


def _torch_linear_cross_entropy() -> LossFn:
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda x: F.linear_cross_entropy(x["e"], x["c"], x["targets"], options=options)


def _cce(impl: str, **options) -> Callable[[], LossFn]:
    def build() -> LossFn:
        from cut_cross_entropy import linear_cross_entropy

        return lambda x: linear_cross_entropy(x["e"], x["c"], x["targets"], impl=impl, **options)

    return build


def _liger() -> LossFn:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda x: loss(x["c"], x["e"], x["targets"])


def _matmul() -> LossFn:
    """The forward's matmul as fast as the device does it: a CPU multiplies 16-bit inputs
    fastest through float32 (its 16-bit matmuls are emulated, slower than every method here)."""

    def matmul(x: Tensors) -> torch.Tensor:
        e, c = x["e"], x["c"]
        if e.device.type == "cpu" and e.dtype != torch.float64:
            e, c = e.float(), c.float()
        return torch.mm(e, c.T)

    return matmul


def _logitless_log_probs(impl: str) -> Callable[[], LossFn]:
    def build() -> LossFn:
        from logitless import linear_log_probs

        def call(x: Tensors) -> torch.Tensor:
            log_probs, entropy = linear_log_probs(
                x["e"], x["c"], x["targets"], temperature=ops.TEMPERATURE, return_entropy=True,
                impl=impl,
            )  # fmt: skip
            return ops.policy_terms(x, log_probs, entropy).mean()

        return call

    return build


def _liger_log_probs() -> LossFn:
    from liger_kernel.ops.fused_linear_scaled_cross_entropy import (
        LigerFusedLinearScaledCrossEntropyFunction as Scaled,
    )

    def call(x: Tensors) -> torch.Tensor:
        nll, entropy = Scaled.apply(
            x["e"], x["c"], x["targets"], ops.TEMPERATURE, -100, 1, True
        )  # positional: temperature, ignore_index, m_tiles_per_cluster, return_entropy
        return ops.policy_terms(x, -nll, entropy).mean()

    return call


def _trl_log_probs() -> LossFn:
    from trl.trainer.utils import selective_log_softmax_and_entropy

    def call(x: Tensors) -> torch.Tensor:
        e, targets = x["e"], x["targets"]
        rows = TRL_SEQUENCE if len(targets) % TRL_SEQUENCE == 0 else len(targets)
        logits = (e @ x["c"].T).view(-1, rows, len(x["c"]))  # (sequences, tokens, V)
        log_probs, entropy = selective_log_softmax_and_entropy(
            logits, targets.view(-1, rows), temperature=ops.TEMPERATURE
        )
        return ops.policy_terms(x, log_probs.flatten(), entropy.flatten()).mean()

    return call


def _logitless_distillation(impl: str) -> Callable[[], LossFn]:
    def build() -> LossFn:
        from logitless import linear_distillation_loss

        return lambda x: linear_distillation_loss(
            x["e"], x["c"], x["teacher_e"], x["teacher_c"], x["targets"],
            temperature=ops.TEMPERATURE, impl=impl,
        )  # fmt: skip

    return build


def _liger_jsd() -> LossFn:
    from liger_kernel.transformers import LigerFusedLinearJSD

    loss = LigerFusedLinearJSD(jsd_beta=0.0, temperature=ops.TEMPERATURE)  # beta 0: forward KL
    return lambda x: loss(x["e"], x["c"], x["teacher_e"], x["teacher_c"], x["targets"])


def _liger_chunked_jsd() -> LossFn:
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss = LigerFusedLinearJSDLoss(
        weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=ops.TEMPERATURE
    )  # beta 0: KL(teacher || student), the forward KL
    return lambda x: loss(x["e"], x["c"], x["teacher_e"], x["teacher_c"], x["targets"])


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


FILTER_EPS = 2.0**-10
"""The filtered methods' budget: a token loses at most this much softmax mass, a quarter of
bfloat16's rounding unit (`filter_eps="auto"` is exact)."""


def _sixteen_bit(device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype == torch.float32:
        return f"filtering at 2**{math.log2(FILTER_EPS):g} is for 16-bit inputs, not float32"
    return None


def _logitless_triton_filtered(device: torch.device, dtype: torch.dtype) -> str | None:
    return _logitless_triton(device, dtype) or _sixteen_bit(device, dtype)


def _torch_has_linear_cross_entropy(device: torch.device, dtype: torch.dtype) -> str | None:
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return f"needs torch >= 2.13 (this is {torch.__version__})"
    return None


def _registry(*methods: Method) -> dict[str, Method]:
    return {m.name: m for m in methods}


_LIGER = _needs(module="liger_kernel", pip="liger-kernel")
_LIGER_CUDA = _needs(module="liger_kernel", pip="liger-kernel", cuda=True)

METHODS: dict[str, dict[str, Method]] = {
    "cross-entropy": _registry(
        Method("logitless", "logitless", "impl='torch', filter_eps='auto'",
               _logitless("torch", "auto")),
        Method("logitless-filtered", "logitless", "impl='torch', filter_eps=2**-10",
               _logitless("torch", FILTER_EPS), _sixteen_bit),
        Method("logitless-triton", "logitless", "impl='triton', filter_eps='auto'",
               _logitless("triton", "auto"), _logitless_triton),
        Method("logitless-triton-filtered", "logitless", "impl='triton', filter_eps=2**-10",
               _logitless("triton", FILTER_EPS), _logitless_triton_filtered),
        Method("eager", "peer", "logits in the input dtype, F.cross_entropy in float32",
               _eager("cross-entropy")),
        Method("torch-compile", "peer", "torch.compile of eager", _torch_compile("cross-entropy")),
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
               _LIGER_CUDA),
        Method("matmul", "floor",
               "torch.mm (N x D) @ (D x V), forward only: time floor (float32 on a CPU)",
               _matmul),
    ),
    "logprobs": _registry(
        Method("logitless", "logitless", "linear_log_probs(return_entropy=True), impl='torch'",
               _logitless_log_probs("torch")),
        Method("logitless-triton", "logitless",
               "linear_log_probs(return_entropy=True), impl='triton'",
               _logitless_log_probs("triton"), _logitless_triton),
        Method("eager", "peer", "logits in the input dtype, float32 log_softmax, gather, entropy",
               _eager("logprobs")),
        Method("torch-compile", "peer", "torch.compile of eager", _torch_compile("logprobs")),
        Method("liger", "peer",
               "liger-kernel LigerFusedLinearScaledCrossEntropyFunction (return_entropy; on "
               "CUDA sm90 its CuTe kernel, elsewhere its 512-token chunked PyTorch path)",
               _liger_log_probs, _LIGER),
        Method("trl", "peer",
               "logits, then trl selective_log_softmax_and_entropy (its loops over sequences "
               f"of {TRL_SEQUENCE} tokens and 128-row entropy chunks; fused Triton on CUDA)",
               _trl_log_probs, _needs(module="trl")),
    ),
    "distill": _registry(
        Method("logitless", "logitless", "linear_distillation_loss (forward KL), impl='torch'",
               _logitless_distillation("torch")),
        Method("logitless-triton", "logitless",
               "linear_distillation_loss (forward KL), impl='triton'",
               _logitless_distillation("triton"), _logitless_triton),
        Method("eager", "peer", "both logit matrices in the input dtype, float32 log_softmax, KL",
               _eager("distill")),
        Method("torch-compile", "peer", "torch.compile of eager", _torch_compile("distill")),
        Method("liger", "peer", "liger-kernel LigerFusedLinearJSD, jsd_beta=0 (forward KL)",
               _liger_jsd, _LIGER_CUDA),
        Method("liger-chunked", "peer",
               "liger-kernel chunked_loss LigerFusedLinearJSDLoss, beta=0 (forward KL), "
               "1024-token chunks, torch.compile'd",
               _liger_chunked_jsd, _LIGER),
    ),
}  # fmt: skip
"""Each op task's methods (`ops.Op.task`), by name."""

METHOD_NAMES = tuple(dict.fromkeys(name for task in METHODS.values() for name in task))
"""Every method name of any task, in registry order."""
