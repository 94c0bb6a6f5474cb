"""linear_distillation_loss and linear_top_k_distillation_loss against the float64 reference:
every divergence, temperature, hard_weight, reduction, ignored tokens and dtype, teacher of
another hidden size, on both backends (the Triton kernels on the interpreter without CUDA)."""

from __future__ import annotations

import pytest
import torch

from helpers import (
    DTYPES,
    MASKED_CLASSES,
    check_results,
    confident_targets,
    device_for,
    gpu,
    make_inputs,
    masked,
    outputs_and_grads,
    rel_error,
)
from logitless import (
    LinearDistillationLoss,
    functional,
    linear_distillation_loss,
    linear_top_k_distillation_loss,
)
from logitless.backends import torch_backend, triton_backend
from logitless.reference import (
    reference_linear_distillation_loss,
    reference_linear_top_k_distillation_loss,
)

ROWS, DIM, TEACHER_DIM, VOCAB = 37, 29, 43, 301


def teacher_head(dtype, bias: bool, scale: float = 2.0, device: str = "cpu"):
    """A teacher of another hidden size, more peaked than the student."""
    teacher_e, teacher_c, _, teacher_bias = make_inputs(
        (ROWS,), TEACHER_DIM, VOCAB, dtype, bias=bias, scale=scale, seed=11, device=device
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


BACKENDS = [("torch", dtype) for dtype in DTYPES] + [
    ("triton", torch.float32),
    ("triton", torch.bfloat16),
]
"""The portable backend at every dtype; the kernels (on the interpreter without CUDA) at
float32 and bfloat16, whose dots they compute differently (float16's are bfloat16's)."""


@pytest.fixture
def kernels_only(monkeypatch):
    """impl="triton" computes on the kernels: the portable backend refuses to run, and the
    backward sweeps several vocabulary chunks (a buffer of about 100 float32 columns)."""

    def refuse(*args, **kwargs):
        raise AssertionError("impl='triton' fell back to the portable backend")

    for name in ("stats", "grads", "stats_and_grads"):
        monkeypatch.setattr(torch_backend, name, refuse)
    monkeypatch.setattr(triton_backend, "LOGIT_GRAD_BUFFER_BYTES", 100 * 4 * ROWS)


def backend_fixture(request, impl):
    if impl == "triton":
        request.getfixturevalue("kernels_only")


FLOAT16_KERNEL_CASES = [CASES[3], CASES[5]]
"""float16 on the kernels (its logit gradient is stored times a power of two): the teacher's
terms of the reverse KL and of the JSD, with both softcaps and a temperature."""


@pytest.mark.parametrize(
    ("impl", "dtype", "options"),
    [(impl, dtype, options) for impl, dtype in BACKENDS for options in CASES]
    + [("triton", torch.float16, options) for options in FLOAT16_KERNEL_CASES],
    ids=str,
)
def test_divergences(request, impl, dtype, options):
    """Loss and the student's gradients (e, c, bias) against float64."""
    backend_fixture(request, impl)
    inputs = make_inputs(
        (ROWS,), DIM, VOCAB, dtype, bias=True, ignore_fraction=0.2, seed=3,
        ignore_index=options.get("ignore_index", -100), device=device_for(impl),
    )  # fmt: skip
    teacher = teacher_head(dtype, bias=True, device=device_for(impl))
    ours = outputs_and_grads(
        adapter(linear_distillation_loss, teacher), inputs, 1, impl=impl, **options
    )
    check_results(
        ours, inputs, reference=adapter(reference_linear_distillation_loss, teacher), **options
    )


@pytest.mark.parametrize(
    ("divergence", "teacher_offset", "bound"),
    [("jsd", 0.0, 2.0), ("jsd", 1000.0, 2.0), ("reverse_kl", 0.0, 1.3),
     ("reverse_kl", 1000.0, 1.3), ("forward_kl", 0.0, 1.3)],
)  # fmt: skip
@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_gradients_of_large_logits_are_as_precise_as_eager(
    request, impl, reduction, divergence, teacher_offset, bound
):
    """A bias of +1000 on every class of the student (and of the teacher, or not) changes no
    divergence's gradients. Each sweep forms log p from the log-sum-exp and its residual (what
    float32 rounds off an lse near 1000), where exp(z - lse) summed to 1 only within 6e-5: the
    JSD's unfused gradients were 66-77x eager float32's error from float64, within 2x now. The
    KLs are sums of per-entry log p - log q (each head relative to its own maximum), where they
    were weighted sums of z - y, of the heads' 1000 apart: 2-4x eager's error before, within
    1.3x now (and 1.2-2.1x with both heads at 1000, from p (log p + lse - y))."""
    backend_fixture(request, impl)
    device = device_for(impl)
    e, c, targets, bias = make_inputs((57,), 24, 601, bias=True, scale=4.0, seed=3, device=device)
    teacher = make_inputs((57,), 35, 601, bias=True, scale=8.0, seed=11, device=device)
    teacher = (teacher[0], teacher[1], teacher[3] + teacher_offset)
    inputs = (e, c, targets, bias + 1000.0)
    options = {"divergence": divergence, "reduction": reduction}
    ours = outputs_and_grads(adapter(linear_distillation_loss, teacher, (57,)), inputs, 1,
                             impl=impl, **options)  # fmt: skip
    reference = adapter(reference_linear_distillation_loss, teacher, (57,))
    exact = outputs_and_grads(reference, inputs, 1, **options)
    eager = outputs_and_grads(reference, inputs, 1, dtype=torch.float32, **options)
    # dE and dC; and the per-token KLs (their sums' errors are a few float32 ulps either way)
    values = 1 if divergence != "jsd" and reduction == "none" else 0
    pairs = zip(ours[0][:values] + ours[1][:2], exact[0][:values] + exact[1][:2],
                eager[0][:values] + eager[1][:2], strict=True)  # fmt: skip
    for x, truth, base in pairs:
        assert rel_error(x, truth) <= bound * rel_error(base, truth)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_kl_of_a_head_confident_in_one_vocabulary_split(request, impl, divergence):
    """One class 120 above the rest in the head whose softmax weighs the KL's terms (the
    teacher's for the reverse KL): the other vocabulary splits' maxima lie so far below the
    row's that their factors underflow to 0, and the merge once dropped their shift (KL 113,
    computed 9). Four rows: the kernel splits the vocabulary (several tiles, an empty split)."""
    backend_fixture(request, impl)
    device = device_for(impl)
    e, c, targets, bias = make_inputs((4,), 16, 577, bias=True, seed=5, device=device)
    teacher = make_inputs((4,), 12, 577, bias=True, seed=6, device=device)
    teacher = [teacher[0], teacher[1], teacher[3]]
    confident = bias if divergence == "forward_kl" else teacher[2]
    confident[0] += 120.0
    options = {"divergence": divergence, "reduction": "none"}
    ours = linear_distillation_loss(e, c, *teacher[:2], targets, bias, teacher[2], impl=impl,
                                    **options)  # fmt: skip
    exact = adapter(reference_linear_distillation_loss, teacher, (4,))(e, c, targets, bias,
                                                                       **options)  # fmt: skip
    assert exact.min() > 50.0
    assert rel_error(ours, exact) < 1e-5


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_kl_of_nearly_equal_heads_is_as_precise_as_eager(request, impl, divergence, reduction):
    """A teacher whose logits differ from the student's by about 1e-2 (a KL near 2e-5): the KL
    is formed from per-entry log-ratios and the log-sum-exps' difference, not as a difference
    of softmax-weighted means of the logits, which was 5-11x eager float32's error. (With e
    requiring a gradient, the mean is the fused loss on the portable backend.)"""
    backend_fixture(request, impl)
    device = device_for(impl)
    e, c, targets, bias = make_inputs((57,), 24, 601, bias=True, scale=3.0, seed=3, device=device)
    _, nudge, _, bias_nudge = make_inputs((57,), 24, 601, bias=True, seed=5, device=device)
    teacher = (e.clone(), c + 3e-3 * nudge, bias + 3e-3 * bias_nudge)
    options = {"divergence": divergence, "reduction": reduction}
    reference = adapter(reference_linear_distillation_loss, teacher, (57,))
    ours = linear_distillation_loss(e.requires_grad_(), c, *teacher[:2], targets, bias,
                                    teacher[2], impl=impl, **options).detach()  # fmt: skip
    exact = reference(e.detach(), c, targets, bias, **options)
    eager = reference(e.detach(), c, targets, bias, dtype=torch.float32, **options)
    assert exact.abs().max() < 1e-4
    assert rel_error(ours, exact) <= 1.5 * rel_error(eager, exact)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_float64_divergences_keep_float64_precision(divergence):
    """float64 inputs compute in float64 throughout (the JSD's log(beta) constants were float32:
    1e-9 relative error)."""
    inputs = make_inputs((ROWS,), DIM, VOCAB, torch.float64, bias=True, seed=3)
    teacher = teacher_head(torch.float64, bias=True)
    options = {"divergence": divergence, "beta": 0.1, "reduction": "none"}
    ours = outputs_and_grads(adapter(linear_distillation_loss, teacher), inputs, 1, **options)
    exact = outputs_and_grads(adapter(reference_linear_distillation_loss, teacher), inputs, 1,
                              **options)  # fmt: skip
    for x, truth in zip(ours[0] + ours[1], exact[0] + exact[1], strict=True):
        assert rel_error(x, truth) < 1e-13


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_classes_both_heads_mask(request, impl, divergence):
    """A class both heads mask with a -inf bias adds 0 to every divergence and its gradient."""
    backend_fixture(request, impl)
    inputs = masked(make_inputs((ROWS,), DIM, VOCAB, bias=True, seed=3, device=device_for(impl)))
    teacher_e, teacher_c, teacher_bias = teacher_head(torch.float32, True, device=device_for(impl))
    teacher_bias[MASKED_CLASSES] = float("-inf")
    teacher = (teacher_e, teacher_c, teacher_bias)
    options = {"divergence": divergence, "hard_weight": 0.3}
    ours = outputs_and_grads(
        adapter(linear_distillation_loss, teacher), inputs, 1, impl=impl, **options
    )
    check_results(
        ours, inputs, reference=adapter(reference_linear_distillation_loss, teacher), **options
    )


@pytest.mark.parametrize("hard_weight", [0.0, 0.3])
def test_reference_jsd_of_a_class_both_heads_mask_has_finite_gradients(hard_weight):
    """The float64 reference's log m of a class masked in both heads is -inf with no NaN in its
    gradient (logsumexp of two -inf had one), so masked JSDs can be checked against it."""
    e, c, targets, bias = masked(make_inputs((ROWS,), DIM, VOCAB, torch.float64, bias=True))
    e.requires_grad_()
    loss = reference_linear_distillation_loss(
        e, c, e.detach(), c, targets, bias, bias, divergence="jsd", hard_weight=hard_weight
    )
    loss.backward()
    assert loss.isfinite() and e.grad.isfinite().all()


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_shift_on_batched_sequences_without_bias(request, impl):
    backend_fixture(request, impl)
    inputs = make_inputs(
        (ROWS,), DIM, VOCAB, bias=False, ignore_fraction=0.1, seed=5, device=device_for(impl)
    )
    e, c, targets, _ = inputs
    batched = (e.view(1, ROWS, DIM), c, targets.view(1, ROWS), None)
    teacher = teacher_head(torch.float32, bias=False, device=device_for(impl))
    options = {"divergence": "jsd", "shift": 2, "reduction": "none", "temperature": 0.7}
    lead = (1, ROWS)
    ours = outputs_and_grads(
        adapter(linear_distillation_loss, teacher, lead), batched, 1, impl=impl, **options
    )
    check_results(
        ours, batched, reference=adapter(reference_linear_distillation_loss, teacher, lead),
        **options,
    )  # fmt: skip


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_reduced_loss_takes_its_gradients_from_the_forward_sweep(
    monkeypatch, divergence, reduction
):
    """On the portable backend a reduced divergence (hard loss mixed in) computes its gradients
    in the forward sweep, with no backward sweep, and agrees with the recomputing path."""
    inputs = make_inputs((ROWS,), DIM, VOCAB, bias=True, ignore_fraction=0.2, seed=7)
    loss = adapter(linear_distillation_loss, teacher_head(torch.float32, bias=True))
    options = {"divergence": divergence, "reduction": reduction, "hard_weight": 0.3}
    options.update(temperature=1.3, impl="torch")
    with monkeypatch.context() as patch:
        patch.setattr(functional, "_fuses", lambda *args: False)
        recomputed = outputs_and_grads(loss, inputs, 1, **options)

    def refuse(*args, **kwargs):
        raise AssertionError("the fused path swept the vocabulary again in backward")

    monkeypatch.setattr(torch_backend, "grads", refuse)
    fused = outputs_and_grads(loss, inputs, 1, **options)
    for ours, theirs in zip(fused[0] + fused[1], recomputed[0] + recomputed[1], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_hard_loss_at_temperature_one_adds_no_sweep(request, monkeypatch, impl, divergence):
    """At T = 1 the cross-entropy's statistics (lse, target) come from the divergence's own
    sweeps, forward and backward; at another temperature its logits differ and it costs more."""
    backend_fixture(request, impl)
    backend = {"torch": torch_backend, "triton": triton_backend}[impl]
    calls = []
    for name in ("stats", "grads", "stats_and_grads"):
        if hasattr(backend, name):
            original = getattr(backend, name)
            monkeypatch.setattr(
                backend, name, lambda *a, _call=original, **k: calls.append(1) or _call(*a, **k)
            )
    device = device_for(impl)
    inputs = make_inputs((ROWS,), DIM, VOCAB, bias=True, ignore_fraction=0.2, seed=5, device=device)
    loss = adapter(linear_distillation_loss, teacher_head(torch.float32, True, device=device))

    def sweeps(**options) -> int:
        calls.clear()
        outputs_and_grads(loss, inputs, 1, impl=impl, divergence=divergence, **options)
        return len(calls)

    assert sweeps(hard_weight=0.3) == sweeps()
    assert sweeps(hard_weight=0.3, temperature=1.3) > sweeps(temperature=1.3)


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
    with pytest.raises(ValueError, match="teacher_e must have the leading shape"):
        linear_distillation_loss(e, c, torch.tensor(1.0), c, targets)  # an IndexError before
    with pytest.raises(TypeError, match="teacher_bias"):
        linear_distillation_loss(e, c, e, c, targets, teacher_bias=[0.0])


def cached_teacher(
    k: int, temperature: float, pad_rows: int = 0, lead=(ROWS,), device: str = "cpu"
):
    """A teacher's top-k log-probabilities and classes at `temperature`, as offline
    distillation caches them (float32); the first `pad_rows` rows hold fewer than k classes
    (-inf padding, with index -1)."""
    teacher_e, teacher_c, teacher_bias = teacher_head(torch.float64, bias=True)
    log_q = torch.log_softmax((teacher_e @ teacher_c.T + teacher_bias) / temperature, dim=-1)
    log_probs, indices = log_q.topk(k, dim=-1)
    log_probs = log_probs.float()
    log_probs[:pad_rows, k // 2 :] = -torch.inf
    indices[:pad_rows, k // 2 :] = -1
    return indices.reshape(*lead, k).to(device), log_probs.reshape(*lead, k).to(device)


def top_k_adapter(function, teacher):
    """(e, c, targets, bias, **options) -> the top-k distillation loss, the teacher fixed."""

    def loss(e, c, targets, bias, **options):
        return function(e, c, *teacher, targets, bias, **options)

    return loss


TOP_K_CASES = [
    {"k": 5},
    {"k": 17, "temperature": 0.7, "reduction": "sum"},
    {"k": 8, "temperature": 1.3, "softcap": 3.0, "reduction": "none"},
    {"k": 5, "hard_weight": 0.3, "ignore_index": 4},
    {"k": 5, "hard_weight": 0.5, "temperature": 1.3, "filter_eps": 2.0**-12},
]


@pytest.mark.parametrize(("impl", "dtype"), BACKENDS, ids=str)
@pytest.mark.parametrize("options", TOP_K_CASES, ids=repr)
def test_top_k_distillation(request, impl, dtype, options):
    """The cached-teacher loss (tail bucket, padded supports) and the student's gradients
    against float64 through the full logits."""
    backend_fixture(request, impl)
    options = dict(options)
    k = options.pop("k")
    inputs = make_inputs(
        (ROWS,), DIM, VOCAB, dtype, bias=True, ignore_fraction=0.2, seed=4,
        ignore_index=options.get("ignore_index", -100), device=device_for(impl),
    )  # fmt: skip
    teacher = cached_teacher(
        k, options.get("temperature", 1.0), pad_rows=3, device=device_for(impl)
    )
    ours = outputs_and_grads(
        top_k_adapter(linear_top_k_distillation_loss, teacher), inputs, 1, impl=impl, **options
    )
    check_results(
        ours, inputs, reference=top_k_adapter(reference_linear_top_k_distillation_loss, teacher),
        **options,
    )  # fmt: skip


@pytest.mark.parametrize(("impl", "dtype"), BACKENDS, ids=str)
def test_top_k_distillation_of_a_confident_student_keeps_its_tail(request, impl, dtype):
    """The teacher's support is the student's top 5, where the student holds all but 2e-9 to
    7e-2 of its mass (median 1e-3; logits of std 12) and the teacher all but 3-68%: the
    student's tail mass is summed outside the support in the sweep (`support_tail`). As
    1 - sum_S p it rounded to 0 or below where it is small, floored at the smallest float:
    float32 losses and gradients 1.5-8% from float64, 10^4-10^5 times eager's error."""
    backend_fixture(request, impl)
    inputs = make_inputs((ROWS,), DIM, VOCAB, dtype, bias=True, scale=12.0, seed=8,
                         device=device_for(impl))  # fmt: skip
    check_top_k_distillation_on_the_students_top(inputs, 5, impl)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize(
    ("dtype", "upstream_scale"),
    [(torch.float16, 1.0), (torch.float32, 1e4)],
    ids=["float16", "float32-upstream-1e4"],
)
def test_top_k_distillation_of_one_row_with_a_tiny_tail(request, impl, dtype, upstream_scale):
    """One row's student holds all but 2e-37 of its mass on the teacher's support, the other
    rows are ordinary. float16 on the kernels: that row's 1 / p_tail set the gain of every
    row's stored gradient, which flushed to 0 (grad_e 100% off). float32 under an upstream
    gradient of 1e4: the coefficient o / p_tail overflowed, NaN gradients on both backends."""
    backend_fixture(request, impl)
    inputs = make_inputs((ROWS,), DIM, VOCAB, dtype, bias=True, scale=3.0, seed=8,
                         device=device_for(impl))  # fmt: skip
    inputs[0][0] *= 80  # log p_tail -84.5
    check_top_k_distillation_on_the_students_top(inputs, 5, impl, upstream_scale=upstream_scale)


@pytest.mark.parametrize("k", [5, 65], ids=["kernels", "portable"])
@pytest.mark.parametrize("bad", ["inf-upstream", "nan-input"])
def test_top_k_distillation_backward_through_non_finite_values(request, k, bad):
    """An inf upstream gradient or a NaN hidden state gives non-finite gradients, as eager's,
    not an error (the portable backend's scaling of o / p_tail once read its size on the host
    and raised OverflowError / ValueError); the other rows' grad_e stays finite."""
    impl = "triton" if k == 5 else "torch"
    backend_fixture(request, impl)
    e, c, targets, bias = make_inputs((ROWS,), DIM, VOCAB, bias=True, seed=17)
    if bad == "nan-input":
        e[3, 0] = float("nan")
    e.requires_grad_()
    indices, log_q = cached_teacher(k, 1.0)
    losses = linear_top_k_distillation_loss(
        e, c, indices, log_q, targets, bias, reduction="none", impl=impl
    )
    upstream = torch.ones_like(losses)
    upstream[3] = float("inf") if bad == "inf-upstream" else 1.0
    losses.backward(upstream)
    assert not e.grad[3].isfinite().all()
    assert e.grad[torch.arange(ROWS) != 3].isfinite().all()


@pytest.mark.parametrize(("impl", "dtype"), BACKENDS, ids=str)
@pytest.mark.parametrize("targets", [True, False], ids=["targets", "no-targets"])
def test_top_k_distillation_of_a_confident_class(request, impl, dtype, targets):
    """One class holds all but 4e-5 of the student's mass (a bias of 16) and about as much of
    the teacher's: its gradient, p (sum q) - q at the class, is formed in the backend's tile
    before any 16-bit rounding (bf16 dbias was 100% off, eager's 5%, when -q came through the
    gathered logits in float32 and p was rounded apart), and its log-prob is anchored at the
    target's, or without targets at the teacher's likeliest class (float32 losses 4.5x eager's
    error when anchored at class 0)."""
    backend_fixture(request, impl)
    inputs = list(make_inputs((ROWS,), DIM, VOCAB, dtype, bias=True, seed=6,
                              device=device_for(impl)))  # fmt: skip
    inputs[3][7] = 16.0
    inputs[2] = torch.full_like(inputs[2], 7) if targets else None
    check_top_k_distillation_on_the_students_top(
        tuple(inputs), 3, impl, noise=0.01, reduction="mean"
    )


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("far", [float("-inf"), -1e9])
def test_top_k_distillation_of_a_target_far_below_the_rest(impl, far):
    """A target whose logit a bias puts far below every other (masked, or -1e9; with
    hard_weight 0 targets only mark rows): the support's log-probs are not taken relative to
    it (NaN, and a negative KL, when they were)."""
    e, c, targets, bias = make_inputs((ROWS,), DIM, VOCAB, bias=True, seed=12)
    bias[targets[:5]] = far
    teacher = cached_teacher(5, 1.0, pad_rows=2)
    function, reference = (
        top_k_adapter(f, teacher)
        for f in (linear_top_k_distillation_loss, reference_linear_top_k_distillation_loss)
    )
    ours = function(e, c, targets, bias, impl=impl, reduction="none")
    exact = reference(e.double(), c.double(), targets, bias.double(), reduction="none")
    assert_equal_with_infinities(ours, exact)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_top_k_distillation_without_targets_anchors_each_row_at_its_own_teacher(impl):
    """Without targets, row t's support log-probs are taken relative to the teacher's
    likeliest class of row t, with a shift too (they were anchored at row t + shift's, and a
    student mask on that class made row t NaN)."""
    e, c, _, bias = make_inputs((1, 6), DIM, VOCAB, bias=True, seed=13)
    indices = torch.arange(24).view(1, 6, 4)  # disjoint supports
    log_q = torch.tensor([0.5, 0.2, 0.1, 0.05]).log().expand(1, 6, 4)
    bias[indices[0, 1, 0]] = float("-inf")  # row 1's likeliest class: row 1's KL is infinite
    options = {"shift": 1, "reduction": "none"}
    ours = linear_top_k_distillation_loss(e, c, indices, log_q, None, bias, impl=impl, **options)
    exact = reference_linear_top_k_distillation_loss(
        e.double(), c.double(), indices, log_q, None, bias.double(), **options
    )
    assert_equal_with_infinities(ours, exact)


@pytest.mark.parametrize("top_k", [False, True], ids=["full", "top_k"])
def test_distillation_without_targets_keeps_rows_whatever_ignore_index(top_k):
    """Without targets every row predicts, whatever ignore_index says: an ignore_index of 0
    counted out every row of the zeros that stand in for targets (the full distillation's loss
    and gradients were 0)."""
    e, c, _, bias = make_inputs((1, ROWS), DIM, VOCAB, bias=True, seed=15)
    options = {"shift": 1, "reduction": "none"}
    if top_k:
        teacher = cached_teacher(5, 1.0, lead=(1, ROWS))
        function = top_k_adapter(linear_top_k_distillation_loss, teacher)
        reference = top_k_adapter(reference_linear_top_k_distillation_loss, teacher)
    else:
        teacher = teacher_head(torch.float32, bias=True)
        function = adapter(linear_distillation_loss, teacher, lead=(1, ROWS))
        exact_teacher = [x.double() for x in teacher]
        reference = adapter(reference_linear_distillation_loss, exact_teacher, lead=(1, ROWS))
    ours = function(e, c, None, bias, ignore_index=0, **options)
    exact = reference(e.double(), c.double(), None, bias.double(), **options)
    assert rel_error(ours, exact) < 1e-6 and ours[..., :-1].ne(0).all()


def test_top_k_distillation_of_one_token_without_targets():
    """An unbatched (D,) student without targets (an IndexError before: a roll over no
    sequence dimension)."""
    e, c, _, bias = make_inputs((1,), DIM, VOCAB, bias=True, seed=16)
    indices, log_q = cached_teacher(5, 1.0)
    ours = linear_top_k_distillation_loss(e[0], c, indices[0], log_q[0], None, bias)
    exact = reference_linear_top_k_distillation_loss(
        e.double(), c.double(), indices[:1], log_q[:1], None, bias.double()
    )
    assert rel_error(ours, exact) < 1e-6


def assert_equal_with_infinities(ours: torch.Tensor, exact: torch.Tensor) -> None:
    """Per-token losses: infinite where float64's are (a teacher's class the student masks),
    never NaN, and float32's precision elsewhere."""
    assert torch.equal(ours.isinf(), exact.isinf()) and not ours.isnan().any()
    finite = exact.isfinite()
    assert finite.any() and rel_error(ours[finite], exact[finite]) < 1e-6


def test_supports_of_more_than_64_classes_skip_the_kernels(monkeypatch):
    """The kernels compare every logit with each support class: beyond MAX_TOP_K (64) classes,
    a support's statistics and gradients come from the portable backend, whose work does not
    grow with k (a top-k backward at k = V took 22 times k = 4's time on the interpreter)."""
    kernels = {
        "lse_forward": triton_backend.lse_forward,
        "lse_backward": triton_backend.lse_backward,
    }

    def without_support(name):
        def launch(*args, support=None, support_grad=None, **kwargs):
            assert support is None and support_grad is None, f"{name} got a support"
            return kernels[name](*args, **kwargs)

        return launch

    for name in kernels:
        monkeypatch.setattr(triton_backend, name, without_support(name))
    inputs = make_inputs((ROWS,), DIM, VOCAB, bias=True, ignore_fraction=0.2, seed=14)
    teacher = cached_teacher(70, 1.0, pad_rows=3)
    ours = outputs_and_grads(
        top_k_adapter(linear_top_k_distillation_loss, teacher), inputs, 1, impl="triton"
    )
    check_results(
        ours, inputs, reference=top_k_adapter(reference_linear_top_k_distillation_loss, teacher)
    )
    e = inputs[0].clone().requires_grad_()
    values, _ = functional.linear_top_k(e, inputs[1], 70, inputs[3], impl="triton")
    values.sum().backward()
    assert e.grad.isfinite().all()


@gpu
def test_top_k_distillation_on_the_kernels_at_a_larger_shape():
    """The support's mask and the `outside` term compiled for the GPU, at a ragged shape of
    several tiles and splits, bf16, with a confident student."""
    inputs = make_inputs((1027,), 336, 20011, torch.bfloat16, bias=True, scale=12.0, seed=4,
                         ignore_fraction=0.1, device="cuda")  # fmt: skip
    check_top_k_distillation_on_the_students_top(inputs, 20, "triton")


def check_top_k_distillation_on_the_students_top(
    inputs,
    k: int,
    impl: str,
    noise: float | None = None,
    reduction: str = "none",
    upstream_scale: float = 1.0,
) -> None:
    """Per-token losses and gradients against float64, the cached teacher's support the
    student's own top k (float64 logits): with `noise`, its log-probs moved by that times unit
    noise (a teacher near the student), else a tail of its own (random log-probs of k + 1
    buckets, the last left out)."""
    e, c, bias = (inputs[i].double() for i in (0, 1, 3))
    gen = torch.Generator().manual_seed(2)
    log_q, support = torch.log_softmax(e @ c.T + bias, -1).topk(k, dim=-1)
    if noise is None:
        log_q = torch.log_softmax(torch.randn(e.shape[0], k + 1, generator=gen), -1)[:, :k]
    else:  # at most all the mass (less 1e-6, rounded to float32)
        log_q = log_q + noise * torch.randn(log_q.shape, generator=gen).to(log_q.device)
        log_q -= torch.logsumexp(log_q, -1, keepdim=True).clamp(min=0) + 1e-6
    teacher = (support, log_q.float())
    options = {"reduction": reduction}
    ours = outputs_and_grads(
        top_k_adapter(linear_top_k_distillation_loss, teacher), inputs, 1, upstream_scale,
        impl=impl, **options,
    )  # fmt: skip
    check_results(
        ours, inputs, reference=top_k_adapter(reference_linear_top_k_distillation_loss, teacher),
        upstream_scale=upstream_scale, **options,
    )  # fmt: skip


@pytest.mark.parametrize("top_k", [False, True], ids=["full", "top_k"])
def test_references_take_ignore_index_equal_to_the_vocabulary_size(top_k):
    """ignore_index = V is no class, so the library takes it; the references, which take the
    hard loss of ignored rows too, must not index class V."""
    inputs = make_inputs((ROWS,), DIM, VOCAB, bias=True, ignore_fraction=0.2,
                         ignore_index=VOCAB, seed=3)  # fmt: skip
    wrap, teacher = (
        (top_k_adapter, cached_teacher(5, 1.0))
        if top_k
        else (adapter, teacher_head(torch.float32, bias=True))
    )
    function, reference = (
        (linear_top_k_distillation_loss, reference_linear_top_k_distillation_loss)
        if top_k
        else (linear_distillation_loss, reference_linear_distillation_loss)
    )
    options = {"hard_weight": 0.4, "ignore_index": VOCAB}
    ours = outputs_and_grads(wrap(function, teacher), inputs, 1, **options)
    check_results(ours, inputs, reference=wrap(reference, teacher), **options)


def test_top_k_distillation_with_shift_on_batched_sequences():
    e, c, targets, _ = make_inputs((ROWS,), DIM, VOCAB, ignore_fraction=0.1, seed=6)
    batched = (e.view(1, ROWS, DIM), c, targets.view(1, ROWS), None)
    teacher = cached_teacher(6, 0.7, lead=(1, ROWS))
    options = {"shift": 1, "reduction": "none", "temperature": 0.7}
    ours = outputs_and_grads(
        top_k_adapter(linear_top_k_distillation_loss, teacher), batched, 1, **options
    )
    check_results(
        ours, batched, reference=top_k_adapter(reference_linear_top_k_distillation_loss, teacher),
        **options,
    )  # fmt: skip


def confident_tokens(device: str):
    """`confident_targets`, a teacher head 0.9 e, and a cached teacher's top 4 log-probabilities
    and classes from 0.9 of the student's logits."""
    e, c, targets, bias = confident_targets(device)
    log_q, indices = torch.log_softmax(0.9 * (e.double() @ c.double().T), -1).topk(4, dim=-1)
    return (e, c, targets, bias), (0.9 * e, c, bias), (indices, log_q.float())


def median_relative_error(values: torch.Tensor, exact: torch.Tensor) -> float:
    return ((values.double().cpu() - exact.cpu()).abs() / exact.cpu().abs()).median().item()


@pytest.mark.parametrize("hard_weight", [0.0, 0.999])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "top_k"])
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_confident_tokens_keep_relative_precision(request, impl, divergence, hard_weight):
    """Confident tokens' losses are as precise as eager float32's (median relative error over
    tokens). With hard_weight 0.999, the hard loss is (lse - target) + lse's residual, apart
    from the divergence's terms: with lse rounded to float32 they were 17-40x eager's. The
    top-k KL alone was 2-5x eager's (2-10x with the suite's block sizes): its support's logits
    are gathered apart from the sweep's, so their rounding did not cancel in z - lse as
    log_softmax's does, and the student's tail mass lost its digits in log sum_S p rounded
    near 0; now the support's log-probs are anchored at the target's from the sweep."""
    backend_fixture(request, impl)
    student, teacher, cached = confident_tokens(device_for(impl))
    options = {"hard_weight": hard_weight, "reduction": "none"}
    if divergence == "top_k":
        function, reference = (
            linear_top_k_distillation_loss,
            reference_linear_top_k_distillation_loss,
        )
        arguments = lambda x: (*x[:2], *cached, *x[2:])  # noqa: E731
    else:
        function, reference = linear_distillation_loss, reference_linear_distillation_loss
        options["divergence"] = divergence
        arguments = lambda x: (*x[:2], *teacher[:2], *x[2:], teacher[2])  # noqa: E731
    ours = function(*arguments(student), impl=impl, **options)
    exact = reference(*arguments([x.double() for x in student[:2]] + [student[2],
                                 student[3].double()]), **options)  # fmt: skip
    eager = reference(*arguments(student), dtype=torch.float32, **options)
    assert median_relative_error(ours, exact) <= 1.5 * median_relative_error(eager, exact)


def test_top_k_distillation_of_the_whole_support_is_the_forward_kl():
    """k = V: no tail, the loss is the full forward KL of `linear_distillation_loss`."""
    e, c, _, bias = make_inputs((ROWS,), DIM, VOCAB, bias=True, seed=7)
    teacher_e, teacher_c, teacher_bias = (x.float() for x in teacher_head(torch.float64, True))
    log_q = torch.log_softmax(teacher_e @ teacher_c.T + teacher_bias, dim=-1)
    indices = torch.randperm(VOCAB).expand(ROWS, VOCAB)
    top_k = linear_top_k_distillation_loss(e, c, indices, log_q.gather(1, indices), bias=bias)
    full = linear_distillation_loss(
        e, c, teacher_e, teacher_c, bias=bias, teacher_bias=teacher_bias
    )
    assert top_k.item() == pytest.approx(full.item(), rel=1e-5)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda i, lp: (i.float(), lp), TypeError, "teacher_indices must be an integer"),
        (lambda i, lp: (i, lp.long()), TypeError, "teacher_log_probs must be a floating"),
        (lambda i, lp: (i[:-1], lp[:-1]), ValueError, "teacher_indices must have shape"),
        (lambda i, lp: (i, lp[:, :-1]), ValueError, "teacher_log_probs must have the shape"),
        (lambda i, lp: (i + VOCAB, lp), ValueError, "teacher_indices must lie in"),
        (lambda i, lp: (i, -lp), ValueError, "teacher_log_probs must be log-probabilities"),
        (lambda i, lp: (i, lp.clamp(max=-0.01) * 0), ValueError, "sum to more than 1"),
        (lambda i, lp: (i.clamp(max=3), lp), ValueError, "must not repeat a class"),
    ],
)
def test_top_k_distillation_bad_teacher(change, error, match):
    e, c, targets, _ = make_inputs((ROWS,), DIM, VOCAB)
    indices, log_probs = change(*cached_teacher(5, 1.0))
    with pytest.raises(error, match=match):
        linear_top_k_distillation_loss(e, c, indices, log_probs, targets)


