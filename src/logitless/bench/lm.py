"""A small causal language model that the benchmark trains on the standard library's sources.

Its final hidden states and classifier are the `trained` data regime: a softmax as peaked as a
real model's, which random weights never give. Plain PyTorch (no transformers), trained for a
fixed number of steps so that a machine always gets the same model, cached after the first run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from logitless import linear_cross_entropy
from logitless.bench import corpus


@dataclass(frozen=True)
class LMConfig:
    """The model, its training and the corpus split; every field is part of the cache key."""

    vocab_size: int = 32768
    width: int = 96
    layers: int = 2
    heads: int = 4
    context: int = 128
    batch: int = 8
    steps: int = 800
    lr: float = 3e-3
    seed: int = 0
    held_out: float = 0.05
    """Fraction at the end of the corpus never trained on: the benchmark's hidden states."""

    def cache_path(self) -> Path:
        key = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return corpus.cache_dir() / f"bench-lm-{hashlib.sha256(key).hexdigest()[:12]}.pt"


DEFAULT_CONFIG = LMConfig()


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention and a GELU MLP."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(batch, length, 3, self.heads, -1).unbind(2)
        attended = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x = x + self.out(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.mlp_norm(x))


class CausalLM(nn.Module):
    """Token and position embeddings, transformer blocks, a final norm and an untied head."""

    def __init__(self, config: LMConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.width)
        self.position = nn.Embedding(config.context, config.width)
        self.blocks = nn.ModuleList(Block(config.width, config.heads) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.vocab_size, bias=False)

    def hidden_states(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, width) final hidden states, the classifier's input."""
        x = self.embed(ids) + self.position(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


@dataclass
class TrainedLM:
    """The trained model with its configuration and the corpus split it was trained on."""

    model: CausalLM
    config: LMConfig
    train_ids: torch.Tensor
    held_out_ids: torch.Tensor

    def target_counts(self) -> torch.Tensor:
        """How often each token is a target in the training text: what makes a token rare."""
        return torch.bincount(self.train_ids, minlength=self.config.vocab_size)


def trained_lm(config: LMConfig = DEFAULT_CONFIG, device: str | torch.device = "cpu") -> TrainedLM:
    """The model trained with `config`, from the cache or trained now (progress on stderr)."""
    ids = corpus.token_ids(config.vocab_size)
    split = int(len(ids) * (1.0 - config.held_out))
    train_ids, held_out_ids = ids[:split], ids[split:]
    with torch.random.fork_rng(devices=[]):  # the same initial weights on every machine
        torch.manual_seed(config.seed)
        model = CausalLM(config)
    path = config.cache_path()
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu"))
    else:
        _train(model.to(device), train_ids, config)
        torch.save(model.cpu().state_dict(), path)
    return TrainedLM(model.to(device).eval(), config, train_ids, held_out_ids)


def _train(model: CausalLM, ids: torch.Tensor, config: LMConfig) -> None:
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps)
    windows = torch.arange(config.context + 1)
    start_time = time.perf_counter()
    for step in range(1, config.steps + 1):
        starts = torch.randint(0, len(ids) - config.context - 1, (config.batch, 1), generator=gen)
        batch = ids[starts + windows].to(device)
        hidden = model.hidden_states(batch[:, :-1])
        # the portable backend on every device: the model must not depend on which kernels exist
        loss = linear_cross_entropy(hidden, model.head.weight, batch[:, 1:], impl="torch")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == config.steps:
            elapsed = time.perf_counter() - start_time
            print(
                f"  training the benchmark LM: step {step}/{config.steps}, "
                f"loss {loss.item():.2f}, {elapsed:.0f} s",
                file=sys.stderr,
                flush=True,
            )


@torch.no_grad()
def hidden_states_and_targets(lm: TrainedLM, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, width) hidden states of held-out text and the (n,) next tokens they predict."""
    context = lm.config.context
    device = next(lm.model.parameters()).device
    n_windows = -(-n // context)
    starts = (torch.arange(n_windows) * context) % (len(lm.held_out_ids) - context - 1)
    windows = lm.held_out_ids[starts[:, None] + torch.arange(context + 1)].to(device)
    hidden = lm.model.hidden_states(windows[:, :-1]).reshape(-1, lm.config.width)
    return hidden[:n].float(), windows[:, 1:].reshape(-1)[:n]
