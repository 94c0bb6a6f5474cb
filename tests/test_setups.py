"""Training setups on one process: autocast, loss scaling, float64 and gradcheck, create_graph,
torch.func, and num_items_in_batch (gradient accumulation)."""

from __future__ import annotations

import pytest
import torch

from helpers import TOLERANCE, check_against_reference, check_results, make_inputs
from helpers import outputs_and_grads as outputs_and_grads_of
from logitless import (
    LinearCrossEntropyLoss,
    linear_cross_entropy,
    linear_distillation_loss,
    linear_log_probs,
    linear_top_k,
    linear_top_k_distillation_loss,
)
from logitless.reference import reference_linear_cross_entropy, relative_error

LEAD, DIM, VOCAB = (3, 13), 21, 307
"""Shapes that are multiples of no block size."""

PATHS = {"fused": {}, "recompute": {"return_lse": True}}
"""Option sets that take the fused path (a reduced loss alone) and the recomputing one."""


def _loss(*args, **options):
    """The loss alone, whichever path the options take."""
    out = linear_cross_entropy(*args, **options)
    return out[0] if isinstance(out, tuple) else out


# --- float64 and gradcheck ---


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"return_lse": True, "shift": 1},
        {"reduction": "none", "label_smoothing": 0.1, "softcap": 3.0, "z_loss": 1e-2},
        {"reduction": "sum", "label_smoothing": 0.2},
    ],
    ids=repr,
)
def test_gradcheck_in_float64(options):
    e, c, targets, bias = make_inputs((2, 5), 6, 29, torch.float64, bias=True, ignore_fraction=0.2)
    params = tuple(x.requires_grad_() for x in (e, c, bias))

    def fn(e, c, bias):
        return linear_cross_entropy(e, c, targets, bias, **options)

    assert torch.autograd.gradcheck(fn, params)
    ours = fn(*params)
    expected = reference_linear_cross_entropy(e, c, targets, bias, **options)
    pairs = zip(ours, expected, strict=True) if isinstance(ours, tuple) else [(ours, expected)]
    for x, ref in pairs:
        assert x.dtype == torch.float64
        torch.testing.assert_close(x, ref, rtol=1e-12, atol=1e-12)


def test_float64_needs_the_portable_backend():
    inputs = make_inputs((4,), 8, 33, torch.float64)
    with pytest.raises(ValueError, match="impl"):
        linear_cross_entropy(*inputs, impl="triton")


# --- loss scaling: the upstream gradient multiplies before any rounding ---


@pytest.mark.parametrize("path", list(PATHS))
def test_float16_with_grad_scaler_scale_is_finite_and_accurate(path):
    """A GradScaler scale of 65536 (above float16's largest finite value, 65504)."""
    inputs = make_inputs(LEAD, DIM, VOCAB, torch.float16, bias=True, ignore_fraction=0.1, seed=5)
    check_against_reference(inputs, upstream_scale=65536.0, **PATHS[path])


def test_bfloat16_gradients_of_a_divided_loss_are_unbiased():
    """grad(loss / 3) on the fused path in bfloat16: the accuracy criterion, and no systematic
    scale error against grad(loss) / 3 (1/3 rounded to bfloat16 is 0.2% too large; rounding
    the product once is unbiased: the fitted scale of many rounded entries is within a few 1e-5
    of 1). The recomputing path, like eager PyTorch, rounds softmax - onehot to bfloat16 before
    its matmul, and with it the upstream factor that all target entries share."""
    path = "fused"
    inputs = make_inputs((64,), 48, 1031, torch.bfloat16, bias=True, seed=6)
    check_against_reference(inputs, upstream_scale=1 / 3, **PATHS[path])
    _, divided = outputs_and_grads_of(_loss, inputs, 1, 1 / 3, **PATHS[path])
    _, whole = outputs_and_grads_of(_loss, inputs, 1, **PATHS[path])
    for x, ref in zip(divided, whole, strict=True):
        x, ref = x.double(), ref.double() / 3
        fitted_scale = (x * ref).sum() / (ref * ref).sum()
        assert abs(fitted_scale.item() - 1) < 2.0**-11


# --- double backward and torch.func ---


@pytest.mark.parametrize("path", list(PATHS))
def test_create_graph_raises_instead_of_a_gradient_without_graph(path):
    e, c, targets, _ = make_inputs(LEAD, DIM, VOCAB, seed=7)
    e.requires_grad_()
    loss = _loss(e, c, targets, **PATHS[path])
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, e, create_graph=True)


@pytest.mark.parametrize("path", list(PATHS))
def test_func_grad_equals_backward(path):
    e, c, targets, bias = make_inputs(LEAD, DIM, VOCAB, bias=True, seed=8)
    grads = torch.func.grad(lambda e, c: _loss(e, c, targets, bias, **PATHS[path]), (0, 1))(e, c)
    e.requires_grad_()
    c.requires_grad_()
    _loss(e, c, targets, bias, **PATHS[path]).backward()
    torch.testing.assert_close(grads, (e.grad, c.grad), rtol=0, atol=0)


