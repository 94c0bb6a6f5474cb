"""logitless: cross-entropy for large vocabularies without ever forming the logit matrix."""

from logitless.distributed import VocabParallel
from logitless.functional import linear_cross_entropy
from logitless.modules import LinearCrossEntropyLoss

__all__ = ["LinearCrossEntropyLoss", "VocabParallel", "linear_cross_entropy"]
__version__ = "0.1.0"
