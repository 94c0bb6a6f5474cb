"""Hugging Face transformers integration: causal-LM training without the N x V logits.

`patch(model)` makes a transformers causal LM compute its loss with logitless whenever it is
called with `labels`; calls without labels (inference, `generate`) are untouched.

How, for any model whose forward runs its head (`get_output_embeddings()`, an `nn.Linear`) on
the final hidden states and hands the result to `self.loss_function`, as transformers' causal
LMs do: during a call with labels the head records its input and returns a probe of
`len(_PROBE)` known values per token instead of V logits, and `loss_function` is replaced by
one that computes the loss from the recorded hidden states and the head's weight and bias. What
the model's forward does to the logits between the two (Gemma 2's softcap, Cohere's and
Granite's scale) it does to the probe, from which the scale is read back and the config's
softcap is checked; any other transform is refused rather than silently dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import transformers
from torch import nn

from logitless._validation import LossOptions
from logitless.functional import linear_cross_entropy_with_options

_PROBE = (-1.0, -0.5, 0.25, 0.75)
"""Per-token values the head returns instead of the logits, in units of the softcap if any."""

_NO_LOSS_FUNCTION = "does not compute its loss by loss_function"

Patchable = TypeVar("Patchable")


def patch(
    model: Patchable,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    filter_eps: float | str | None = "auto",
    impl: str = "auto",
    eval_logits: bool = True,
) -> Patchable:
    """Make `model` compute its causal-LM loss with logitless when called with `labels`.

    The loss is `logitless.linear_cross_entropy` of the final hidden states and the head's
    weight (and bias, if any) with shift=1 (or the given `shift_labels`), ignore_index=-100 and
    the config's `final_logit_softcapping`; with `num_items_in_batch` it is the sum divided by
    it, as transformers' own loss does for gradient accumulation. Such calls return
    `logits=None`. Calls without labels are unchanged.

    Args:
        model: a transformers causal LM instance (a PEFT model is patched through its base
            model), or a causal-LM class, whose every instance is then patched.
        label_smoothing, z_loss, filter_eps, impl: passed to `linear_cross_entropy`.
        eval_logits: calls with labels while gradients are disabled (evaluation, as in
            `Trainer.evaluate`) run the model unpatched and return its logits and loss, so that
            predictions and `compute_metrics` are the unpatched model's. False computes their
            loss with logitless and returns `logits=None` too (then evaluate with
            `prediction_loss_only=True`).

    Returns:
        `model` itself, patched in place.
    """
    options = LossOptions(
        label_smoothing=label_smoothing, z_loss=z_loss, filter_eps=filter_eps, impl=impl
    )
    if isinstance(model, type):
        if not issubclass(model, transformers.PreTrainedModel):
            raise TypeError(f"model must be a transformers model class, got {model.__name__}")
        model.forward = _patched_method(model.forward, options, eval_logits)
        return model
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(causal_lm, transformers.PreTrainedModel):
        raise TypeError(f"model must be a transformers model, got {type(model).__name__}")
    _linear_head(causal_lm)
    forward = causal_lm.forward
    if isinstance(forward, functools.partial) and forward.func is _forward:
        forward = forward.args[1]  # patched before: replace its options
    # A partial over the model (not a closure) so that a deepcopy calls its own copy.
    causal_lm.forward = functools.update_wrapper(
        functools.partial(_forward, causal_lm, forward, options, eval_logits), forward
    )
    return model


def _patched_method(method: Callable, options: LossOptions, eval_logits: bool) -> Callable:
    """A class's `forward` method that routes calls with labels through `_forward`."""
    method = getattr(method, "__logitless_unpatched__", method)

    @functools.wraps(method)
    def forward(self, *args, **kwargs):
        bound = functools.partial(method, self)
        return _forward(self, bound, options, eval_logits, *args, **kwargs)

    forward.__logitless_unpatched__ = method
    return forward


