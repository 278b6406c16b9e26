"""`samba-lm eval ppl`: streamed NLL == full forward, bucket and prefix arithmetic, flat memory, the
result files, argument errors, and the long-document sources (janeaustenr's R database included)."""

import argparse
import bz2
import gc
import gzip
import json
import lzma
import math
import struct
import sys
import tracemalloc
import zlib

import pytest
import torch
import torch.nn.functional as F
from conftest import small_model

from samba_lm import model as samba_model
from samba_lm import save_pretrained
from samba_lm.data import train_tokenizer
from samba_lm.eval import ppl
from samba_lm.eval.documents import AUSTEN_NOVELS, iter_long_documents, read_lazyload_db
from samba_lm.ops import linear_cross_entropy

SAMBA = ("mamba", "mlp", "swa", "mlp")  # no full attention: its cache grows with the stream


def full_forward_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """NLL of positions 1..L-1 from one teacher-forced forward."""
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1]
    return F.cross_entropy(logits, ids[1:], reduction="none").double()


# ------------------------------------------------------------------------------------------ streaming
@pytest.mark.parametrize("chunk_size", [1, 7, 45])
def test_streamed_nll_equals_the_full_forward(chunk_size):
    """Every position, through the prefix sums: prefix_sum[N + 1] - prefix_sum[N] is position N's NLL."""
    model = small_model()  # float64, every layer kind, window 8
    ids = torch.randint(0, 97, (45,))
    sums = ppl.stream_nll(model, ids, chunk_size, lengths=range(2, 46), progress=False)
    cumulative = torch.tensor([0.0] + [sums.prefix_sum[n] for n in range(2, 46)], dtype=torch.float64)
    expected = full_forward_nll(model, ids)
    torch.testing.assert_close(cumulative.diff(), expected, rtol=1e-10, atol=1e-10)
    assert sums.tokens == 45 and sums.bucket_count == [44]
    assert sums.bucket_sum[0] == pytest.approx(expected.sum().item(), rel=1e-12)


def test_stream_nll_equals_the_old_per_chunk_logits():
    """The numbers of the code before the head went through labels: each chunk's full logits, then
    F.cross_entropy. stream_nll must give them (float32), and ask the model for losses, not logits."""
    model = small_model(torch.float32, layers=SAMBA)
    ids, chunk_size, lengths = torch.randint(0, 97, (1300,)), 300, [2, 500, 1024, 1300]
    outputs = []
    hook = model.register_forward_hook(lambda module, args, output: outputs.append(output))
    try:
        sums = ppl.stream_nll(model, ids, chunk_size, lengths, progress=False)
    finally:
        hook.remove()
    assert outputs and all(o.logits is None and o.losses is not None for o in outputs)
    state, nll = model.init_state(1), []
    with torch.no_grad():
        for s in range(0, 1299, chunk_size):
            chunk = ids[s:min(s + chunk_size, 1299) + 1]
            logits = model(chunk[None, :-1], state=state).logits[0]
            nll.append(F.cross_entropy(logits, chunk[1:], reduction="none").double())
    nll = torch.cat(nll)
    assert sums.bucket_count == [1023, 276]
    assert sums.bucket_sum == pytest.approx([nll[:1023].sum().item(), nll[1023:].sum().item()], rel=1e-6)
    assert sums.prefix_sum == pytest.approx({n: nll[:n - 1].sum().item() for n in lengths}, rel=1e-6)


def test_buckets_and_prefix_averages_match_a_direct_computation():
    """Two documents across the 1K and 2K edges, chunks (700) that straddle them."""
    model = small_model(torch.float32, layers=SAMBA)
    docs = [torch.randint(0, 97, (2600,)), torch.randint(0, 97, (1500,))]
    lengths = [2, 1000, 1024, 1500, 2048, 2600, 4096]
    results = [ppl.stream_nll(model, ids, 700, lengths, progress=False) for ids in docs]
    nlls = [full_forward_nll(model, ids) for ids in docs]  # index i is position i + 1

    def bucket_mean(lo, hi):
        parts = [nll[max(lo, 1) - 1:hi - 1] for nll in nlls]
        return torch.cat(parts).mean().item(), sum(p.numel() for p in parts)

    agg = ppl.summarize(results, lengths)
    assert [b["bucket"] for b in agg["buckets"]] == ["0-1K", "1K-2K", "2K-4K"]
    for b, (lo, hi) in zip(agg["buckets"], [(0, 1024), (1024, 2048), (2048, 4096)]):
        mean, count = bucket_mean(lo, hi)
        assert (b["start"], b["end"], b["tokens"]) == (lo, hi, count)
        assert b["nll"] == pytest.approx(mean, rel=1e-5) and b["ppl"] == pytest.approx(math.exp(mean), rel=1e-5)
    for p in agg["prefix"]:
        n = p["length"]
        reached = [nll[:n - 1] for nll in nlls if len(nll) + 1 >= n]  # a shorter document does not count
        assert (p["documents"], p["tokens"]) == (len(reached), len(reached) * (n - 1))
        if reached:
            assert p["nll"] == pytest.approx(torch.cat(reached).mean().item(), rel=1e-5)
        else:
            assert p["nll"] is None and p["ppl"] is None
    assert [p["documents"] for p in agg["prefix"]] == [2, 2, 2, 2, 1, 1, 0]
    assert agg["nll"] == pytest.approx(torch.cat(nlls).mean().item(), rel=1e-5)
    assert (agg["tokens"], agg["predicted"]) == (4100, 4098)

    short = ppl.summarize([results[1]], lengths)
    assert [b["tokens"] for b in short["buckets"]] == [1023, 476]
    assert short["nll"] == pytest.approx(nlls[1].mean().item(), rel=1e-5)


