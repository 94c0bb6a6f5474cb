"""logitless.transformers.patch against the unpatched transformers models it replaces.

Tiny random models (no downloads) of many causal-LM families, float32: the patched loss and
the gradients of the output layer and the input embeddings equal the model's own; calls without
labels, `generate`, tied embeddings, LoRA adapters (on the body and on the head), PEFT's
modules_to_save, torch.compile with fullgraph=True, and the Trainer with gradient accumulation
and label smoothing behave as unpatched.
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import logitless.transformers  # noqa: E402
from logitless.backends import torch_backend  # noqa: E402
from logitless.reference import reference_linear_cross_entropy  # noqa: E402
from logitless.transformers import patch, unpatch  # noqa: E402
from tests.helpers import join_gloo_group, rel_error  # noqa: E402

LOSS_TOLERANCE, GRAD_TOLERANCE = 1e-5, 1e-4
VOCAB, BATCH, LENGTH = 101, 2, 13

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    initializer_range=0.2,  # logits of order 1: a softcap or a scale changes the loss visibly
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

FAMILIES = {
    "llama": ("llama", {}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "gemma2-softcap": ("gemma2", {"final_logit_softcapping": 2.0}),
    "gemma3-softcap": ("gemma3_text", {"final_logit_softcapping": 2.0}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "mistral": ("mistral", {}),
    "phi3": ("phi3", {}),
    "phi-head-bias": ("phi", {}),
    "gpt2": ("gpt2", {}),
    "cohere-logit-scale": ("cohere", {"logit_scale": 0.25}),
    "granite-logit-scale": ("granite", {"logits_scaling": 4.0}),
    "olmo2": ("olmo2", {}),
    "stablelm": ("stablelm", {}),
    "gpt-neox": ("gpt_neox", {}),
    "opt": ("opt", {}),
    "bloom": ("bloom", {}),
    "glm": ("glm", {}),
    "smollm3": ("smollm3", {}),
    "exaone4": ("exaone4", {}),
}

FOUR = ["llama", "gemma2-softcap", "qwen2", "granite-logit-scale"]
"""The families each integration test runs on: plain, softcap, bias-free Qwen, logit scale."""


@pytest.fixture(autouse=True)
def quiet_transformers():
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)


def make_model(family: str) -> transformers.PreTrainedModel:
    model_type, overrides = FAMILIES[family]
    config = transformers.AutoConfig.for_model(model_type, **COMMON, **overrides)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Token ids, a right-padded second row, and labels ignoring the padding and a few more."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (BATCH, LENGTH), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, LENGTH - 4 :] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[torch.rand(labels.shape, generator=gen) < 0.15] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loss_and_grads(model, batch, **kwargs):
    """The loss of a forward with labels, and the gradients of the trainable parameters."""
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kwargs)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    return out, grads


def assert_same_loss_and_grads(patched, reference, batch, names, **kwargs):
    ours, our_grads = loss_and_grads(patched, batch, **kwargs)
    theirs, their_grads = loss_and_grads(reference, batch, **kwargs)
    assert ours.logits is None
    assert rel_error(ours.loss, theirs.loss) <= LOSS_TOLERANCE, (ours.loss, theirs.loss)
    for name in names:
        error = rel_error(our_grads[name], their_grads[name])
        assert error <= GRAD_TOLERANCE, f"{name}: relative error {error:.3g}"


def head_and_embedding_names(model) -> list[str]:
    by_param = {p: name for name, p in model.named_parameters()}  # tied: one name
    layers = (model.get_output_embeddings(), model.get_input_embeddings())
    return sorted({by_param[p] for layer in layers for p in layer.parameters()})


@pytest.mark.parametrize("num_items_in_batch", [None, 23], ids=["mean", "num_items"])
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_gradients_match_unpatched(family, num_items_in_batch):
    reference = make_model(family)
    patched = patch(copy.deepcopy(reference))
    extra = {"num_items_in_batch": torch.tensor(num_items_in_batch)} if num_items_in_batch else {}
    names = head_and_embedding_names(reference)
    assert_same_loss_and_grads(patched, reference, make_batch(), names, **extra)


def test_logit_scale_scales_the_head_bias():
    """Cohere's logits are logit_scale * (hidden @ W.T + b): with a biased head, the patched
    loss scaled the hidden states only (10 nats off)."""
    reference = make_model("cohere-logit-scale")
    head = reference.lm_head
    reference.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        reference.lm_head.weight.copy_(head.weight)
        reference.lm_head.bias.normal_(0.0, 2.0)
    patched = patch(copy.deepcopy(reference))
    assert_same_loss_and_grads(patched, reference, make_batch(), ["lm_head.weight", "lm_head.bias"])


def test_padded_vocabulary_the_model_slices_off():
    """Inkling's head has rows past `unpadded_vocab_size`, which its forward slices off the
    logits: the loss runs over the classes before them (the 4-wide probe cannot see a slice)."""
    config = transformers.AutoConfig.for_model(
        "inkling_text", **{**COMMON, "vocab_size": 128}, unpadded_vocab_size=VOCAB,
        swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8,
        moe_intermediate_size=37, n_routed_experts=4, num_experts_per_tok=2,
        mlp_layer_types=["dense", "dense"],
    )  # fmt: skip
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    patched = patch(copy.deepcopy(reference))
    names = head_and_embedding_names(reference)
    assert_same_loss_and_grads(patched, reference, make_batch(), names)


@pytest.mark.parametrize("num_items_in_batch", [None, 23], ids=["mean", "num_items"])
def test_one_token_sequences_predict_nothing(num_items_in_batch):
    """A micro-batch of one-token sequences (shifted: no labels left) gives a zero loss with zero
    gradients, as transformers' own loss does with num_items_in_batch (without it, 0 / 0)."""
    reference = make_model("llama")
    patched = patch(copy.deepcopy(reference))
    batch = {"input_ids": torch.tensor([[5], [7]]), "labels": torch.tensor([[5], [7]])}
    extra = {"num_items_in_batch": torch.tensor(num_items_in_batch)} if num_items_in_batch else {}
    out, grads = loss_and_grads(patched, batch, **extra)
    assert out.loss.item() == 0.0
    assert all(not grad.any() for grad in grads.values() if grad is not None)
    if num_items_in_batch:
        assert reference(**batch, **extra).loss.item() == 0.0


