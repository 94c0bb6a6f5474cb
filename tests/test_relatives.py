"""Log-probs, entropy, top-k and class weights against the float64 reference, on both backends
(Triton through its interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import (
    DTYPES,
    check_against_reference,
    check_results,
    confident_targets,
    first_input_gradient,
    make_inputs,
    masked,
    outputs_and_grads,
    rel_error,
)
from logitless import (
    LinearCrossEntropyLoss,
    linear_cross_entropy,
    linear_distillation_loss,
    linear_log_probs,
    linear_top_k,
)
from logitless._validation import triton_interpreter_on
from logitless.backends import Logits, get_backend
from logitless.reference import reference_linear_log_probs, reference_linear_top_k

IMPLS = [
    "torch",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            not (torch.cuda.is_available() or triton_interpreter_on()),
            reason="needs CUDA or TRITON_INTERPRET=1",
        ),
    ),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

LOG_PROB_OPTIONS = [
    {"temperature": 0.7, "return_entropy": True},
    {"temperature": 1.3, "return_entropy": True, "softcap": 4.0},
    {"temperature": 1.3},
    {"return_entropy": True, "ignore_index": 5},
    {"temperature": 0.7, "return_entropy": True, "filter_eps": "auto"},
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", LOG_PROB_OPTIONS, ids=repr)
def test_log_probs_and_entropy(impl, dtype, options):
    """Values and gradients under random per-token upstream weights, ragged shapes."""
    inputs = make_inputs(
        (37,), 29, 301, dtype, bias=True, ignore_fraction=0.2, seed=3, device=DEVICE,
        ignore_index=options.get("ignore_index", -100),
    )  # fmt: skip
    check_against_reference(inputs, impl=impl, function=linear_log_probs, **options)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shift", [1, 3])
def test_log_probs_shift_on_batched_sequences(impl, shift):
    inputs = make_inputs((2, 19), 24, 213, bias=True, ignore_fraction=0.1, seed=5, device=DEVICE)
    check_against_reference(
        inputs, impl=impl, function=linear_log_probs, shift=shift, temperature=0.7,
        return_entropy=True, softcap=3.0,
    )  # fmt: skip


@pytest.mark.parametrize("impl", IMPLS)
def test_entropy_with_classes_masked_by_the_bias(impl):
    """A -inf bias masks a class: it adds 0 to the entropy and to its gradient, not NaN."""
    inputs = masked(make_inputs((37,), 29, 301, bias=True, seed=3, device=DEVICE))
    check_against_reference(
        inputs, impl=impl, function=linear_log_probs, return_entropy=True, temperature=0.7
    )


def test_log_probs_are_minus_the_unreduced_loss():
    """At T = 1 the log-probs are the negated per-token cross-entropy, bit for bit in float32."""
    e, c, targets, bias = make_inputs((3, 17), 16, 257, bias=True, ignore_fraction=0.2, seed=7)
    log_probs = linear_log_probs(e, c, targets, bias, shift=1)
    losses = linear_cross_entropy(e, c, targets, bias, shift=1, reduction="none")
    assert torch.equal(log_probs, -losses)


def test_entropy_of_a_uniform_softmax_is_log_v():
    e = torch.randn(5, 8)
    c = torch.zeros(97, 8)
    _, entropy = linear_log_probs(e, c, torch.zeros(5, dtype=torch.long), return_entropy=True)
    torch.testing.assert_close(entropy, torch.full((5,), torch.tensor(97.0).log().item()))


def _top_k(k):
    def top_k(e, c, targets, bias, **options):
        return linear_top_k(e, c, k, bias, **options)

    return top_k


def _reference_top_k(k):
    def top_k(e, c, targets, bias, **options):
        return reference_linear_top_k(e, c, k, bias, **options)

    return top_k


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("k", "options"),
    [
        (1, {}),
        (5, {"temperature": 0.7}),
        (3, {"temperature": 1.3, "softcap": 3.0}),
        (17, {}),
        (70, {"temperature": 0.7}),  # above the Triton kernel's MAX_TOP_K
    ],
    ids=["argmax", "k5-T0.7", "k3-T1.3-softcap", "k17", "k70-T0.7"],
)
def test_top_k(impl, dtype, k, options):
    """Descending log-probs and indices equal to the float64 reference's; value gradients."""
    inputs = make_inputs((2, 21), 29, 301, dtype, bias=True, seed=4, device=DEVICE)
    ours = outputs_and_grads(_top_k(k), inputs, 1, impl=impl, **options)
    values, indices = ours[0]
    assert indices.dtype == torch.int64 and values.shape == (2, 21, k)
    assert (values[..., 1:] <= values[..., :-1]).all()
    check_results(ours, inputs, reference=_reference_top_k(k), **options)
    # 16-bit logits may order near-ties differently: the classes picked must be as likely, in
    # float64, as the true top k, up to one rounding of a logit of that dtype.
    e, c, _, bias = inputs
    exact = reference_linear_top_k(e, c, c.shape[0], bias, **options)
    exact_values = exact[0].gather(-1, exact[1].argsort(-1))  # by class
    picked = exact_values.gather(-1, indices)
    slack = 4 * torch.finfo(dtype).eps * exact[0].abs().amax()
    assert (picked - exact[0][..., :k]).abs().max() <= slack


