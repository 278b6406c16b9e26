"""The data pipeline: sources, tokenizer, token shards and the block loader (all on CPU, small corpora)."""

import gzip
import hashlib
import itertools
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models

from samba_lm.data import (EOS, SOURCES, BlockLoader, ReadLog, TokenShards, TokenStream, build_shards, eos_id,
                           iter_documents, load_tokenizer, train_tokenizer)

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "naïve", "café", "日本", "def", "return"]


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Distinct documents; one holds a literal EOS string, which must stay text."""
    rng = random.Random(seed)
    docs = [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) + "\n" for i in range(n)]
    docs[1] = f"doc 1 mentions {EOS} inside its text\n"
    return docs


def write_txt_corpus(root, docs):
    root.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (root / f"{i:04d}.txt").write_text(doc, encoding="utf-8")
    return root


def split_documents(shards: TokenShards, split: str) -> list[str]:
    """Decode a split back into its documents, cutting at every EOS."""
    tokenizer = load_tokenizer(shards.tokenizer_path)
    stream = shards.split(split)
    ids = stream.read(0, len(stream))
    assert ids[-1] == shards.eos_id
    cuts = np.flatnonzero(ids == shards.eos_id)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tokenizer.decode(ids[a:b].tolist()) for a, b in zip(starts, cuts)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    docs = make_docs(30)
    root = write_txt_corpus(tmp_path_factory.mktemp("corpus") / "txt", docs)
    return root, docs


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    root, docs = corpus
    out = tmp_path_factory.mktemp("shards")
    index = build_shards(str(root), out, vocab_size=320, val_fraction=0.2, seed=0, progress=False)
    return out, index, docs


def write_stream(path, n_tokens: int, shard_tokens: int) -> TokenStream:
    """A stream of the token ids 0, 1, 2, ... in shards of `shard_tokens`."""
    path.mkdir(parents=True, exist_ok=True)
    tokens = np.arange(n_tokens, dtype="<u2")
    files = []
    for k, start in enumerate(range(0, n_tokens, shard_tokens)):
        files.append(path / f"train_{k:03d}.bin")
        tokens[start:start + shard_tokens].tofile(files[-1])
    return TokenStream(files, "<u2")


# ----------------------------------------------------------------------------------------- sources

def test_text_directory_source_sorted_recursive_skips_hidden_and_empty(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".hidden_dir").mkdir()
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "b" / "c.md").write_text("second")
    (tmp_path / "b" / "d.txt").write_text("  \n\t ")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / ".hidden_dir" / "x.txt").write_text("hidden too")
    (tmp_path / "z.txt").write_bytes(b"bad \xff byte")
    log = ReadLog()
    assert list(iter_documents(str(tmp_path), log=log)) == ["first", "second"]  # z.txt is not UTF-8
    assert log.files == 3 and list(log.skipped) == [str(tmp_path / "z.txt")]
    assert list(iter_documents(tmp_path / "a.txt")) == ["first"]


def write_bad_files(root):
    """Two text files and one of each kind of file that is not UTF-8 text; their reasons, by name."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text("a first document")
    (root / "b.md").write_bytes(b"\xef\xbb\xbfa second one, behind a UTF-8 byte-order mark")
    bad = {"image.png": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "a PNG image"),
           "text.gz": (gzip.compress(b"compressed text"), "gzip-compressed"),
           "utf16.txt": ("UTF-16 text".encode("utf-16"), "UTF-16 text: convert it to UTF-8"),
           "utf16le.txt": ("no mark".encode("utf-16-le"), "a NUL byte at offset 1"),
           "latin1.txt": ("café".encode("latin-1"), r"not UTF-8 \(byte 0xe9 at offset 3\)"),
           "records.jsonl": (b"\x00\x01binary", "a NUL byte at offset 0"),
           "table.parquet": (b"not parquet at all", "not a Parquet file")}
    for name, (raw, _) in bad.items():
        (root / name).write_bytes(raw)
    return {name: why for name, (_, why) in bad.items()}


