"""Passkey retrieval: prompt construction, scoring, the grid, the command hooks, and the fine-tuning task."""

import argparse
import json
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

import samba_lm
from conftest import save_small_model
from samba_lm.cli import main as cli
from samba_lm.data import BlockLoader, TokenShards, build_shards, eos_id, load_tokenizer, train_tokenizer
from samba_lm.data.passkey import (FILLER, INTRO, NEEDLE, QUESTION, PasskeyBlocks, filler_ids, passkey_answer,
                                   passkey_prompt, retrieved)
from samba_lm.eval import passkey
from samba_lm.options import parse_count
from samba_lm.train import TrainConfig, train


@pytest.fixture(scope="module")
def tok():
    texts = [INTRO, FILLER, QUESTION] + [NEEDLE.format(key=k) + f" {k}." for k in (12345, 67890, 40213, 99871)]
    return train_tokenizer(texts * 4, vocab_size=320)


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    return save_small_model(tok, tmp_path_factory.mktemp("passkey_model"))


def n_tokens(tok, text):
    return len(tok.encode(text).ids)


# ----------------------------------------------------------------------------- prompts
@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_prompt_length_needle_depth_and_question(tok, depth):
    key = "40213"
    ids, at = passkey_prompt(tok, 300, key, depth)
    assert len(ids) == 300
    text = tok.decode(ids)
    needle = "\n" + NEEDLE.format(key=key) + "\n"
    assert text.count(needle) == 1 and text.count(key) == 2
    assert text.startswith(INTRO + "\n") and text.endswith("\n" + QUESTION)
    assert tok.decode(ids[at:]).startswith(needle)
    # the filler before the needle is `depth` of all filler tokens
    intro = n_tokens(tok, INTRO + "\n")
    fixed = intro + n_tokens(tok, needle) + n_tokens(tok, "\n" + QUESTION)
    assert at - intro == round(depth * (300 - fixed))
    if depth == 0:
        assert at == intro
    if depth == 1:
        assert tok.decode(ids[at:]) == needle + "\n" + QUESTION
    # the text re-encodes to (about) the same length: the pieces tokenize as the whole text does
    assert abs(n_tokens(tok, text) - 300) <= 2


def test_filler_repeats_the_sentences(tok):
    n = 3 * n_tokens(tok, FILLER) + 5
    assert tok.decode(filler_ids(tok, n)).startswith(" ".join([FILLER] * 3))
    assert len(filler_ids(tok, n)) == n and filler_ids(tok, 0) == []


def test_length_too_short_is_refused(tok, model_dir):
    with pytest.raises(ValueError, match="shorter than the passkey prompt"):
        passkey_prompt(tok, 20, "12345", 0.5)
    with pytest.raises(ValueError, match="--lengths"):
        passkey.passkey_grid(None, tok, [20], [0.5], 1, progress=False)


@pytest.mark.parametrize("text, ok", [(" 12345.", True), ("12345", True), ("  12345 is", True), ("123456", False),
                                      ("1234", False), (" 54321", False), ("The pass key", False), ("", False)])
def test_scorer(text, ok):
    assert retrieved(text, "12345") is ok


# ----------------------------------------------------------------------------- the grid
def fake_generate(tok, right: bool):
    """Answers each prompt with its key (or another) as a model would: prompt ids + answer ids."""
    def generate(model, prompts, max_new_tokens, temperature, stop_tokens, prefill_chunk=None):
        out = []
        for ids in prompts:
            key = re.search(r"The pass key is (\d+)\.", tok.decode(ids)).group(1)
            answer = key if right else str(int(key) + 1)
            out.append(torch.tensor(ids + tok.encode(f" {answer}. Remember").ids))
        return out
    return generate


@pytest.mark.parametrize("right", [True, False])
def test_grid_scores_the_answers(tok, monkeypatch, right):
    monkeypatch.setattr(passkey, "generate", fake_generate(tok, right))
    result = passkey.passkey_grid(None, tok, [150, 200], [0.0, 0.5, 1.0], n_keys=3, seed=1, progress=False)
    assert result["accuracy"] == [[float(right)] * 3] * 2
    assert result["mean_accuracy"] == float(right) and len(result["trials"]) == 2 * 3 * 3
    trial = result["trials"][0]
    assert trial["length"] == 150 and trial["depth"] == 0.0 and re.fullmatch(r"\d{5}", trial["key"])
    assert trial["correct"] is right and trial["answer"].startswith(" ")