@pytest.mark.parametrize("family", ["llama", "gemma2-softcap", "phi-head-bias", "gpt2"])
def test_inference_and_generate_unchanged(family):
    reference = make_model(family)
    patched = patch(copy.deepcopy(reference))
    batch = make_batch()
    del batch["labels"]
    torch.testing.assert_close(patched(**batch).logits, reference(**batch).logits, rtol=0, atol=0)
    prompt = batch["input_ids"][:, :5]
    generated = patched.generate(prompt, max_new_tokens=6, do_sample=False)
    assert generated.shape == (BATCH, 11)
    assert torch.equal(generated, reference.generate(prompt, max_new_tokens=6, do_sample=False))


def test_tied_embeddings_share_one_gradient():
    reference = make_model("llama-tied")
    assert reference.lm_head.weight is reference.model.embed_tokens.weight
    patched = patch(copy.deepcopy(reference))
    assert patched.lm_head.weight is patched.model.embed_tokens.weight
    assert_same_loss_and_grads(patched, reference, make_batch(), ["model.embed_tokens.weight"])


def test_loss_options_pass_through():
    """label_smoothing and z_loss: against the float64 reference on the head's inputs."""
    options = {"label_smoothing": 0.1, "z_loss": 1e-2}
    reference = make_model("gemma2-softcap")
    patched = patch(copy.deepcopy(reference), **options)
    batch = make_batch()
    hidden = []
    reference.lm_head.register_forward_hook(lambda module, args, out: hidden.append(args[0]))
    reference(**batch)
    expected = reference_linear_cross_entropy(
        hidden[0], reference.lm_head.weight, batch["labels"], shift=1, softcap=2.0, **options
    )
    expected.backward()
    ours, grads = loss_and_grads(patched, batch)
    assert rel_error(ours.loss, expected) <= LOSS_TOLERANCE
    for name in head_and_embedding_names(reference):
        their_grad = reference.get_parameter(name).grad
        assert rel_error(grads[name], their_grad) <= GRAD_TOLERANCE, name