def test_memory_stays_flat_in_the_document_length(monkeypatch):
    """Streaming 8K tokens must leave no more behind than streaming 1K.

    Measured at the last chunk (a forward hook), when anything kept per position is largest: the bytes
    of every live torch tensor (found through `gc`, storages counted once, leaving out the weights and
    the caller's token ids), and tracemalloc's peak for Python and numpy memory. Exact counts, unlike
    RSS, so the allowances are small: 2 KB of tensors, 8 KB of Python memory (whose peak wanders by a
    few KB between runs, whatever the length), while a float32 per token over 7K tokens is 28 KB.
    The same meter is run on two leaky variants (per-chunk losses kept as tensors, then as Python
    floats) to show that it catches them: the test cannot pass by measuring nothing.
    """
    model = small_model(torch.float32, layers=SAMBA)

    def measure(n_tokens):
        ids = torch.randint(0, 97, (n_tokens,))
        own = {ids.untyped_storage().data_ptr()} | {b.untyped_storage().data_ptr() for b in model.buffers()}
        fed, seen = [0], {}

        def at_last_chunk(module, args, output):
            fed[0] += args[0].shape[1]
            if fed[0] == n_tokens - 1:
                seen["python"] = tracemalloc.get_traced_memory()[1]
                storages = {}
                for obj in gc.get_objects():
                    if issubclass(type(obj), torch.Tensor) and not isinstance(obj, torch.nn.Parameter):
                        try:
                            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
                        except RuntimeError:  # a fake tensor that an earlier torch.compile test left: no memory
                            continue
                seen["tensors"] = sum(n for ptr, n in storages.items() if ptr not in own)
                del storages
                tracemalloc.reset_peak()  # the meter's own allocations are not stream_nll's

        hook = model.register_forward_hook(at_last_chunk)
        tracemalloc.start()
        try:
            ppl.stream_nll(model, ids, 512, lengths=[1024, 2048], progress=False)
            python = max(seen["python"], tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
            hook.remove()
        return seen["tensors"], python

    short, long = measure(1024), measure(8192)
    assert long[0] - short[0] <= 2048 and long[1] - short[1] <= 8192, (short, long)

    kept = []
    for keep in (lambda nll: nll, lambda nll: nll.tolist()):
        def leaky_cross_entropy(*args, **kwargs):  # stream_nll's losses come from the model's head op
            loss, nll = linear_cross_entropy(*args, **kwargs)
            kept.append(keep(nll))
            return loss, nll

        monkeypatch.setattr(samba_model, "linear_cross_entropy", leaky_cross_entropy)
        leaky = measure(8192)
        assert leaky[0] - short[0] > 20_000 or leaky[1] - short[1] > 20_000, (short, leaky)
        kept.clear()


def test_stream_nll_argument_errors():
    model = small_model(torch.float32, layers=SAMBA)
    for ids, kwargs, match in [(torch.zeros(2, 5, dtype=torch.long), {}, "1-D"),
                               (torch.zeros(1, dtype=torch.long), {}, "at least 2"),
                               (torch.zeros(5), {}, "integer"),
                               (torch.zeros(5, dtype=torch.long), {"chunk_size": 0}, "chunk_size"),
                               (torch.zeros(5, dtype=torch.long), {"lengths": [1]}, "lengths")]:
        with pytest.raises(ValueError, match=match):
            ppl.stream_nll(model, ids, progress=False, **kwargs)


# ------------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny random model with a 300-token BPE beside it, and a corpus of two text files."""
    root = tmp_path_factory.mktemp("ppl")
    text = " ".join(f"line {i} of a long story about the number {i * 7 % 13}." for i in range(600))
    tokenizer = train_tokenizer([text], 300)
    model = small_model(torch.float32, vocab_size=tokenizer.get_vocab_size(), layers=SAMBA)
    save_pretrained(model, root / "model")
    tokenizer.save(str(root / "model" / "tokenizer.json"))
    (root / "docs" / "more").mkdir(parents=True)
    (root / "docs" / "long.txt").write_text(text)
    (root / "docs" / "more" / "short.txt").write_text(text[:900])
    (root / "docs" / ".hidden").write_text("not a document")
    return root


def parse(*argv):
    parser = argparse.ArgumentParser()
    ppl.add_arguments(parser)
    return parser.parse_args(["--no-progress", *argv])


def test_run_writes_json_and_plot(saved_model, tmp_path, capsys):
    out = tmp_path / "out"
    payload = ppl.run(parse("--model", str(saved_model / "model"), "--source", str(saved_model / "docs"),
                            "--max-tokens", "3000", "--chunk-size", "500", "--device", "cpu", "--out", str(out)))
    on_disk = json.loads((out / "ppl.json").read_text())
    assert on_disk == json.loads(json.dumps(payload))
    record = on_disk["run_record"]
    assert {"command", "model_path", "weights_sha256", "config", "samba_lm", "torch", "date"} <= set(record)
    assert record["model_path"] == str(saved_model / "model") and record["config"]["layers"] == list(SAMBA)
    names = [d["name"] for d in on_disk["documents"]]
    assert names == ["long.txt", "more/short.txt"]  # sorted, hidden files left out
    long_doc, short_doc = on_disk["documents"]
    assert long_doc["tokens"] == 3000 > short_doc["tokens"]  # --max-tokens truncates
    assert on_disk["lengths"] == [1024, 2048]  # default: 1K, 2K, ... up to the longest document
    assert [p["documents"] for p in on_disk["aggregate"]["prefix"]] == [1, 1]
    assert on_disk["aggregate"]["tokens"] == 3000 + short_doc["tokens"]
    assert all(math.isfinite(b["ppl"]) for b in on_disk["aggregate"]["buckets"])
    printed = capsys.readouterr().out
    assert "1K-2K" in printed and "ppl.json" in printed
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (out / "ppl.png").exists() and "plot was skipped" in printed
    else:
        assert (out / "ppl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_plot_is_skipped(saved_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    ppl.run(parse("--model", str(saved_model / "model"), "--source", str(saved_model / "docs" / "long.txt"),
                  "--max-tokens", "300", "--lengths", "100,200", "--out", str(tmp_path)))
    assert (tmp_path / "ppl.json").is_file() and not (tmp_path / "ppl.png").exists()
    assert "matplotlib is not installed: no plot" in capsys.readouterr().out


