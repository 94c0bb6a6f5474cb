"""Autograd functions over a backend: per-token logit statistics, and the fused loss.

Every quantity logitless offers is an elementwise function of a few per-token statistics of the
logits z = scale * softcap(e @ c.T + bias) (and of a teacher's, for distillation): see
docs/statistics.md. So one differentiable op computes the statistics a call asks for
(`LinearLogitStats`), and plain PyTorch combines them into losses, log-probs, entropies and
divergences. Its backward turns the upstream gradient of each statistic into the coefficients
of the backend's one gradient formula (`COEFFICIENT_RULES`). When a cross-entropy is reduced
and nothing else is asked for, the coefficients are known during the forward pass and the
backend can produce the gradients in the same sweep (`FusedLinearCrossEntropy`), saving one
matmul.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from logitless import _ops as ops
from logitless._loss import TokenLoss

if TYPE_CHECKING:
    from logitless.distributed import VocabParallel

MIXTURE = ("jsd", "jsd_p")
"""Statistics of the second sweep: they need both log-sum-exps of the first."""


@dataclass(frozen=True)
class Plan:
    """How one call runs: the backend, how the logits are formed, gradient filtering, the
    vocabulary shard (the backend then sees its rows only, and the statistics are combined
    across ranks) and, for distillation, the teacher's softcap and the JSD's beta."""

    impl: str
    softcap: float | None
    filter_eps: float | None
    vocab_parallel: VocabParallel | None = None
    scale: float = 1.0
    column_weight: torch.Tensor | None = None
    teacher_softcap: float | None = None
    beta: float = 0.5


def filters(terms: tuple[str, ...], softcap: float | None) -> bool:
    """Whether gradient filtering may skip tiles for these coefficient terms: only the softmax
    and target terms have a skipped mass bounded by the budget (the `sum` term without softcap
    is added outside the tiles)."""
    allowed = {"p", "target"} if softcap is not None else {"p", "target", "sum"}
    return set(terms) <= allowed


def _coefficients(grads: dict, values: dict, beta: float) -> dict[str, torch.Tensor]:
    """The coefficient rows of the backend's gradient formula from the upstream gradient G of
    each statistic (docs/statistics.md):

        lse: a += G; target: t += G; sum: s += G; mean: a += G (1 - mean), b += G;
        cross_mean: g += G; teacher_under_student: a -= G tus, b_y += G;
        jsd: a += G (1 - beta) jsd_p, b_r -= G (1 - beta);
        teacher_lse, teacher_mean: nothing (the teacher gets no gradient).
    """
    out: dict[str, torch.Tensor] = {}

    def add(term: str, value: torch.Tensor) -> None:
        out[term] = out[term] + value if term in out else value

    for name, g in grads.items():
        if name == "lse":
            add("p", g)
        elif name in ("target", "sum"):
            add(name, g)
        elif name == "mean":
            add("p", g * (1.0 - values["mean"]))
            add("pz", g)
        elif name == "cross_mean":
            add("q", g)
        elif name == "teacher_under_student":
            add("p", -g * values["teacher_under_student"])
            add("py", g)
        elif name == "jsd":
            add("p", (1.0 - beta) * g * values["jsd_p"])
            add("plogr", -(1.0 - beta) * g)
    return out


class LinearLogitStats(torch.autograd.Function):
    """The statistics `names` per row, (len(names), N), and with `top_k` the indices of each
    row's largest logits; backward recomputes the logits block by block."""

    @staticmethod
    def forward(ctx, e, c, bias, targets, teacher_e, teacher_c, teacher_bias, plan: Plan,
                names: tuple[str, ...], top_k: int = 0):  # fmt: skip
        with_teacher = teacher_e is not None
        first = ["lse", *(["teacher_lse"] if with_teacher else [])]
        first += [name for name in names if name not in first and name not in MIXTURE]
        teacher = (teacher_e, teacher_c, teacher_bias, plan.teacher_softcap, plan.beta)
        found, top = ops.stats(
            e, c, bias, targets, plan.impl, plan.softcap, plan.scale, plan.column_weight,
            ",".join(first), *teacher, None, None, top_k,
        )  # fmt: skip
        shard = plan.vocab_parallel
        if shard is not None:
            found = shard.combine_stats(found, first)
        values = dict(zip(first, found, strict=True))
        if "jsd" in names:
            second, _ = ops.stats(
                e, c, bias, targets, plan.impl, plan.softcap, plan.scale, plan.column_weight,
                ",".join(MIXTURE), *teacher, values["teacher_lse"], values["lse"], 0,
            )  # fmt: skip
            if shard is not None:
                second = shard.sum_stats(second)
            values.update(zip(MIXTURE, second, strict=True))
        ctx.plan, ctx.kept = plan, tuple(values)
        ctx.names = names
        ctx.save_for_backward(
            e,
            c,
            bias,
            targets,
            teacher_e,
            teacher_c,
            teacher_bias,
            torch.stack(list(values.values())),
        )
        ctx.mark_non_differentiable(targets, top)
        return torch.stack([values[name] for name in names]), top

    @staticmethod
    def backward(ctx, grad_stats, _):
        e, c, bias, targets, teacher_e, teacher_c, teacher_bias, kept = ctx.saved_tensors
        plan: Plan = ctx.plan
        values = dict(zip(ctx.kept, kept, strict=True))
        coefficients = _coefficients(
            dict(zip(ctx.names, grad_stats, strict=True)), values, plan.beta
        )
        terms = tuple(coefficients)
        needs = ctx.needs_input_grad[:3]
        filter_eps = plan.filter_eps if filters(terms, plan.softcap) else None
        teacher = (teacher_e, teacher_c, teacher_bias, plan.teacher_softcap, plan.beta)
        grad_e, grad_c, grad_bias = ops.grads(
            e, c, bias, targets, values["lse"], torch.stack(list(coefficients.values())),
            ",".join(terms), plan.impl, plan.softcap, plan.scale, plan.column_weight, *teacher,
            values.get("teacher_lse"), filter_eps, list(needs),
        )  # fmt: skip
        if plan.vocab_parallel is not None and needs[0]:
            grad_e = plan.vocab_parallel.reduce_grad_e(grad_e)
        grads = _present((grad_e.to(e.dtype), grad_c, grad_bias), needs)
        return *grads, None, None, None, None, None, None, None