def test_nested_func_grad_raises():
    e, c, targets, _ = make_inputs(LEAD, DIM, VOCAB, seed=9)
    inner = torch.func.grad(lambda e: linear_cross_entropy(e, c, targets))
    with pytest.raises(RuntimeError, match="double backward"):
        torch.func.grad(lambda e: inner(e).sum())(e)


@pytest.mark.parametrize("path", list(PATHS))
def test_vjp_and_jacrev_raise_clearly(path):
    """torch.func.vjp differentiates with create_graph=True (refused as a double backward, not
    mistaken for torch.func.grad's level); jacrev's backward runs under vmap (its refusal, not
    an in-place error inside the backward)."""
    e, c, targets, _ = make_inputs(LEAD, DIM, VOCAB, seed=11)
    _, vjp = torch.func.vjp(lambda e: _loss(e, c, targets, **PATHS[path]).sum(), e)
    with pytest.raises(RuntimeError, match=r"double backward.*vjp"):
        vjp(torch.ones(()))
    with pytest.raises(RuntimeError, match=r"vmap.*leading"):
        torch.func.jacrev(lambda e: _loss(e, c, targets, **PATHS[path]).sum())(e)


def test_vmap_raises_and_says_what_to_do():
    e, c, targets, _ = make_inputs((2, 5), DIM, VOCAB, seed=10)
    with pytest.raises(RuntimeError, match=r"vmap.*leading"):
        torch.func.vmap(lambda e, t: linear_cross_entropy(e, c, t))(e, targets)


# --- autocast ---


@pytest.mark.parametrize(
    ("e_dtype", "c_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),  # fp32 master weights, bf16 activations
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16),
    ],
    ids=str,
)
@pytest.mark.parametrize("path", list(PATHS))
def test_autocast_computes_in_its_dtype_and_returns_each_gradient_in_its_input_dtype(
    e_dtype, c_dtype, path
):
    e, c, targets, bias = make_inputs(LEAD, DIM, VOCAB, bias=True, ignore_fraction=0.1, seed=11)
    e, c, bias = e.to(e_dtype), c.to(c_dtype), bias.to(c_dtype)

    def under_autocast(*args, **options):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear_cross_entropy(*args, **options)

    outs, grads = outputs_and_grads_of(under_autocast, (e, c, targets, bias), 1, **PATHS[path])
    assert [g.dtype for g in grads] == [e_dtype, c_dtype, c_dtype]
    # Exactly the computation on the inputs cast to bfloat16, held to the accuracy criterion
    # against float64 and eager PyTorch on those inputs (what autocast's F.linear computes).
    cast = (e.bfloat16(), c.bfloat16(), targets, bias.bfloat16())
    expected = outputs_and_grads_of(linear_cross_entropy, cast, 1, **PATHS[path])
    for x, y in zip(outs + grads, expected[0] + expected[1], strict=True):
        assert torch.equal(x, y.to(x.dtype))
    bf16_grads = [g.to(torch.bfloat16) for g in grads]
    check_results((outs, bf16_grads), cast, **PATHS[path])


@pytest.mark.parametrize(
    ("function", "options"),
    [
        (linear_log_probs, {"temperature": 0.7, "return_entropy": True}),
        (linear_top_k, {"k": 3}),
    ],
    ids=["log_probs", "top_k"],
)
def test_autocast_holds_for_log_probs_and_top_k(function, options):
    """fp32 master weights, bf16 activations: computed on the bf16 casts, gradients back in
    each input's dtype."""
    e, c, targets, bias = make_inputs(LEAD, DIM, VOCAB, bias=True, ignore_fraction=0.1, seed=13)
    e = e.bfloat16()
    if function is linear_top_k:
        call = lambda e, c, targets, bias, **kw: linear_top_k(e, c, bias=bias, **kw)  # noqa: E731
    else:
        call = function

    def under_autocast(*args, **kw):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return call(*args, **kw)

    outs, grads = outputs_and_grads_of(under_autocast, (e, c, targets, bias), 1, **options)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    cast = (e, c.bfloat16(), targets, bias.bfloat16())
    expected = outputs_and_grads_of(call, cast, 1, **options)
    for x, y in zip(outs + grads, expected[0] + expected[1], strict=True):
        assert torch.equal(x, y.to(x.dtype))