@pytest.mark.parametrize("family", FOUR)
def test_shift_labels_and_tuple_outputs(family):
    """Pre-shifted labels (sequence parallelism) take precedence, as in transformers' loss; a
    tuple keeps its positions, with None where the logits were."""
    reference = make_model(family)
    patched = patch(copy.deepcopy(reference))
    batch = make_batch()
    batch["shift_labels"] = batch["labels"].flip(-1)  # targets unrelated to the labels
    theirs = reference(**batch, return_dict=False)
    ours = patched(**batch, return_dict=False)
    assert len(ours) == len(theirs) and ours[1] is None
    assert type(ours[2]) is type(theirs[2])  # the cache, in its place
    assert rel_error(ours[0], theirs[0]) <= LOSS_TOLERANCE


def test_bfloat16_autocast_computes_the_head_in_bfloat16(monkeypatch):
    """Under autocast the loss takes the head's operands in bfloat16, as nn.Linear would, and
    keeps each logit's float32 accumulator (wherever bf16 is multiplied in float32, which a CPU
    with bf16 dot products does not: `native_16_bit_matmul`): the loss is the float64 loss of
    those bfloat16 operands (the unpatched model's, from bfloat16-rounded logits, is about 1e-4
    away)."""
    monkeypatch.setattr(torch_backend, "_CPU_HAS_BF16_DOTS", False)
    reference = make_model("llama")
    patched = patch(copy.deepcopy(reference))
    batch = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, our_grads = loss_and_grads(patched, batch)
        theirs, their_grads = loss_and_grads(reference, batch, output_hidden_states=True)
    hidden = theirs.hidden_states[-1].detach().bfloat16()
    head = reference.get_output_embeddings().weight.detach().bfloat16()
    exact = reference_linear_cross_entropy(hidden, head, batch["labels"], shift=1)
    assert rel_error(ours.loss, exact) <= LOSS_TOLERANCE  # from float32 operands: 1.5e-4
    assert rel_error(ours.loss, theirs.loss) <= 1e-3  # their logits rounded to bfloat16
    for name in head_and_embedding_names(reference):
        assert rel_error(our_grads[name], their_grads[name]) <= 1e-2, name  # bfloat16 rounding


def test_patching_a_class_patches_its_instances(monkeypatch):
    cls = transformers.MistralForCausalLM
    monkeypatch.setattr(cls, "forward", cls.forward)  # restored after the test
    reference = make_model("mistral")
    patch(cls, z_loss=0.0)
    patched = make_model("mistral")
    assert_same_loss_and_grads(patched, reference, make_batch(), ["lm_head.weight"])
    patch(patched)  # an instance patch on top of the class's does the work once
    assert_same_loss_and_grads(patched, reference, make_batch(), ["lm_head.weight"])


def test_deepcopy_of_a_patched_model_is_patched_and_independent():
    reference = make_model("llama")
    patched = copy.deepcopy(patch(copy.deepcopy(reference)))
    assert_same_loss_and_grads(patched, reference, make_batch(), ["lm_head.weight"])


@pytest.mark.parametrize("patch_first", [False, True], ids=["peft-then-patch", "patch-then-peft"])
def test_lora_adapters(patch_first):
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    base = make_model("llama")
    reference = peft.get_peft_model(copy.deepcopy(base), lora)
    if patch_first:
        patched = peft.get_peft_model(patch(copy.deepcopy(base)), lora)
    else:
        patched = patch(peft.get_peft_model(copy.deepcopy(base), lora))
    patched.load_state_dict(reference.state_dict())
    adapters = [name for name, p in reference.named_parameters() if p.requires_grad]
    assert adapters and all("lora_" in name for name in adapters)
    assert_same_loss_and_grads(patched, reference, make_batch(), adapters)


def make_trainer(model, tmp_path, **args) -> transformers.Trainer:
    """A Trainer over 9 batches of 2 rows on the CPU, logging the loss of every step.

    Plain SGD, whose steps are linear in the gradients: Adam's first steps move a parameter by
    about lr x sign(gradient), which turns rounding noise on a near-zero gradient into a whole
    step (the BLAS's thread count alone then changes the result)."""
    pytest.importorskip("accelerate")  # the Trainer's requirement
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        optim="sgd",
        learning_rate=1e-1,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        **args,
    )
    data = [
        {key: value[row] for key, value in make_batch(seed).items()}
        for seed in range(9)
        for row in range(BATCH)
    ]
    return transformers.Trainer(model=model.train(), args=args, train_dataset=data)


def train(trainer: transformers.Trainer) -> list[float]:
    trainer.train()
    return [log["loss"] for log in trainer.state.log_history if "loss" in log]


