"""logitless: cross-entropy for large vocabularies without ever forming the logit matrix."""

from logitless.distributed import VocabParallel
from logitless.functional import (
    linear_cross_entropy,
    linear_distillation_loss,
    linear_log_probs,
    linear_top_k,
)
from logitless.modules import LinearCrossEntropyLoss

__all__ = [
    "LinearCrossEntropyLoss",
    "VocabParallel",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_log_probs",
    "linear_top_k",
]
__version__ = "0.1.0"
