"""The loss of one token as a function of its logit statistics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class TokenLoss:
    """The loss of one token from its logit statistics, and their derivatives.

    With class weights w (V,), W = sum_v w[v] (`weight_total`) and the token's target weight
    w[y] (without class weights: w = 1, W = V):

        loss = w[y] (1 - label_smoothing) (lse - target_logit)
               + label_smoothing / V * (W lse - logit_sum) + w[y] z_loss * lse**2

    where logit_sum = sum_v w[v] z[v]: F.cross_entropy with `weight` and label smoothing, plus
    PaLM's z-loss, weighted like the token's cross-entropy: F.cross_entropy's weighted mean
    divides by sum w[y], and a z-loss left unweighted would change with the weights' scale.

    Not a frozen dataclass: torch 2.11's dynamo loses the fields of a frozen dataclass built
    inside a compiled function when one of its methods is called (test_compile, torch 2.11).
    """

    label_smoothing: float
    z_loss: float
    vocab: int
    weight_total: float = 0.0
    """sum_v w[v] of the class weights; only read with a `target_weight`."""

    def __call__(self, lse, target_logit, logit_sum, target_weight, lse_residual):
        """`lse_residual` (what rounding lse lost) keeps a confident token's loss lse - target,
        near 0, as precise as log_softmax's."""
        smoothing = self.label_smoothing
        if target_weight is None:
            loss = (lse - (1.0 - smoothing) * target_logit) + lse_residual
        else:
            loss = target_weight * (1.0 - smoothing) * ((lse - target_logit) + lse_residual)
            if smoothing:
                loss = loss + (smoothing * self.weight_total / self.vocab) * lse
        if smoothing:
            loss = loss - (smoothing / self.vocab) * logit_sum
        if self.z_loss:
            z_loss = self.z_loss if target_weight is None else self.z_loss * target_weight
            loss = loss + z_loss * lse.square()
        return loss

    def coefficients(self, lse, weights, target_weight=None):
        """d(weights * loss) / d(lse, target_logit, logit_sum)."""
        smoothing = self.label_smoothing
        if target_weight is None:
            grad_lse = weights
            grad_target = -(1.0 - smoothing) * weights
        else:
            grad_lse = weights * (
                target_weight * (1.0 - smoothing) + smoothing * self.weight_total / self.vocab
            )
            grad_target = -(1.0 - smoothing) * weights * target_weight
        if self.z_loss:
            z_loss = self.z_loss if target_weight is None else self.z_loss * target_weight
            grad_lse = grad_lse + weights * (2.0 * z_loss) * lse
        return grad_lse, grad_target, -(self.label_smoothing / self.vocab) * weights


DIVERGENCES = {
    "forward_kl": {"forward_kl": 1.0},
    "reverse_kl": {"reverse_kl": 1.0},
    "jsd": {"jsd": 1.0},
}
"""Each divergence of one token as a linear combination of its statistics: each is a statistic
of its own, summed from per-entry differences of log-probabilities (docs/statistics.md), so
that a small divergence is not a difference of numbers of the size of the logits."""


HARD_LOSS_STATISTICS = ("lse", "target", "lse_residual")
"""The statistics of the hard loss mixed into a distillation: the cross-entropy at T = 1."""


def with_hard_loss(weights: dict[str, float], hard_weight: float) -> dict[str, float]:
    """(1 - h) divergence + h cross-entropy (lse - target) as one linear combination of
    statistics, for their gradients: at T = 1 the cross-entropy's statistics come from the
    divergence's sweep."""
    if not hard_weight:
        return dict(weights)
    mixed = {name: (1.0 - hard_weight) * weight for name, weight in weights.items()}
    mixed["lse"] = mixed.get("lse", 0.0) + hard_weight
    mixed["target"] = -hard_weight
    return mixed