@pytest.mark.parametrize("impl", IMPLS)
def test_top_1_gradient_of_confident_rows_in_bfloat16(impl):
    """k = 1 where one class holds all but 4e-5 of every row's mass (a bias of 16): the
    value's gradient, a one-hot less p, is formed in the backend's gradient tile before any
    16-bit rounding. Its two parts came apart before (the one-hot through gathered logits in
    float32, p rounded to bf16 in the sweep), and cancelled after rounding: dE 97 times the
    gradient's size from float64 (eager's error 0.86). (In float32 the value itself, near 0,
    is 1.1-1.3x eager's relative error, as `test_top_k_of_confident_rows_keeps_relative_precision`
    bounds it.)"""
    inputs = make_inputs((32,), 16, 130, torch.bfloat16, bias=True, seed=4, device=DEVICE)
    inputs[3][7] = 16.0
    ours = outputs_and_grads(_top_k(1), inputs, 1, impl=impl)
    assert (ours[0][1] == 7).all()
    check_results(ours, inputs, reference=_reference_top_k(1))


def confident_rows():
    """Inputs whose logits (std 12) make many rows confident: a largest probability near 1."""
    return make_inputs((211,), 64, 1009, bias=True, scale=12.0, seed=9, device=DEVICE)


def worst_relative_errors(ours, eager, exact) -> tuple[float, float]:
    """(ours', eager's) largest relative error where the exact value lies within (1e-6, 1e-3)
    of 0 (where float32's 1 + x still keeps 3 digits of x), over at least 10 such rows."""
    near_zero = (exact.abs() > 1e-6) & (exact.abs() < 1e-3)
    assert near_zero.sum() >= 10
    return tuple(
        ((values.double() - exact).abs() / exact.abs())[near_zero].max().item()
        for values in (ours, eager)
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "grad"])
def test_top_k_of_confident_rows_keeps_relative_precision(impl, grad):
    """A confident row's largest log-prob (near 0) is as precise, relative to itself, as
    log_softmax's in float32 (a logit minus a rounded log-sum-exp was 300x further off)."""
    e, c, _, bias = confident_rows()
    exact = reference_linear_top_k(e, c, 3, bias)[0][:, 0]
    eager = torch.log_softmax(e @ c.T + bias, dim=-1).amax(-1)
    ours = linear_top_k(e.requires_grad_(grad), c, 3, bias, impl=impl)[0][:, 0]
    ours_error, eager_error = worst_relative_errors(ours, eager, exact)
    assert ours_error <= 2 * eager_error