def assert_same_training(patched, reference, our_losses, their_losses, steps):
    assert len(our_losses) == steps
    torch.testing.assert_close(our_losses, their_losses, rtol=1e-4, atol=0)
    for name, param in patched.named_parameters():
        their_param = reference.get_parameter(name)
        assert rel_error(param.detach(), their_param.detach()) <= 1e-5, name


def test_trainer_evaluate_with_accuracy_metrics(tmp_path):
    """Trainer.evaluate with the usual accuracy compute_metrics: the unpatched model's metrics,
    and arrays (never an empty tuple) as predictions."""
    pytest.importorskip("accelerate")
    seen = []

    def accuracy(prediction):
        seen.append(type(prediction.predictions))
        predicted = prediction.predictions.argmax(-1)[:, :-1]
        labels = prediction.label_ids[:, 1:]
        kept = labels != -100
        return {"accuracy": float((predicted[kept] == labels[kept]).mean())}

    def evaluate(model):
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to="none",
            use_cpu=True, disable_tqdm=True,
        )  # fmt: skip
        data = [
            {k: v[row] for k, v in make_batch(seed).items()} for seed in range(3) for row in (0, 1)
        ]
        trainer = transformers.Trainer(
            model=model, args=args, eval_dataset=data, compute_metrics=accuracy
        )
        return trainer.evaluate()

    reference = make_model("llama")
    patched = patch(copy.deepcopy(reference))
    theirs, ours = evaluate(reference), evaluate(patched)
    assert seen[-1] is not tuple and ours["eval_accuracy"] == theirs["eval_accuracy"]
    assert 0 < ours["eval_accuracy"] < 1
    assert abs(ours["eval_loss"] - theirs["eval_loss"]) <= LOSS_TOLERANCE * theirs["eval_loss"]
    # Logit-free evaluation keeps logits=None, for prediction_loss_only.
    with torch.no_grad():
        lean = patch(copy.deepcopy(reference), eval_logits=False)(**make_batch())
        full = patched(**make_batch())
    assert lean.logits is None and full.logits.shape == (BATCH, LENGTH, VOCAB)
    assert rel_error(lean.loss, full.loss) <= LOSS_TOLERANCE


def test_trainer_with_gradient_accumulation(tmp_path):
    """Micro-batches with different numbers of labelled tokens: the normalization shows."""
    reference = make_model("llama")
    patched = patch(copy.deepcopy(reference))
    args = {"gradient_accumulation_steps": 3, "max_steps": 3}
    their_losses = train(make_trainer(reference, tmp_path, **args))
    our_losses = train(make_trainer(patched, tmp_path, **args))
    assert_same_training(patched, reference, our_losses, their_losses, steps=3)


@pytest.fixture
def logitless_calls(monkeypatch):
    """The number of losses logitless.transformers computed during the test."""
    calls = []
    compute = logitless.transformers.linear_cross_entropy_with_options
    monkeypatch.setattr(
        logitless.transformers,
        "linear_cross_entropy_with_options",
        lambda *args: calls.append(1) or compute(*args),
    )
    return calls


@pytest.mark.parametrize("family", FOUR)
def test_trainer_label_smoothing_runs_through_logitless(family, tmp_path, logitless_calls):
    """patch(trainer) moves label_smoothing_factor into the patch: the Trainer keeps the labels
    in the model's inputs, logitless computes the smoothed loss, and training is unchanged."""
    reference = make_model(family)
    model = copy.deepcopy(reference)
    args = {"label_smoothing_factor": 0.1, "gradient_accumulation_steps": 2, "max_steps": 2}
    their_losses = train(make_trainer(reference, tmp_path, **args))
    trainer = patch(make_trainer(model, tmp_path, **args))
    assert trainer.label_smoother is None
    our_losses = train(trainer)
    assert len(logitless_calls) == 4  # every micro-batch
    assert_same_training(model, reference, our_losses, their_losses, steps=2)


