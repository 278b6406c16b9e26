"""lm-eval adapter (`--model samba-lm`): log-likelihoods against one full float64 forward, rolling
log-likelihood against `stream_nll` and `samba-lm eval ppl`, generate_until against samba_lm.generate,
the local tasks through lm_eval.simple_evaluate and `samba-lm eval harness`, offline, and errors."""

import argparse
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

# Nothing may reach the Hugging Face hub: set before `datasets` (through lm_eval) reads them.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from conftest import save_small_model, small_model  # noqa: E402

import samba_lm  # noqa: E402
import samba_lm.cli  # noqa: E402
from samba_lm.data import train_tokenizer  # noqa: E402
from samba_lm.eval import harness, ppl  # noqa: E402
from samba_lm.eval.harness import TASKS_DIR, SambaHarnessLM  # noqa: E402

lm_eval = pytest.importorskip("lm_eval", reason="the adapter needs lm-eval: pip install 'samba-lm[eval]'")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

TEXT = " ".join(f"line {i} of a long story about the number {i * 7 % 13}." for i in range(600))
DOC = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
       "want of a wife. However little known the feelings or views of such a man may be on his first entering "
       "a neighbourhood, this truth is so well fixed in the minds of the surrounding families.")


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer([TEXT], 300)


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    """A tiny random float32 model with its tokenizer, as `samba-lm train` leaves one."""
    return save_small_model(tokenizer, tmp_path_factory.mktemp("harness") / "model")


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection (to the hub or elsewhere) fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def adapter(tokenizer, **kwargs) -> SambaHarnessLM:
    """A float64 model with every layer kind (window 8), in memory."""
    model = small_model(torch.float64, vocab_size=tokenizer.get_vocab_size())
    return SambaHarnessLM(model=model, tokenizer=tokenizer, device="cpu", **kwargs)


def full_forward(model, context, continuation):
    """(sum of log p(continuation | context), continuation == argmax) from one forward, in float64."""
    ids = torch.tensor(context + continuation)
    with torch.no_grad():
        logits = model(ids[None]).logits[0, len(context) - 1:-1].double()
    target = torch.tensor(continuation)
    return logits.log_softmax(-1).gather(-1, target[:, None]).sum().item(), bool((logits.argmax(-1) == target).all())


# ---------------------------------------------------------------------------------- log-likelihood
@pytest.mark.parametrize("batch_size, chunk_size", [(1, 4096), (3, 8), (5, 5)])
def test_loglikelihood_equals_one_full_forward(tokenizer, batch_size, chunk_size):
    """Contexts of 1 to 40 tokens (beyond the chunk and the window: streamed through the state), continuations
    of 1 to 20 (across chunks), batched longest first with left padding; the greedy continuation shares its
    batch with a longer one, so its greedy match must ignore positions it does not score."""
    lm = adapter(tokenizer, batch_size=batch_size, chunk_size=chunk_size)
    g, vocab = torch.Generator().manual_seed(0), lm.model.config.vocab_size
    rows = [(torch.randint(1, vocab, (n,), generator=g).tolist(), torch.randint(1, vocab, (k,), generator=g).tolist())
            for n, k in [(1, 1), (40, 3), (5, 12), (17, 1), (9, 7), (33, 2), (30, 20)]]
    context = rows[1][0]
    greedy = samba_lm.generate(lm.model, [context], 6, temperature=0.0)[0][len(context):].tolist()
    rows += [(context, greedy), (context, greedy[:-1] + [(greedy[-1] + 1) % vocab])]
    got = lm._loglikelihood_tokens([(("", ""), c, k) for c, k in rows], disable_tqdm=True)
    for (c, k), (logprob, is_greedy) in zip(rows, got):
        expected, expected_greedy = full_forward(lm.model, c, k)
        assert logprob == pytest.approx(expected, rel=1e-10, abs=1e-10)
        assert is_greedy == expected_greedy
    assert [g for _, g in got[-2:]] == [True, False]