def _forward(
    model: transformers.PreTrainedModel,
    forward: Callable,
    options: LossOptions,
    eval_logits: bool,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """`forward(*args, **kwargs)`, its loss from logitless when it is given labels (and, with
    `eval_logits`, gradients are enabled)."""
    try:
        labels = inspect.signature(forward).bind_partial(*args, **kwargs).arguments.get("labels")
    except TypeError:
        labels = None  # a bad call: let the model report it
    if labels is None or (eval_logits and not torch.is_grad_enabled()):
        return forward(*args, **kwargs)
    head = _linear_head(model)
    if isinstance(head.__dict__.get("forward"), _HeadInterception):
        return forward(*args, **kwargs)  # an outer patch handles this call
    with _HeadInterception(model, head, options) as interception:
        try:
            outputs = forward(*args, **kwargs)
        except NotImplementedError:
            raise
        except Exception as err:
            if interception.hidden is not None and interception.logits is None:
                raise interception.unsupported(_NO_LOSS_FUNCTION) from err  # it used the probe
            raise
    if interception.logits is None:
        raise interception.unsupported(_NO_LOSS_FUNCTION)
    return _without(outputs, (interception.logits, interception.probe))


def _linear_head(model: transformers.PreTrainedModel) -> nn.Linear:
    """The output layer, if a plain `nn.Linear`: a subclass (quantized, sharded, with an adapter)
    may compute something else than `hidden @ weight.T + bias`."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear:
        raise TypeError(
            f"model must have a plain nn.Linear output layer (lm_head), {type(model).__name__} "
            f"has {type(head).__name__}"
        )
    return head


class _HeadInterception:
    """For one forward call: the head records its input and returns a probe, and the model's
    `loss_function` computes the loss from that input with logitless."""

    def __init__(self, model: transformers.PreTrainedModel, head: nn.Linear, options: LossOptions):
        self.model, self.head, self.options = model, head, options
        self.softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        self.hidden: torch.Tensor | None = None
        self.probe: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None  # the probe as the model passed it to the loss

    def __enter__(self) -> _HeadInterception:
        # Instance attributes, which accelerate's hooks may already occupy: saved and restored.
        self.saved = {
            (self.head, "forward"): self.head.__dict__.get("forward"),
            (self.model, "_loss_function"): self.model.__dict__.get("_loss_function"),
        }
        self.head.forward = self
        self.model.loss_function = self.loss
        return self

    def __exit__(self, *exc_info: object) -> None:
        for (module, name), value in self.saved.items():
            if value is None:
                delattr(module, name)
            else:
                setattr(module, name, value)

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head's forward: record `hidden`, return the probe in place of the logits."""
        if self.hidden is not None:
            raise self.unsupported("runs its output layer more than once in a forward")
        self.hidden = hidden
        values = torch.tensor(_PROBE, device=hidden.device) * (self.softcap or 1.0)
        self.probe = values.expand(*hidden.shape[:-1], len(_PROBE)).contiguous()
        return self.probe

    def loss(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor | None = None,
        vocab_size: int | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        ignore_index: int = -100,
        shift_labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """transformers' `ForCausalLMLoss` signature and meaning, computed by logitless."""
        if self.hidden is None:
            raise self.unsupported("calls loss_function before its output layer")
        self.logits = logits
        scale = self._logit_scale(logits)
        hidden = self.hidden if scale == 1.0 else self.hidden * scale
        targets, shift = (labels, 1) if shift_labels is None else (shift_labels, 0)
        options = dataclasses.replace(
            self.options,
            ignore_index=ignore_index,
            shift=shift,
            softcap=self.softcap,
            reduction="mean" if num_items_in_batch is None else "sum",
        )
        weight, bias = self.head.weight, self.head.bias
        device = hidden.device.type
        if torch.is_autocast_enabled(device):  # compute in the dtype the head would have
            dtype = torch.get_autocast_dtype(device)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with torch.autocast(device, enabled=False):
            loss = linear_cross_entropy_with_options(
                hidden, weight, targets.to(hidden.device), bias, options
            )
        if num_items_in_batch is not None:
            if torch.is_tensor(num_items_in_batch):
                num_items_in_batch = num_items_in_batch.to(loss.device)
            loss = loss / num_items_in_batch
        return loss

    def _logit_scale(self, logits: torch.Tensor) -> float:
        """The factor a with `logits = softcap(a * head(hidden))` that the model applied."""
        if not (
            isinstance(logits, torch.Tensor)
            and logits.is_floating_point()
            and logits.shape == self.probe.shape
        ):
            raise self.unsupported("reshapes its logits before the loss")
        if not logits.numel():
            return 1.0  # no tokens: nothing to scale
        probe, received = self.probe.double(), logits.detach().double()
        if self.softcap is not None:
            received = self.softcap * torch.atanh(received / self.softcap)
        scale = (received.flatten()[-1] / probe.flatten()[-1]).item()
        tolerance = 16 * torch.finfo(logits.dtype).eps
        if not torch.allclose(received, scale * probe, rtol=tolerance, atol=0.0):
            raise self.unsupported(
                "transforms its logits before the loss other than by a constant factor and "
                "the config's final_logit_softcapping"
            )
        return 1.0 if math.isclose(scale, 1.0, rel_tol=tolerance) else scale

    def unsupported(self, what: str) -> NotImplementedError:
        return NotImplementedError(
            f"{type(self.model).__name__} {what}: logitless.transformers.patch cannot compute "
            "its loss; call it without patching"
        )


def _without(outputs: Any, tensors: tuple[torch.Tensor | None, ...]) -> Any:
    """`outputs` (a ModelOutput or a tuple) with the entries that are `tensors` left out."""
    dropped = lambda value: any(value is t for t in tensors)  # noqa: E731
    if isinstance(outputs, transformers.utils.ModelOutput):
        keys = [key for key, value in outputs.items() if dropped(value)]
        return dataclasses.replace(outputs, **dict.fromkeys(keys)) if keys else outputs
    if isinstance(outputs, tuple):
        return tuple(value for value in outputs if not dropped(value))
    return outputs