@pytest.mark.parametrize("argv, error, match", [
    (["--chunk-size", "0"], ValueError, "--chunk-size must be >= 1"),
    (["--max-tokens", "1"], ValueError, "--max-tokens must be >= 2"),
    (["--lengths", "1K,1"], ValueError, "--lengths: 1 is not a prefix length"),
    (["--device", "nowhere"], ValueError, "--device must be"),
    (["--source", "no/such/place"], FileNotFoundError, "document source 'no/such/place' does not exist"),
])
def test_run_argument_errors(saved_model, tmp_path, argv, error, match):
    with pytest.raises(error, match=match):
        ppl.run(parse("--model", str(saved_model / "model"), "--out", str(tmp_path), *argv))


def test_a_model_without_tokenizer_is_refused(saved_model, tmp_path):
    model = small_model(torch.float32, layers=SAMBA)
    save_pretrained(model, tmp_path / "bare")
    with pytest.raises(ValueError, match="--model: no tokenizer.json"):
        ppl.run(parse("--model", str(tmp_path / "bare"), "--source", str(saved_model / "docs")))


def test_encoding_in_pieces_equals_one_encode():
    text = "".join(f"Line {i}:  naïve café 日本 {i * 31}.  \n\n  indented\n's quoted\t\n" for i in range(300))
    tokenizer = train_tokenizer([text], 300)
    whole = tokenizer.encode(text).ids
    assert ppl.encode_long(tokenizer, text, piece_chars=40).tolist() == whole  # about 500 pieces
    assert ppl.encode_long(tokenizer, text, max_tokens=1000, piece_chars=40).tolist() == whole[:1000]


def test_lengths_are_sorted_without_repeats():
    lengths = parse("--model", "m", "--lengths", "4K, 1k,1M,3000,4096").lengths
    assert ppl.check_lengths(lengths) == [1024, 3000, 4096, 2**20]


# ----------------------------------------------------------------------------------------- sources
def test_shakespeare_is_one_long_document():
    (name, text), = list(iter_long_documents("shakespeare"))
    assert name == "shakespeare" and len(text) > 4_000_000 and "HAMLET" in text