def test_loglikelihood_of_text_requests(tokenizer):
    """Through lm-eval's own tokenization: the context's trailing space goes to the continuation, and an
    empty context is the EOT prefix."""
    lm = adapter(tokenizer, batch_size=2)
    requests = [("Question: what is the number? Answer:", " seven"), ("line 3 of a long ", "story"), ("", "line 5")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)], disable_tqdm=True)
    enc = lambda s: tokenizer.encode(s).ids  # noqa: E731
    pairs = [(enc(requests[0][0]), enc(requests[0][0] + " seven")[len(enc(requests[0][0])):]),
             (enc("line 3 of a long"), enc("line 3 of a long story")[len(enc("line 3 of a long")):]),
             ([lm.eot_token_id], enc("line 5"))]
    for (logprob, _), (c, k) in zip(got, pairs):
        assert logprob == pytest.approx(full_forward(lm.model, c, k)[0], rel=1e-10)


# ---------------------------------------------------------------------------------- rolling
def test_rolling_loglikelihood_scores_every_token_after_the_eot_prefix(tokenizer):
    """ll(doc) = sum over all n tokens of log p(token | EOT, tokens before): one float64 forward of
    [EOT] + doc; the same at any chunk size (7: many chunks, beyond the window; 4096: one)."""
    ids = [0] + tokenizer.encode(DOC).ids
    assert len(ids) > 40
    results = []
    for chunk_size in (7, 4096):
        lm = adapter(tokenizer, chunk_size=chunk_size)
        results.append(lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (DOC,), 0),
                                                 Instance("loglikelihood_rolling", {}, ("",), 1)], disable_tqdm=True))
    with torch.no_grad():
        logits = lm.model(torch.tensor(ids)[None]).logits[0, :-1]
    expected = -F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
    assert results[0][0] == pytest.approx(expected, rel=1e-10) and results[1][0] == pytest.approx(expected, rel=1e-10)
    assert results[0][1] == results[1][1] == 0.0  # an empty document: no token, log 1
    sums = ppl.stream_nll(lm.model, torch.tensor(ids), 5, progress=False)
    assert sum(sums.bucket_count) == len(ids) - 1  # every document token predicted once
    assert -sum(sums.bucket_sum) == pytest.approx(results[0][0], rel=1e-10)


def test_rolling_perplexity_agrees_with_eval_ppl(saved, tmp_path):
    """`samba-lm eval ppl` on the document written after an EOS scores the same n tokens as the
    harness's rolling log-likelihood of the document: its nll x predicted is -ll."""
    (tmp_path / "doc.txt").write_text("<|endoftext|>" + DOC)
    parser = argparse.ArgumentParser()
    ppl.add_arguments(parser)
    payload = ppl.run(parser.parse_args(["--model", str(saved), "--source", str(tmp_path / "doc.txt"), "--device",
                                         "cpu", "--chunk-size", "16", "--no-progress", "--out", str(tmp_path)]))
    lm = SambaHarnessLM(pretrained=str(saved), device="cpu", chunk_size=16)
    (ll,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (DOC,), 0)], disable_tqdm=True)
    agg = payload["aggregate"]
    assert agg["predicted"] == len(lm.tok_encode(DOC))
    assert agg["nll"] * agg["predicted"] == pytest.approx(-ll, rel=1e-9)