@pytest.mark.parametrize("eval_logits", [True, False])
def test_trainer_label_smoothing_in_evaluation_and_unpatch(tmp_path, eval_logits):
    """Trainer.evaluate of a patched Trainer with label_smoothing_factor reports the unpatched
    Trainer's smoothed eval_loss (with eval_logits the Trainer smooths the model's logits as it
    would unpatched), also patched again with the other eval_logits; unpatch gives the Trainer
    its label smoother back."""
    reference = make_model("llama")
    args = {"label_smoothing_factor": 0.1, "max_steps": 1}
    theirs = make_trainer(reference, tmp_path, **args)
    expected = theirs.evaluate(theirs.train_dataset[:6])["eval_loss"]
    ours = make_trainer(copy.deepcopy(reference), tmp_path, **args)
    for again in (eval_logits, not eval_logits):
        patch(ours, eval_logits=again)
        assert ours.label_smoother is None and ("compute_loss" in vars(ours)) == again
        evaluated = ours.evaluate(theirs.train_dataset[:6])["eval_loss"]
        assert abs(evaluated - expected) <= LOSS_TOLERANCE * expected
    assert unpatch(ours).label_smoother is not None and "compute_loss" not in vars(ours)
    assert our_loss_is_the_models_own(ours.model)


def our_loss_is_the_models_own(model) -> bool:
    """Whether `model` returns logits and its own loss of them (it is not patched)."""
    batch = make_batch()
    outputs = model(**batch)
    if outputs.logits is None:
        return False
    return bool(outputs.loss == model.loss_function(outputs.logits, batch["labels"], VOCAB))


def test_unpatch_after_mixed_precision_training(tmp_path):
    """accelerate wraps the forward of a Trainer's model for mixed precision around the patched
    one; unpatch still turns the patch off."""
    model = make_model("llama")
    trainer = patch(make_trainer(model, tmp_path, bf16=True, max_steps=1))
    trainer.train()
    assert model(**make_batch()).logits is None
    unpatch(trainer)
    assert our_loss_is_the_models_own(model)


def test_trainer_that_would_take_the_logits_warns(tmp_path):
    """A patched model that a Trainer calls without labels (label smoothing or a
    compute_loss_func set) warns instead of silently computing the logits."""
    model = patch(make_model("llama"))
    trainer = make_trainer(model, tmp_path, label_smoothing_factor=0.1, max_steps=1)
    with pytest.warns(UserWarning, match=r"without labels.*not a TRL trainer's"):
        trainer.train()  # also right for a patched TRL trainer, which keeps its smoothing
    trainer = make_trainer(model, tmp_path, max_steps=1)
    trainer.compute_loss_func = lambda outputs, labels, num_items_in_batch: outputs.logits.sum()
    with pytest.warns(UserWarning, match="compute_loss_func takes the model's logits"):
        patch(trainer)
    with pytest.raises(ValueError, match="label_smoothing"):
        patch(make_trainer(model, tmp_path, label_smoothing_factor=0.1), label_smoothing=0.2)


def test_logit_free_evaluation_with_compute_metrics_warns(tmp_path):
    """With eval_logits=False, compute_metrics would get no predictions: patch(trainer) warns,
    unless the Trainer evaluates with prediction_loss_only."""
    trainer = make_trainer(make_model("llama"), tmp_path)
    trainer.compute_metrics = lambda prediction: {}
    with pytest.warns(UserWarning, match="compute_metrics gets no predictions"):
        patch(trainer, eval_logits=False)
    lean = make_trainer(make_model("llama"), tmp_path, prediction_loss_only=True)
    lean.compute_metrics = trainer.compute_metrics
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch(trainer)
        patch(lean, eval_logits=False)


def test_deepspeed_zero3_is_refused(monkeypatch, tmp_path):
    """ZeRO-3 empties lm_head.weight again when the head's forward returns, before the loss
    reads it: patch refuses while ZeRO-3 is on (a Trainer left as it was), and a model patched
    before it was refuses its call (ZeRO-3's release of the weight simulated by a hook)."""
    patched = patch(make_model("llama"))
    weight = patched.lm_head.weight
    patched.lm_head.register_forward_hook(
        lambda *_: setattr(weight, "data", weight.data.new_empty(0))
    )
    with pytest.raises(NotImplementedError, match="DeepSpeed ZeRO-3"):
        patched(**make_batch())
    trainer = make_trainer(make_model("llama"), tmp_path, label_smoothing_factor=0.1)
    cls = transformers.LlamaForCausalLM
    monkeypatch.setattr(cls, "forward", cls.forward)  # restored after the test
    monkeypatch.setattr(transformers.integrations, "is_deepspeed_zero3_enabled", lambda: True)
    for patchable in (trainer.model, cls, trainer):
        with pytest.raises(NotImplementedError, match=r"DeepSpeed ZeRO-3 is not supported.*FSDP2"):
            patch(patchable)
    assert trainer.label_smoother is not None