def test_files_that_are_not_text_are_left_out_with_a_reason(tmp_path, capsys):
    reasons = write_bad_files(tmp_path / "corpus")
    log = ReadLog()
    docs = list(iter_documents(tmp_path / "corpus", log=log))
    assert docs == ["a first document", "a second one, behind a UTF-8 byte-order mark"]
    assert log.files == 2 and sorted(Path(f).name for f in log.skipped) == sorted(reasons)
    warned = capsys.readouterr().err
    for name, why in reasons.items():
        assert re.search(why, log.skipped[str(tmp_path / "corpus" / name)]), name
        assert f"warning: skipping {tmp_path / 'corpus' / name}: " in warned
    for name, why in reasons.items():  # refused one by one, each naming itself
        with pytest.raises(ValueError, match=f"{re.escape(name)}: .*{why}.*--on-bad-file skip"):
            list(iter_documents(tmp_path / "corpus" / name, on_bad_file="error"))
    with pytest.raises(ValueError, match=r"holds no non-empty document; left out as not text: .*image\.png \(a PNG"):
        list(iter_documents(tmp_path / "corpus" / "image.png"))
    with pytest.raises(ValueError, match="on_bad_file must be one of skip, error"):
        iter_documents(tmp_path / "corpus", on_bad_file="ignore")


def test_a_jsonl_file_that_turns_bad_after_its_start_names_the_line(tmp_path):
    file = tmp_path / "data.jsonl"  # the start (64 KB) is checked as a whole; a later line on its own
    file.write_bytes(b'{"text": "fine"}\n' * 5000 + b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl, line 5001: not UTF-8 \(byte 0xe9\)"):
        list(iter_documents(file))


def test_jsonl_source_reads_the_field_and_names_a_bad_line(tmp_path):
    file = tmp_path / "data.jsonl"
    file.write_text(json.dumps({"content": "one", "text": 1}) + "\n\n" + json.dumps({"content": "two"}) + "\n")
    assert list(iter_documents(str(file), jsonl_field="content")) == ["one", "two"]
    with pytest.raises(ValueError, match=r"data\.jsonl, line 1: field 'text'"):
        list(iter_documents(str(file)))
    with pytest.raises(ValueError, match=r"line 3: field 'content'"):
        file.write_text('{"content": "a"}\n\n{"other": "b"}\n')
        list(iter_documents(str(file), jsonl_field="content"))


def test_parquet_source_reads_the_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    file = tmp_path / "data.parquet"
    pq.write_table(pa.table({"body": ["alpha", None, "beta", ""], "n": [1, 2, 3, 4]}), file)
    assert list(iter_documents(str(file), parquet_column="body")) == ["alpha", "beta"]
    with pytest.raises(ValueError, match=r"no column 'text'.*body, n"):
        list(iter_documents(str(file)))
    with pytest.raises(ValueError, match="not text"):
        list(iter_documents(str(file), parquet_column="n"))


def test_python_stdlib_source_yields_code():
    assert SOURCES == ("shakespeare", "python-stdlib")
    docs = list(itertools.islice(iter_documents("python-stdlib"), 50))
    assert len(docs) == 50
    assert sum("def " in d or "import " in d for d in docs) >= 40


def test_shakespeare_source_yields_the_works():
    docs = list(iter_documents("shakespeare"))
    assert 38 <= len(docs) <= 44
    assert all("by William Shakespeare" in d[:200] for d in docs)
    assert sum(len(d) > 50_000 for d in docs) >= 35  # the plays; a few poems are short
    assert any(d.startswith("HAMLET") for d in docs)
    assert docs == list(iter_documents("shakespeare"))  # a fixed order


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        iter_documents(str(tmp_path / "nowhere"))  # at the call, before iteration
    (tmp_path / "blank.txt").write_text("   \n")
    with pytest.raises(ValueError, match=r"empty corpus.*" + str(tmp_path.name)):
        list(iter_documents(str(tmp_path)))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 1: not valid JSON"):
        list(iter_documents(str(tmp_path / "bad.jsonl")))


# --------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_is_deterministic_byte_level_with_eos_zero():
    docs = make_docs(40)
    a, b = train_tokenizer(docs, 350), train_tokenizer(iter(docs), 350)
    assert a.to_str() == b.to_str()
    assert eos_id(a) == 0 and a.id_to_token(0) == EOS
    assert 257 < a.get_vocab_size() <= 350
    text = "unseen bytes: Ωμέγα 🙂 \x00\t"
    assert a.decode(a.encode(text).ids) == text  # byte-level: nothing is unknown
    assert train_tokenizer(make_docs(40, seed=1), 350).to_str() != a.to_str()


@pytest.mark.parametrize("bad", [257, 0, 300.0, True, "300"])
def test_tokenizer_rejects_bad_vocab_size(bad):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["some text"], bad)


