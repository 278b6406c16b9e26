"""Passkey retrieval prompts (the Landmark-attention protocol the Samba paper used) and the fine-tuning
task built from them.

A prompt is, line by line (as in Landmark attention / LongLoRA's passkey_retrivial.py):

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. ...
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. The grass ...
    The pass key is 12345. Remember it. 12345 is the pass key.
    The grass is green. The sky is blue. ...
    What is the pass key? The pass key is

The filler is counted in tokens of the model's tokenizer and cut at any token, like the original cuts
it at any character; the part after the needle starts the filler again from its beginning. Prompts are
assembled from separately encoded pieces, so their length is exact: a byte-level tokenizer splits
words at spaces and newlines, so the pieces tokenize as the whole text would (a cut filler may end in
a part of a word; the model sees a valid token sequence either way).
"""

from __future__ import annotations

import random
import re

import numpy as np
import torch
from tokenizers import Tokenizer

from .tokenizer import eos_id

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
         "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


def random_key(rng: random.Random) -> str:
    """A random 5-digit pass key (the paper's)."""
    return str(rng.randint(10_000, 99_999))


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text).ids


def filler_ids(tokenizer: Tokenizer, n: int) -> list[int]:
    """The first `n` tokens of FILLER repeated, joined by spaces."""
    first, unit = _encode(tokenizer, FILLER), _encode(tokenizer, " " + FILLER)
    repeats = max(0, n - len(first)) // len(unit) + 1
    return (first + unit * repeats)[:n]


def passkey_prompt(tokenizer: Tokenizer, length: int, key: str, depth: float) -> tuple[list[int], int]:
    """(token ids of a prompt of exactly `length` tokens, index of the needle's first token).

    The needle follows the first `depth` (0..1) of the filler tokens: 0 puts it right after the
    introduction, 1 right before the question."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must lie in [0, 1], got {depth!r}")
    intro = _encode(tokenizer, INTRO + "\n")
    needle = _encode(tokenizer, "\n" + NEEDLE.format(key=key) + "\n")
    question = _encode(tokenizer, "\n" + QUESTION)
    n_filler = length - len(intro) - len(needle) - len(question)
    if n_filler < 0:
        raise ValueError(f"length {length} is shorter than the passkey prompt without filler "
                         f"({length - n_filler} tokens with this tokenizer)")
    before = round(depth * n_filler)
    ids = intro + filler_ids(tokenizer, before) + needle + filler_ids(tokenizer, n_filler - before) + question
    return ids, len(intro) + before


def passkey_answer(tokenizer: Tokenizer, key: str) -> list[int]:
    """What follows the question in a training example: " 12345." """
    return _encode(tokenizer, f" {key}.")


def retrieved(text: str, key: str) -> bool:
    """Whether generated text answers `key`: its leading digits (after spaces) are exactly the key, so
    "12345." is right and "123456" wrong."""
    found = re.match(r"\s*(\d+)", text)
    return found is not None and found.group(1) == key


class PasskeyBlocks:
    """The fine-tuning task as a loader: each block is one passkey prompt, its answer and EOS, exactly
    `seq_len + 1` tokens, with a random key and depth (the paper's 500 steps at 4K).

    Example i of the global order is drawn from a generator seeded by (seed, i), so, like BlockLoader,
    `position` (examples consumed by all ranks together) is all a resume needs. The loss covers every
    token, as in the paper's plain language-model fine-tuning; only the answer carries information the
    filler does not.
    """

    def __init__(self, tokenizer: Tokenizer, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.tokenizer, self.seq_len, self.seed = tokenizer, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.eos = eos_id(tokenizer)
        self.position = 0
        self.example(0)  # a seq_len too short for a prompt fails here, before any work

    def example(self, index: int) -> list[int]:
        rng = random.Random(f"passkey/{self.seed}/{index}")
        key, depth = random_key(rng), rng.random()
        answer = passkey_answer(self.tokenizer, key) + [self.eos]
        try:
            prompt, _ = passkey_prompt(self.tokenizer, self.seq_len + 1 - len(answer), key, depth)
        except ValueError as e:
            raise ValueError(f"seq_len {self.seq_len} is too short for the passkey task: {e}") from None
        return prompt + answer

    def next_batch(self, global_batch: int) -> torch.Tensor:
        """This rank's contiguous slice of the next `global_batch` examples: [global_batch // world_size,
        seq_len + 1] int64."""
        if global_batch % self.world_size:
            raise ValueError(f"global_batch {global_batch} is not divisible by world_size {self.world_size}")
        per_rank = global_batch // self.world_size
        first = self.position + self.rank * per_rank
        batch = np.array([self.example(first + row) for row in range(per_rank)], dtype=np.int64)
        self.position += global_batch
        return torch.from_numpy(batch)

    def state_dict(self) -> dict:
        return {"task": "passkey", "position": self.position, "seq_len": self.seq_len, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        """Resume at `state["position"]`; the state must come from a passkey loader of this seq_len and seed."""
        for key, value in (("task", "passkey"), ("seq_len", self.seq_len), ("seed", self.seed)):
            if state.get(key) != value:
                raise ValueError(f"loader state has {key}={state.get(key)!r} but this loader has {value!r}: "
                                 "resuming another task, seq_len or seed would silently change the run")
        position = state.get("position")
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise ValueError(f"loader state position must be an int >= 0, got {position!r}")
        self.position = position
