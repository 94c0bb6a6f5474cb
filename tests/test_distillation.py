"""linear_distillation_loss against the float64 reference: every divergence, temperature,
hard_weight, reduction, ignored tokens and dtype, teacher of another hidden size."""

from __future__ import annotations

import pytest
import torch

from helpers import DTYPES, check_results, make_inputs, outputs_and_grads
from logitless import linear_distillation_loss
from logitless.reference import reference_linear_distillation_loss

ROWS, DIM, TEACHER_DIM, VOCAB = 37, 29, 43, 301


def teacher_head(dtype, bias: bool, scale: float = 2.0):
    """A teacher of another hidden size, more peaked than the student."""
    teacher_e, teacher_c, _, teacher_bias = make_inputs(
        (ROWS,), TEACHER_DIM, VOCAB, dtype, bias=bias, scale=scale, seed=11
    )
    return teacher_e, teacher_c, teacher_bias


def adapter(function, teacher, lead=(ROWS,)):
    """(e, c, targets, bias, **options) -> the loss, with the teacher head fixed."""
    teacher_e, teacher_c, teacher_bias = teacher

    def loss(e, c, targets, bias, **options):
        return function(
            e, c, teacher_e.reshape(*lead, -1), teacher_c, targets, bias, teacher_bias, **options
        )

    return loss


CASES = [
    {"divergence": "forward_kl"},
    {"divergence": "forward_kl", "temperature": 0.7, "reduction": "sum"},
    {"divergence": "reverse_kl", "temperature": 1.3},
    {"divergence": "reverse_kl", "reduction": "none", "softcap": 3.0, "teacher_softcap": 4.0},
    {"divergence": "jsd", "beta": 0.5},
    {"divergence": "jsd", "beta": 0.2, "temperature": 0.7, "reduction": "none"},
    {"divergence": "forward_kl", "hard_weight": 0.3, "temperature": 1.3},
    {"divergence": "jsd", "beta": 0.7, "hard_weight": 0.5, "ignore_index": 4},
]


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", CASES, ids=repr)
def test_divergences(impl, dtype, options):
    """Loss and the student's gradients (e, c, bias) against float64."""
    if impl == "triton" and dtype != torch.float32:
        pytest.skip("the Triton backend routes a teacher to the portable one: one dtype shows it")
    inputs = make_inputs(
        (ROWS,), DIM, VOCAB, dtype, bias=True, ignore_fraction=0.2, seed=3,
        ignore_index=options.get("ignore_index", -100),
    )  # fmt: skip
    teacher = teacher_head(dtype, bias=True)
    ours = outputs_and_grads(
        adapter(linear_distillation_loss, teacher), inputs, 1, impl=impl, **options
    )
    check_results(
        ours, inputs, reference=adapter(reference_linear_distillation_loss, teacher), **options
    )


def test_shift_on_batched_sequences_without_bias():
    inputs = make_inputs((ROWS,), DIM, VOCAB, bias=False, ignore_fraction=0.1, seed=5)
    e, c, targets, _ = inputs
    batched = (e.view(1, ROWS, DIM), c, targets.view(1, ROWS), None)
    teacher = teacher_head(torch.float32, bias=False)
    options = {"divergence": "jsd", "shift": 2, "reduction": "none", "temperature": 0.7}
    lead = (1, ROWS)
    ours = outputs_and_grads(
        adapter(linear_distillation_loss, teacher, lead), batched, 1, **options
    )
    check_results(
        ours, batched, reference=adapter(reference_linear_distillation_loss, teacher, lead),
        **options,
    )  # fmt: skip


def test_identical_heads_have_zero_divergence_and_the_teacher_no_gradient():
    e, c, _targets, bias = make_inputs((ROWS,), DIM, VOCAB, bias=True, seed=2)
    teacher_e, teacher_c = e.clone().requires_grad_(), c.clone().requires_grad_()
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        loss = linear_distillation_loss(
            e, c, teacher_e, teacher_c, bias=bias, teacher_bias=bias, divergence=divergence
        )
        assert abs(loss.item()) < 1e-5
        assert not loss.requires_grad or loss.grad_fn is not None
    loss = linear_distillation_loss(e.requires_grad_(), c, teacher_e, teacher_c)
    loss.backward()
    assert teacher_e.grad is None and teacher_c.grad is None


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"divergence": "kl"}, ValueError, "divergence"),
        ({"divergence": "jsd", "beta": 1.0}, ValueError, "beta"),
        ({"hard_weight": 0.5}, ValueError, "needs targets"),
        ({"hard_weight": 2.0}, ValueError, "hard_weight"),
        ({"teacher_softcap": -1.0}, ValueError, "teacher_softcap"),
        ({"temperature": -1.0}, ValueError, "temperature"),
    ],
)
def test_bad_options(options, error, match):
    e, c, _, _ = make_inputs((4,), 8, 97)
    with pytest.raises(error, match=match):
        linear_distillation_loss(e, c, e, c, **options)


def test_bad_teacher():
    e, c, targets, _ = make_inputs((4,), 8, 97)
    with pytest.raises(ValueError, match="teacher_c must have shape"):
        linear_distillation_loss(e, c, e, c[:-1], targets)
    with pytest.raises(ValueError, match="teacher_e must have the leading shape"):
        linear_distillation_loss(e, c, e[:-1], c, targets)
    with pytest.raises(ValueError, match="teacher_e must have the dtype"):
        linear_distillation_loss(e, c, e.double(), c, targets)
    with pytest.raises(TypeError, match="teacher_bias"):
        linear_distillation_loss(e, c, e, c, targets, teacher_bias=[0.0])
