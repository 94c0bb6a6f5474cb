"""Autograd functions over a backend: per-token logit statistics, and the fused loss.

Every quantity logitless offers is an elementwise function of a few per-token statistics of the
logits z = scale * softcap(e @ c.T + bias) (and of a teacher's, for distillation): see
docs/statistics.md. So one differentiable op computes the statistics a call asks for
(`LinearLogitStats`), and plain PyTorch combines them into losses, log-probs, entropies and
divergences. Its backward turns the upstream gradient of each statistic into the coefficients
of the backend's one gradient formula (`logitless._loss.statistic_coefficients`). When a
cross-entropy is reduced and nothing else is asked for, the coefficients are known during the
forward pass and the backend can produce the gradients in the same sweep
(`FusedLinearCrossEntropy`), saving one matmul.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from logitless import _ops as ops
from logitless._loss import (
    HARD_LOSS_STATISTICS,
    TokenLoss,
    divergence_from_statistics,
    floored_log_tail,
    mixed_with_hard_loss,
    statistic_coefficients,
    with_hard_loss,
)
from logitless._validation import check_no_vmap

if TYPE_CHECKING:
    from logitless.distributed import TokenGather, VocabParallel

MIXTURE = ("jsd", "jsd_p")
"""Statistics of the second sweep: they need both log-sum-exps of the first."""


@dataclass(frozen=True)
class Plan:
    """How one call runs: the backend, how the logits are formed, gradient filtering, the
    vocabulary shard (the backend then sees its rows only, and the statistics are combined
    across ranks; with `token_gather`, the rows are every rank's tokens, see
    `logitless.distributed.TokenGather`) and, for distillation, the teacher's softcap, the
    JSD's beta and a cached teacher's support (N, k) (the `support_tail` statistic's)."""

    impl: str
    softcap: float | None
    filter_eps: float | None
    vocab_parallel: VocabParallel | None = None
    token_gather: TokenGather | None = None
    scale: float = 1.0
    column_weight: torch.Tensor | None = None
    teacher_softcap: float | None = None
    beta: float = 0.5
    support: torch.Tensor | None = None


def filters(terms: tuple[str, ...], softcap: float | None) -> bool:
    """Whether gradient filtering may skip tiles for these coefficient terms: only the softmax
    and target terms have a skipped mass bounded by the budget (the `sum` term without softcap
    is added outside the tiles)."""
    allowed = {"p", "target"} if softcap is not None else {"p", "target", "sum"}
    return set(terms) <= allowed


class LinearLogitStats(torch.autograd.Function):
    """The statistics `names` per row, (len(names), N); the log-probabilities at k classes per
    row, (N, k): with `top_k`, each row's largest logits (their classes the second output),
    with `plan.support`, its classes (`_support_log_probs`); and (for backward) every
    statistic computed. Backward recomputes the logits block by block; the log-probabilities'
    gradient, a one-hot at each class less p, is formed in the backend's gradient tile with the
    statistics' (a confident class's 1 - p there, before any 16-bit rounding)."""

    @staticmethod
    def forward(e, c, bias, targets, teacher_e, teacher_c, teacher_bias, plan: Plan,
                names: tuple[str, ...], top_k: int):  # fmt: skip
        first = _first_sweep(names, teacher_e is not None, plan.support is not None)
        teacher = (teacher_e, teacher_c, teacher_bias, plan.teacher_softcap, plan.beta)
        found, top, top_log_probs = ops.stats(
            e, c, bias, targets, plan.impl, plan.softcap, plan.scale, plan.column_weight,
            ",".join(first), *teacher, None, None, top_k, plan.support,
        )  # fmt: skip
        shard = plan.vocab_parallel
        if shard is not None:
            found = shard.combine_stats(found, list(first))
        values = dict(zip(first, found, strict=True))
        if "jsd" in names:
            second, *_ = ops.stats(
                e, c, bias, targets, plan.impl, plan.softcap, plan.scale, plan.column_weight,
                ",".join(MIXTURE), *teacher, _lse_pair(values, "teacher_lse"),
                _lse_pair(values, "lse"), 0, None,
            )  # fmt: skip
            if shard is not None:
                second = shard.sum_stats(second)
            values.update(zip(MIXTURE, second, strict=True))
        if plan.support is not None:
            top_log_probs = _support_log_probs(e, c, bias, targets, plan, values)
        kept = torch.stack(list(values.values()))
        return torch.stack([values[name] for name in names]), top, top_log_probs, kept

    @staticmethod
    def setup_context(ctx, inputs, output):
        e, c, bias, targets, teacher_e, teacher_c, teacher_bias, plan, names, _ = inputs
        ctx.plan, ctx.names = plan, names
        with_teacher, with_support = teacher_e is not None, plan.support is not None
        ctx.kept = _first_sweep(names, with_teacher, with_support) + (
            MIXTURE if "jsd" in names else ()
        )
        classes = plan.support if with_support else output[1]
        ctx.save_for_backward(
            e, c, bias, targets, teacher_e, teacher_c, teacher_bias, output[3], classes
        )
        ctx.mark_non_differentiable(targets, output[1], output[3])

    @staticmethod
    def backward(ctx, grad_stats, _, grad_log_probs, __):
        check_not_double_backward()
        e, c, bias, targets, teacher_e, teacher_c, teacher_bias, kept, classes = ctx.saved_tensors
        plan: Plan = ctx.plan
        values = dict(zip(ctx.kept, kept, strict=True))
        grads = {  # a rounding's residual has no gradient
            name: g
            for name, g in zip(ctx.names, grad_stats, strict=True)
            if not name.endswith("_residual")
        }
        if plan.token_gather is not None:  # every rank's tokens get every rank's coefficients
            summed = plan.token_gather.sum_coefficients(*grads.values())
            grads = dict(zip(grads, summed, strict=True))
        coefficients = statistic_coefficients(grads, values, plan.beta)
        support = support_grad = support_tail = None
        if "outside" in coefficients:
            support_tail = floored_log_tail(values["support_tail"])
        if classes.shape[1]:  # log p at the classes: a one-hot at each, less p times their sum
            support, support_grad = classes, grad_log_probs
            coefficients["p"] = coefficients.get("p", 0.0) - support_grad.sum(1)
        terms = tuple(coefficients)
        needs = ctx.needs_input_grad[:3]
        # a support's one-hot lies at classes no tile check knows: never filtered
        filtered = filters(terms, plan.softcap) and support is None
        filter_eps = plan.filter_eps if filtered else None
        teacher = (teacher_e, teacher_c, teacher_bias, plan.teacher_softcap, plan.beta)
        with torch.no_grad():  # under torch.func.grad too: the result is not differentiated
            grad_e, grad_c, grad_bias = ops.grads(
                e, c, bias, targets, _lse_pair(values, "lse"),
                torch.stack(list(coefficients.values())), ",".join(terms), plan.impl,
                plan.softcap, plan.scale, plan.column_weight, *teacher,
                _lse_pair(values, "teacher_lse"), filter_eps, list(needs), support, support_tail,
                support_grad,
            )  # fmt: skip
        if plan.vocab_parallel is not None and needs[0]:
            grad_e = plan.vocab_parallel.reduce_grad_e(grad_e)
        if plan.token_gather is not None:
            grad_c, grad_bias = (plan.token_gather.average(g) for g in (grad_c, grad_bias))
        grads = (grad_e.to(e.dtype), grad_c, grad_bias.to(c.dtype))
        return *_present(grads, needs), None, None, None, None, None, None, None


def _lse_pair(values: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """The log-sum-exp `name` as the backends take it: (2, N), with its residual."""
    if name not in values:
        return None
    return torch.stack([values[name], values[f"{name}_residual"]])


def _first_sweep(
    names: tuple[str, ...], with_teacher: bool, with_support: bool = False
) -> tuple[str, ...]:
    """The statistics of the first sweep for `names`: every one but the JSD's, and always the
    log-sum-exps (with their residuals) the backward (and the JSD's sweep) need, and the
    target logit a support's log-probabilities are anchored at."""
    normalizers = ["lse", *(["teacher_lse"] if with_teacher else [])]
    first = [*normalizers, *(f"{name}_residual" for name in normalizers)]
    first += ["target"] if with_support else []
    return tuple(first + [name for name in names if name not in first and name not in MIXTURE])


def _support_log_probs(e, c, bias, targets, plan: Plan, values: dict) -> torch.Tensor:
    """The log-probabilities at `plan.support`'s classes (N, k), 0 at its padding (-1).

    Its logits and the target's are gathered (N x (k + 1) dot products) apart from the sweep,
    whose lse they would not cancel as log_softmax's logits do: a confident class's log-prob
    (near 0) would keep an ulp of lse. So where a row's target is likely (log p_target > -1)
    they are taken relative to it, (z - z_target) + log p_target, the target's from the sweep
    ((target - lse) - residual, as precise as log_softmax's); elsewhere (a target far below the
    others, even masked, whose logit no difference should pass through) (z - lse) - residual.
    """
    support = plan.support
    classes = torch.cat((support, targets.unsqueeze(1)), dim=1).clamp(min=0)
    z = ops.gathered_dots(e, c, classes)
    if bias is not None:
        z = z + bias.to(z.dtype)[classes]
    if plan.softcap is not None:
        z = plan.softcap * torch.tanh(z / plan.softcap)
    z = z * plan.scale
    z, anchor = z[:, :-1], z[:, -1:]
    lse, residual, target = (
        values[name].unsqueeze(1) for name in ("lse", "lse_residual", "target")
    )
    target_log_p = (target - lse) - residual
    likely = (targets.unsqueeze(1) >= 0) & (target_log_p > -1.0)
    log_p = torch.where(likely, (z - anchor) + target_log_p, (z - lse) - residual)
    return torch.where(support >= 0, log_p, 0.0)


class _FusedLoss(torch.autograd.Function):
    """A reduced loss whose gradients the forward pass computes; backward only scales them.

    Forward returns the loss and those gradients (the caller keeps the loss only): grad_e and
    grad_bias in the accumulation dtype, grad_c in c's; its first three inputs are (e, c, bias),
    its last `needs`, which of them get a gradient. Backward multiplies the gradients by the
    upstream gradient in float32 (or float64) and rounds once. They are scaled in place (no
    second copy of grad_c), so a second backward through the same graph is refused. 16-bit
    gradients are rounded before that multiplication, which costs range in float16 (a
    GradScaler's scale would overflow or its small gradients flush to zero);
    `logitless.functional` does not fuse float16 inputs.
    """

    @staticmethod
    def setup_context(ctx, inputs, output):
        e, c, needs = inputs[0], inputs[1], inputs[-1]
        _, *grads = output
        ctx.needs, ctx.dtypes, ctx.other_inputs = needs, (e.dtype, c.dtype), len(inputs) - 3
        ctx.set_materialize_grads(False)  # else backward gets a zero tensor per gradient output
        ctx.mark_non_differentiable(*grads)
        ctx.save_for_backward(*grads)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        check_not_double_backward()
        if getattr(ctx, "spent", False):
            raise RuntimeError(
                "logitless: a second backward through the same reduced loss (retain_graph=True): "
                "its gradients, computed in the forward pass, were scaled in place by the first. "
                "Compute the loss again, or sum reduction='none' losses, whose backward recomputes"
            )
        ctx.spent = True
        grad_e, grad_c, grad_bias = ctx.saved_tensors
        e_dtype, c_dtype = ctx.dtypes
        scaled = (
            _scale_in_place(grad_e, grad_loss).to(e_dtype),
            _scale_in_place(grad_c, grad_loss),
            _scale_in_place(grad_bias, grad_loss).to(c_dtype),
        )
        return *_present(scaled, ctx.needs), *(None,) * ctx.other_inputs


class FusedLinearCrossEntropy(_FusedLoss):
    """sum_n token_weights[n] * loss[n] of a cross-entropy, its gradients from the forward pass.

    `token_weights` (N,) holds each row's weight in the reduction (0 for ignored rows),
    `target_weights` (N,) each row's class weight or None.
    """

    @staticmethod
    def forward(e, c, bias, targets, token_weights, target_weights, plan: Plan,
                token_loss: TokenLoss, needs):  # fmt: skip
        found, *grads = ops.stats_and_grads(
            e, c, bias, targets, token_weights, target_weights, plan.impl, plan.softcap,
            plan.column_weight, token_loss.label_smoothing > 0, plan.filter_eps,
            token_loss.label_smoothing, token_loss.z_loss, token_loss.vocab, list(needs),
        )  # fmt: skip
        lse, target_logit, lse_residual, logit_sum = found
        losses = token_loss(lse, target_logit, logit_sum, target_weights, lse_residual)
        loss = torch.where(token_weights != 0, token_weights * losses, 0.0).sum()
        return loss, *grads


class FusedLinearDivergence(_FusedLoss):
    """sum_n token_weights[n] * loss[n] of a divergence between a teacher head and the
    student's, its gradients (the student's) from the forward pass; `weights` holds the
    divergence as a linear combination of statistics (`logitless._loss.DIVERGENCES`), and
    `hard_weight` mixes in the student's cross-entropy, whose statistics the same sweep gives:
    only at T = 1 (`plan.scale` 1), where the divergence's logits are the hard loss's."""

    @staticmethod
    def forward(e, c, bias, targets, teacher_e, teacher_c, teacher_bias, token_weights,
                plan: Plan, weights: dict[str, float], hard_weight: float, needs):  # fmt: skip
        mixed = with_hard_loss(weights, hard_weight)
        hard = HARD_LOSS_STATISTICS if hard_weight else ()
        jsd_p = ("jsd_p",) if "jsd" in weights else ()
        names = tuple(dict.fromkeys((*mixed, *hard, *jsd_p)))
        found, *grads = ops.linear_stats_and_grads(
            e, c, bias, targets, token_weights, plan.impl, plan.softcap, plan.scale,
            ",".join(names), [mixed.get(name, 0.0) for name in names], teacher_e, teacher_c,
            teacher_bias, plan.teacher_softcap, plan.beta, list(needs),
        )  # fmt: skip
        values = dict(zip(names, found, strict=True))
        losses = mixed_with_hard_loss(
            divergence_from_statistics(weights, values), values, hard_weight
        )
        loss = torch.where(token_weights != 0, token_weights * losses, 0.0).sum()
        return loss, *grads


SCALE_CHUNK_ELEMENTS = 2**18
"""Elements per chunk when scaling a 16-bit gradient through float32 (1 MiB of scratch)."""


def _scale_in_place(grad: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """grad *= scale, the product taken in float32 or better and rounded once to grad's dtype;
    chunked so that a 16-bit V x D gradient never needs a float32 copy of itself."""
    scale = scale.to(torch.promote_types(grad.dtype, torch.float32))
    if grad.dtype == scale.dtype or grad.numel() == 0:
        return grad.mul_(scale)
    flat = grad.view(-1)
    for start in range(0, flat.numel(), SCALE_CHUNK_ELEMENTS):
        part = flat[start : start + SCALE_CHUNK_ELEMENTS]
        part.copy_(part.to(scale.dtype).mul_(scale))
    return grad


def check_not_double_backward() -> None:
    """Refuse to be differentiated twice: logitless's gradients are not themselves
    differentiable, and autograd would otherwise return them without a graph.

    Backward runs with grad mode on under `create_graph=True` (which torch.func.vjp, jacrev
    and hessian use), and also under one `torch.func.grad` (the only transform on the stack),
    which is allowed: its result is not differentiated. Under vmap (jacrev's), the vmap
    refusal.
    """
    if not torch.is_grad_enabled():
        return
    check_no_vmap()
    stack = torch._C._functorch.get_interpreter_stack() or []
    if [level.key() for level in stack] == [torch._C._functorch.TransformType.Grad]:
        return
    raise RuntimeError(
        "logitless: double backward (create_graph=True, as torch.func.vjp, jacrev and hessian "
        "take, or torch.func.grad nested in another transform) is not supported: its gradients "
        "are not differentiable. Take the gradient with torch.func.grad or .backward(), the "
        "gradient penalty through eager PyTorch (logitless.reference), or leave create_graph off."
    )


def _present(grads, needs):
    """None for the gradients that were not asked for (the ops return empty tensors there)."""
    return tuple(g if need else None for g, need in zip(grads, needs, strict=True))
