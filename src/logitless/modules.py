"""`torch.nn.Module` forms of the losses."""

from __future__ import annotations

import dataclasses
import inspect

import torch

from logitless._validation import LossOptions, check_distillation, temperature_scale
from logitless.distributed import VocabParallel
from logitless.functional import linear_cross_entropy_with_options, linear_distillation_loss


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of `logitless.linear_cross_entropy`; takes the same keyword options, the
    class weights `weight` as a buffer (as `torch.nn.CrossEntropyLoss`)."""

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        shift: int = 0,
        softcap: float | None = None,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        return_lse: bool = False,
        filter_eps: float | str | None = "auto",
        impl: str = "auto",
        vocab_parallel: VocabParallel | None = None,
        weight: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.options = LossOptions(
            ignore_index=ignore_index,
            reduction=reduction,
            shift=shift,
            softcap=softcap,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            return_lse=return_lse,
            filter_eps=filter_eps,
            impl=impl,
            vocab_parallel=vocab_parallel,
        )

    def forward(
        self,
        e: torch.Tensor,
        c: torch.Tensor,
        targets: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        num_items_in_batch: int | torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return linear_cross_entropy_with_options(
            e, c, targets, bias, self.options, num_items_in_batch, weight=self.weight
        )

    def extra_repr(self) -> str:
        defaults = LossOptions()
        changed = [
            f"{field.name}={getattr(self.options, field.name)!r}"
            for field in dataclasses.fields(LossOptions)
            if getattr(self.options, field.name) != getattr(defaults, field.name)
        ]
        return ", ".join(changed)


class LinearDistillationLoss(torch.nn.Module):
    """Module form of `logitless.linear_distillation_loss`: its keyword options, checked at
    construction, and a forward that takes both heads (the teacher gets no gradient)."""

    def __init__(
        self,
        *,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        temperature: float = 1.0,
        hard_weight: float = 0.0,
        teacher_softcap: float | None = None,
        ignore_index: int = -100,
        reduction: str = "mean",
        shift: int = 0,
        softcap: float | None = None,
        filter_eps: float | str | None = None,
        impl: str = "auto",
        vocab_parallel: VocabParallel | None = None,
    ) -> None:
        super().__init__()
        check_distillation(divergence, beta, hard_weight, teacher_softcap)
        temperature_scale(temperature)
        LossOptions(
            ignore_index=ignore_index, reduction=reduction, shift=shift, softcap=softcap,
            filter_eps=filter_eps, impl=impl, vocab_parallel=vocab_parallel,
        )  # fmt: skip
        self.options = {
            "divergence": divergence,
            "beta": beta,
            "temperature": temperature,
            "hard_weight": hard_weight,
            "teacher_softcap": teacher_softcap,
            "ignore_index": ignore_index,
            "reduction": reduction,
            "shift": shift,
            "softcap": softcap,
            "filter_eps": filter_eps,
            "impl": impl,
            "vocab_parallel": vocab_parallel,
        }

    def forward(
        self,
        e: torch.Tensor,
        c: torch.Tensor,
        teacher_e: torch.Tensor,
        teacher_c: torch.Tensor,
        targets: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        teacher_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return linear_distillation_loss(
            e, c, teacher_e, teacher_c, targets, bias, teacher_bias, **self.options
        )

    def extra_repr(self) -> str:
        defaults = inspect.signature(type(self).__init__).parameters
        changed = [
            f"{name}={value!r}"
            for name, value in self.options.items()
            if value != defaults[name].default
        ]
        return ", ".join(changed)