@pytest.mark.parametrize(
    "model_type, sizes",
    [
        ("t5", dict(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8)),
        ("bart", dict(d_model=16, encoder_layers=1, decoder_layers=1, encoder_ffn_dim=32,
                      decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2)),
    ],
)  # fmt: skip
def test_encoder_decoder_models_are_refused_by_patch(model_type, sizes):
    """An encoder-decoder's loss_function falls back to ForCausalLMLoss: refused by patch,
    rather than at its first call with labels, and left as it was (no hook installed)."""
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=VOCAB, decoder_start_token_id=0, **sizes
    )
    model = transformers.AutoModelForSeq2SeqLM.from_config(config)
    with pytest.raises(TypeError, match=f"{type(model).__name__} is an encoder-decoder"):
        patch(model)
    assert logitless.transformers._installed_hooks(model) == []


def test_compiled_or_wrapped_models_are_refused_with_what_to_do():
    """torch.compile's and DDP's (here DataParallel's) wrappers: patch the model inside first."""
    model = make_model("llama")
    for wrapped in (torch.compile(model), nn.DataParallel(model)):
        with pytest.raises(TypeError, match="patch the model before compiling or wrapping it"):
            patch(wrapped)


def test_unsupported_models_are_refused():
    with pytest.raises(TypeError, match="transformers model"):
        patch(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="z_loss"):
        patch(make_model("llama"), z_loss=-1.0)

    bart = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.for_model(
            "bart", vocab_size=VOCAB, d_model=16, decoder_layers=1, decoder_attention_heads=2
        )
    )
    with pytest.raises(NotImplementedError, match="does not compute its loss by loss_function"):
        patch(bart)(**make_batch())

    shifted = patch(make_model("llama"))
    shifted.lm_head.register_forward_hook(lambda module, args, out: out + 1.0)
    with pytest.raises(NotImplementedError, match="transforms its logits"):
        shifted(**make_batch())

    masked_lm = transformers.AutoModelForMaskedLM.from_config(
        transformers.AutoConfig.for_model(
            "modernbert", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
            num_hidden_layers=1, num_attention_heads=4, pad_token_id=0,
        )
    )  # fmt: skip
    with pytest.raises(TypeError, match="ForMaskedLMLoss, not transformers' ForCausalLMLoss"):
        patch(masked_lm)


def test_an_offloaded_head_is_refused(tmp_path):
    """accelerate's offloaded head keeps its weight on the meta device until its own hook runs,
    which a patched call does not: refused with a clear error, not a device mismatch."""
    make_model("llama").save_pretrained(tmp_path / "model")
    offloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map={"model": "cpu", "lm_head": "disk"},
        offload_folder=tmp_path / "offload",
    )  # fmt: skip
    with pytest.raises(NotImplementedError, match="offloaded"):
        patch(offloaded)(**make_batch())


@pytest.mark.parametrize("family", FOUR)
def test_unpatch_restores_the_models_own_loss(family):
    reference = make_model(family)
    model = patch(copy.deepcopy(reference))
    assert model(**make_batch()).logits is None
    assert unpatch(model) is model
    ours, theirs = model(**make_batch()), reference(**make_batch())
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=0, atol=0)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=0, atol=0)


def test_unpatch_of_an_unpatched_model_and_twice(monkeypatch):
    model = make_model("llama")
    unpatch(unpatch(model))  # nothing to undo
    unpatch(unpatch(patch(model)))
    assert our_loss_is_the_models_own(model)
    cls = transformers.LlamaForCausalLM
    monkeypatch.setattr(cls, "forward", cls.forward)  # restored after the test
    patch(cls)
    unpatch(model)  # an instance of a patched class has no patch of its own
    assert model(**make_batch()).logits is None


def test_instance_patch_over_a_class_patch_takes_its_own_options(monkeypatch):
    """An instance patch on a patched class computes with its own options; unpatching both in
    any order leaves the model's own forward."""
    cls = transformers.LlamaForCausalLM
    monkeypatch.setattr(cls, "forward", cls.forward)  # restored after the test
    model = make_model("llama")
    expected = model(**make_batch()).loss
    patch(cls, z_loss=1.0)
    patch(model)
    assert rel_error(model(**make_batch()).loss, expected) <= LOSS_TOLERANCE
    unpatch(cls)
    unpatch(model)
    assert our_loss_is_the_models_own(model)