@pytest.mark.parametrize("impl", IMPLS)
def test_entropy_of_confident_rows_keeps_relative_precision(impl):
    """A confident token's entropy (near 0) is about as precise, relative to itself, as eager
    float32's -(p * log p).sum(): lse - mean, two numbers of the size of the largest logit, had
    lost it (50x eager's error, and negative entropies)."""
    e, c, targets, bias = confident_rows()
    log_p = torch.log_softmax(e.double() @ c.double().T + bias.double(), dim=-1)
    exact = -(log_p.exp() * log_p).sum(-1)
    log_p32 = torch.log_softmax(e @ c.T + bias, dim=-1)
    eager = -(log_p32.exp() * log_p32).sum(-1)
    ours = linear_log_probs(e, c, targets, bias, return_entropy=True, impl=impl)[1]
    ours_error, eager_error = worst_relative_errors(ours, eager, exact)
    assert (ours >= 0).all() and ours_error <= 3 * eager_error


@pytest.mark.parametrize("impl", IMPLS)
def test_log_probs_of_confident_rows_keep_relative_precision(impl):
    """A confident token's log-prob (near 0) is (target - lse) - the lse's residual, as precise
    as eager float32's log_softmax: target - lse alone, with lse rounded to float32, was 100%
    off (0 for -1e-5)."""
    e, c, _, bias = confident_rows()
    top = (e @ c.T + bias).argmax(-1)
    exact = torch.log_softmax(e.double() @ c.double().T + bias.double(), dim=-1)
    exact = exact.gather(1, top.unsqueeze(1)).squeeze(1)
    eager = torch.log_softmax(e @ c.T + bias, dim=-1).gather(1, top.unsqueeze(1)).squeeze(1)
    ours = linear_log_probs(e, c, top, bias, impl=impl)
    ours_error, eager_error = worst_relative_errors(ours, eager, exact)
    assert ours_error <= 1.5 * eager_error


@pytest.mark.parametrize("impl", IMPLS)
def test_entropy_gradient_of_large_logits_stays_near_eager(impl):
    """The entropy's gradient p (mean - z) = -p (log p + entropy), formed from log p and the
    entropy (small numbers) rather than from mean - z (two of the size of the largest logit):
    at logit std 30, within 2.5x eager float32's error from float64 over four draws (up to 10x
    with mean - z; 5x with log p = z - lse, lse rounded to float32 without its residual)."""
    ratios = [_entropy_gradient_error_vs_eager(impl, seed) for seed in range(4)]
    assert max(ratios) <= 2.5, ratios


@pytest.mark.parametrize("impl", IMPLS)
def test_per_token_gradients_of_confident_tokens_are_as_precise_as_eager(impl):
    """Per-token cross-entropy and log-probs (unfused: their backward recomputes p) of tokens
    whose target holds all but 2e-5 of the mass, every logit offset by +100: p = exp(z - lse)
    from an lse rounded to float32 put 9x eager float32's error in their gradients; with the
    lse's residual, as eager's or better."""
    inputs = confident_targets(DEVICE)
    targets = inputs[2]

    def grad_e(loss, dtype=torch.float32):
        return first_input_gradient(lambda x, c, _, b: loss(x, c, b), inputs, dtype)

    exact = grad_e(lambda x, c, b: F.cross_entropy(x @ c.T + b, targets, reduction="sum"),
                   torch.float64)  # fmt: skip
    eager = grad_e(lambda x, c, b: F.cross_entropy(x @ c.T + b, targets, reduction="sum"))
    per_token = grad_e(
        lambda x, c, b: linear_cross_entropy(x, c, targets, b, reduction="none", impl=impl).sum()
    )
    log_probs = grad_e(lambda x, c, b: -linear_log_probs(x, c, targets, b, impl=impl).sum())
    for ours in (per_token, log_probs):
        assert rel_error(ours, exact) <= 1.5 * rel_error(eager, exact)