def test_grid_on_a_model_is_reproducible(tok, model_dir):
    model = samba_lm.load_pretrained(model_dir).eval()
    first, again = (passkey.passkey_grid(model, tok, [140], [0.0, 1.0], 2, 0, 3, progress=False) for _ in range(2))
    assert first == again and len(first["accuracy"]) == 1 and len(first["accuracy"][0]) == 2
    assert [t["correct"] for t in first["trials"]] == [retrieved(t["answer"], t["key"]) for t in first["trials"]]


def test_keys_depend_on_the_seed_and_the_cell_only(tok, monkeypatch):
    monkeypatch.setattr(passkey, "generate", fake_generate(tok, True))
    run = lambda seed, lengths: passkey.passkey_grid(None, tok, lengths, [0.0, 1.0], 2, seed, progress=False)
    first, other = run(0, [140, 180]), run(1, [140, 180])
    assert [t["key"] for t in first["trials"]] != [t["key"] for t in other["trials"]]
    assert len({t["key"] for t in first["trials"]}) > 1
    assert run(0, [180])["trials"] == first["trials"][4:]  # adding a length changes no other cell


def test_run_writes_json_png_and_the_record(tok, model_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    passkey.add_arguments(parser)
    args = parser.parse_args(["--model", str(model_dir), "--lengths", "140", "180", "--depths", "0", "0.5", "1",
                              "--keys", "2", "--out", str(tmp_path), "--max-new-tokens", "4"])
    payload = passkey.run(args)
    saved = json.loads((tmp_path / "passkey.json").read_text())
    assert saved == json.loads(json.dumps(payload))
    assert saved["task"] == "passkey" and saved["lengths"] == [140, 180] and saved["depths"] == [0.0, 0.5, 1.0]
    assert len(saved["accuracy"]) == 2 and len(saved["trials"]) == 12
    assert saved["run"]["model_path"] == str(model_dir) and len(saved["run"]["weights_sha256"]) == 64
    assert saved["run"]["config"]["vocab_size"] == tok.get_vocab_size()
    assert (tmp_path / "passkey.png").stat().st_size > 0
    assert "mean accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [(["--keys", "0"], "--keys"), (["--depths", "1.5"], "--depths"),
                                            (["--lengths", "0"], "--lengths"),
                                            (["--max-new-tokens", "0"], "--max-new-tokens")])
def test_bad_arguments(tmp_path, flags, message):
    parser = argparse.ArgumentParser()
    passkey.add_arguments(parser)
    with pytest.raises(ValueError, match=message):
        passkey.run(parser.parse_args(["--model", str(tmp_path / "none"), *flags]))


def test_lengths_take_k_suffixes():
    assert [parse_count(s) for s in ("4096", "4K", "256k", "1M")] == [4096, 4096, 262144, 1 << 20]


# ----------------------------------------------------------------------------- the fine-tuning task
def test_blocks_hold_a_prompt_its_answer_and_eos(tok):
    blocks = PasskeyBlocks(tok, seq_len=200, seed=3).next_batch(4)
    assert blocks.shape == (4, 201) and blocks.dtype == torch.int64
    keys = set()
    for row in blocks.tolist():
        assert row[-1] == eos_id(tok) and eos_id(tok) not in row[:-1]
        text = tok.decode(row)
        key = re.search(r"The pass key is (\d{5})\. Remember it\. \1 is the pass key\.", text).group(1)
        assert text.endswith(f"{QUESTION} {key}.") and text.count(key) == 3
        assert row[-1 - len(passkey_answer(tok, key)):-1] == passkey_answer(tok, key)
        keys.add(key)
    assert len(keys) == 4