def r_serialize(value) -> bytes:
    """R's XDR serialization (version 3) of str/None lists (character vectors), int lists, bools and
    dicts (named lists); repeated symbols as references, like R writes them."""
    out, symbols = [b"X\n", struct.pack(">iiii", 3, 0x040201, 0x030500, 5), b"UTF-8"], []

    def charsxp(s, latin1=False):
        if s is None:
            out.append(struct.pack(">ii", 9, -1))
        else:
            raw = s.encode("latin-1" if latin1 else "utf-8")
            out.append(struct.pack(">ii", 9 | ((4 if latin1 else 8) << 12), len(raw)) + raw)

    def item(x):
        if isinstance(x, dict):
            out.append(struct.pack(">ii", 19 | (1 << 9), len(x)))
            for v in x.values():
                item(v)
            out.append(struct.pack(">i", 2 | (1 << 10)))  # attributes: pairlist(names = ...)
            if "names" in symbols:
                out.append(struct.pack(">i", 255 | (symbols.index("names") + 1) << 8))
            else:
                symbols.append("names")
                out.append(struct.pack(">i", 1))
                charsxp("names")
            item(list(x))
            out.append(struct.pack(">i", 254))
        elif isinstance(x, bool):
            out.append(struct.pack(">iii", 10, 1, int(x)))
        elif all(isinstance(v, int) for v in x) and x:
            out.append(struct.pack(f">ii{len(x)}i", 13, len(x), *x))
        else:
            out.append(struct.pack(">ii", 16, len(x)))
            for s in x:
                charsxp(s, latin1=s == "café")

    item(value)
    return b"".join(out)


def write_lazyload_db(data_dir, objects: dict, compression):
    """What R's makeLazyLoadDB writes: Rdata.rdb (length-prefixed compressed objects), Rdata.rdx (index)."""
    data_dir.mkdir(parents=True)
    blob, variables = b"", {}
    for name, value in objects.items():
        raw = r_serialize(value)
        body = {1: lambda r: zlib.compress(r), 2: lambda r: b"2" + bz2.compress(r),
                3: lambda r: b"Z" + lzma.compress(r, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])}
        entry = struct.pack(">I", len(raw)) + body[compression](raw)
        variables[name] = [len(blob), len(entry)]
        blob += entry
    (data_dir / "Rdata.rdb").write_bytes(blob)
    index = {"variables": variables, "references": {}, "compressed": True if compression == 1 else [compression]}
    (data_dir / "Rdata.rdx").write_bytes(gzip.compress(r_serialize(index)))


@pytest.mark.parametrize("compression", [1, 2, 3])  # gzip, bzip2, xz: R's three lazy-load formats
def test_austen_reads_the_r_database(tmp_path, compression, monkeypatch):
    novels = {name: [name.upper(), "", None, "It is a truth", "café"] for name in reversed(AUSTEN_NOVELS)}
    write_lazyload_db(tmp_path / "janeaustenr" / "data", novels, compression)
    docs = list(iter_long_documents(f"austen:{tmp_path / 'janeaustenr'}"))
    assert [name for name, _ in docs] == list(AUSTEN_NOVELS)  # publication order
    assert docs[0][1] == "SENSESENSIBILITY\n\n\nIt is a truth\ncafé\n"  # NA lines read as empty
    monkeypatch.setenv("R_LIBS", str(tmp_path))  # found in an R library directory too
    assert list(iter_long_documents("austen")) == docs


def test_austen_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"janeaustenr.*apt-get install r-cran-janeaustenr"):
        iter_long_documents(f"austen:{tmp_path}")
    write_lazyload_db(tmp_path / "data", {"emma": ["x"]}, 1)
    with pytest.raises(ValueError, match="no sensesensibility, prideprejudice"):
        iter_long_documents(f"austen:{tmp_path}")
    (tmp_path / "data" / "Rdata.rdb").write_bytes(b"\0\0\0\x09garbage")
    with pytest.raises(ValueError, match="object 'emma' is corrupt"):
        read_lazyload_db(tmp_path / "data" / "Rdata")


def test_the_installed_janeaustenr():
    """R's own files, where r-cran-janeaustenr is installed (or R_LIBS points at an unpacked copy)."""
    try:
        docs = dict(iter_long_documents("austen"))
    except FileNotFoundError:
        pytest.skip("r-cran-janeaustenr is not installed")
    assert list(docs) == list(AUSTEN_NOVELS)
    assert docs["prideprejudice"].startswith("PRIDE AND PREJUDICE")
    assert 400_000 < min(map(len, docs.values())) and max(map(len, docs.values())) < 1_000_000
