"""What each benchmark op computes: its inputs beyond (e, c, targets), and its objective.

Every method of an op computes one scalar from the same inputs (and, with a backward, its
gradients with respect to the student's e and c). The scalar is a mean over tokens of per-token
terms, written once here on the full logits as eager PyTorch computes them: at the input dtype
it is the eager peer, in float64 (block by block) the reference every error is measured against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

TEMPERATURE = 1.0
"""The temperature of the logprobs and distill ops (both distributions at T for distill)."""
SEED = 1


@dataclass(frozen=True)
class Op:
    name: str
    task: str
    """What is computed, which names the op's methods: "cross-entropy", "logprobs", "distill"."""
    backward: bool
    summary: str


OPS = {
    op.name: op
    for op in (
        Op("loss", "cross-entropy", False, "mean cross-entropy"),
        Op("loss+backward", "cross-entropy", True, "mean cross-entropy, + dE and dC"),
        Op("logprobs", "logprobs", True,
           f"per-token log-probs and entropy at T={TEMPERATURE:g}, weighted by random per-token "
           "weights (policy-gradient style), + dE and dC"),
        Op("distill", "distill", True,
           f"mean forward KL(teacher || student) at T={TEMPERATURE:g}, the teacher head of its "
           "own hidden size, + the student's dE and dC"),
    )
}  # fmt: skip

TOKEN_KEYS = {
    "cross-entropy": ("e", "targets"),
    "logprobs": ("e", "targets", "logprob_weights", "entropy_weights"),
    "distill": ("e", "targets", "teacher_e"),
}
"""The inputs of each task with one row per token (the rest are shared by all tokens)."""


def extra_inputs(
    task: str, n: int, v: int, dtype: torch.dtype, teacher_d: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The inputs a task needs beyond (e, c, targets), never zeros, and a note on each."""
    gen = torch.Generator().manual_seed(SEED)
    if task == "logprobs":
        weights = {
            "logprob_weights": torch.randn(n, generator=gen),
            "entropy_weights": torch.randn(n, generator=gen),
        }
        return weights, ["per-token weights of the log-probs and of the entropy ~ randn"]
    if task == "distill":
        teacher = {
            "teacher_e": (torch.randn(n, teacher_d, generator=gen) / teacher_d**0.5).to(dtype),
            "teacher_c": torch.randn(v, teacher_d, generator=gen).to(dtype),
        }
        note = f"teacher: hidden size {teacher_d}, teacher_e ~ randn/sqrt(D_t), teacher_c ~ randn"
        return teacher, [note]
    return {}, []


def policy_terms(
    x: dict[str, torch.Tensor], log_probs: torch.Tensor, entropy: torch.Tensor
) -> torch.Tensor:
    """The logprobs op's per-token terms from log-probs and entropy: every method's last step."""
    return x["logprob_weights"] * log_probs + x["entropy_weights"] * entropy


def per_token(task: str, x: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The per-token terms of `task` as plain eager PyTorch computes them from the full logits
    formed in `dtype` (float32 or better after), whose mean over tokens is the op's scalar: TRL's
    entropy and `F.kl_div`, without the guards `logitless.reference` keeps for -inf logits
    (N x V masks that would slow the eager peer down; the benchmark's logits are finite)."""
    logits = _logits(x["e"], x["c"], dtype)
    if task == "cross-entropy":
        return F.cross_entropy(logits, x["targets"], reduction="none")
    log_p = torch.log_softmax(logits if TEMPERATURE == 1 else logits / TEMPERATURE, dim=-1)
    if task == "logprobs":
        picked = log_p.gather(1, x["targets"].unsqueeze(1)).squeeze(1)
        return policy_terms(x, picked, -(log_p.exp() * log_p).sum(-1))
    teacher = _logits(x["teacher_e"], x["teacher_c"], dtype)
    log_q = torch.log_softmax(teacher if TEMPERATURE == 1 else teacher / TEMPERATURE, dim=-1)
    return F.kl_div(log_p, log_q, reduction="none", log_target=True).sum(-1)


def _logits(e: torch.Tensor, c: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e @ c.T in `dtype`, then in float32 if narrower (as transformers' losses upcast them)."""
    logits = e.to(dtype) @ c.to(dtype).T
    return logits.float() if dtype.itemsize < 4 else logits


def objective(task: str, x: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The op's scalar on the full logits in `dtype`: eager PyTorch at the input dtype."""
    return per_token(task, x, dtype).mean()