def _entropy_gradient_error_vs_eager(impl: str, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    e = torch.randn(37, 29, generator=gen) * 30 / 29**0.5
    c, targets = torch.randn(301, 29, generator=gen), torch.randint(0, 301, (37,), generator=gen)
    upstream = torch.randn(37, generator=gen)

    def eager(x, c):
        log_p = torch.log_softmax(x @ c.T, dim=-1)
        return -(log_p.exp() * log_p).sum(-1)

    def ours(x, c):
        return linear_log_probs(x, c, targets.to(DEVICE), return_entropy=True, impl=impl)[1]

    def grad_e(entropy, dtype):
        def loss(x, c):
            return entropy(x, c).double().cpu() @ upstream.double()

        return first_input_gradient(loss, (e.to(DEVICE), c.to(DEVICE)), dtype)

    exact = grad_e(eager, torch.float64)
    return rel_error(grad_e(ours, torch.float32), exact) / rel_error(
        grad_e(eager, torch.float32), exact
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_statistics_of_an_all_masked_shard_are_not_nan(impl):
    """A vocabulary shard whose every class a -inf bias masks (padding rows on one rank) has
    lse -inf and no NaN among its statistics: the other ranks' weight it by exp(-inf) = 0."""
    e, c, _, bias = make_inputs((9,), 8, 40, bias=True, seed=3, device=DEVICE)
    no_targets = torch.full((9,), -1, device=DEVICE)
    names = ("lse", "entropy", "target")
    found = get_backend(impl).stats(
        e, c, torch.full_like(bias, -torch.inf), no_targets, logits=Logits(), names=names
    )
    assert (found[0] == -torch.inf).all() and not found.isnan().any()


def test_argmax_gives_accuracy_without_logits():
    e, c, targets, bias = make_inputs((64,), 16, 211, bias=True, scale=3.0, seed=6)
    _, predicted = linear_top_k(e, c, 1, bias)
    logits = e.double() @ c.double().T + bias.double()
    assert torch.equal(predicted[:, 0], logits.argmax(-1))
    accuracy = (predicted[:, 0] == targets).float().mean()
    assert accuracy == (logits.argmax(-1) == targets).float().mean()


WEIGHT_OPTIONS = [
    {},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"label_smoothing": 0.1},
    {"label_smoothing": 0.2, "reduction": "sum"},
    {"label_smoothing": 0.1, "reduction": "none", "return_lse": True},
    {"label_smoothing": 0.1, "softcap": 3.0},
    {"label_smoothing": 0.1, "z_loss": 1e-3, "softcap": 5.0, "reduction": "none"},
    {"z_loss": 1e-2},
    {"z_loss": 1e-2, "ignore_index": 301},  # = V: no row of the weight table
]


def class_weights(vocab: int, dtype=torch.float32, device=DEVICE) -> torch.Tensor:
    """Random weights in [0, 2), strided (every other entry of a table): a kernel that read
    them as contiguous gave float32 gradients 2e-3 off with smoothing and softcap."""
    gen = torch.Generator().manual_seed(17)
    return (torch.rand(2 * vocab, generator=gen) * 2).to(device=device, dtype=dtype)[::2]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("options", WEIGHT_OPTIONS, ids=repr)
def test_class_weights_match_weighted_cross_entropy(impl, dtype, options):
    """F.cross_entropy(weight=) semantics, weighted mean and smoothing included, fused or not."""
    inputs = make_inputs(
        (37,), 29, 301, dtype, bias=True, ignore_fraction=0.2, seed=3, device=DEVICE,
        ignore_index=options.get("ignore_index", -100),
    )  # fmt: skip
    check_against_reference(inputs, impl=impl, weight=class_weights(301), **options)


def test_class_weights_equal_float64_cross_entropy_directly():
    """The reference itself against F.cross_entropy on materialized float64 logits."""
    e, c, targets, _ = make_inputs((40,), 12, 97, torch.float64, ignore_fraction=0.2, seed=2)
    weight = class_weights(97, torch.float64, "cpu")
    for smoothing in (0.0, 0.3):
        for reduction in ("mean", "sum", "none"):
            ours = linear_cross_entropy(
                e.float(), c.float(), targets, weight=weight.float(),
                label_smoothing=smoothing, reduction=reduction,
            )  # fmt: skip
            expected = F.cross_entropy(
                e @ c.T, targets, weight=weight, label_smoothing=smoothing, reduction=reduction
            )
            torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_z_loss_with_class_weights_is_reduced_like_the_loss(impl):
    """A token's z-loss is weighted like its cross-entropy: the weighted mean does not change
    with the weights' scale, and a token whose target weighs 0 adds nothing."""
    e, c, targets, bias = make_inputs((33,), 16, 211, bias=True, seed=8, device=DEVICE)
    weight = class_weights(211)
    options = {"z_loss": 0.1, "label_smoothing": 0.1, "impl": impl}
    loss = linear_cross_entropy(e, c, targets, bias, weight=weight, **options)
    scaled = linear_cross_entropy(e, c, targets, bias, weight=7 * weight, **options)
    torch.testing.assert_close(scaled, loss, rtol=1e-5, atol=0)
    zeroed = weight.clone()
    zeroed[targets[:5]] = 0
    dropped = targets.clone()
    dropped[torch.isin(targets, targets[:5])] = -100
    without = linear_cross_entropy(e, c, targets, bias, weight=zeroed, reduction="sum", z_loss=0.1)
    expected = linear_cross_entropy(e, c, dropped, bias, weight=zeroed, reduction="sum", z_loss=0.1)
    torch.testing.assert_close(without, expected, rtol=1e-5, atol=0)


def test_module_takes_class_weights():
    inputs = make_inputs((2, 9), 16, 211, bias=True, seed=6)
    weight = class_weights(211, device="cpu")
    module = LinearCrossEntropyLoss(weight=weight, shift=1, label_smoothing=0.1)
    expected = linear_cross_entropy(*inputs, weight=weight, shift=1, label_smoothing=0.1)
    torch.testing.assert_close(module(*inputs), expected)
    assert "weight" in dict(module.named_buffers())


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda e, c, t: linear_log_probs(e, c, t, temperature=0.0), ValueError, "temperature"),
        (lambda e, c, t: linear_log_probs(e, c, t, temperature="1"), TypeError, "temperature"),
        (lambda e, c, t: linear_log_probs(e, c, t, return_entropy=1), TypeError, "return_entropy"),
        (lambda e, c, t: linear_top_k(e, c, 0), ValueError, "k must be in"),
        (lambda e, c, t: linear_top_k(e, c, 98), ValueError, "k must be in"),
        (lambda e, c, t: linear_top_k(e, c, 2.0), TypeError, "k must be an int"),
        (lambda e, c, t: linear_top_k(e.tolist(), c, 2), TypeError, "e must be a torch.Tensor"),
        (
            lambda e, c, t: linear_distillation_loss(e.tolist(), c, e, c),
            TypeError,
            "e must be a torch.Tensor",
        ),
        (
            lambda e, c, t: linear_cross_entropy(e, c, t, weight=torch.ones(96)),
            ValueError,
            "weight",
        ),
        (
            lambda e, c, t: linear_cross_entropy(e, c, t, weight=torch.ones(97, dtype=torch.long)),
            TypeError,
            "weight",
        ),
        (lambda e, c, t: linear_cross_entropy(e, c, t, weight=[1.0] * 97), TypeError, "weight"),
        (
            lambda e, c, t: linear_cross_entropy(
                e, c, t, weight=torch.ones(97, requires_grad=True)
            ),
            ValueError,
            "weight must not require grad",
        ),
    ],
)
def test_bad_arguments(call, error, match):
    e, c, targets, _ = make_inputs((4,), 8, 97)
    with pytest.raises(error, match=match):
        call(e, c, targets)


def test_log_probs_reference_takes_ignore_index_equal_to_the_vocabulary_size():
    """ignore_index = V is no class, so the library takes it; the reference, which gathers the
    target on ignored rows too, must not index class V."""
    inputs = make_inputs((37,), 29, 301, bias=True, ignore_fraction=0.2, ignore_index=301, seed=3)
    options = {"ignore_index": 301, "return_entropy": True}
    ours = outputs_and_grads(linear_log_probs, inputs, 1, **options)
    check_results(ours, inputs, reference=reference_linear_log_probs, **options)