def test_load_tokenizer_errors(tmp_path):
    tokenizer = train_tokenizer(make_docs(10), 300)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert load_tokenizer(tmp_path / "tokenizer.json").to_str() == tokenizer.to_str()
    assert load_tokenizer(tmp_path).to_str() == tokenizer.to_str()  # a directory holding tokenizer.json
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer"):
        load_tokenizer(tmp_path / "junk.json")
    Tokenizer(models.BPE()).save(str(tmp_path / "no_eos.json"))
    with pytest.raises(ValueError, match="no '<|endoftext|>' token"):
        load_tokenizer(tmp_path / "no_eos.json")


# ------------------------------------------------------------------------------------------ shards

def test_build_ends_every_document_with_eos_and_splits_by_document(built):
    out, index, docs = built
    shards = TokenShards(out)
    assert shards.index == index == json.loads((out / "index.json").read_text())
    assert (shards.eos_id, index["dtype"], sorted(shards.splits)) == (0, "uint16", ["train", "val"])
    assert shards.vocab_size == load_tokenizer(shards.tokenizer_path).get_vocab_size() <= 320
    train, val = split_documents(shards, "train"), split_documents(shards, "val")
    assert len(val) == index["splits"]["val"]["documents"] == round(0.2 * len(docs))
    assert len(train) == index["splits"]["train"]["documents"] == len(docs) - len(val)
    assert not set(train) & set(val)
    assert sorted(train + val) == sorted(docs)  # exact round trip, the literal EOS string included
    assert [d for d in docs if d in set(train)] == train  # each split keeps corpus order
    for name in ("train", "val"):
        ids = shards.split(name).read(0, index["splits"][name]["tokens"])
        assert (ids == 0).sum() == index["splits"][name]["documents"]


def test_build_is_byte_identical_for_the_same_seed(corpus, tmp_path):
    root, _ = corpus
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        build_shards(str(root), tmp_path / name, vocab_size=300, val_fraction=0.2, seed=seed, shard_tokens=500,
                     progress=False)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "train_001.bin" in files and "tokenizer.json" in files and not any(f.endswith(".tmp") for f in files)
    assert files == sorted(p.name for p in (tmp_path / "b").iterdir())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "val_000.bin").read_bytes() != (tmp_path / "c" / "val_000.bin").read_bytes()


def test_no_validation_split_without_fraction_or_with_one_document(corpus, tmp_path):
    root, docs = corpus
    index = build_shards(str(root), tmp_path / "a", vocab_size=300, val_fraction=0.0, progress=False)
    assert list(index["splits"]) == ["train"] and index["splits"]["train"]["documents"] == len(docs)
    one = write_txt_corpus(tmp_path / "one", ["just one document"])
    index = build_shards(str(one), tmp_path / "b", vocab_size=300, val_fraction=0.5, progress=False)
    assert list(index["splits"]) == ["train"]
    with pytest.raises(ValueError, match="no split 'val'.*available: train"):
        TokenShards(tmp_path / "b").split("val")


def test_list_of_sources_and_a_given_tokenizer(built, corpus, tmp_path):
    out, _, docs = built
    root, _ = corpus
    extra = write_txt_corpus(tmp_path / "extra", ["an extra document"])
    index = build_shards([str(root), str(extra)], tmp_path / "o", tokenizer=str(out / "tokenizer.json"),
                         val_fraction=0.0, progress=False)
    assert index["sources"] == [str(root), str(extra)]
    assert (tmp_path / "o" / "tokenizer.json").read_bytes() == (out / "tokenizer.json").read_bytes()
    assert split_documents(TokenShards(tmp_path / "o"), "train") == docs + ["an extra document"]


