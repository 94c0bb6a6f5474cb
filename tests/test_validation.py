"""Hostile inputs: every bad argument is a TypeError/ValueError naming it; odd values stay right."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import make_inputs, rel_error
from logitless import (
    LinearCrossEntropyLoss,
    LinearDistillationLoss,
    linear_cross_entropy,
    linear_distillation_loss,
    linear_top_k,
)
from logitless.reference import reference_linear_cross_entropy


@pytest.fixture
def inputs():
    return make_inputs((2, 6), 8, 50, bias=True, seed=21)


BAD_OPTIONS = [
    ("reduction", "avg", ValueError),
    ("reduction", None, TypeError),
    ("ignore_index", 1.5, TypeError),
    ("ignore_index", True, TypeError),
    ("ignore_index", 2**70, ValueError),
    ("shift", -1, ValueError),
    ("shift", 1.0, TypeError),
    ("softcap", 0.0, ValueError),
    ("softcap", -3.0, ValueError),
    ("softcap", math.inf, ValueError),
    ("softcap", math.nan, ValueError),
    ("softcap", "30", TypeError),
    ("label_smoothing", -0.1, ValueError),
    ("label_smoothing", 1.5, ValueError),
    ("label_smoothing", math.nan, ValueError),
    ("z_loss", -1e-4, ValueError),
    ("z_loss", math.inf, ValueError),
    ("return_lse", 1, TypeError),
    ("filter_eps", "exact", ValueError),
    ("filter_eps", -1e-3, ValueError),
    ("filter_eps", 1.0, ValueError),
    ("filter_eps", math.nan, ValueError),
    ("impl", "cuda", ValueError),
    ("impl", 3, TypeError),
]


@pytest.mark.parametrize(("name", "value", "error"), BAD_OPTIONS, ids=repr)
def test_bad_option_names_the_argument(inputs, name, value, error):
    with pytest.raises(error, match=name):
        linear_cross_entropy(*inputs, **{name: value})
    with pytest.raises(error, match=name):
        LinearCrossEntropyLoss(**{name: value})
    with pytest.raises(error, match=name):
        setattr(LinearCrossEntropyLoss(), name, value)


def test_numpy_scalars_are_numbers():
    """Options from a NumPy config (np.float32, np.int64) act as the Python numbers they hold,
    as in F.cross_entropy (they were refused with a TypeError), and are kept as Python numbers;
    a NumPy bool is still not an int."""
    np = pytest.importorskip("numpy")
    e, c, targets, bias = make_inputs((2, 6), 8, 50, bias=True, seed=21)
    teacher_e, teacher_c, _, _ = make_inputs((2, 6), 12, 50, seed=5)
    python = {"ignore_index": 7, "shift": 1, "softcap": 5.0, "label_smoothing": 0.25}
    numpy = {"ignore_index": np.int64(7), "shift": np.int32(1), "softcap": np.float32(5.0),
             "label_smoothing": np.float32(0.25)}  # fmt: skip
    torch.testing.assert_close(
        linear_cross_entropy(e, c, targets, bias, **numpy),
        linear_cross_entropy(e, c, targets, bias, **python),
    )
    module = LinearCrossEntropyLoss(**numpy, z_loss=np.float64(1e-3))
    assert all(type(getattr(module, name)) is type(value) for name, value in python.items())
    assert type(module.z_loss) is float
    python = {"beta": 0.25, "temperature": 0.75, "hard_weight": 0.5, "divergence": "jsd"}
    numpy = {"beta": np.float32(0.25), "temperature": np.float64(0.75),
             "hard_weight": np.float32(0.5), "divergence": "jsd"}  # fmt: skip
    torch.testing.assert_close(
        linear_distillation_loss(e, c, teacher_e, teacher_c, targets, **numpy),
        linear_distillation_loss(e, c, teacher_e, teacher_c, targets, **python),
    )
    module = LinearDistillationLoss(**numpy)
    assert all(type(getattr(module, name)) is type(value) for name, value in python.items())
    values, indices = linear_top_k(e, c, np.int64(3), temperature=np.float32(0.75))
    assert indices.shape == (2, 6, 3)
    torch.testing.assert_close(values, linear_top_k(e, c, 3, temperature=0.75)[0])
    with pytest.raises(TypeError, match="ignore_index"):
        linear_cross_entropy(e, c, targets, ignore_index=np.bool_(True))


def _bad_tensor_cases():
    e, c, targets, bias = make_inputs((2, 6), 8, 50, bias=True, seed=21)
    return [
        ("e", "e", (e.to(torch.complex64), c, targets, bias), TypeError),
        ("e", "e", (e.long(), c, targets, bias), TypeError),
        ("e", "e", ([1.0], c, targets, bias), TypeError),
        ("c", "c", (e, c.half(), targets, bias), ValueError),
        ("bias", "bias", (e, c, targets, bias.half()), ValueError),
        ("bias", "bias", (e, c, targets, bias[:-1]), ValueError),
        ("bias", "bias", (e, c, targets, "bias"), TypeError),
        ("targets", "targets", (e, c, targets.float(), bias), TypeError),
        ("targets", "targets", (e, c, targets.bool(), bias), TypeError),
        ("targets", "targets", (e, c, targets[:, :-1], bias), ValueError),
        ("targets", "targets", (e, c, targets.reshape(-1), bias), ValueError),
        ("c", "c", (e, c[:, :-1], targets, bias), ValueError),
        ("c", "c", (e, c[None], targets, bias), ValueError),
        ("c", "c", (e, c[:0], targets, bias), ValueError),
        ("D=0", "hidden size", (e[..., :0], c[:, :0], targets, bias), ValueError),
        ("e", "e", (torch.tensor(1.0), c, torch.tensor(0), bias), ValueError),
        ("targets-high", "targets", (e, c, targets.clone().fill_(50), bias), ValueError),
        ("targets-negative", "targets", (e, c, targets.clone().fill_(-2), bias), ValueError),
    ]


@pytest.mark.parametrize(
    ("case", "name", "args", "error"),
    _bad_tensor_cases(),
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_bad_tensor_names_the_argument(case, name, args, error):
    with pytest.raises(error, match=name):
        linear_cross_entropy(*args)


@pytest.mark.parametrize("shift", [6, 7])
def test_shift_that_leaves_nothing(inputs, shift):
    with pytest.raises(ValueError, match="shift"):
        linear_cross_entropy(*inputs, shift=shift)


def test_shift_needs_a_sequence_dimension():
    e, c, targets, _ = make_inputs((), 8, 20)
    with pytest.raises(ValueError, match="shift"):
        linear_cross_entropy(e, c, targets, shift=1)


def test_target_check_reports_the_value():
    e, c, targets, _ = make_inputs((9,), 8, 20)
    targets[4] = 20
    with pytest.raises(ValueError, match=r"\[0, 20\).*found 20"):
        linear_cross_entropy(e, c, targets)


def test_shifted_out_targets_are_not_checked():
    """A shift drops the first targets of each sequence: whatever they hold, the loss is that of
    the shifted slice, as F.cross_entropy on it (a target there outside [0, V) was refused)."""
    e, c, targets, _ = make_inputs((2, 9), 8, 20, seed=3)
    targets[:, 0] = torch.tensor([20, -7])
    ours = linear_cross_entropy(e, c, targets, shift=1)
    exact = reference_linear_cross_entropy(e[:, :-1].double(), c.double(), targets[:, 1:])
    assert rel_error(ours, exact) < 1e-6
    targets[1, 5] = 20
    with pytest.raises(ValueError, match="found 20"):
        linear_cross_entropy(e, c, targets, shift=1)


def test_meta_num_items_in_batch_names_it():
    e, c, targets, _ = make_inputs((2, 9), 8, 20, seed=3)
    with pytest.raises(ValueError, match="num_items_in_batch must hold a value"):
        linear_cross_entropy(e, c, targets, num_items_in_batch=torch.tensor(5, device="meta"))


def test_triton_impl_without_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="impl"):
        linear_cross_entropy(*make_inputs((3,), 8, 20), impl="triton")


@pytest.mark.parametrize("where", ["e", "c", "bias"])
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_nan_or_inf_input_gives_nan_loss(where, value, reduction):
    e, c, targets, bias = make_inputs((5,), 8, 40, bias=True, seed=22)
    {"e": e, "c": c, "bias": bias}[where].view(-1)[3] = value
    loss = linear_cross_entropy(e, c, targets, bias, reduction=reduction)
    assert torch.isnan(loss).any(), f"{where}={value} gave {loss}"


def test_minus_inf_bias_masks_a_class_like_eager():
    """-inf on a non-target class removes it from the softmax: a finite, correct loss."""
    e, c, targets, bias = make_inputs((7,), 8, 40, bias=True, seed=23)
    masked = (targets.max() + 1) % 40
    bias[masked] = -math.inf
    ours = linear_cross_entropy(e, c, targets, bias)
    ref = reference_linear_cross_entropy(e, c, targets, bias)
    assert torch.isfinite(ours)
    assert rel_error(ours, ref) < 1e-6


@pytest.mark.parametrize("options", [{}, {"softcap": 30.0}, {"z_loss": 1e-4}], ids=repr)
def test_huge_logits_stay_finite_and_correct(options):
    """Logits of magnitude 1e4 in float32: no overflow, same as float64."""
    e, c, targets, _ = make_inputs((13,), 16, 301, seed=24)
    e = e / e.norm(dim=-1, keepdim=True) * 100
    c = c / c.norm(dim=-1, keepdim=True) * 100
    e.requires_grad_()
    loss = linear_cross_entropy(e, c, targets, **options)
    loss.backward()
    e64 = e.detach().double().requires_grad_()
    ref = reference_linear_cross_entropy(e64, c, targets, **options)
    ref.backward()
    assert torch.isfinite(loss) and torch.isfinite(e.grad).all()
    assert rel_error(loss, ref) < 1e-5
    assert rel_error(e.grad, e64.grad) < 1e-4


def test_meta_tensors_are_refused_naming_e():
    """A model built on the meta device and not yet materialized: a ValueError naming e, not
    autocast's "unknown device type" or a failed copy deep inside."""
    e, c = torch.randn(4, 8, device="meta"), torch.randn(10, 8, device="meta")
    targets = torch.zeros(4, dtype=torch.long, device="meta")
    with pytest.raises(ValueError, match=r"e must hold values.*meta"):
        linear_cross_entropy(e, c, targets)
