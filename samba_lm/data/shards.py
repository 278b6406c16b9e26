"""Token shards: a corpus tokenized once into flat binary files that training memory-maps.

A shard directory holds:
    tokenizer.json                  the tokenizer the ids come from
    train_000.bin, train_001.bin..  raw little-endian uint16 token ids (uint32 for a vocabulary over
    val_000.bin, ..                 65536); every document is followed by EOS
    index.json                      written last, so its presence means the build finished

The corpus is streamed (one pass to count documents, one to train the tokenizer, one to encode),
never held in memory, and the same inputs and seed give byte-identical files. The index records each
split's sha256 over its token ids, computed while writing: a checkpoint carries it, so that a run
never resumes on other data, and a resume checks it without reading the shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from ..options import check_out_dir
from .sources import ReadLog, iter_documents
from .tokenizer import check_vocab_size, eos_id, load_tokenizer, train_tokenizer

FORMAT = "samba-lm-shards/1"
INDEX_FILE = "index.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_BATCH_DOCS = 256  # documents per encode_batch call (the Rust side spreads each batch over threads) ...
_BATCH_CHARS = 8_000_000  # ... or fewer when they are long, to bound memory


def build_shards(source: str | list[str], out_dir: str | os.PathLike, vocab_size: int = 4096,
                 tokenizer: str | None = None, val_fraction: float = 0.05, seed: int = 0,
                 shard_tokens: int = 50_000_000, jsonl_field: str = "text", parquet_column: str = "text",
                 on_bad_file: str = "skip", progress: bool = True) -> dict:
    """Tokenize `source` (one source or a list, concatenated) into shards in `out_dir`; return the index.

    Documents are split into train/val by a `seed`ed shuffle; the tokenizer is trained on the train
    documents only (`vocab_size` is then an upper bound), or loaded from `tokenizer` if given. Files
    that are not text are left out with a warning or stop the build (`on_bad_file`, see
    `iter_documents`); `index["read"]` says what was read and left out. Every argument is checked,
    and the corpus read once, before anything in `out_dir` changes.
    """
    sources = [os.fspath(source)] if isinstance(source, (str, os.PathLike)) else [os.fspath(s) for s in source]
    if not sources:
        raise ValueError("source: give at least one data source")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"shard_tokens must be a positive int, got {shard_tokens!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    out = check_out_dir(out_dir, "out_dir")
    if tokenizer is None:
        check_vocab_size(vocab_size)
    tok = load_tokenizer(tokenizer) if tokenizer is not None else None

    def documents(log: ReadLog) -> Iterator[str]:
        for s in sources:
            yield from iter_documents(s, jsonl_field, parquet_column, on_bad_file, log)

    # The first pass warns about the files it leaves out and fills `log`; the later passes leave out
    # the same files into logs of their own, silently.
    log = ReadLog()
    n_docs = sum(1 for _ in documents(log))
    is_val = _val_mask(n_docs, val_fraction, seed)
    if tok is None:
        train_docs = (d for d, v in zip(documents(ReadLog(warn=False)), is_val, strict=True) if not v)
        bar = tqdm(train_docs, total=n_docs - sum(is_val), unit="doc", desc="training tokenizer",
                   disable=not progress)
        tok = train_tokenizer(bar, vocab_size)
    eos, vocab = eos_id(tok), tok.get_vocab_size()
    dtype_name = "uint16" if vocab <= 1 << 16 else "uint32"

    out.mkdir(parents=True, exist_ok=True)
    # Drop a previous build's index and shards first: they must never pass for this build's.
    (out / INDEX_FILE).unlink(missing_ok=True)
    for split in SPLITS:
        for old in out.glob(f"{split}_*.bin"):
            old.unlink()
    tmp = out / (TOKENIZER_FILE + ".tmp")
    tok.save(str(tmp))
    os.replace(tmp, out / TOKENIZER_FILE)

    # A literal "<|endoftext|>" inside a document is text, not a document boundary.
    tok.encode_special_tokens = True
    writers = {split: _ShardWriter(out, split, DTYPES[dtype_name], shard_tokens) for split in SPLITS}
    n_split = dict.fromkeys(SPLITS, 0)
    with tqdm(total=n_docs, unit="doc", desc="tokenizing", disable=not progress) as bar:
        for batch, flags in _batches(zip(documents(ReadLog(warn=False)), is_val, strict=True)):
            for encoding, val in zip(tok.encode_batch(batch, add_special_tokens=False), flags):
                split = "val" if val else "train"
                writers[split].write(np.array(encoding.ids + [eos], dtype=DTYPES[dtype_name]))
                n_split[split] += 1
            bar.update(len(batch))

    splits = {}
    for split, writer in writers.items():
        writer.close()
        if n_split[split]:
            splits[split] = {"shards": writer.shards, "documents": n_split[split],
                             "tokens": sum(s["tokens"] for s in writer.shards), "sha256": writer.sha256.hexdigest()}
    read = {"files": log.files, "documents": n_docs,
            "skipped": [{"file": file, "reason": why} for file, why in log.skipped.items()]}
    index = {"format": FORMAT, "dtype": dtype_name, "vocab_size": vocab, "eos_id": eos, "seed": seed,
             "val_fraction": float(val_fraction), "sources": sources, "read": read, "splits": splits}
    tmp = out / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, out / INDEX_FILE)
    return index


def _val_mask(n: int, val_fraction: float, seed: int) -> bytearray:
    """mask[i] = 1 if document i goes to validation."""
    mask = bytearray(n)
    if n >= 2 and val_fraction > 0:
        order = list(range(n))
        random.Random(seed).shuffle(order)
        # At least one validation document, and at least one left to train on.
        for i in order[:min(n - 1, max(1, round(val_fraction * n)))]:
            mask[i] = 1
    return mask


def _batches(pairs) -> Iterator[tuple[list[str], list[int]]]:
    batch, flags, chars = [], [], 0
    for doc, flag in pairs:
        batch.append(doc)
        flags.append(flag)
        chars += len(doc)
        if len(batch) == _BATCH_DOCS or chars >= _BATCH_CHARS:
            yield batch, flags
            batch, flags, chars = [], [], 0
    if batch:
        yield batch, flags


class _ShardWriter:
    """Appends token ids to `{split}_000.bin`, `{split}_001.bin`, ..., at most `shard_tokens` each."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict] = []  # {"file", "tokens"} of each finished shard
        self.sha256 = hashlib.sha256()  # over the split's ids as stored, whatever the sharding
        self._file, self._name, self._count = None, "", 0

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            if self._file is None:
                self._name = f"{self.split}_{len(self.shards):03d}.bin"
                self._file = open(self.out / (self._name + ".tmp"), "wb")
            take = ids[:self.shard_tokens - self._count]
            raw = take.tobytes()
            self._file.write(raw)
            self.sha256.update(raw)
            self._count += len(take)
            ids = ids[len(take):]
            if self._count == self.shard_tokens:
                self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            os.replace(self.out / (self._name + ".tmp"), self.out / self._name)
            self.shards.append({"file": self._name, "tokens": self._count})
            self._file, self._count = None, 0