class FusedLinearCrossEntropy(torch.autograd.Function):
    """A reduced loss whose gradients the forward pass computes; backward only scales them.

    `token_weights` (N,) holds each row's weight in the reduction (0 for ignored rows),
    `target_weights` (N,) each row's class weight or None. The gradients are scaled in place,
    so a second backward through the same graph is refused by autograd's check of modified
    saved tensors.
    """

    @staticmethod
    def forward(ctx, e, c, bias, targets, token_weights, target_weights, plan: Plan,
                token_loss: TokenLoss):  # fmt: skip
        needs = ctx.needs_input_grad[:3]
        found, grad_e, grad_c, grad_bias = ops.stats_and_grads(
            e, c, bias, targets, token_weights, target_weights, plan.impl, plan.softcap,
            plan.column_weight, token_loss.label_smoothing > 0, plan.filter_eps,
            token_loss.label_smoothing, token_loss.z_loss, token_loss.vocab, list(needs),
        )  # fmt: skip
        losses = token_loss(*found, target_weights)
        loss = torch.where(token_weights != 0, token_weights * losses, 0.0).sum()
        ctx.needs = needs
        ctx.save_for_backward(grad_e.to(e.dtype), grad_c, grad_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        scaled = [g.mul_(grad_loss.to(g.dtype)) for g in ctx.saved_tensors]
        return *_present(scaled, ctx.needs), None, None, None, None, None


def _present(grads, needs):
    """None for the gradients that were not asked for (the ops return empty tensors there)."""
    return tuple(g if need else None for g, need in zip(grads, needs, strict=True))
