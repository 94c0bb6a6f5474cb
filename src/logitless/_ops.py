"""The backend calls as PyTorch custom ops, so that torch.compile sees opaque, shape-known ops.

Backends loop over blocks, sync on filter decisions and launch Triton kernels: nothing
torch.compile should trace into. Registered as `torch.library.custom_op`s with fake (meta)
implementations, a compiled training step keeps them in its graph without a break. Ops cannot
return None, so a gradient that is not needed comes back as an empty tensor, and ops take the
backend contract's `Logits` and `Teacher` as their fields. They run with autocast off:
`logitless.functional` has cast the inputs already, and the backends' matmuls must keep their
dtypes (a backward called inside an autocast region would otherwise run in bf16).
"""

from __future__ import annotations

import torch
from torch import Tensor

from logitless._loss import TokenLoss, coefficient_terms, statistic_coefficients
from logitless.backends import Logits, Teacher, get_backend
from logitless.backends.torch_backend import accumulation_dtype, rows_per_block


@torch.library.custom_op("logitless::stats", mutates_args=())
def stats(
    e: Tensor,
    c: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    impl: str,
    softcap: float | None,
    scale: float,
    column_weight: Tensor | None,
    names: str,
    teacher_e: Tensor | None,
    teacher_c: Tensor | None,
    teacher_bias: Tensor | None,
    teacher_softcap: float | None,
    beta: float,
    teacher_lse: Tensor | None,
    lse: Tensor | None,
    top_k: int,
    support: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(statistics (len(names), N), top-k indices (N, top_k), their log-probabilities) of
    `backends.stats`; `names` is comma-separated (custom ops take no list of strings)."""
    teacher = _teacher(teacher_e, teacher_c, teacher_bias, teacher_softcap, beta, teacher_lse)
    with _no_autocast(e):
        out = get_backend(impl).stats(
            e, c, bias, targets, logits=Logits(softcap, scale, column_weight),
            names=_split(names), teacher=teacher, lse=lse, top_k=top_k, support=support,
        )  # fmt: skip
    if top_k:
        return out
    return out, targets.new_empty(e.shape[0], 0, dtype=torch.int64), out.new_empty(e.shape[0], 0)


@stats.register_fake
def _(e, c, bias, targets, impl, softcap, scale, column_weight, names, teacher_e, teacher_c,
      teacher_bias, teacher_softcap, beta, teacher_lse, lse, top_k, support):  # fmt: skip
    acc = accumulation_dtype(e.dtype)
    return (
        e.new_empty(len(_split(names)), e.shape[0], dtype=acc),
        e.new_empty(e.shape[0], top_k, dtype=torch.int64),
        e.new_empty(e.shape[0], top_k, dtype=acc),
    )


@torch.library.custom_op("logitless::grads", mutates_args=())
def grads(
    e: Tensor,
    c: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    coefficients: Tensor,
    terms: str,
    impl: str,
    softcap: float | None,
    scale: float,
    column_weight: Tensor | None,
    teacher_e: Tensor | None,
    teacher_c: Tensor | None,
    teacher_bias: Tensor | None,
    teacher_softcap: float | None,
    beta: float,
    teacher_lse: Tensor | None,
    filter_eps: float | None,
    needs: list[bool],
    support: Tensor | None,
    support_tail: Tensor | None,
    support_grad: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of `backends.grads` (`terms` comma-separated), the rank-one `sum` term
    added here without softcap."""
    terms = _split(terms)
    uniform = "sum" in terms and softcap is None
    in_tiles = [i for i, term in enumerate(terms) if not (uniform and term == "sum")]
    teacher = _teacher(teacher_e, teacher_c, teacher_bias, teacher_softcap, beta, teacher_lse)
    with _no_autocast(e):
        out = get_backend(impl).grads(
            e, c, bias, targets, lse, coefficients[in_tiles], tuple(terms[i] for i in in_tiles),
            logits=Logits(softcap, scale, column_weight), teacher=teacher,
            filter_eps=filter_eps, needs=tuple(needs), support=support, support_tail=support_tail,
            support_grad=support_grad,
        )  # fmt: skip
        if uniform:
            grad_sum = coefficients[terms.index("sum")]
            add_uniform_gradient(*out, e, c, grad_sum * scale, column_weight)
    return _finish(out, e, c, bias)


@grads.register_fake
def _(e, c, bias, targets, lse, coefficients, terms, impl, softcap, scale, column_weight,
      teacher_e, teacher_c, teacher_bias, teacher_softcap, beta, teacher_lse, filter_eps,
      needs, support, support_tail, support_grad):  # fmt: skip
    return _fake_grads(e, c, bias, needs)


@torch.library.custom_op("logitless::stats_and_grads", mutates_args=())
def stats_and_grads(
    e: Tensor,
    c: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    token_weights: Tensor,
    target_weights: Tensor | None,
    impl: str,
    softcap: float | None,
    column_weight: Tensor | None,
    with_sum: bool,
    filter_eps: float | None,
    label_smoothing: float,
    z_loss: float,
    vocab: int,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(lse, target logit, lse residual, sum) statistics (4, N) of a cross-entropy (the sum 0
    without `with_sum`) and the gradients of sum_n token_weights[n] * loss[n], in one sweep."""
    weight_total = 0.0 if column_weight is None else column_weight.sum()
    token_loss = TokenLoss(label_smoothing, z_loss, vocab, weight_total)
    names = ("lse", "target", "lse_residual", *(("sum",) if with_sum else ()))
    terms = ("p", "target", "sum") if with_sum and softcap is not None else ("p", "target")

    def coefficients(rows: slice, row_stats: Tensor) -> Tensor:
        row_target_weights = None if target_weights is None else target_weights[rows]
        found = token_loss.coefficients(row_stats[0], token_weights[rows], row_target_weights)
        return torch.stack(found[: len(terms)])

    with _no_autocast(e):
        out, *grads_out = get_backend(impl).stats_and_grads(
            e, c, bias, targets, coefficients, logits=Logits(softcap, 1.0, column_weight),
            names=names, terms=terms, filter_eps=filter_eps, needs=tuple(needs),
        )  # fmt: skip
        if with_sum and softcap is None:
            grad_sum = token_loss.coefficients(out[0], token_weights, target_weights)[2]
            add_uniform_gradient(*grads_out, e, c, grad_sum, column_weight)
    if not with_sum:
        out = torch.cat([out, torch.zeros_like(out[:1])])
    return out, *_finish(grads_out, e, c, bias)


@stats_and_grads.register_fake
def _(e, c, bias, targets, token_weights, target_weights, impl, softcap, column_weight, with_sum,
      filter_eps, label_smoothing, z_loss, vocab, needs):  # fmt: skip
    stats_out = e.new_empty(4, e.shape[0], dtype=accumulation_dtype(e.dtype))
    return stats_out, *_fake_grads(e, c, bias, needs)


@torch.library.custom_op("logitless::linear_stats_and_grads", mutates_args=())
def linear_stats_and_grads(
    e: Tensor,
    c: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    token_weights: Tensor,
    impl: str,
    softcap: float | None,
    scale: float,
    names: str,
    stat_weights: list[float],
    teacher_e: Tensor | None,
    teacher_c: Tensor | None,
    teacher_bias: Tensor | None,
    teacher_softcap: float | None,
    beta: float,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The statistics `names` (comma-separated) and the gradients of
    sum_n token_weights[n] sum_i stat_weights[i] stats[i, n], a loss linear in the statistics
    (the divergences, `logitless._loss.DIVERGENCES`), in one sweep."""
    names = _split(names)
    terms = coefficient_terms(names, beta)
    teacher = _teacher(teacher_e, teacher_c, teacher_bias, teacher_softcap, beta, None)

    def coefficients(rows: slice, row_stats: Tensor) -> Tensor:
        grads = {name: token_weights[rows] * w for name, w in zip(names, stat_weights, strict=True)}
        found = statistic_coefficients(grads, dict(zip(names, row_stats, strict=True)), beta)
        return torch.stack([found[term] for term in terms])

    with _no_autocast(e):
        out, *grads_out = get_backend(impl).stats_and_grads(
            e, c, bias, targets, coefficients, logits=Logits(softcap, scale), names=names,
            terms=terms, filter_eps=None, needs=tuple(needs), teacher=teacher,
        )  # fmt: skip
    return out, *_finish(grads_out, e, c, bias)


@linear_stats_and_grads.register_fake
def _(e, c, bias, targets, token_weights, impl, softcap, scale, names, stat_weights, teacher_e,
      teacher_c, teacher_bias, teacher_softcap, beta, needs):  # fmt: skip
    stats_out = e.new_empty(len(_split(names)), e.shape[0], dtype=accumulation_dtype(e.dtype))
    return stats_out, *_fake_grads(e, c, bias, needs)


def add_uniform_gradient(grad_e, grad_c, grad_bias, e, c, grad_sum, column_weight=None) -> None:
    """Add, in place, the gradient of sum_n grad_sum[n] * sum_v w[v] z[n, v] for
    z = e @ c.T + bias (w = `column_weight`, 1 if None).

    It is rank one: logit (n, v) gets grad_sum[n] * w[v], so it never needs a logit tile, and
    gradient filtering can never drop it.
    """
    acc = grad_sum.dtype
    weight = None if column_weight is None else column_weight.to(acc)
    if grad_e is not None:
        weighted_c = c.sum(0, dtype=acc) if weight is None else weight @ c.to(acc)
        grad_e.add_(torch.outer(grad_sum, weighted_c).to(grad_e.dtype))
    if grad_c is not None:
        row = (grad_sum.unsqueeze(0) @ e.to(acc)).to(grad_c.dtype)
        grad_c.add_(row if weight is None else torch.outer(weight, row[0]).to(grad_c.dtype))
    if grad_bias is not None:
        total = grad_sum.sum()
        grad_bias.add_((total if weight is None else total * weight).to(grad_bias.dtype))


@torch.library.custom_op("logitless::gathered_dots", mutates_args=())
def gathered_dots(e: Tensor, c: Tensor, indices: Tensor) -> Tensor:
    """(N, k) products `e[n] . c[indices[n, j]]` in the accumulation dtype, the classifier rows
    gathered a row block at a time (`_gather_blocks`): never N x k x D at once."""
    acc = accumulation_dtype(e.dtype)
    out = torch.empty(indices.shape, device=e.device, dtype=acc)
    with _no_autocast(e):
        for rows in _gather_blocks(indices, c.shape[1]):
            gathered = c[indices[rows]].to(acc)  # (rows, k, D)
            out[rows] = (gathered @ e[rows].to(acc).unsqueeze(2)).squeeze(2)
    return out


@gathered_dots.register_fake
def _(e, c, indices):
    return e.new_empty(indices.shape, dtype=accumulation_dtype(e.dtype))


def _gather_blocks(indices: Tensor, dim: int) -> list[slice]:
    """Row blocks whose gathered (rows, k, D) classifier rows fit the portable backend's
    memory budget."""
    n, k = indices.shape
    block = rows_per_block(n, k * dim, 4, indices.device)
    return [slice(start, min(n, start + block)) for start in range(0, n, block)]


def _no_autocast(e: Tensor) -> torch.autocast:
    return torch.autocast(e.device.type, enabled=False)


def _split(names: str) -> tuple[str, ...]:
    return tuple(names.split(",")) if names else ()


def _teacher(e, c, bias, softcap, beta, lse) -> Teacher | None:
    return None if e is None else Teacher(e, c, bias, softcap, beta, lse)


def _finish(grads_out, e: Tensor, c: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """grad_e and grad_bias in the accumulation dtype (vocabulary shards sum grad_e before
    rounding; the fused path scales both before rounding), grad_c in c's dtype (no V x D float32
    copy); an empty tensor for a gradient not computed."""
    dtypes = (accumulation_dtype(e.dtype), c.dtype, accumulation_dtype(e.dtype))
    return tuple(
        e.new_empty(0) if g is None else g.to(dtype)
        for g, dtype in zip(grads_out, dtypes, strict=True)
    )


def _fake_grads(e, c, bias, needs):
    shapes = (e.shape, c.shape, None if bias is None else bias.shape)
    dtypes = (accumulation_dtype(e.dtype), c.dtype, accumulation_dtype(e.dtype))
    return tuple(
        e.new_empty(shape, dtype=dtype) if need else e.new_empty(0)
        for shape, dtype, need in zip(shapes, dtypes, needs, strict=True)
    )


def _outside_compile(op):
    """`op` through the dispatcher only while torch.compile traces; eagerly its Python function.

    A custom op's first eager call imports torch._dynamo (about 140 MB of resident memory, once
    per process, for a call that needs none of it); eager calls skip the dispatcher instead.
    """

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        return op._init_fn(*args)

    call.op = op
    return call


stats, grads, stats_and_grads, linear_stats_and_grads, gathered_dots = map(
    _outside_compile,
    (stats, grads, stats_and_grads, linear_stats_and_grads, gathered_dots),
)