class TokenStream:
    """The shards of one split, memory-mapped read-only and read as one sequence of token ids.
    `sha256`: the split's fingerprint from its index (None for shards built before there was one)."""

    def __init__(self, paths: Sequence[str | os.PathLike], dtype: np.dtype | str, sha256: str | None = None):
        self.paths, self.sha256 = [Path(p) for p in paths], sha256
        # numpy cannot map an empty file; an empty shard holds nothing to read anyway.
        self._maps = [np.memmap(p, dtype=np.dtype(dtype), mode="r") for p in self.paths if p.stat().st_size]
        self._starts = np.cumsum([0] + [len(m) for m in self._maps])  # first token of each shard; last = total

    def __len__(self) -> int:
        return int(self._starts[-1])

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) as int64, across shard boundaries."""
        if start < 0 or n < 0 or start + n > len(self):
            raise IndexError(f"read({start}, {n}) is outside the stream of {len(self)} tokens")
        out = np.empty(n, dtype=np.int64)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        done = 0
        while done < n:
            offset = start + done - int(self._starts[shard])
            take = min(n - done, len(self._maps[shard]) - offset)
            out[done:done + take] = self._maps[shard][offset:offset + take]
            done += take
            shard += 1
        return out


class TokenShards:
    """A finished shard directory: its index, its tokenizer's path and a `TokenStream` per split."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index_file = self.path / INDEX_FILE
        if not index_file.is_file():
            raise FileNotFoundError(f"no shard index {index_file}: run `samba-lm data` first to build the shards")
        try:
            index = json.loads(index_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{index_file} is corrupt ({e}): rebuild it with `samba-lm data`") from None
        _check_index(index, index_file)
        self.index = index
        self.vocab_size: int = index["vocab_size"]
        self.eos_id: int = index["eos_id"]
        self.tokenizer_path = self.path / TOKENIZER_FILE
        self._dtype = DTYPES[index["dtype"]]
        # Sizes are checked up front: a truncated shard would otherwise read as garbage or fail mid-run.
        for split in index["splits"].values():
            for shard in split["shards"]:
                file = self.path / shard["file"]
                if not file.is_file():
                    raise FileNotFoundError(f"shard {file} listed in {index_file} does not exist")
                expected = shard["tokens"] * self._dtype.itemsize
                if file.stat().st_size != expected:
                    raise ValueError(f"shard {file} holds {file.stat().st_size} bytes but the index says "
                                     f"{shard['tokens']} tokens ({expected} bytes): rebuild with `samba-lm data`")

    @property
    def splits(self) -> list[str]:
        return list(self.index["splits"])

    def split(self, name: str) -> TokenStream:
        if name not in self.index["splits"]:
            raise ValueError(f"no split {name!r} in {self.path} (available: {', '.join(self.splits)})")
        split = self.index["splits"][name]
        return TokenStream([self.path / shard["file"] for shard in split["shards"]], self._dtype, split.get("sha256"))


def _check_index(index, where: Path) -> None:
    def bad(why: str) -> ValueError:
        return ValueError(f"{where} is not a valid shard index ({why}): rebuild it with `samba-lm data`")

    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise bad(f"format is not {FORMAT!r}")
    if index.get("dtype") not in DTYPES:
        raise bad(f"dtype {index.get('dtype')!r} is not one of {', '.join(DTYPES)}")
    for key in ("vocab_size", "eos_id"):
        if not isinstance(index.get(key), int):
            raise bad(f"{key} is not an int")
    splits = index.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise bad("it lists no splits")
    for name, split in splits.items():
        shards = split.get("shards") if isinstance(split, dict) else None
        if not isinstance(shards, list) or not all(
                isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("tokens"), int)
                and s["tokens"] >= 0 for s in shards):
            raise bad(f"split {name!r} has no valid shard list")
