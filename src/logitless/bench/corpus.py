"""Real text present on every machine: the Python standard library's sources, and a tokenizer.

Used by the benchmark's `trained` data regime and by examples/train_lm.py. Both the tokenizer
and the token ids are cached (LOGITLESS_CACHE, default ~/.cache/logitless).
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import torch


def cache_dir() -> Path:
    path = Path(os.environ.get("LOGITLESS_CACHE", Path.home() / ".cache" / "logitless"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def source_files() -> list[Path]:
    """The standard library's .py files, in a fixed order, test suites left out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        p
        for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
    )


def texts(max_bytes: int | None = None) -> list[str]:
    """Source files' texts, up to about `max_bytes` in all."""
    out, total = [], 0
    for path in source_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        out.append(text)
        total += len(text)
        if max_bytes is not None and total >= max_bytes:
            break
    return out


def tokenizer(vocab_size: int = 32768):
    """A byte-level BPE tokenizer trained on the corpus (needs the `tokenizers` package)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = cache_dir() / f"stdlib-bpe-{vocab_size}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    tok.save(str(path))
    return tok


def token_ids(vocab_size: int = 32768) -> torch.Tensor:
    """The whole corpus as one int64 sequence of token ids (files concatenated)."""
    path = cache_dir() / f"stdlib-ids-{vocab_size}.pt"
    if path.exists():
        return torch.load(path)
    tok = tokenizer(vocab_size)
    encoded = tok.encode_batch(texts())
    ids = torch.tensor([i for enc in encoded for i in enc.ids], dtype=torch.long)
    torch.save(ids, path)
    return ids