def divergence_from_statistics(
    weights: dict[str, float], values: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The divergence per row from its statistics, summed in the order of `weights` (one of
    `DIVERGENCES`)."""
    return sum(weight * values[name] for name, weight in weights.items())


def mixed_with_hard_loss(
    divergence: torch.Tensor, hard: dict[str, torch.Tensor], hard_weight: float
) -> torch.Tensor:
    """(1 - h) divergence + h cross-entropy per row, the cross-entropy from its statistics
    `hard` (`HARD_LOSS_STATISTICS`) as (lse - target) + lse_residual, apart from the
    divergence's terms: a confident token's, near 0, keeps the precision of log_softmax."""
    if not hard_weight:
        return divergence
    cross_entropy = (hard["lse"] - hard["target"]) + hard["lse_residual"]
    return (1.0 - hard_weight) * divergence + hard_weight * cross_entropy


def statistic_coefficients(grads: dict, values: dict, beta: float) -> dict[str, torch.Tensor]:
    """The coefficient rows of the backend's gradient formula from the upstream gradient G of
    each statistic (docs/statistics.md):

        lse: a += G; target: t += G; sum: s += G;
        entropy: a -= G entropy, b -= G;
        forward_kl: a += G, g -= G; reverse_kl: a -= G reverse_kl, b_pq += G;
        jsd: a += G (1 - beta) jsd_p, b_r -= G (1 - beta);
        support_tail: a -= G, o += G (the `outside` term's p / p_tail outside the support);
        teacher_lse: nothing (the teacher gets no gradient); the log-sum-exps' residuals are
        not given (a rounding has no gradient).
    """
    out: dict[str, torch.Tensor] = {}

    def add(term: str, value: torch.Tensor) -> None:
        out[term] = out[term] + value if term in out else value

    for name, g in grads.items():
        if name == "lse":
            add("p", g)
        elif name in ("target", "sum"):
            add(name, g)
        elif name == "entropy":  # p (mean - z) = -p (log p + entropy)
            add("p", -g * values["entropy"])
            add("plogp", -g)
        elif name == "forward_kl":  # p - q
            add("p", g)
            add("q", -g)
        elif name == "reverse_kl":  # p (log p - log q - reverse_kl)
            add("p", -g * values["reverse_kl"])
            add("plogpq", g)
        elif name == "jsd":
            add("p", (1.0 - beta) * g * values["jsd_p"])
            add("plogr", -(1.0 - beta) * g)
        elif name == "support_tail":  # p ([v not in S] / p_tail - 1)
            add("p", -g)
            add("outside", g)
    return out


def coefficient_terms(names: tuple[str, ...], beta: float) -> tuple[str, ...]:
    """The coefficient rows that the upstream gradients of the statistics `names` give."""
    one = torch.ones(())
    values = dict.fromkeys((*names, "jsd_p"), one)
    return tuple(statistic_coefficients(dict.fromkeys(names, one), values, beta))


def floored_log_tail(log_tail: torch.Tensor) -> torch.Tensor:
    """log p_tail at least the smallest normal float's: the top-k KL's floor, and the `outside`
    term's normalizer (p / p_tail, at most 1 outside the support, stays finite where the tail
    underflowed)."""
    return log_tail.clamp(min=math.log(torch.finfo(log_tail.dtype).tiny))


def top_k_forward_kl(
    teacher_log_probs: torch.Tensor, student_log_probs: torch.Tensor, student_log_tail: torch.Tensor
) -> torch.Tensor:
    """Forward KL from a teacher known on k classes per row, the rest of its mass one bucket:

        sum_{i in S} q_i (log q_i - log p_i) + q_tail (log q_tail - log p_tail)

    with q_tail = 1 - sum_S q_i and p_tail = sum_{v not in S} p_v (the KL of the k + 1 buckets,
    at most the full KL). (N, k) log-probabilities and (N,) log p_tail in (the `support_tail`
    statistic: summed outside S, as 1 - sum_S p would lose a confident student's tail to
    rounding), (N,) out; a teacher entry of -inf is padding, not in S. log p_tail is floored at
    the smallest normal float's, so that a student with all its mass on S gets a large finite
    loss and gradient where the teacher has a tail.
    """
    in_support = teacher_log_probs != -math.inf
    log_q = torch.where(in_support, teacher_log_probs, 0.0)
    q = torch.where(in_support, log_q.exp(), 0.0)
    support = (q * (log_q - student_log_probs)).sum(-1)
    tiny = torch.finfo(student_log_probs.dtype).tiny
    log_p_tail = floored_log_tail(student_log_tail)
    q_tail = torch.clamp(1.0 - q.sum(-1), min=0.0)
    tail = q_tail * (torch.log(torch.clamp(q_tail, min=tiny)) - log_p_tail)
    return support + tail