# ---------------------------------------------------------------------------------- generation
def test_generate_until_stops_at_the_stop_string(tokenizer):
    """Greedy text == samba_lm.generate's, cut before the stop string, per row of a batch; decoding ends
    once every row has met one (counted in forward calls)."""
    lm = adapter(tokenizer, batch_size=2, chunk_size=4)
    prompts = ["line 12 of a long story", "the number"]
    eot = lm.eot_token_id
    full = []
    for prompt in prompts:
        out = samba_lm.generate(lm.model, [tokenizer.encode(prompt).ids], 24, temperature=0.0, stop_tokens=[eot])[0]
        new = out[len(tokenizer.encode(prompt).ids):].tolist()
        full.append(tokenizer.decode([t for t in new if t != eot]))
    assert all(len(text) > 12 for text in full), full
    stops = [text[len(text) // 3:len(text) // 3 + 3] for text in full] + ["never seen"]  # one batch, same kwargs
    expected = [text[:min(text.find(s) for s in stops if s in text)] for text in full]

    def run(gen_kwargs):
        calls = []
        hook = lm.model.register_forward_hook(lambda *_: calls.append(1))
        requests = [Instance("generate_until", {}, (p, gen_kwargs(i)), i) for i, p in enumerate(prompts)]
        texts = lm.generate_until(requests, disable_tqdm=True)
        hook.remove()
        return texts, len(calls)

    texts, calls = run(lambda i: {"until": stops, "max_gen_toks": 24})
    assert texts == expected
    texts, calls_without_stop = run(lambda i: {"until": [], "max_gen_toks": 24, "do_sample": False})
    assert texts == full
    assert calls < calls_without_stop


def test_generate_until_rejects_what_it_cannot_honour(tokenizer):
    lm = adapter(tokenizer)
    with pytest.raises(ValueError, match=r"unsupported gen_kwargs \['num_beams'\]"):
        lm.generate_until([Instance("generate_until", {}, ("a", {"until": ["."], "num_beams": 4}), 0)])
    with pytest.raises(ValueError, match="until must be non-empty strings"):
        lm.generate_until([Instance("generate_until", {}, ("a", {"until": [""]}), 0)])


# ---------------------------------------------------------------------------------- tasks, offline
def test_simple_evaluate_on_the_local_multiple_choice_task(saved, no_network):
    """acc is the share of questions whose answer has the highest log-likelihood, which the test
    recomputes from the task's jsonl with the adapter's loglikelihood."""
    lm = SambaHarnessLM(pretrained=str(saved), device="cpu", batch_size=8)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=["samba_tiny_mc"], task_manager=manager, log_samples=False)
    docs = [json.loads(line) for line in (TASKS_DIR / "samba_tiny_mc.jsonl").read_text().splitlines()]
    assert results["n-samples"]["samba_tiny_mc"] == {"original": 20, "effective": 20} and len(docs) == 20
    correct = 0
    for doc in docs:
        requests = [Instance("loglikelihood", {}, (f"Question: {doc['question']}\nAnswer:", f" {c}"), 0)
                    for c in doc["choices"]]
        lls = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
        correct += max(range(len(lls)), key=lls.__getitem__) == doc["answer"]
    acc = results["results"]["samba_tiny_mc"]["acc,none"]
    assert 0 <= acc <= 1 and acc == pytest.approx(correct / 20)


def test_local_perplexity_task_uses_the_rolling_loglikelihood(saved, no_network):
    """byte_perplexity = exp(-sum of ll / sum of UTF-8 bytes) over the documents."""
    lm = SambaHarnessLM(pretrained=str(saved), device="cpu")
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=["samba_tiny_ppl"], task_manager=manager, log_samples=False)
    texts = [json.loads(line)["text"] for line in (TASKS_DIR / "samba_tiny_ppl.jsonl").read_text().splitlines()]
    nll = sum(sum(ppl.stream_nll(lm.model, torch.tensor([0] + lm.tok_encode(t)), progress=False).bucket_sum)
              for t in texts)
    expected = math.exp(nll / sum(len(t.encode()) for t in texts))
    assert results["results"]["samba_tiny_ppl"]["byte_perplexity,none"] == pytest.approx(expected, rel=1e-9)


