"""`torch.nn.Module` form of the loss."""

from __future__ import annotations

import dataclasses

import torch

from logitless._validation import LossOptions
from logitless.distributed import VocabParallel
from logitless.functional import linear_cross_entropy_with_options


class LinearCrossEntropyLoss(torch.nn.Module):
    """Module form of `logitless.linear_cross_entropy`; takes the same keyword options."""

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
    ) -> None:
        super().__init__()
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
            e, c, targets, bias, self.options, num_items_in_batch
        )

    def extra_repr(self) -> str:
        defaults = LossOptions()
        changed = [
            f"{field.name}={getattr(self.options, field.name)!r}"
            for field in dataclasses.fields(LossOptions)
            if getattr(self.options, field.name) != getattr(defaults, field.name)
        ]
        return ", ".join(changed)
