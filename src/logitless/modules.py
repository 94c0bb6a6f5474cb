"""`torch.nn.Module` forms of the losses."""

from __future__ import annotations

import dataclasses

import torch

from logitless._validation import DistillationOptions, LossOptions
from logitless.distributed import VocabParallel
from logitless.functional import linear_cross_entropy_with_options, linear_distillation_loss


def _option_attributes(options_class: type):
    """A class decorator: each field of `options_class` an attribute of the module, read from
    and written to its `options`, as `torch.nn.CrossEntropyLoss` keeps `ignore_index` or
    `reduction`: a value set is checked then and used from the next call (never ignored)."""

    def attribute(name: str) -> property:
        def get(self):
            return getattr(self.options, name)

        def set_(self, value) -> None:
            self.options = dataclasses.replace(self.options, **{name: value})

        return property(get, set_, doc=f"The `{name}` option (see `{options_class.__name__}`).")

    def decorate(module_class: type) -> type:
        for field in dataclasses.fields(options_class):
            setattr(module_class, field.name, attribute(field.name))
        return module_class

    return decorate


def _changed_options(options) -> str:
    """`extra_repr` of a module: its options that differ from their defaults."""
    defaults = type(options)()
    return ", ".join(
        f"{field.name}={getattr(options, field.name)!r}"
        for field in dataclasses.fields(options)
        if getattr(options, field.name) != getattr(defaults, field.name)
    )


@_option_attributes(LossOptions)
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
        return _changed_options(self.options)


@_option_attributes(DistillationOptions)
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
        self.options = DistillationOptions(
            divergence=divergence, beta=beta, temperature=temperature, hard_weight=hard_weight,
            teacher_softcap=teacher_softcap, ignore_index=ignore_index, reduction=reduction,
            shift=shift, softcap=softcap, filter_eps=filter_eps, impl=impl,
            vocab_parallel=vocab_parallel,
        )  # fmt: skip

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
            e, c, teacher_e, teacher_c, targets, bias, teacher_bias, **vars(self.options)
        )

    def extra_repr(self) -> str:
        return _changed_options(self.options)
