"""Hugging Face transformers integration: causal-LM training without the N x V logits.

`patch(model)` makes a transformers causal LM compute its loss with logitless whenever it is
called with `labels`; calls without labels (inference, `generate`) are untouched. `patch(trainer)`
does the same for a `Trainer`'s model and moves the Trainer's label smoothing into the patch, so
that the Trainer passes the labels to the model instead of asking it for the logits.

How, for any model whose forward runs its head (`get_output_embeddings()`, an `nn.Linear`) on
the final hidden states and hands the result to `self.loss_function`, as transformers' causal
LMs do: during a call with labels the head records its input and returns a probe of
`len(_PROBE)` known values per token instead of V logits, and `loss_function` is replaced by
one that computes the loss from the recorded hidden states and the head's weight and bias. What
the model's forward does to the logits between the two (Gemma 2's softcap, Cohere's and
Granite's scale) it does to the probe, from which the scale is read back and the config's
softcap is checked; any other transform is refused rather than silently dropped. A config's
`unpadded_vocab_size` (Inkling: the head's rows past it are padding its forward slices off the
logits) limits the loss to the rows before it. Models whose `loss_function` is not transformers'
causal-LM loss (masked LMs, T5Gemma), encoder-decoders and DeepSpeed ZeRO-3 (which empties
the head's weight before the loss reads it) are refused. The probe is
checked on a model's first call with labels and its scale kept, so that later calls (and
compiled graphs) read it without a host synchronization. `labelled_log_probs` runs the same
interception for per-token log-probs (and entropies) instead of a loss, on any model.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import types
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import transformers
from torch import nn
from transformers.loss.loss_utils import ForCausalLMLoss

import logitless
from logitless._validation import LossOptions, check_bool, temperature_scale
from logitless.functional import linear_cross_entropy_with_options

_PROBE = (-1.0, -0.5, 0.25, 0.75)
"""Per-token values the head returns instead of the logits, in units of the softcap if any."""

_NO_LOSS_FUNCTION = "does not compute its loss by loss_function"
_ZERO3 = (
    "DeepSpeed ZeRO-3 is not supported by logitless.transformers.patch: it empties the "
    "lm_head weight when the head's forward returns, before the loss reads it (FSDP2's "
    "fully_shard is supported)"
)
_SCALE = "_logitless_logit_scale"
"""Attribute of a patched model: the logit scale its probe showed, once checked."""
_ACTIVE = "_logitless_patched"
"""Attribute of a patched instance while its patch is on: `unpatch` clears it, which turns the
patch off even where a wrapper of the patched forward remains (accelerate's mixed precision
wraps a Trainer's model's forward)."""
_SMOOTHER = "_logitless_label_smoother"
"""Attribute of a patched Trainer: the label smoother the patch took over, for `unpatch`."""

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
    weight (and bias, if any; its rows before the config's `unpadded_vocab_size`) with shift=1
    (or the given `shift_labels`), ignore_index=-100 and the config's `final_logit_softcapping`;
    with `num_items_in_batch` it is the sum divided by it, as transformers' own loss does for
    gradient accumulation. Such calls return no logits
    (`logits=None`, or None in the logits' place of a tuple). Calls without labels are
    unchanged; one in training mode with gradients enabled warns, since its caller is about to
    compute a loss from the full logits.

    Args:
        model: a transformers causal LM instance (a PEFT model is patched through its base
            model), a causal-LM class, whose every instance is then patched, or a
            `transformers.Trainer`, whose model is patched and whose `label_smoothing_factor`
            becomes the patch's `label_smoothing`.
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
    _check_no_zero3()
    if isinstance(model, transformers.Trainer):
        return _patch_trainer(model, options, eval_logits)
    if isinstance(model, type):
        if not issubclass(model, transformers.PreTrainedModel):
            raise TypeError(f"model must be a transformers model class, got {model.__name__}")
        model.forward = _patched_method(model, options, eval_logits)
        return model
    causal_lm = _causal_lm(model)
    layers = _head_layers(causal_lm)
    _check_causal_lm_loss(causal_lm)
    fused = _fused_head(causal_lm)
    if fused is not None:
        _check_fused_options(type(causal_lm).__name__, options)
    # the hooks now, not at the first call: a model compiled before it would compile twice
    for layer in layers:
        _Hook.install(layer, "forward")
    _Hook.install(causal_lm, "_loss_function", causal_lm.loss_function)
    if fused is not None:
        causal_lm.forward = fused.forward  # TRL's fused head is put back on top below
    forward = _unpatched_forward(causal_lm)
    # A partial over the model (not a closure) so that a deepcopy calls its own copy.
    causal_lm.forward = functools.update_wrapper(
        functools.partial(_instance_forward, causal_lm, forward, options, eval_logits), forward
    )
    setattr(causal_lm, _ACTIVE, True)
    if fused is not None:
        _install_fused_head(causal_lm, fused, options)
    return model


def unpatch(model: Patchable) -> Patchable:
    """Undo `patch`: `model` (an instance, a class or a Trainer's model) computes its own loss."""
    if isinstance(model, transformers.Trainer):
        for wrapped in (model.model, getattr(model, "ref_model", None)):
            if wrapped is not None:
                unpatch(wrapped)
        if _SMOOTHER in vars(model):
            model.label_smoother = vars(model).pop(_SMOOTHER)
            _unwrap_compute_loss(model)
    elif isinstance(model, type):
        model.forward = getattr(model.forward, "__logitless_unpatched__", model.forward)
    else:
        causal_lm = _causal_lm(model)
        own = causal_lm.__dict__.get("forward")
        if isinstance(own, functools.partial) and own.func is _fused_forward:
            causal_lm.forward = own.args[2].trl_forward  # TRL's own fused head
        elif isinstance(own, functools.partial) and own.func is _instance_forward:
            original = own.args[1]
            if _is_class_forward(causal_lm, original):
                del causal_lm.forward  # the class's forward (patched or not) shows through again
            else:
                causal_lm.forward = original  # an instance's own, such as accelerate's hook
        causal_lm.__dict__.pop(_ACTIVE, None)
        causal_lm.__dict__.pop(_SCALE, None)
        for hook in _installed_hooks(causal_lm):
            hook.uninstall()
    return model


def labelled_log_probs(
    model: Any,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    **inputs: Any,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probs (and entropies) of `labels`, shifted by one as the model's loss
    shifts them, under `softmax(logits / temperature)` of a transformers causal LM called with
    `inputs`, without its logits: as a patched call computes its loss, from the head's input
    and weight (LoRA and modules_to_save heads included) with the model's own logit transforms
    (a constant scale, the config's softcap) read from the probe. Shaped like `labels[:, 1:]`,
    0 where a label is -100 (those rows cost nothing). Patched or not, the model is left as it
    was.
    """
    temperature_scale(temperature)  # before the model runs
    check_bool("return_entropy", return_entropy)
    causal_lm = _causal_lm(model)
    layers = _head_layers(causal_lm)
    _check_causal_lm_loss(causal_lm)
    hooks_before = set(_installed_hooks(causal_lm))
    scale_before = causal_lm.__dict__.get(_SCALE)
    options = LossOptions(filter_eps=None)
    outputs = ("log_probs", "entropy") if return_entropy else ("log_probs",)
    interception = _FusedHeadInterception(causal_lm, layers, options, temperature, outputs)
    try:
        _intercepted(
            interception, _unpatched_forward(causal_lm), (),
            {**inputs, "labels": labels, "use_cache": False},
        )  # fmt: skip
    finally:
        for hook in set(_installed_hooks(causal_lm)) - hooks_before:
            hook.uninstall()
        if scale_before is None:  # measured for this call only: an unpatched model keeps nothing
            causal_lm.__dict__.pop(_SCALE, None)
    fields = interception.fields
    return (fields["log_probs"], fields["entropy"]) if return_entropy else fields["log_probs"]


def _installed_hooks(model: transformers.PreTrainedModel) -> list[_Hook]:
    """The hooks a patched call installed in `model`'s modules (forward, _loss_function)."""
    return [
        hook
        for module in model.modules()
        for hook in vars(module).values()
        if isinstance(hook, _Hook)
    ]


def _check_no_zero3() -> None:
    """A NotImplementedError under DeepSpeed ZeRO-3, which partitions the head's weight again
    when its forward returns, before the loss reads it."""
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # a transformers without its DeepSpeed integration
        return
    if is_deepspeed_zero3_enabled():
        raise NotImplementedError(_ZERO3)


def _causal_lm(model: Any) -> transformers.PreTrainedModel:
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not isinstance(causal_lm, transformers.PreTrainedModel):
        message = f"model must be a transformers model, got {type(model).__name__}"
        wrapped = (getattr(model, name, None) for name in ("_orig_mod", "module"))  # compile, DDP
        if any(isinstance(inner, nn.Module) for inner in wrapped):
            message += (
                ": patch the model before compiling or wrapping it (torch.compile, DDP, "
                "accelerate's prepare)"
            )
        raise TypeError(message)
    return causal_lm


def _unpatched_forward(model: transformers.PreTrainedModel) -> Callable:
    """The model's forward without its own patch, and without its class's: an instance's patch
    takes precedence over its class's."""
    own = model.__dict__.get("forward")
    if isinstance(own, functools.partial) and own.func is _instance_forward:
        return own.args[1]  # patched before
    forward = model.forward
    original = getattr(getattr(forward, "__func__", None), "__logitless_unpatched__", None)
    return forward if original is None else types.MethodType(original, model)


def _is_class_forward(model: transformers.PreTrainedModel, forward: Callable) -> bool:
    """Whether `forward` is the model's class's forward (or what a class patch wraps), bound to
    the model."""
    method = type(model).forward
    functions = (method, getattr(method, "__logitless_unpatched__", None))
    return (
        getattr(forward, "__self__", None) is model
        and getattr(forward, "__func__", None) in functions
    )


def _patch_trainer(
    trainer: transformers.Trainer, options: LossOptions, eval_logits: bool
) -> transformers.Trainer:
    """Patch the Trainer's model (and a TRL trainer's reference model, whose fused LM head
    logitless then computes). Otherwise label smoothing moves from the Trainer into the patch,
    so that the Trainer keeps the labels in the model's inputs and gets no logits."""
    models = [trainer.model]
    ref_model = getattr(trainer, "ref_model", None)
    if ref_model is not None and _fused_head(_causal_lm(ref_model)) is not None:
        models.append(ref_model)
    factor = trainer.args.label_smoothing_factor
    if _fused_head(_causal_lm(trainer.model)) is not None:
        _check_fused_options(type(trainer).__name__, options)
    elif factor and options.label_smoothing and factor != options.label_smoothing:
        raise ValueError(
            f"label_smoothing={options.label_smoothing} differs from the Trainer's "
            f"label_smoothing_factor={factor}: give one of them"
        )
    elif factor:
        options = dataclasses.replace(options, label_smoothing=factor)
        _take_label_smoother(trainer, eval_logits)
    if not eval_logits and trainer.compute_metrics and not trainer.args.prediction_loss_only:
        warnings.warn(
            "with eval_logits=False the Trainer's compute_metrics gets no predictions (the "
            "model returns logits=None in evaluation); patch with eval_logits=True for them, or "
            "set prediction_loss_only=True for the loss alone",
            stacklevel=3,
        )
    if trainer.compute_loss_func is not None:
        warnings.warn(
            "the Trainer's compute_loss_func takes the model's logits, so its loss is computed "
            "from the full N x V logits, without logitless; to use logitless, drop "
            "compute_loss_func and pass the loss's options (label_smoothing, z_loss) to patch()",
            stacklevel=3,
        )
    for model in models:
        patch(
            model,
            label_smoothing=options.label_smoothing,
            z_loss=options.z_loss,
            filter_eps=options.filter_eps,
            impl=options.impl,
            eval_logits=eval_logits,
        )
    return trainer


def _take_label_smoother(trainer: transformers.Trainer, eval_logits: bool) -> None:
    """Move the Trainer's label smoothing into the patch: its label smoother takes the labels
    out of the model's inputs and smooths the loss from the logits. With `eval_logits`,
    evaluation runs the model unpatched, so the smoother is given back there, and the Trainer
    evaluates the loss it would unpatched."""
    if _SMOOTHER not in vars(trainer):  # else patched before, with this eval_logits or not
        vars(trainer)[_SMOOTHER] = trainer.label_smoother
        trainer.label_smoother = None
    _unwrap_compute_loss(trainer)
    if eval_logits:
        trainer.compute_loss = functools.partial(_compute_loss, trainer, trainer.compute_loss)


def _unwrap_compute_loss(trainer: transformers.Trainer) -> None:
    """Take `_compute_loss`'s wrapper off the Trainer, if it has one: its class's compute_loss
    again, or the one of its own it had before."""
    own = vars(trainer).get("compute_loss")
    if isinstance(own, functools.partial) and own.func is _compute_loss:
        del vars(trainer)["compute_loss"]
        wrapped = own.args[1]
        if getattr(wrapped, "__func__", None) is not type(trainer).compute_loss:
            trainer.compute_loss = wrapped


def _compute_loss(trainer: transformers.Trainer, compute_loss: Callable, *args, **kwargs):
    """The Trainer's `compute_loss`, with its label smoother in evaluation (gradients off)."""
    trainer.label_smoother = None if torch.is_grad_enabled() else vars(trainer)[_SMOOTHER]
    try:
        return compute_loss(*args, **kwargs)
    finally:
        trainer.label_smoother = None


def _patched_method(model_class: type, options: LossOptions, eval_logits: bool) -> Callable:
    """A class's `forward` method that routes calls with labels through `_forward` while it is
    the class's (a wrapper of an instance's bound forward, such as accelerate's, may outlive
    `unpatch`)."""
    method = getattr(model_class.forward, "__logitless_unpatched__", model_class.forward)

    @functools.wraps(method)
    def forward(self, *args, **kwargs):
        if model_class.forward is not forward:  # unpatched, or patched again: what it is now
            return model_class.forward(self, *args, **kwargs)
        bound = functools.partial(method, self)
        return _forward(self, bound, options, eval_logits, *args, **kwargs)

    forward.__logitless_unpatched__ = method
    return forward


def _instance_forward(
    model: transformers.PreTrainedModel,
    forward: Callable,
    options: LossOptions,
    eval_logits: bool,
    *args: Any,
    **kwargs: Any,
) -> Any:
    """A patched instance's forward: `_forward` while its patch is on (`_ACTIVE`)."""
    if not getattr(model, _ACTIVE, False):
        return forward(*args, **kwargs)
    return _forward(model, forward, options, eval_logits, *args, **kwargs)


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
    if labels is not None and eval_logits and not torch.is_grad_enabled():
        return forward(*args, **kwargs)  # evaluation: the unpatched model's logits and loss
    if labels is None:
        if model.training and torch.is_grad_enabled():
            warnings.warn(
                f"{type(model).__name__} is called for training without labels, so it returns "
                "the full N x V logits and logitless computes no loss; pass the labels to the "
                "model. A Trainer keeps them from it, to compute the loss from the logits "
                "itself, with a compute_loss_func or with a label_smoothing_factor that "
                "logitless.transformers.patch(trainer) has not taken over (it takes over "
                "transformers' Trainer's, not a TRL trainer's)",
                stacklevel=3,
            )
        return forward(*args, **kwargs)
    layers = _head_layers(model)
    _check_causal_lm_loss(model)
    hooks = (layer.__dict__.get("forward") for layer in layers)
    if any(isinstance(hook, _Hook) and hook.interception for hook in hooks):
        return forward(*args, **kwargs)  # an outer patch handles this call
    return _intercepted(_HeadInterception(model, layers, options), forward, args, kwargs)


def _intercepted(
    interception: _HeadInterception, forward: Callable, args: tuple, kwargs: dict
) -> Any:
    """`forward(*args, **kwargs)` with its head and loss intercepted, without the probe."""
    with interception:
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


def _check_causal_lm_loss(model: transformers.PreTrainedModel) -> None:
    """A TypeError unless `model` computes its loss with transformers' causal-LM loss, the one a
    patch replaces: a masked LM's or an encoder-decoder's loss_function (ModernBERT, T5Gemma)
    does not shift the labels, and an encoder-decoder without a loss_type of its own (T5, BART)
    has ForCausalLMLoss as its loss_function but does not call it."""
    if model.config.is_encoder_decoder:
        raise TypeError(
            f"{type(model).__name__} is an encoder-decoder model: "
            "logitless.transformers.patch computes a causal LM's loss only"
        )
    loss_function = model.loss_function
    if isinstance(loss_function, _Hook):  # patched and called before
        loss_function = loss_function.default
    if loss_function is not ForCausalLMLoss:
        name = getattr(loss_function, "__name__", type(loss_function).__name__)
        raise TypeError(
            f"model computes its loss with {name}, not transformers' ForCausalLMLoss: "
            "logitless.transformers.patch computes a causal LM's loss only"
        )


def _head_layers(model: transformers.PreTrainedModel) -> list[nn.Module]:
    """The layers whose forward computes the logits from the final hidden states: the output
    layer itself, or the layers a PEFT `modules_to_save` wrapper dispatches to."""
    head = model.get_output_embeddings()
    if _is_lora(head):
        for name in set(head.active_adapters) & set(head.lora_variant):
            raise TypeError(
                f"model's output layer has a {type(head.lora_variant[name]).__name__} LoRA "
                "variant, which logitless cannot compute without its logits: use plain LoRA on "
                "the lm_head, or call the model without patching"
            )
    if _is_linear(head) or _is_lora(head):
        return [head]
    wrapper = _peft_class("peft.utils.other", "ModulesToSaveWrapper")
    if wrapper is not None and isinstance(head, wrapper):
        inner = [head.original_module, *head.modules_to_save.values()]
        if all(_is_linear(layer) for layer in inner):
            return inner
    kind = type(head)
    raise TypeError(
        f"model must have an output layer (lm_head) that computes hidden @ weight.T + bias: "
        f"{type(model).__name__}'s is {kind.__module__}.{kind.__qualname__}, which logitless "
        "cannot compute without its logits. Supported: nn.Linear and its subclasses that keep "
        "its forward (FSDP2's), PEFT LoRA and modules_to_save on an nn.Linear; otherwise call "
        "the model without patching"
    )


def _is_linear(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) and type(layer).forward is nn.Linear.forward


def _is_lora(layer: nn.Module) -> bool:
    lora = _peft_class("peft.tuners.lora", "Linear")
    return lora is not None and type(layer) is lora and _is_linear(layer.base_layer)


def _peft_class(module: str, name: str) -> type | None:
    """A PEFT class, if PEFT is loaded (no PEFT layer exists before it is)."""
    return getattr(sys.modules.get(module), name, None)


def _classifier(
    layer: nn.Module, hidden: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(e, c, bias) with `layer(hidden) = e @ c.T + bias`, without computing it.

    A LoRA layer's active adapters add `scaling * B(A(dropout(hidden)))`: their rank-r
    features join `hidden` and their B matrices join the weight, so the loss runs over
    `[hidden, features]` and `[W, B]` (a (V, D + r) copy of the weight, no logits).
    """
    if _is_linear(layer):
        return hidden, layer.weight, layer.bias
    if layer.disable_adapters and layer.merged:
        layer.unmerge()  # as the layer's own forward does
    base = layer.base_layer
    e, c, bias = [hidden], [base.weight], base.bias
    if not (layer.disable_adapters or layer.merged):
        for name in layer.active_adapters:
            if name not in layer.lora_A:
                continue
            lora_a, lora_b = layer.lora_A[name], layer.lora_B[name]
            scaling = layer.scaling[name]
            features = lora_a(layer.lora_dropout[name](hidden.to(lora_a.weight.dtype)))
            e.append((features * scaling).to(hidden.dtype))
            c.append(lora_b.weight.to(base.weight.dtype))
            if lora_b.bias is not None:
                term = scaling * lora_b.bias.to(base.weight.dtype)
                bias = term if bias is None else bias + term
    if len(e) == 1:
        return hidden, base.weight, bias
    return torch.cat(e, dim=-1), torch.cat(c, dim=-1), bias


def _unshard(layer: nn.Module) -> None:
    """Gather an FSDP2 head's parameters again: FSDP frees them after the head's forward (with
    reshard_after_forward), and the loss, computed later, needs them. FSDP's post-backward
    hook, which the head's input carries into the loss, reduce-scatters their gradients and
    frees them again."""
    fsdp_module = getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)
    for module in (layer, getattr(layer, "base_layer", None)):
        if fsdp_module is not None and isinstance(module, fsdp_module):
            module.unshard()


class _HeadInterception:
    """For one forward call: the head records its input and returns a probe, and the model's
    `loss_function` computes the loss from that input with logitless."""

    def __init__(
        self, model: transformers.PreTrainedModel, layers: list[nn.Module], options: LossOptions
    ):
        self.model, self.options = model, options
        self.hooks = [_Hook.install(layer, "forward") for layer in layers]
        self.hooks.append(_Hook.install(model, "_loss_function", model.loss_function))
        self.softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
        self.hidden: torch.Tensor | None = None
        self.layer: nn.Module | None = None
        self.operands: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
        self.probe: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None  # the probe as the model passed it to the loss

    def __enter__(self) -> _HeadInterception:
        for hook in self.hooks:
            hook.interception = self
        return self

    def __exit__(self, *exc_info: object) -> None:
        for hook in self.hooks:
            hook.interception = None

    def record(
        self, layer: nn.Module, hidden: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """The head's forward: record its operands, return the probe in place of the logits."""
        if args or kwargs:
            raise self.unsupported(
                "passes its output layer more than the hidden states (PEFT's adapter_names: a "
                "batch mixing adapters)"
            )
        if self.hidden is not None:
            raise self.unsupported("runs its output layer more than once in a forward")
        weight = layer.weight if _is_linear(layer) else layer.base_layer.weight
        if weight.device.type == "meta":
            raise self.unsupported("keeps its output layer offloaded (weight on the meta device)")
        hidden = hidden.to(weight.device)  # as accelerate's hook of a head on another device
        self.hidden, self.layer = hidden, layer
        self.operands = _classifier(layer, hidden)
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
        _unshard(self.layer)
        hidden, weight, bias = self.operands
        if not weight.numel():  # as DeepSpeed ZeRO-3 leaves it
            raise NotImplementedError(f"{type(self.model).__name__}: {_ZERO3}")
        classes = getattr(self.model.config.get_text_config(), "unpadded_vocab_size", None)
        if classes is not None and classes < weight.shape[0]:  # padding rows the model slices off
            weight, bias = weight[:classes], None if bias is None else bias[:classes]
        if not (isinstance(scale, float) and scale == 1.0):  # a (hidden @ W.T + b)
            hidden, bias = hidden * scale, None if bias is None else bias * scale
        targets, shift = (labels, 1) if shift_labels is None else (shift_labels, 0)
        if targets.shape != hidden.shape[:-1]:
            raise ValueError(
                f"labels must have one entry per position the output layer sees: "
                f"{tuple(hidden.shape[:-1])}, got {tuple(targets.shape)} (with logits_to_keep, "
                "the loss has only the kept positions: pass their labels, or logits_to_keep=0)"
            )
        if targets.shape[-1] <= shift:  # one-token sequences predict nothing, as in transformers
            targets, shift = torch.full_like(targets, ignore_index), 0
        options = dataclasses.replace(
            self.options,
            ignore_index=ignore_index,
            shift=shift,
            softcap=self.softcap,
        )
        device = hidden.device.type
        dtype = self.dtype(device)
        if dtype is not None:  # compute in the dtype the head would have
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(hidden.device)
        with torch.autocast(device, enabled=False):
            return self.compute(
                hidden, weight, bias, targets.to(hidden.device), options, num_items_in_batch
            )

    def dtype(self, device: str) -> torch.dtype | None:
        """The dtype the head's operands are cast to: autocast's, as nn.Linear's would be."""
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None

    def compute(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        options: LossOptions,
        num_items_in_batch: torch.Tensor | int | None,
    ) -> torch.Tensor:
        """The causal-LM loss: the mean over labelled tokens, or their sum / num_items_in_batch."""
        if num_items_in_batch is None:
            return linear_cross_entropy_with_options(hidden, weight, targets, bias, options)
        options = dataclasses.replace(options, reduction="sum")
        loss = linear_cross_entropy_with_options(hidden, weight, targets, bias, options)
        return loss / num_items_in_batch

    def _logit_scale(self, logits: torch.Tensor) -> float | torch.Tensor:
        """The factor a with `logits = softcap(a * head(hidden))` that the model applied.

        Read from the probe and checked on the model's first call, then kept on the model. A
        compiled graph that meets an unchecked model reads it as a tensor and checks it with a
        device-side assertion: neither waits for the device.
        """
        if not (
            isinstance(logits, torch.Tensor)
            and logits.is_floating_point()
            and logits.shape == self.probe.shape
        ):
            raise self.unsupported("reshapes its logits before the loss")
        known = getattr(self.model, _SCALE, None)
        if known is not None:
            return known
        if not logits.numel():
            return 1.0  # no tokens: nothing to scale, nothing learnt
        probe, received = self.probe.double(), logits.detach().double()
        if self.softcap is not None:
            received = self.softcap * torch.atanh(received / self.softcap)
        scale = received.flatten()[-1] / probe.flatten()[-1]
        tolerance = 16 * torch.finfo(logits.dtype).eps
        scale = torch.where((scale - 1.0).abs() <= tolerance, 1.0, scale)
        agrees = torch.isclose(received, scale * probe, rtol=tolerance, atol=0.0).all()
        if torch.compiler.is_compiling():
            torch._assert_async(agrees, self.unsupported(_TRANSFORMS).args[0])
            return scale.float()
        if not agrees:
            raise self.unsupported(_TRANSFORMS)
        setattr(self.model, _SCALE, scale.item())
        return getattr(self.model, _SCALE)

    def unsupported(self, what: str) -> NotImplementedError:
        return NotImplementedError(
            f"{type(self.model).__name__} {what}: logitless.transformers.patch cannot compute "
            "its loss; call it without patching"
        )


class _Hook:
    """A patched model's head layer `forward` or its `_loss_function`: what it was, except
    during an intercepted call, when it records the head's input or computes the loss.

    Installed once and left in place (deleting a module attribute inside a compiled graph is
    not supported); `unpatch` removes it.
    """

    def __init__(self, module: nn.Module, name: str, default: Callable | None):
        self.module, self.name, self.default = module, name, default
        self.replaced = module.__dict__.get(name)  # accelerate's hooks may occupy forward
        self.interception: _HeadInterception | None = None

    @classmethod
    def install(cls, module: nn.Module, name: str, default: Callable | None = None) -> _Hook:
        hook = module.__dict__.get(name)
        if not isinstance(hook, cls):
            hook = cls(module, name, default)
            setattr(module, name, hook)
        return hook

    def uninstall(self) -> None:
        if self.replaced is None:
            delattr(self.module, self.name)
        else:
            setattr(self.module, self.name, self.replaced)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.interception is not None:
            if self.name == "forward":
                return self.interception.record(self.module, *args, **kwargs)
            return self.interception.loss(*args, **kwargs)
        if self.replaced is not None:
            return self.replaced(*args, **kwargs)
        if self.default is not None:
            return self.default(*args, **kwargs)
        return type(self.module).forward(self.module, *args, **kwargs)


_TRANSFORMS = (
    "transforms its logits before the loss other than by a constant factor and the config's "
    "final_logit_softcapping"
)


def _without(outputs: Any, tensors: tuple[torch.Tensor | None, ...]) -> Any:
    """`outputs` (a ModelOutput or a tuple) with None in place of the entries that are
    `tensors`, as transformers leaves an output it did not compute."""
    dropped = lambda value: any(value is t for t in tensors)  # noqa: E731
    if isinstance(outputs, transformers.utils.ModelOutput):
        keys = [key for key, value in outputs.items() if dropped(value)]
        return dataclasses.replace(outputs, **dict.fromkeys(keys)) if keys else outputs
    if isinstance(outputs, tuple):
        return tuple(None if dropped(value) else value for value in outputs)
    return outputs


# TRL's trainers (SFT, DPO, GRPO, RLOO, KTO) give their models a fused LM head with
# `trl.trainer.utils.add_fused_lm_head`: `model(..., labels=labels, fused_lm_head=True)` returns a
# `FusedCausalLMOutput` of per-token log-probabilities and statistics instead of logits, and the
# trainers compute their losses from it. That call is TRL's extension point; logitless answers
# it with the same fields, computed through the probe like any patched call.


@dataclasses.dataclass(frozen=True)
class _FusedHead:
    """The arguments TRL gave `add_fused_lm_head`, and the model's forward it wrapped."""

    temperature: float
    cast_lm_head_to_fp32: bool
    outputs: tuple[str, ...]
    forward: Callable  # the model's forward under TRL's wrapper
    trl_forward: Callable  # TRL's wrapper, which unpatch restores


def _fused_head(model: transformers.PreTrainedModel) -> _FusedHead | None:
    """The fused LM head TRL gave `model` (computed by TRL, or by a patch), if it did."""
    trl_forward = model.__dict__.get("forward")
    if isinstance(trl_forward, functools.partial) and trl_forward.func is _fused_forward:
        return trl_forward.args[2]
    code = getattr(getattr(trl_forward, "__func__", None), "__code__", None)
    if code is None or code.co_name != "_fused_forward" or "trl" not in code.co_filename:
        return None
    settings = inspect.getclosurevars(trl_forward.__func__).nonlocals
    return _FusedHead(
        temperature=settings["temperature"],
        cast_lm_head_to_fp32=settings["cast_lm_head_to_fp32"],
        outputs=tuple(settings["outputs"]),
        forward=settings["original_forward"],
        trl_forward=trl_forward,
    )


def _check_fused_options(name: str, options: LossOptions) -> None:
    for option in ("label_smoothing", "z_loss"):
        if getattr(options, option):
            raise ValueError(
                f"{option} does not apply to {name}'s TRL fused LM head: TRL's trainers compute "
                "their losses from per-token log-probabilities, which it would change"
            )


def _install_fused_head(
    model: transformers.PreTrainedModel, head: _FusedHead, options: LossOptions
) -> None:
    if not hasattr(logitless, "linear_log_probs"):
        raise NotImplementedError(
            "TRL's fused LM head needs logitless.linear_log_probs and linear_top_k, which this "
            "version of logitless lacks"
        )
    plain = model.forward  # patched: labelled calls without fused_lm_head
    model.forward = functools.update_wrapper(
        functools.partial(_fused_forward, model, plain, head, options), head.trl_forward
    )


def _fused_forward(
    model: transformers.PreTrainedModel,
    plain: Callable,
    head: _FusedHead,
    options: LossOptions,
    *args: Any,
    fused_lm_head: bool = False,
    **kwargs: Any,
) -> Any:
    """TRL's fused-head forward, computed by logitless."""
    if not fused_lm_head:
        return plain(*args, **kwargs)
    if not getattr(model, _ACTIVE, False):  # unpatched under a wrapper that kept this forward
        return head.trl_forward(*args, fused_lm_head=True, **kwargs)
    kwargs["use_cache"] = False
    interception = _FusedHeadInterception(
        model, _head_layers(model), options, head.temperature, head.outputs,
        cast_to_fp32=head.cast_lm_head_to_fp32,
    )  # fmt: skip
    outputs = _intercepted(interception, _unpatched_forward(model), args, kwargs)
    trl_utils = sys.modules["trl.trainer.utils"]
    return trl_utils.FusedCausalLMOutput(
        loss=outputs.loss, aux_loss=getattr(outputs, "aux_loss", None), **interception.fields
    )


class _FusedHeadInterception(_HeadInterception):
    """An intercepted call for per-token fields at a temperature (TRL's fused head's, or
    `labelled_log_probs`'s) in place of the loss, which becomes TRL's: minus the log-probs' sum
    over the labelled tokens (or num_items_in_batch)."""

    def __init__(self, model, layers, options, temperature, outputs, *, cast_to_fp32=False):
        super().__init__(model, layers, options)
        self.temperature, self.outputs, self.cast_to_fp32 = temperature, outputs, cast_to_fp32
        self.fields: dict[str, torch.Tensor | None] = {}

    def dtype(self, device: str) -> torch.dtype | None:
        return torch.float32 if self.cast_to_fp32 else super().dtype(device)

    def compute(self, hidden, weight, bias, targets, options, num_items_in_batch):
        self.fields = _fused_fields(
            hidden, weight, bias, targets, options, self.temperature, self.outputs
        )
        mask = self.fields["label_mask"]
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return -self.fields["log_probs"].sum() / count


def _fused_fields(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    options: LossOptions,
    temperature: float,
    outputs: tuple[str, ...],
) -> dict[str, torch.Tensor | None]:
    """The per-token fields of TRL's `FusedCausalLMOutput` that `outputs` names (log_probs
    always), 0 at ignored tokens, for logits `softcap(e @ c.T + bias) / temperature`."""
    with_entropy = "entropy" in outputs  # else neither the sweep nor the backward forms it
    found = logitless.linear_log_probs(
        e,
        c,
        targets,
        bias,
        temperature=temperature,
        return_entropy=with_entropy,
        ignore_index=options.ignore_index,
        shift=options.shift,
        softcap=options.softcap,
        filter_eps=options.filter_eps,
        impl=options.impl,
    )
    log_probs, entropy = found if with_entropy else (found, None)
    labels = targets[..., options.shift :]
    mask = labels != options.ignore_index
    fields = {
        "log_probs": log_probs,
        "entropy": entropy,
        "label_mask": mask,
        "is_top1": None,
        "mean_logits": None,
        "log_sum_sq_probs": None,
    }
    with torch.no_grad():
        if "is_top1" in outputs:
            rows = e[..., : e.shape[-2] - options.shift, :]  # the rows that predict a label
            _, top = logitless.linear_top_k(
                rows,
                c,
                1,
                bias,
                temperature=temperature,
                softcap=options.softcap,
                impl=options.impl,
            )
            fields["is_top1"] = (top[..., 0] == labels) & mask
        if "mean_logits" in outputs or "log_sum_sq_probs" in outputs:
            lse, mean = _lse_and_mean(e, c, bias, targets, options, 1.0 / temperature)
            if "mean_logits" in outputs:
                fields["mean_logits"] = mean
            if "log_sum_sq_probs" in outputs:  # log sum p^2 = lse(2 z) - 2 lse(z)
                lse_twice, _ = _lse_and_mean(e, c, bias, targets, options, 2.0 / temperature)
                fields["log_sum_sq_probs"] = lse_twice - 2 * lse
    return fields


def _lse_and_mean(
    e: torch.Tensor,
    c: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    options: LossOptions,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-sum-exp and mean over the vocabulary of `scale * softcap(e @ c.T + bias)`:
    `a * softcap_s(z) = softcap_(a s)(a z)` folds the scale into the operands, and the fully
    smoothed loss is `lse - mean`."""
    options = dataclasses.replace(
        options,
        softcap=None if options.softcap is None else options.softcap * scale,
        reduction="none",
        label_smoothing=1.0,
        z_loss=0.0,
        return_lse=True,
    )
    bias = None if bias is None else bias * scale
    smoothed, lse = linear_cross_entropy_with_options(e * scale, c, targets, bias, options)
    return lse, lse - smoothed
