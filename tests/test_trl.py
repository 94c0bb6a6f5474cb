"""logitless as the fused LM head of TRL's trainers, against TRL's own head.

`patch(trainer)` replaces the fused head TRL gave the trainer's model (and reference model):
a few steps of SFT, DPO and GRPO on tiny random models log the same losses and metrics as
TRL's own path, with logitless computing every fused-head call.
"""

from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

import logitless  # noqa: E402
import logitless.transformers  # noqa: E402
from logitless.transformers import patch, unpatch  # noqa: E402
from tests.test_transformers import (  # noqa: E402
    FOUR,
    VOCAB,
    assert_same_training,
    make_model,
    transformers,
)

pytestmark = pytest.mark.skipif(
    not hasattr(logitless, "linear_log_probs"),
    reason="TRL's fused head needs logitless.linear_log_probs and linear_top_k (issue 12)",
)

STEPS = 2


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def make_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny models' vocabulary: token i is spelt `t<i>`."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = tokenizers.decoders.WordPiece()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def text(gen: torch.Generator, low: int, high: int) -> str:
    length = int(torch.randint(low, high, (), generator=gen))
    return " ".join(f"t{i}" for i in torch.randint(3, VOCAB, (length,), generator=gen).tolist())


def dataset(kind: str) -> datasets.Dataset:
    gen = torch.Generator().manual_seed(0)
    if kind == "sft":
        rows = [{"prompt": text(gen, 2, 6), "completion": text(gen, 3, 9)} for _ in range(8)]
    elif kind == "dpo":
        rows = [
            {"prompt": text(gen, 2, 6), "chosen": text(gen, 2, 7), "rejected": text(gen, 2, 7)}
            for _ in range(8)
        ]
    else:
        rows = [{"prompt": text(gen, 2, 6)} for _ in range(8)]
    return datasets.Dataset.from_list(rows)


def reward_length(completions, **kwargs) -> list[float]:
    return [float(len(completion.split())) for completion in completions]


COMMON = dict(
    per_device_train_batch_size=2,
    max_steps=STEPS,
    optim="sgd",  # steps linear in the gradients: see test_transformers.make_trainer
    learning_rate=1e-1,
    logging_steps=1,
    save_strategy="no",
    report_to="none",
    use_cpu=True,
    seed=0,
    disable_tqdm=True,
    bf16=False,  # TRL's default is bf16 autocast, where its head rounds each logit to bfloat16
)


def make_trainer(kind: str, model, tmp_path, **config):
    tokenizer = make_tokenizer()
    args = dict(COMMON, output_dir=str(tmp_path), **config)
    if kind == "sft":
        return trl.SFTTrainer(
            model=model,
            args=trl.SFTConfig(**args),
            train_dataset=dataset("sft"),
            processing_class=tokenizer,
        )
    if kind == "dpo":
        return trl.DPOTrainer(
            model=model,
            ref_model=copy.deepcopy(model),  # TRL would load it from the hub
            args=trl.DPOConfig(**args),
            train_dataset=dataset("dpo"),
            processing_class=tokenizer,
        )
    return trl.GRPOTrainer(
        model=model,
        reward_funcs=reward_length,
        args=trl.GRPOConfig(num_generations=2, max_completion_length=5, temperature=0.7, **args),
        train_dataset=dataset("grpo"),
        processing_class=tokenizer,
    )


LOGGED = {
    "sft": ["loss", "entropy", "mean_token_accuracy"],
    "dpo": ["loss", "logps/chosen", "logps/rejected", "logits/chosen", "entropy"],
    "grpo": ["loss", "entropy"],
}


def logged(trainer, kind: str) -> dict[str, list[float]]:
    history = [log for log in trainer.state.log_history if "loss" in log]
    return {key: [log[key] for log in history] for key in LOGGED[kind]}


@pytest.fixture
def fused_calls(monkeypatch):
    """The number of fused-head calls logitless computed during the test."""
    calls = []
    compute = logitless.linear_log_probs
    monkeypatch.setattr(
        logitless, "linear_log_probs", lambda *a, **k: calls.append(1) or compute(*a, **k)
    )
    return calls


@pytest.mark.parametrize("family", FOUR)
@pytest.mark.parametrize("kind", ["sft", "dpo", "grpo"])
def test_trainer_steps_equal_trls_own_head(kind, family, tmp_path, fused_calls):
    reference = make_model(family)
    model = copy.deepcopy(reference)
    theirs = make_trainer(kind, reference, tmp_path)
    theirs.train()
    assert not fused_calls
    ours = patch(make_trainer(kind, model, tmp_path))
    ours.train()
    assert fused_calls  # every fused-head call, the reference model's included
    their_logs, our_logs = logged(theirs, kind), logged(ours, kind)
    assert_same_training(model, reference, our_logs["loss"], their_logs["loss"], STEPS)
    for key in LOGGED[kind]:
        torch.testing.assert_close(our_logs[key], their_logs[key], rtol=1e-4, atol=1e-6, msg=key)


def test_options_that_would_change_the_log_probs_are_refused(tmp_path):
    trainer = make_trainer("sft", make_model("llama"), tmp_path)
    with pytest.raises(ValueError, match="z_loss does not apply to SFTTrainer"):
        patch(trainer, z_loss=1e-4)


def test_patching_the_model_alone_and_unpatch(tmp_path, fused_calls):
    """patch(model) after TRL gave it a fused head replaces that head too, once however often
    it is patched; unpatch restores TRL's."""
    model = make_model("llama")
    trainer = make_trainer("sft", model, tmp_path)
    trl_forward = model.forward
    patch(patch(model))
    assert model.forward is not trl_forward
    batch = next(iter(trainer.get_train_dataloader()))
    outputs = model(**batch, fused_lm_head=True)
    assert len(fused_calls) == 1 and outputs.log_probs.shape == batch["labels"][:, 1:].shape
    unpatch(model)
    assert model.forward is trl_forward