def test_dtype_is_uint32_when_the_vocabulary_exceeds_uint16(corpus, tmp_path):
    root, docs = corpus
    tokenizer = train_tokenizer(docs, 300)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(65_536)])
    tokenizer.save(str(tmp_path / "big.json"))
    tokenizer.encode_special_tokens = True  # as build_shards encodes: a literal EOS in a document is text
    index = build_shards(str(root), tmp_path / "o", tokenizer=str(tmp_path / "big.json"), val_fraction=0.0,
                         progress=False)
    assert index["dtype"] == "uint32" and index["vocab_size"] > 65_536
    n = index["splits"]["train"]["tokens"]
    assert (tmp_path / "o" / "train_000.bin").stat().st_size == 4 * n
    expected = [i for d in docs for i in tokenizer.encode(d, add_special_tokens=False).ids + [0]]
    assert TokenShards(tmp_path / "o").split("train").read(0, n).tolist() == expected


def test_stream_reads_across_shard_boundaries(built, corpus, tmp_path):
    root, _ = corpus
    index = build_shards(str(root), tmp_path, vocab_size=320, val_fraction=0.2, shard_tokens=7, progress=False)
    shards = index["splits"]["train"]["shards"]
    assert len(shards) > 10 and all(s["tokens"] <= 7 for s in shards)
    stream = TokenShards(tmp_path).split("train")
    whole = np.concatenate([np.fromfile(tmp_path / s["file"], dtype="<u2") for s in shards]).astype(np.int64)
    assert len(stream) == len(whole) == index["splits"]["train"]["tokens"]
    # Same tokens as the single-shard build of the same corpus.
    assert np.array_equal(whole, TokenShards(built[0]).split("train").read(0, len(whole)))
    for start, n in [(0, 7), (5, 3), (6, 2), (3, 40), (0, len(whole)), (len(whole) - 9, 9), (len(whole), 0)]:
        out = stream.read(start, n)
        assert out.dtype == np.int64 and np.array_equal(out, whole[start:start + n]), (start, n)
    with pytest.raises(IndexError):
        stream.read(len(whole) - 1, 2)