def test_blocks_are_deterministic_and_resume_exactly(tok):
    a, b = PasskeyBlocks(tok, 150, seed=0), PasskeyBlocks(tok, 150, seed=0)
    first, second = a.next_batch(2), a.next_batch(2)
    assert torch.equal(first, b.next_batch(2)) and not torch.equal(first, second)
    resumed = PasskeyBlocks(tok, 150, seed=0)
    resumed.load_state_dict({**a.state_dict(), "position": 2})
    assert torch.equal(resumed.next_batch(2), second)
    assert not torch.equal(PasskeyBlocks(tok, 150, seed=1).next_batch(2), first)
    # two ranks take contiguous halves of the same global batch
    ranks = [PasskeyBlocks(tok, 150, 0, rank, 2).next_batch(4) for rank in (0, 1)]
    assert torch.equal(torch.cat(ranks), PasskeyBlocks(tok, 150, 0).next_batch(4))


def test_blocks_refuse_what_does_not_fit(tok):
    with pytest.raises(ValueError, match="seq_len 40 is too short for the passkey task"):
        PasskeyBlocks(tok, 40)
    blocks = PasskeyBlocks(tok, 150)
    with pytest.raises(ValueError, match="task=None"):  # a checkpoint of the language-model task
        blocks.load_state_dict({"position": 3, "seq_len": 150, "seed": 0, "n_blocks": 10})
    with pytest.raises(ValueError, match="seq_len=200"):
        blocks.load_state_dict({**blocks.state_dict(), "seq_len": 200})


@pytest.mark.parametrize("values, field", [({"task": "passkey"}, "init_from"), ({"task": "copy"}, "task"),
                                           ({"init_from": "x", "model_args": {"d_model": 64}}, "model_args")])
def test_bad_task_config(values, field):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**values)


def train_losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_fine_tune_on_passkeys_from_the_command_line(tok, model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--task", "passkey", "--init-from", str(model_dir), "--seq-len", "160", "--batch-size", "2",
            "--steps", "3", "--lr", "1e-4", "--warmup-fraction", "0.5", "--save-every", "2", "--out-dir", str(out),
            "--no-tensorboard", "--no-progress"]
    cli(argv)
    losses = train_losses(out)
    assert len(losses) == 3
    # step 1 trained the saved weights (not a fresh init) on the first passkey blocks of seed 0
    init = samba_lm.load_pretrained(model_dir)
    batch = PasskeyBlocks(tok, 160, seed=0).next_batch(2)
    with torch.no_grad():
        expected = F.cross_entropy(init(batch[:, :-1]).logits.flatten(0, 1), batch[:, 1:].flatten()).item()
    assert losses[0] == pytest.approx(expected, rel=1e-5)
    tuned = samba_lm.load_pretrained(out / "model")
    assert tuned.config == init.config
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), init.state_dict().values()))
    assert load_tokenizer(out / "model").get_vocab() == tok.get_vocab()
    # without its last checkpoint the same command resumes from step 2 and repeats step 3 exactly
    shutil.rmtree(out / "checkpoints" / "step_00000003")
    capsys.readouterr()
    cli(argv)
    assert "resuming" in capsys.readouterr().out and train_losses(out) == losses


def test_fine_tune_on_text_needs_the_models_tokenizer(tok, model_dir, tmp_path):
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text(" ".join([FILLER, NEEDLE.format(key=12345)] * 40))
    build_shards(str(tmp_path / "text"), tmp_path / "ours", tokenizer=str(model_dir / "tokenizer.json"),
                 val_fraction=0, progress=False)
    run = dict(task="lm", init_from=str(model_dir), seq_len=64, batch_size=2, steps=1, tensorboard=False,
               progress=False)
    train(TrainConfig(data=str(tmp_path / "ours"), out_dir=str(tmp_path / "run"), **run))
    batch = BlockLoader(TokenShards(tmp_path / "ours").split("train"), 64, seed=0).next_batch(2)
    with torch.no_grad():
        logits = samba_lm.load_pretrained(model_dir)(batch[:, :-1]).logits
    assert train_losses(tmp_path / "run")[0] == pytest.approx(
        F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).item(), rel=1e-5)
    build_shards(str(tmp_path / "text"), tmp_path / "theirs", vocab_size=300, val_fraction=0, progress=False)
    with pytest.raises(ValueError, match="another tokenizer"):
        train(TrainConfig(data=str(tmp_path / "theirs"), out_dir=str(tmp_path / "run2"), **run))
