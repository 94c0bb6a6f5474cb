"""logitless: cross-entropy for large vocabularies without ever forming the logit matrix."""

from logitless.distributed import VocabParallel
from logitless.functional import (
    linear_cross_entropy,
    linear_distillation_loss,
    linear_log_probs,
    linear_top_k,
    linear_top_k_distillation_loss,
)
from logitless.modules import LinearCrossEntropyLoss, LinearDistillationLoss

__all__ = [
    "LinearCrossEntropyLoss",
    "LinearDistillationLoss",
    "VocabParallel",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_log_probs",
    "linear_top_k",
    "linear_top_k_distillation_loss",
]
__version__ = "0.1.0"
