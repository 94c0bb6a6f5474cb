"""Drop-in entry points for reinforcement-learning frameworks: per-token log-probabilities and
entropies of sampled tokens, without the logits.

`verl_linear_cross_entropy` has the call shape of verl's fused kernel
(`verl.utils.kernel.linear_cross_entropy(hidden, weight, labels, temperature, reduction,
dist_process_group)` returning `(log_probs, entropy)`); `completion_log_probs` computes what TRL's
trainers compute from a model's logits (`selective_log_softmax` of the completion tokens under
`logits / temperature`, and the entropies) from its final hidden states instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from logitless._validation import REDUCTIONS, check_completion
from logitless.distributed import VocabParallel
from logitless.functional import linear_log_probs


def verl_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    reduction: str = "none",
    dist_process_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl's fused-kernel contract: (log-probs, entropies) of `labels` under
    `softmax(hidden @ weight.T / temperature)`, both differentiable: the log-probs per token
    ("none", shaped like `labels`), summed ("sum") or averaged ("mean") over the tokens; the
    entropies per token whatever the reduction, as verl's kernel returns them.

    With `dist_process_group`, `weight` holds this rank's contiguous rows of a vocabulary
    sharded in rank order over that group (tensor parallelism), as verl's kernel expects.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    shard = None
    if dist_process_group is not None:
        shard = _rank_order_shard(weight.shape[0], dist_process_group)
    log_probs, entropy = linear_log_probs(
        hidden, weight, labels, temperature=temperature, return_entropy=True,
        vocab_parallel=shard,
    )  # fmt: skip
    if reduction == "sum":
        return log_probs.sum(), entropy
    if reduction == "mean":
        return log_probs.mean(), entropy
    return log_probs, entropy


def completion_log_probs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    logits_to_keep: int,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """TRL-style per-token log-probs (and entropies) of the last `logits_to_keep` tokens of
    `input_ids` (B, T) (the completions) under a transformers causal LM, without its logits.

    The same as `selective_log_softmax(model(...).logits[:, :-1][:, -logits_to_keep:] / T,
    input_ids[:, -logits_to_keep:])`, computed as a `logitless.transformers.patch`ed call
    computes its loss (`logitless.transformers.labelled_log_probs`): from the head's input and
    weight, with whatever the model's forward does to its logits (Gemma 2's softcap, Cohere's
    and Granite's scale; any other transform is refused). The prompt's positions cost nothing.
    """
    check_completion(input_ids, logits_to_keep)
    from logitless.transformers import labelled_log_probs  # imports transformers

    prompt = torch.arange(input_ids.shape[1], device=input_ids.device) < (
        input_ids.shape[1] - logits_to_keep
    )
    outputs = labelled_log_probs(
        model, input_ids.masked_fill(prompt, -100), temperature=temperature,
        return_entropy=return_entropy, input_ids=input_ids, attention_mask=attention_mask,
    )  # fmt: skip
    if return_entropy:
        return tuple(x[:, -logits_to_keep:] for x in outputs)
    return outputs[:, -logits_to_keep:]


def _rank_order_shard(rows: int, group: dist.ProcessGroup) -> VocabParallel:
    """This rank's `VocabParallel` when every rank of `group` holds `rows` consecutive rows of
    the vocabulary in rank order (one all-gather of the row counts, then the shard's own)."""
    if "gloo" not in str(dist.get_backend(group)):
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    mine = torch.tensor(rows, dtype=torch.int64, device=device)
    counts = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, mine, group=group)
    start = int(sum(counts[: dist.get_rank(group)]))
    return VocabParallel(start, start + rows, group)