def test_unpatch_of_a_class(monkeypatch):
    """unpatch(cls) restores its forward, and turns the patch off also where a wrapper (as
    accelerate's for mixed precision) holds an instance's bound patched forward."""
    cls = transformers.Qwen2ForCausalLM
    monkeypatch.setattr(cls, "forward", cls.forward)  # restored after the test
    original = cls.forward
    patch(cls)
    model = make_model("qwen2")
    assert model(**make_batch()).logits is None
    bound = model.forward
    model.forward = functools.wraps(bound)(lambda *args, **kwargs: bound(*args, **kwargs))
    unpatch(cls)
    assert cls.forward is original
    assert our_loss_is_the_models_own(model)


def compiled_loss_and_grads(model, batch):
    """loss_and_grads of `model` compiled whole (aot_eager: Dynamo's tracing and AOT autograd,
    without generating kernels) with fullgraph=True, which fails on any graph break."""
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.zero_grad(set_to_none=True)
    out = compiled(**batch)
    out.loss.backward()
    return out, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("checked", [False, True], ids=["compiled-first", "eager-first"])
@pytest.mark.parametrize("family", FOUR)
def test_compiles_with_fullgraph_and_equals_eager(family, checked):
    """Compiled first, the probe's scale is a tensor and its check a device-side assertion;
    after an eager call, the scale is a number kept on the model. Either way: no graph break,
    no host synchronization, the eager model's loss and gradients."""
    torch._dynamo.reset()
    reference = make_model(family)
    patched = patch(copy.deepcopy(reference))
    batch = make_batch()
    if checked:
        patched(**batch)
    ours, our_grads = compiled_loss_and_grads(patched, batch)
    theirs, their_grads = loss_and_grads(reference, batch)
    assert ours.logits is None
    assert rel_error(ours.loss, theirs.loss) <= LOSS_TOLERANCE
    for name in head_and_embedding_names(reference):
        assert rel_error(our_grads[name], their_grads[name]) <= GRAD_TOLERANCE, name


def test_labels_longer_than_the_kept_logits_name_logits_to_keep():
    model = patch(make_model("llama"))
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(**make_batch(), logits_to_keep=1)


def test_a_compiled_patched_model_compiles_once():
    """Compiled before any eager call, the second step of the same shapes reuses the first's
    graph (the hooks were installed at the first call, whose guards then failed: two compiles)."""
    torch._dynamo.reset()
    patched = patch(make_model("llama"))
    compiled_loss_and_grads(patched, make_batch())
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled_loss_and_grads(patched, make_batch())


def test_compiled_probe_check_still_refuses_other_transforms():
    torch._dynamo.reset()
    shifted = patch(make_model("llama"))
    shifted.lm_head.register_forward_hook(lambda module, args, out: out + 1.0)
    with pytest.raises(RuntimeError, match="transforms its logits"):
        compiled_loss_and_grads(shifted, make_batch())


def trainable_names(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("family", FOUR)
def test_lora_on_the_head(family):
    """The adapter's low-rank term joins the loss as extra features and classifier columns;
    its dropout draws the same random numbers as the unpatched layer's."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(
        r=3, target_modules=["lm_head", "q_proj"], lora_dropout=0.25, init_lora_weights=False
    )
    reference = peft.get_peft_model(make_model(family), lora).train()
    patched = patch(copy.deepcopy(reference))
    names = trainable_names(reference)
    assert any("lm_head.lora_B" in name for name in names)
    torch.manual_seed(1)
    ours, our_grads = loss_and_grads(patched, make_batch())
    torch.manual_seed(1)
    theirs, their_grads = loss_and_grads(reference, make_batch())
    assert ours.logits is None
    assert rel_error(ours.loss, theirs.loss) <= LOSS_TOLERANCE
    for name in names:
        assert rel_error(our_grads[name], their_grads[name]) <= GRAD_TOLERANCE, name
    assert_same_loss_without_adapters(patched, reference)


@pytest.mark.parametrize("family", FOUR)
def test_modules_to_save_head(family):
    """PEFT's trainable copy of the head (common when tokens are added) is the one computed,
    and the original when adapters are disabled."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(
        r=2, target_modules=["q_proj"], modules_to_save=["lm_head"], init_lora_weights=False
    )
    reference = peft.get_peft_model(make_model(family), lora)
    copy_of_head = reference.get_output_embeddings().modules_to_save["default"]
    with torch.no_grad():
        copy_of_head.weight.mul_(1.5)  # differs from the original head
    patched = patch(copy.deepcopy(reference))
    names = trainable_names(reference)
    assert any("modules_to_save" in name for name in names)
    assert_same_loss_and_grads(patched, reference, make_batch(), names)
    assert_same_loss_without_adapters(patched, reference)


