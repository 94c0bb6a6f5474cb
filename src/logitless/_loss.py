"""The loss of one token as a function of its logit statistics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenLoss:
    """The loss of one token from its logit statistics, and their derivatives.

    With class weights w (V,), W = sum_v w[v] (`weight_total`) and the token's target weight
    w[y] (without class weights: w = 1, W = V):

        loss = w[y] (1 - label_smoothing) (lse - target_logit)
               + label_smoothing / V * (W lse - logit_sum) + z_loss * lse**2

    where logit_sum = sum_v w[v] z[v]: F.cross_entropy with `weight` and label smoothing, plus
    PaLM's z-loss.
    """

    label_smoothing: float
    z_loss: float
    vocab: int
    weight_total: float = 0.0
    """sum_v w[v] of the class weights; only read with a `target_weight`."""

    def __call__(self, lse, target_logit, logit_sum, target_weight=None):
        smoothing = self.label_smoothing
        if target_weight is None:
            loss = lse - (1.0 - smoothing) * target_logit
        else:
            loss = target_weight * (1.0 - smoothing) * (lse - target_logit)
            if smoothing:
                loss = loss + (smoothing * self.weight_total / self.vocab) * lse
        if smoothing:
            loss = loss - (smoothing / self.vocab) * logit_sum
        if self.z_loss:
            loss = loss + self.z_loss * lse.square()
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
            grad_lse = grad_lse + weights * (2.0 * self.z_loss) * lse
        return grad_lse, grad_target, -(self.label_smoothing / self.vocab) * weights