def test_the_cli_writes_its_json(saved, tmp_path, capfd, no_network, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a git repository: git is asked quietly for lm-eval's git_hash
    samba_lm.cli.main(["eval", "harness", "--model", str(saved), "--tasks", "samba_tiny_mc,samba_tiny_ppl",
                       "--limit", "5", "--batch-size", "4", "--device", "cpu", "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "harness.json").read_text())
    assert set(payload["results"]) == {"samba_tiny_mc", "samba_tiny_ppl"}
    assert payload["n-samples"]["samba_tiny_mc"] == {"original": 20, "effective": 5}
    assert 0 <= payload["results"]["samba_tiny_mc"]["acc,none"] <= 1
    record = payload["run_record"]
    assert record["model_path"] == str(saved) and len(record["weights_sha256"]) == 64
    assert record["command"].startswith("samba-lm eval harness --model")
    assert payload["lm_eval"] == lm_eval.__version__ and payload["git_hash"] is None
    captured = capfd.readouterr()
    assert "samba_tiny_mc" in captured.out  # the table
    assert "fatal" not in captured.out + captured.err


# ---------------------------------------------------------------------------------- errors
def test_registered_and_bad_model_args_are_named(saved, tmp_path):
    cls = get_model("samba-lm")
    assert cls is SambaHarnessLM
    for args, error, match in [
        ("", ValueError, "give pretrained=PATH"),
        (f"pretrained={tmp_path}/nowhere", FileNotFoundError, f"pretrained={tmp_path}/nowhere: "),
        (f"pretrained={saved},flavour=sweet", ValueError, r"unknown argument\(s\) \['flavour'\]"),
        (f"pretrained={saved},batch_size=0", ValueError, "batch_size must be a positive int"),
        (f"pretrained={saved},batch_size=auto", ValueError, "batch_size must be a positive int, got 'auto'"),
        (f"pretrained={saved},chunk_size=-3", ValueError, "chunk_size must be a positive int"),
        (f"pretrained={saved},device=toaster", ValueError, "device must be auto, cpu, cuda"),
        (f"pretrained={saved},dtype=int8", ValueError, "dtype must be one of"),
    ]:
        with pytest.raises(error, match=match):
            cls.create_from_arg_string(args)
    samba_lm.save_pretrained(samba_lm.load_pretrained(saved), tmp_path / "bare")
    with pytest.raises(ValueError, match="no tokenizer.json beside the model"):
        cls.create_from_arg_string(f"pretrained={tmp_path / 'bare'}")
    lm = cls.create_from_arg_string(f"pretrained={saved},batch_size=8,chunk_size=64,dtype=float64",
                                    {"device": "cpu", "batch_size": None})
    assert (lm.batch_size, lm.chunk_size, next(lm.model.parameters()).dtype) == (8, 64, torch.float64)


@pytest.mark.parametrize("argv, error, match", [
    (["--tasks", "samba_tiny_mc", "--limit", "0"], ValueError, "--limit must be > 0"),
    (["--tasks", "samba_tiny_mc", "--batch-size", "0"], ValueError, "--batch-size must be >= 1"),
    (["--tasks", "samba_tiny_mc", "--include-path", "no/such/dir"], FileNotFoundError, "--include-path no/such/dir"),
])
def test_cli_argument_errors(saved, tmp_path, argv, error, match):
    parser = argparse.ArgumentParser()
    harness.add_arguments(parser)
    with pytest.raises(error, match=match):
        harness.run(parser.parse_args(["--model", str(saved), "--out", str(tmp_path), *argv]))


def test_samba_lm_works_without_lm_eval():
    """`import samba_lm` and the command line do not need lm-eval; the adapter says what to install."""
    code = ("import sys; sys.modules['lm_eval'] = None\n"
            "import samba_lm, samba_lm.cli\n"
            "samba_lm.cli.build_parser()\n"
            "from samba_lm.eval.harness import SambaHarnessLM\n"
            "try:\n    SambaHarnessLM(pretrained='x')\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).parent)
    assert out.returncode == 0, out.stderr
    assert "pip install 'samba-lm[eval]'" in out.stdout


def test_lm_evals_own_backends_stay_registered_beside_ours():
    """Registering samba-lm must not hide lm-eval's lazily registered backends ("hf" and the rest):
    checked in a fresh interpreter, where ours is the first import."""
    code = ("import samba_lm.eval.harness; from lm_eval.api.registry import get_model; "
            "print(get_model('samba-lm').__name__, get_model('hf').__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["SambaHarnessLM", "HFLM"]