def test_mixed_adapter_batches_are_refused():
    """PEFT's adapter_names (a batch mixing adapters) reaches a LoRA head's forward: refused
    clearly rather than failing inside the patch."""
    peft = pytest.importorskip("peft")
    lora = peft.LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False)
    model = patch(peft.get_peft_model(make_model("llama"), lora).eval())
    with pytest.raises(NotImplementedError, match="adapter_names"):
        model(**make_batch(), adapter_names=["default"] * BATCH)


def assert_same_loss_without_adapters(patched, reference):
    """With PEFT's adapters disabled (nothing trainable then): the original head's loss."""
    batch = make_batch()
    with patched.disable_adapter(), reference.disable_adapter():
        ours, theirs = patched(**batch), reference(**batch)
    assert ours.logits is None
    assert rel_error(ours.loss, theirs.loss) <= LOSS_TOLERANCE


class SubclassedHead(nn.Linear):
    """A subclass that keeps nn.Linear's forward: computed like nn.Linear."""


class RescaledHead(nn.Linear):
    """A subclass with a forward of its own: refused."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(hidden)


def with_head(model, cls):
    old = model.lm_head
    model.lm_head = cls(old.in_features, old.out_features, bias=old.bias is not None)
    model.lm_head.load_state_dict(old.state_dict())
    return model


@pytest.mark.parametrize("family", FOUR)
def test_linear_subclass_heads(family):
    reference = with_head(make_model(family), SubclassedHead)
    patched = patch(copy.deepcopy(reference))
    assert_same_loss_and_grads(patched, reference, make_batch(), ["lm_head.weight"])
    with pytest.raises(TypeError, match=r"test_transformers\.RescaledHead.*Supported"):
        patch(with_head(make_model(family), RescaledHead))


def test_lora_variants_on_the_head_are_refused():
    peft = pytest.importorskip("peft")
    dora = peft.LoraConfig(r=2, target_modules=["lm_head"], use_dora=True)
    with pytest.raises(TypeError, match="DoraLinearVariant"):
        patch(peft.get_peft_model(make_model("llama"), dora))


FSDP_FAMILIES = ["llama", "qwen2", "granite-logit-scale"]  # untied: FSDP2 cannot shard a tied head
FSDP_WORLD = 2


def _fsdp_worker(rank: int, out_dir: str) -> None:
    """One rank: each family with `fully_shard(model.lm_head)`, patched, on the rank's batch."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    join_gloo_group(rank, FSDP_WORLD, out_dir)
    try:
        mesh = init_device_mesh("cpu", (FSDP_WORLD,))
        results = {}
        for family in FSDP_FAMILIES:
            model = make_model(family)
            fully_shard(model.lm_head, mesh=mesh)  # reshards after its forward
            assert type(model.lm_head).__name__ == "FSDPLinear"
            out, grads = loss_and_grads(patch(model), make_batch(seed=rank))
            results[family] = (out.logits, out.loss, grads["lm_head.weight"].full_tensor())
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_head(tmp_path):
    """FSDP2 frees the head's gathered weight after the head's forward; the loss gathers it
    again, and FSDP reduces its gradient over the ranks as it does the unpatched head's."""
    from torch.multiprocessing import start_processes

    start_processes(_fsdp_worker, args=(str(tmp_path),), nprocs=FSDP_WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(FSDP_WORLD)]
    for family in FSDP_FAMILIES:
        reference = make_model(family)
        expected = [loss_and_grads(reference, make_batch(seed=r)) for r in range(FSDP_WORLD)]
        mean_grad = sum(grads["lm_head.weight"] for _, grads in expected) / FSDP_WORLD
        for rank, (logits, loss, grad) in enumerate(r[family] for r in ranks):
            assert logits is None
            assert rel_error(loss, expected[rank][0].loss) <= LOSS_TOLERANCE, family
            assert rel_error(grad, mean_grad) <= GRAD_TOLERANCE, family
