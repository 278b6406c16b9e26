"""Byte-level BPE tokenizers (Hugging Face `tokenizers`), with `<|endoftext|>` as id 0.

Byte-level means any text round-trips: every byte has a token, so nothing is ever unknown.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
MIN_VOCAB = 256 + 1 + 1  # every byte, EOS, and at least one merge


def check_vocab_size(vocab_size) -> None:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be an int >= {MIN_VOCAB} (256 bytes + EOS + merges), got {vocab_size!r}")


def train_tokenizer(documents: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE tokenizer of at most `vocab_size` tokens (fewer on a tiny corpus)."""
    check_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],  # first, so EOS is id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer.json (or the tokenizer.json inside a directory) that has the EOS token."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception
        raise ValueError(f"{path} is not a Hugging Face tokenizer.json: {e}") from None
    if tokenizer.token_to_id(EOS) is None:
        raise ValueError(f"tokenizer {path} has no {EOS!r} token, which ends every document")
    return tokenizer


def eos_id(tokenizer: Tokenizer) -> int:
    """The id of `EOS` in `tokenizer`."""
    token_id = tokenizer.token_to_id(EOS)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {EOS!r} token")
    return token_id