def test_top_k_distillation_bad_options():
    e, c, targets, _ = make_inputs((ROWS,), DIM, VOCAB)
    teacher = cached_teacher(5, 1.0)
    with pytest.raises(ValueError, match="needs targets"):
        linear_top_k_distillation_loss(e, c, *teacher, hard_weight=0.5)
    with pytest.raises(ValueError, match="temperature"):
        linear_top_k_distillation_loss(e, c, *teacher, targets, temperature=0.0)


def test_module_equals_the_function():
    inputs = make_inputs((ROWS,), DIM, VOCAB, bias=True, ignore_fraction=0.2, seed=8)
    teacher_e, teacher_c, teacher_bias = teacher_head(torch.float32, bias=True)
    options = {"divergence": "jsd", "beta": 0.3, "temperature": 1.3, "hard_weight": 0.2}
    module = LinearDistillationLoss(**options)
    assert "divergence='jsd'" in repr(module) and "reduction" not in repr(module)
    ours = outputs_and_grads(
        lambda e, c, t, b: module(e, c, teacher_e, teacher_c, t, b, teacher_bias), inputs, 1
    )
    expected = outputs_and_grads(
        adapter(linear_distillation_loss, (teacher_e, teacher_c, teacher_bias)), inputs, 1,
        **options,
    )  # fmt: skip
    for x, y in zip(ours[0] + ours[1], expected[0] + expected[1], strict=True):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="beta"):
        LinearDistillationLoss(divergence="jsd", beta=0.0)
    with pytest.raises(ValueError, match="reduction"):
        LinearDistillationLoss(reduction="avg")
    with pytest.raises(ValueError, match="temperature"):
        LinearDistillationLoss(temperature=-2.0)
    module.temperature, module.divergence = 2.0, "reverse_kl"
    loss = module(*inputs[:2], teacher_e, teacher_c, inputs[2], inputs[3], teacher_bias)
    expected = linear_distillation_loss(
        *inputs[:2], teacher_e, teacher_c, *inputs[2:], teacher_bias,
        **{**options, "temperature": 2.0, "divergence": "reverse_kl"},
    )  # fmt: skip
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="beta"):
        module.beta = 1.0
