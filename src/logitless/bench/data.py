"""The benchmark's data regimes: what e, c and the targets look like.

`random`: e ~ randn / sqrt(D), c ~ 0.5 * randn, uniform targets. Logits have a standard deviation
of 0.5, so the softmax is nearly uniform: the exact, unfiltered cost of every method.

`trained`: the final hidden states of held-out text and the classifier of a small causal LM that
the benchmark trains on the standard library's sources (`logitless.bench.lm`), with next tokens as
targets. Its softmax is peaked like a real model's, the only fair ground for gradient filtering.
A shape wider or with a larger vocabulary than the model is reached in two documented steps that
keep the model's statistics (see `extend`); the runner reports the statistics before and after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from logitless.bench import lm

REGIMES = ("random", "trained")
SEED = 0
RARE_FRACTION = 0.5
"""Extra vocabulary rows imitate the classifier rows of this rarest fraction of the tokens."""


@dataclass(frozen=True)
class Shape:
    n: int
    d: int
    v: int

    def __str__(self) -> str:
        return f"N={self.n} D={self.d} V={self.v}"


@dataclass
class Inputs:
    """One benchmark case: the tensors every method gets, and how they were made."""

    e: torch.Tensor
    c: torch.Tensor
    targets: torch.Tensor
    notes: list[str]


def make_inputs(
    regime: str,
    shape: Shape,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    lm_config: lm.LMConfig | None = None,
) -> Inputs:
    """The inputs of `regime` at `shape`, in `dtype` on `device`, the same on every call."""
    check_shape(regime, shape, lm_config)
    if regime == "random":
        inputs = _random(shape)
    else:
        inputs = _trained(shape, lm_config or lm.DEFAULT_CONFIG, device)
    inputs.e = inputs.e.to(device=device, dtype=dtype).contiguous()
    inputs.c = inputs.c.to(device=device, dtype=dtype).contiguous()
    inputs.targets = inputs.targets.to(device)
    return inputs


def _random(shape: Shape) -> Inputs:
    gen = torch.Generator().manual_seed(SEED)
    e = torch.randn(shape.n, shape.d, generator=gen) / shape.d**0.5
    c = 0.5 * torch.randn(shape.v, shape.d, generator=gen)
    targets = torch.randint(0, shape.v, (shape.n,), generator=gen)
    return Inputs(e, c, targets, ["e ~ randn/sqrt(D), c ~ 0.5*randn, uniform targets"])


def check_shape(regime: str, shape: Shape, lm_config: lm.LMConfig | None = None) -> None:
    """Raise ValueError, before any work, when `regime` cannot produce `shape`."""
    if regime not in REGIMES:
        raise ValueError(f"data regime must be one of {REGIMES}, got {regime!r}")
    if regime != "trained":
        return
    config = lm_config or lm.DEFAULT_CONFIG
    width, vocab = config.width, config.vocab_size
    if shape.d < width or shape.v < vocab or (shape.v > vocab and shape.d == width):
        raise ValueError(
            f"the trained regime needs V >= {vocab} and D >= {width}, and D > {width} when "
            f"V > {vocab} (the model's vocabulary and width, and a coordinate for the extra "
            f"rows' offset), got {shape}"
        )


def _trained(shape: Shape, config: lm.LMConfig, device: str | torch.device) -> Inputs:
    model = lm.trained_lm(config, device)
    e, targets = lm.hidden_states_and_targets(model, shape.n)
    c = model.model.head.weight.detach().float()
    notes = [
        f"hidden states of {shape.n} held-out stdlib tokens and the classifier of a "
        f"{config.layers}-layer, width-{config.width} causal LM trained {config.steps} steps "
        f"on the stdlib with a {config.vocab_size}-token BPE; targets = next tokens"
    ]
    e, c, extension = extend(e.cpu(), c.cpu(), model.target_counts(), shape)
    return Inputs(e, c, targets, notes + extension)


def extend(
    e: torch.Tensor, c: torch.Tensor, target_counts: torch.Tensor, shape: Shape
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Grow a model's (e, c) to `shape`, keeping its softmax statistics; notes say how.

    Vocabulary: a larger vocabulary splits the same rare tail more finely. The extra rows are
    drawn from a Gaussian fitted (mean and covariance) to the classifier rows of the model's
    rarest tokens, and their logits are lowered by log(extra / rare) so that together they hold
    about the probability mass the rare tokens hold; they are never targets. That offset is a
    bias folded into the classifier (e gains a constant coordinate, c the matching one), so it
    needs D > width.

    Width: e and c are mapped by one matrix with orthonormal columns Q (D x k), so that
    (e Q^T)(c Q^T)^T = e c^T: every logit is kept, and the model's k-dimensional subspace is
    spread over all D coordinates.
    """
    gen = torch.Generator().manual_seed(SEED)
    vocab, width = c.shape
    e, c = e.double(), c.double()
    notes = []
    if shape.v > vocab:
        if shape.d <= width:
            raise ValueError(
                f"the trained regime grows the vocabulary only with D > {width} (the model's "
                f"width, plus one coordinate for the extra rows' offset), got {shape}"
            )
        rare = target_counts.argsort()[: int(vocab * RARE_FRACTION)]
        n_extra = shape.v - vocab
        cov = torch.cov(c[rare].T) + 1e-8 * torch.eye(width, dtype=torch.float64)
        draws = torch.randn(n_extra, width, generator=gen, dtype=torch.float64)
        extra = c[rare].mean(0) + draws @ torch.linalg.cholesky(cov).T
        offset = -math.log(n_extra / len(rare))
        scale = e.square().mean().sqrt().item()  # the constant coordinate looks like the others
        e = torch.cat([e, torch.full((len(e), 1), scale, dtype=torch.float64)], 1)
        bias = torch.cat([torch.zeros(vocab), torch.full((n_extra,), offset / scale)])
        c = torch.cat([torch.cat([c, extra]), bias[:, None].double()], 1)
        notes.append(
            f"vocabulary {vocab} -> {shape.v}: {n_extra} extra classifier rows drawn from a "
            f"Gaussian fitted to the rows of the {len(rare)} rarest tokens, logits offset by "
            f"{offset:+.2f} = -log({n_extra}/{len(rare)}) so that together they hold about the "
            "rare tokens' probability mass; never targets"
        )
    if shape.d > e.shape[1]:
        k = e.shape[1]
        lift, _ = torch.linalg.qr(torch.randn(shape.d, k, generator=gen, dtype=torch.float64))
        e, c = e @ lift.T, c @ lift.T
        notes.append(
            f"width {k} -> {shape.d}: e and c mapped by one {shape.d}x{k} matrix with "
            "orthonormal columns, which keeps every logit"
        )
    return e.float(), c.float(), notes
