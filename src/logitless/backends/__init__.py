"""Backends: the computation of per-row logit statistics and of their gradients.

A backend works on flat rows: `e` (N, D), `c` (V, D), `bias` (V,) or None, and `targets` (N,)
int64 where -1 marks a row without target (ignored, shifted out, or held by another vocabulary
shard). It checks nothing: `logitless.functional` has done that. With

    z = scale * softcap(e @ c.T + bias),  p = softmax(z)
    y = scale * softcap_t(e_t @ c_t.T + bias_t),  q = softmax(y)   (an optional teacher)
    m = beta * q + (1 - beta) * p                                 (the JSD mixture)

and `w` the optional (V,) column weight (1 without), it provides

    stats(e, c, bias, targets, *, logits, names, teacher=None, lse=None, top_k=0, support=None)
        -> (len(names), N) float32 (float64 for float64 inputs)
           [, (N, top_k) int64 indices of the largest z, (N, top_k) float32 their log p]

        the per-row statistics in `names` (see `STATISTICS`; `lse`, the student's, given for
        the second sweep of `jsd` and `jsd_p`, as `grads` takes it); with `top_k`, each row's
        largest logits, in descending order, and their log-probabilities taken from the sweep's
        own logits as (z - max z) - log sum exp(z - max z), as log_softmax does: a confident row's
        largest log p (near 0) keeps its relative precision, which z minus a rounded log-sum-exp
        (or a logit recomputed another way) loses; `support` (N, k) int64 classes per row (-1 for
        none) is the set S outside which `support_tail` sums;

    grads(e, c, bias, targets, lse, coefficients, terms, *, logits, teacher=None,
          filter_eps, needs, support=None, support_tail=None, support_grad=None)
        -> (grad_e, grad_c, grad_bias)

        the gradients, for the inputs flagged in `needs` (None for the others), of the function
        whose derivative with respect to the logits is, per entry,

            dL/dz = p * (a + b * log p + b_pq * log(p / q) + b_r * log(m / p))
                    + o * p / p_tail * [v not in S] + g * q + t * [v = target]
                    + sum_j u[n, j] * [v = S[n, j]] + s * w

        `lse` (2, N) is each row's log-sum-exp as the pair (`lse`, `lse_residual`) of
        statistics, whose sum it is to twice the accumulation dtype's precision (as is a
        teacher's `lse`): p = exp((z - lse[0]) - lse[1]) then sums to 1 to that dtype's
        precision whatever the logits' size, where exp(z - lse[0]) is off by an ulp of lse
        (4e-6 at lse 50: confident tokens', the entropy's and the JSD's gradients amplify it).
        `coefficients` is (len(terms), N): the rows of the coefficients named in `terms`
        (from `TERMS`; absent ones are 0). The caller adds the `sum` term itself when there is
        no softcap (it is rank one, see `logitless._ops.add_uniform_gradient`). With
        `filter_eps`, tiles whose softmax entries are all negligible and that hold no target
        are skipped; the caller passes it only for the terms `p` and `target`. `support`
        (N, k) gives the classes S of the `outside` term and of the one-hot term, whose
        coefficients u are `support_grad` (N, k) (the gradient of log-probs at S: the caller
        folds -sum_j u_j into `a`); `support_tail` (N,), given with the `outside` term, is
        log p_tail = log sum_{v not in S} p (floored at the smallest normal float), by which
        that term is normalized: p / p_tail is at most 1 there, so that o bounds the term as
        the other coefficients bound theirs.
        Gradients may come back in float32;

    stats_and_grads(e, c, bias, targets, coefficients_of, *, logits, names, terms,
                    filter_eps, needs, teacher=None) -> (stats, grad_e, grad_c, grad_bias)
                                                                                 [optional]

        both in one sweep, when the coefficients of a block of rows are a function
        `coefficients_of(rows, stats of those rows)` known during the forward pass (a reduced
        loss); with a teacher, its statistics and the JSD's in that same sweep.

See docs/statistics.md for why these statistics and this one gradient formula cover every loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

STATISTICS = (
    "lse",  # log sum_v exp z
    "lse_residual",  # what lse lost to rounding: the pair (lse, residual) given back as "lse"
    "target",  # z[target], 0 without target
    "sum",  # sum_v w[v] z[v]
    "entropy",  # lse - mean, from sum_v p (z - max z): without the cancellation of that difference
    "teacher_lse",  # log sum_v exp y
    "teacher_lse_residual",  # idem, of the teacher's
    "forward_kl",  # sum_v q (log q - log p), from per-entry differences relative to each max
    "reverse_kl",  # sum_v p (log p - log q), idem
    "jsd",  # beta KL(q || m) + (1 - beta) KL(p || m) (needs both lse: a second sweep)
    "jsd_p",  # sum_v p log(m / p) (idem; the jsd's gradient needs it)
    "support_tail",  # log sum_{v not in S} p: the mass outside a row's support, summed as such
)
TERMS = ("p", "plogp", "target", "sum", "q", "plogpq", "plogr", "outside")
"""The coefficient rows of the gradient formula: a, b, t, s, g, b_pq, b_r, o."""


@dataclass(frozen=True)
class Logits:
    """How the logits are formed from `e @ c.T + bias`: softcap, then `scale` (1 / temperature);
    `column_weight` (V,) weighs the `sum` statistic and term (class weights), None for 1."""

    softcap: float | None = None
    scale: float = 1.0
    column_weight: torch.Tensor | None = None


@dataclass(frozen=True)
class Teacher:
    """A second head over the same vocabulary, whose statistics come with the student's.

    Its logits y use the student's `scale`; `lse` (2, N) is its log-sum-exp once known, as the
    student's is given to `grads` (the JSD statistics and the `q` terms need it), `beta` weighs
    the JSD mixture.
    """

    e: torch.Tensor
    c: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None
    beta: float = 0.5
    lse: torch.Tensor | None = None


def lse_pair(peak: torch.Tensor, log_total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse, residual) from (max, log sum exp(z - max)): their rounded sum and what its
    rounding lost, exactly (Knuth's TwoSum; the `*_residual` statistics, 0 where lse is not
    finite)."""
    lse = peak + log_total
    peak_part = lse - log_total
    total_part = lse - peak_part
    lost = (peak - peak_part) + (log_total - total_part)
    return lse, torch.where(lse.isfinite(), lost, 0.0)


def get_backend(impl: str) -> ModuleType:
    """The backend module for a resolved `impl` ("torch" or "triton")."""
    if impl == "triton":
        from logitless.backends import triton_backend

        return triton_backend
    from logitless.backends import torch_backend

    return torch_backend
