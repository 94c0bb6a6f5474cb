"""The loss of one token as a function of its logit statistics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLoss:
    """The loss of one token from its logit statistics, and the derivatives the fused path uses.

    loss = lse - (1 - label_smoothing) * target_logit - label_smoothing / V * logit_sum
           + z_loss * lse**2
    which is F.cross_entropy with label smoothing plus PaLM's z-loss.
    """

    label_smoothing: float
    z_loss: float
    vocab: int

    def __call__(self, lse, target_logit, logit_sum):
        loss = lse - (1.0 - self.label_smoothing) * target_logit
        if self.label_smoothing:
            loss = loss - (self.label_smoothing / self.vocab) * logit_sum
        if self.z_loss:
            loss = loss + self.z_loss * lse.square()
        return loss

    def coefficients(self, lse, weights):
        """d(weights * loss) / d(lse, target_logit, logit_sum)."""
        grad_lse = weights * (1.0 + 2.0 * self.z_loss * lse) if self.z_loss else weights
        return (
            grad_lse,
            -(1.0 - self.label_smoothing) * weights,
            -(self.label_smoothing / self.vocab) * weights,
        )
