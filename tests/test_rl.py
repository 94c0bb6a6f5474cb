"""The RL entry points: verl's fused-kernel call shape, and TRL's per-token completion log-probs
from a model's hidden states, against the full logits."""

from __future__ import annotations

import pytest
import torch

import logitless
from helpers import make_inputs, rel_error
from logitless.reference import reference_linear_log_probs
from logitless.rl import completion_log_probs, verl_linear_cross_entropy

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_verl_call_shape(reduction):
    e, c, targets, _ = make_inputs((2, 23), 16, 301, seed=3)
    ours = [x.detach().requires_grad_() for x in (e, c)]
    theirs = [x.detach().double().requires_grad_() for x in (e, c)]
    log_probs, entropy = verl_linear_cross_entropy(*ours, targets, 0.7, reduction)
    ref_log_probs, ref_entropy = reference_linear_log_probs(
        *theirs, targets, temperature=0.7, return_entropy=True
    )
    if reduction != "none":  # the log-probs only: verl's entropies stay per token
        ref_log_probs = getattr(torch, reduction)(ref_log_probs)
    assert log_probs.shape == ref_log_probs.shape
    assert entropy.shape == targets.shape
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(x.shape, generator=gen) for x in (log_probs, entropy)]
    torch.autograd.backward([log_probs, entropy], weights)
    torch.autograd.backward([ref_log_probs, ref_entropy], [w.double() for w in weights])
    for x, ref in [(log_probs, ref_log_probs), (entropy, ref_entropy)]:
        assert rel_error(x.detach(), ref.detach()) < 1e-5
    for x, ref in zip(ours, theirs, strict=True):
        assert rel_error(x.grad, ref.grad) < 1e-5
    with pytest.raises(ValueError, match="reduction"):
        verl_linear_cross_entropy(e, c, targets, 1.0, "avg")


def _trl_per_token_logps(model, input_ids, attention_mask, logits_to_keep, temperature):
    """What TRL's trainers compute: from the full logits."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    logits = logits[:, :-1][:, -logits_to_keep:] / temperature
    log_p = logits.log_softmax(-1)
    picked = log_p.gather(-1, input_ids[:, -logits_to_keep:].unsqueeze(-1)).squeeze(-1)
    return picked, -(log_p.exp() * log_p).sum(-1)


@pytest.mark.parametrize(
    ("model_type", "head"),
    [
        ("llama", None),
        ("gemma2", None),  # softcap
        ("cohere", None),  # logits * logit_scale (0.0625)
        ("granite", None),  # logits / logits_scaling
        ("llama", "lora"),  # LoRA on the lm_head
        ("cohere", "lora-bias"),  # a scale, and a LoRA with a bias on the lm_head
    ],
)
def test_trl_completion_log_probs_recipe(model_type, head):
    """Against TRL's recipe from the model's own logits, whatever the model does to them or
    its head adds (a scale, a LoRA, a scaled LoRA bias: off by 0.24, 3.8 and 28 before), and
    the model left as it was."""
    config = transformers.AutoConfig.for_model(
        model_type, vocab_size=101, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, initializer_range=0.2,
        **({"logits_scaling": 4.0} if model_type == "granite" else {}),
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if head is not None:
        peft = pytest.importorskip("peft")
        lora = peft.LoraConfig(
            r=3, target_modules=["lm_head", "q_proj"], init_lora_weights=False,
            lora_bias=head == "lora-bias",
        )  # fmt: skip
        model = peft.get_peft_model(model, lora)
        with torch.no_grad():  # a LoRA bias starts at 0
            for name, parameter in model.named_parameters():
                if "lora_B" in name and name.endswith("bias"):
                    parameter.normal_(0.0, 2.0)
    attributes = {name: set(vars(module)) for name, module in model.named_modules()}
    input_ids = torch.randint(3, 101, (2, 15))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0  # left padding of the prompt
    keep, temperature = 6, 0.7

    def run(fn):
        model.zero_grad(set_to_none=True)
        log_probs, entropy = fn()
        ((log_probs * torch.linspace(-1, 1, keep)).sum() + 0.1 * entropy.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return log_probs.detach(), entropy.detach(), grads

    ours = run(
        lambda: completion_log_probs(
            model, input_ids, attention_mask, keep, temperature=temperature, return_entropy=True
        )
    )
    theirs = run(lambda: _trl_per_token_logps(model, input_ids, attention_mask, keep, temperature))
    assert ours[0].shape == (2, keep)
    assert rel_error(ours[0], theirs[0]) < 1e-5 and rel_error(ours[1], theirs[1]) < 1e-5
    assert ours[2].keys() == theirs[2].keys()
    for name, grad in ours[2].items():
        assert rel_error(grad, theirs[2][name]) < 1e-4, name
    assert {name: set(vars(module)) for name, module in model.named_modules()} == attributes


def test_completion_log_probs_forms_the_entropy_only_when_asked(monkeypatch):
    """Without return_entropy, the fused head is not asked for it: its sweep would keep the
    entropy's sum and its backward a p log p term (which also turns gradient filtering off)."""
    asked = []
    compute = logitless.linear_log_probs
    monkeypatch.setattr(
        logitless,
        "linear_log_probs",
        lambda *a, **k: asked.append(k["return_entropy"]) or compute(*a, **k),
    )
    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=101, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    input_ids = torch.randint(3, 101, (2, 9))
    log_probs = completion_log_probs(model, input_ids, torch.ones_like(input_ids), 4)
    _, entropy = completion_log_probs(
        model, input_ids, torch.ones_like(input_ids), 4, return_entropy=True
    )
    assert asked == [False, True]
    assert log_probs.shape == entropy.shape == (2, 4)


@pytest.mark.parametrize(
    ("arguments", "error", "named"),
    [
        ({"logits_to_keep": 0}, ValueError, "logits_to_keep"),
        ({"logits_to_keep": 15}, ValueError, "logits_to_keep"),
        ({"logits_to_keep": 2.0}, TypeError, "logits_to_keep"),
        ({"input_ids": torch.randint(3, 101, (15,))}, ValueError, "input_ids"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"return_entropy": "yes"}, TypeError, "return_entropy"),
    ],
    ids=["keep-0", "keep-all", "keep-float", "ids-1d", "temperature-0", "entropy-str"],
)
def test_bad_arguments_are_named_before_the_model_runs(arguments, error, named):
    config = transformers.AutoConfig.for_model(
        "llama", vocab_size=101, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.forward = model.get_decoder().forward = None  # a forward would raise a TypeError
    call = {"input_ids": torch.randint(3, 101, (2, 15)), "logits_to_keep": 4, **arguments}
    with pytest.raises(error, match=named):
        completion_log_probs(
            model, call.pop("input_ids"), torch.ones(2, 15, dtype=torch.long),
            call.pop("logits_to_keep"), **call,
        )  # fmt: skip