@pytest.mark.parametrize("function", ["distillation", "top_k_distillation"])
def test_autocast_holds_for_distillation(function):
    """Both heads (a cached teacher's log-probs as they are) computed on the bf16 casts, the
    student's gradients back in each input's dtype."""
    e, c, targets, bias = make_inputs(LEAD, DIM, VOCAB, bias=True, ignore_fraction=0.1, seed=14)
    teacher_e, teacher_c, _, teacher_bias = make_inputs(LEAD, 2 * DIM, VOCAB, bias=True, seed=15)
    e = e.bfloat16()
    if function == "distillation":
        teacher = (teacher_e.bfloat16(), teacher_c, teacher_bias)

        def call(e, c, targets, bias, teacher=teacher, **kw):
            return linear_distillation_loss(e, c, *teacher[:2], targets, bias, teacher[2], **kw)

        cast_teacher = (teacher_e.bfloat16(), teacher_c.bfloat16(), teacher_bias.bfloat16())
    else:
        teacher = (teacher_e @ teacher_c.T).log_softmax(-1).topk(5)[::-1]

        def call(e, c, targets, bias, teacher=teacher, **kw):
            return linear_top_k_distillation_loss(e, c, *teacher, targets, bias, **kw)

        cast_teacher = teacher

    def under_autocast(*args, **kw):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return call(*args, **kw)

    options = {"temperature": 1.3, "hard_weight": 0.2}
    outs, grads = outputs_and_grads_of(under_autocast, (e, c, targets, bias), 1, **options)
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    cast = (e, c.bfloat16(), targets, bias.bfloat16())
    expected = outputs_and_grads_of(
        lambda *args, **kw: call(*args, teacher=cast_teacher, **kw), cast, 1, **options
    )
    for x, y in zip(outs + grads, expected[0] + expected[1], strict=True):
        assert torch.equal(x, y.to(x.dtype))


def test_float64_is_not_autocast_and_mixed_dtypes_stay_an_error_outside():
    e, c, targets, _ = make_inputs(LEAD, DIM, VOCAB, seed=12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear_cross_entropy(e.double(), c.double(), targets).dtype == torch.float64
    with pytest.raises(ValueError, match="c must have the dtype of e"):
        linear_cross_entropy(e.bfloat16(), c, targets)


# --- num_items_in_batch ---


@pytest.mark.parametrize("path", list(PATHS))
def test_num_items_in_batch_divides_the_sum(path):
    inputs = make_inputs(LEAD, DIM, VOCAB, bias=True, ignore_fraction=0.2, seed=13)
    options = {**PATHS[path], "z_loss": 1e-3, "label_smoothing": 0.1, "shift": 1}
    total = _loss(*inputs, reduction="sum", **options)
    for count in (37, torch.tensor(37.0), torch.tensor([37])):
        divided = _loss(*inputs, num_items_in_batch=count, **options)
        torch.testing.assert_close(divided, total / 37, rtol=1e-6, atol=0)


@pytest.mark.parametrize("path", list(PATHS))
def test_gradient_accumulation_with_num_items_equals_the_whole_batch(path):
    """Two micro-batches of unequal token counts, each divided by the step's total count."""
    e, c, targets, bias = make_inputs((4, 13), DIM, VOCAB, bias=True, ignore_fraction=0.3, seed=14)
    params = [x.detach().requires_grad_() for x in (e, c, bias)]
    count = int((targets[:, 1:] != -100).sum())
    for part in (slice(0, 1), slice(1, 4)):
        micro = (params[0][part], params[1], targets[part], params[2])
        _loss(*micro, shift=1, num_items_in_batch=count, **PATHS[path]).backward()
    whole_params = [x.detach().requires_grad_() for x in (e, c, bias)]
    _loss(*whole_params[:2], targets, whole_params[2], shift=1, **PATHS[path]).backward()
    for accumulated, full in zip(params, whole_params, strict=True):
        assert relative_error(accumulated.grad, full.grad) < TOLERANCE[torch.float32]


def test_module_takes_num_items_in_batch():
    inputs = make_inputs(LEAD, DIM, VOCAB, seed=15)
    module = LinearCrossEntropyLoss(shift=1)
    expected = linear_cross_entropy(*inputs, shift=1, reduction="sum") / 11
    torch.testing.assert_close(module(*inputs, num_items_in_batch=11), expected)


@pytest.mark.parametrize(
    ("value", "options", "error"),
    [
        (0, {}, ValueError),
        (2.5, {}, TypeError),
        (True, {}, TypeError),
        (torch.tensor([3, 4]), {}, ValueError),
        (torch.tensor(0), {}, ValueError),
        (torch.tensor(-2.0), {}, ValueError),
        (torch.tensor(float("nan")), {}, ValueError),  # a NaN loss
        (torch.tensor(float("inf")), {}, ValueError),  # a loss of 0 and no gradient
        (5, {"reduction": "none"}, ValueError),
        (5, {"reduction": "sum"}, ValueError),
    ],
    ids=repr,
)
def test_bad_num_items_in_batch_names_the_argument(value, options, error):
    inputs = make_inputs(LEAD, DIM, VOCAB, seed=16)
    with pytest.raises(error, match="num_items_in_batch"):
        linear_cross_entropy(*inputs, num_items_in_batch=value, **options)