def test_build_errors(corpus, tmp_path):
    root, _ = corpus
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="val_fraction"):
            build_shards(str(root), tmp_path / "o", val_fraction=bad, progress=False)
    for bad in (0, -5, 1.5):
        with pytest.raises(ValueError, match="shard_tokens"):
            build_shards(str(root), tmp_path / "o", shard_tokens=bad, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty corpus"):
        build_shards(str(tmp_path / "empty"), tmp_path / "o", progress=False)
    with pytest.raises(FileNotFoundError):
        build_shards(str(tmp_path / "missing"), tmp_path / "o", progress=False)
    assert not (tmp_path / "o" / "index.json").exists()


def test_a_build_records_what_it_read_and_left_out(tmp_path):
    reasons = write_bad_files(tmp_path / "corpus")
    index = build_shards(str(tmp_path / "corpus"), tmp_path / "out", vocab_size=300, val_fraction=0, progress=False)
    assert index["read"]["files"] == 2 and index["read"]["documents"] == 2
    assert sorted(Path(s["file"]).name for s in index["read"]["skipped"]) == sorted(reasons)
    assert "\ufffd" not in "".join(split_documents(TokenShards(tmp_path / "out"), "train"))
    before = {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()}
    with pytest.raises(ValueError, match="--on-bad-file skip"):  # refused before the old build is touched
        build_shards(str(tmp_path / "corpus"), tmp_path / "out", vocab_size=300, on_bad_file="error", progress=False)
    assert {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()} == before


def test_each_split_records_the_sha256_of_its_tokens(built, corpus, tmp_path):
    out, index, _ = built
    for name, split in index["splits"].items():
        stored = b"".join((out / s["file"]).read_bytes() for s in split["shards"])
        assert split["sha256"] == hashlib.sha256(stored).hexdigest()
        assert TokenShards(out).split(name).sha256 == split["sha256"]
    resharded = build_shards(str(corpus[0]), tmp_path, vocab_size=320, val_fraction=0.2, shard_tokens=7,
                             progress=False)
    assert len(resharded["splits"]["train"]["shards"]) > 1
    assert resharded["splits"]["train"]["sha256"] == index["splits"]["train"]["sha256"]  # the tokens, not the files


def test_opening_bad_shard_directories(built, tmp_path):
    out, index, _ = built
    with pytest.raises(FileNotFoundError, match="samba-lm data"):
        TokenShards(tmp_path)
    for name in ("index.json", "tokenizer.json", "train_000.bin", "val_000.bin"):
        (tmp_path / name).write_bytes((out / name).read_bytes())
    TokenShards(tmp_path)
    with open(tmp_path / "train_000.bin", "ab") as f:
        f.write(b"\x00")
    with pytest.raises(ValueError, match=r"train_000\.bin holds .* bytes but the index says"):
        TokenShards(tmp_path)
    (tmp_path / "train_000.bin").write_bytes((out / "train_000.bin").read_bytes()[:-2])
    with pytest.raises(ValueError, match="bytes but the index says"):
        TokenShards(tmp_path)
    (tmp_path / "index.json").write_text('{"format": "samba-lm-shards/1", "dtype": "int8"')
    with pytest.raises(ValueError, match="corrupt"):
        TokenShards(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({**index, "dtype": "int8"}))
    with pytest.raises(ValueError, match="dtype"):
        TokenShards(tmp_path)


def test_shakespeare_end_to_end(tmp_path):
    index = build_shards("shakespeare", tmp_path, vocab_size=512, progress=False)
    n = len(list(iter_documents("shakespeare")))
    assert index["splits"]["val"]["documents"] == round(0.05 * n)
    assert index["splits"]["train"]["documents"] + index["splits"]["val"]["documents"] == n
    shards = TokenShards(tmp_path)
    for name, split in index["splits"].items():
        stream = shards.split(name)
        assert (stream.read(0, len(stream)) == shards.eos_id).sum() == split["documents"]
    text = load_tokenizer(shards.tokenizer_path).decode(shards.split("train").read(0, 200).tolist())
    assert "Shakespeare" in text


# ------------------------------------------------------------------------------------------ loader

def test_loader_blocks_are_stream_slices_and_an_epoch_covers_each_once(tmp_path):
    stream = write_stream(tmp_path, 1000, shard_tokens=64)
    seq_len = 9
    plain = BlockLoader(stream, seq_len, shuffle=False)
    assert plain.n_blocks == 100
    batch = plain.next_batch(4)
    assert batch.dtype == torch.int64 and batch.shape == (4, 10)
    for i in range(4):
        assert torch.equal(batch[i], torch.from_numpy(stream.read(i * 10, 10)))
    loader = BlockLoader(stream, seq_len, seed=5)
    rows = torch.cat([loader.next_batch(10) for _ in range(10)])
    # Tokens are 0, 1, 2, ...: every row is one whole block, and an epoch visits each block once.
    assert torch.equal(rows - rows[:, :1], torch.arange(10).expand(100, 10))
    assert (rows[:, 0] % 10 == 0).all()
    assert sorted((rows[:, 0] // 10).tolist()) == list(range(100))
    order = torch.randperm(100, generator=torch.Generator().manual_seed(5 * 1_000_003 + 0))
    assert torch.equal(rows[:, 0] // 10, order)
    assert loader.position == 100 and loader.epoch == 1


def test_loader_order_is_deterministic_per_seed_and_epoch(tmp_path):
    stream = write_stream(tmp_path, 2000, shard_tokens=300)
    first = [BlockLoader(stream, 15, seed=1).next_batch(125) for _ in range(2)]
    assert torch.equal(first[0], first[1])
    assert not torch.equal(first[0], BlockLoader(stream, 15, seed=2).next_batch(125))
    loader = BlockLoader(stream, 15, seed=1)
    epoch0, epoch1 = loader.next_batch(125), loader.next_batch(125)
    assert torch.equal(epoch0, first[0]) and not torch.equal(epoch0, epoch1)
    assert torch.equal(epoch0[:, 0].sort().values, epoch1[:, 0].sort().values)


def test_loader_crosses_the_epoch_boundary(tmp_path):
    stream = write_stream(tmp_path, 105, shard_tokens=50)  # 10 blocks of 10; 5 tokens dropped
    loader = BlockLoader(stream, 9, seed=7)
    perms = [torch.randperm(10, generator=torch.Generator().manual_seed(7 * 1_000_003 + e)) for e in range(3)]
    expected = torch.cat(perms) * 10
    starts = torch.cat([loader.next_batch(4)[:, 0] for _ in range(6)])  # 24 blocks: into epoch 2
    assert torch.equal(starts, expected[:24])
    assert loader.position == 24 and loader.epoch == 2
    big = BlockLoader(stream, 9, seed=7).next_batch(25)  # one batch longer than an epoch
    assert torch.equal(big[:, 0], expected[:25])


def test_ranks_partition_the_single_process_batch(tmp_path):
    stream = write_stream(tmp_path, 3000, shard_tokens=128)
    single = BlockLoader(stream, 7, seed=3)
    ranks = [BlockLoader(stream, 7, seed=3, rank=r, world_size=4) for r in range(4)]
    for _ in range(12):  # 375 blocks / 32 per step: crosses an epoch
        parts = [loader.next_batch(32) for loader in ranks]
        assert all(p.shape == (8, 8) for p in parts)
        assert torch.equal(torch.cat(parts), single.next_batch(32))
    assert all(loader.position == single.position for loader in ranks)
    with pytest.raises(ValueError, match="divisible by world_size 4"):
        ranks[0].next_batch(30)
    with pytest.raises(ValueError, match="rank"):
        BlockLoader(stream, 7, rank=4, world_size=4)


def test_resume_from_state_dict_continues_exactly(tmp_path):
    stream = write_stream(tmp_path, 5000, shard_tokens=999)
    uninterrupted = BlockLoader(stream, 31, seed=11)
    for _ in range(7):
        uninterrupted.next_batch(24)
    state = uninterrupted.state_dict()
    assert state == {"position": 168, "seq_len": 31, "seed": 11, "n_blocks": 156, "data_sha256": None}
    resumed = BlockLoader(stream, 31, seed=11)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as stored in a checkpoint
    two_ranks = [BlockLoader(stream, 31, seed=11, rank=r, world_size=2) for r in range(2)]
    for loader in two_ranks:  # a resume may change the world size
        loader.load_state_dict(state)
    for _ in range(10):
        expected = uninterrupted.next_batch(24)
        assert torch.equal(resumed.next_batch(24), expected)
        assert torch.equal(torch.cat([loader.next_batch(24) for loader in two_ranks]), expected)


def test_load_state_dict_rejects_another_run(tmp_path):
    stream = write_stream(tmp_path / "a", 1000, shard_tokens=1000)
    loader = BlockLoader(stream, 9, seed=0)
    state = loader.state_dict()
    for key, other in (("seq_len", BlockLoader(stream, 19, seed=0)), ("seed", BlockLoader(stream, 9, seed=1)),
                       ("n_blocks", BlockLoader(write_stream(tmp_path / "b", 900, 1000), 9, seed=0))):
        with pytest.raises(ValueError, match=key):
            other.load_state_dict(state)
    with pytest.raises(ValueError, match="position"):
        loader.load_state_dict({**state, "position": -1})


def test_load_state_dict_rejects_other_data_of_the_same_size(tmp_path):
    paths = write_stream(tmp_path, 1000, shard_tokens=1000).paths
    ours, theirs = (BlockLoader(TokenStream(paths, "<u2", sha256=h), 9) for h in ("a" * 64, "b" * 64))
    with pytest.raises(ValueError, match="data differs.*bbbbbbbbbbbb.*aaaaaaaaaaaa"):
        theirs.load_state_dict(ours.state_dict())
    unknown = BlockLoader(TokenStream(paths, "<u2"), 9)  # shards or a checkpoint from before fingerprints
    unknown.load_state_dict(ours.state_dict())
    ours.load_state_dict({k: v for k, v in unknown.state_dict().items() if k != "data_sha256"})


def test_seq_len_longer_than_the_data(tmp_path):
    stream = write_stream(tmp_path, 50, shard_tokens=20)
    with pytest.raises(ValueError, match=r"seq_len 50 is longer than the data.*51.*holds 50"):
        BlockLoader(stream, 50)
    assert BlockLoader(stream, 49).n_blocks == 1
