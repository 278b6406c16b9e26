"""Phonebook lookup: the books, the prompt, exact-match scoring, the evaluation and its command hooks."""

import argparse
import json
import random
import re

import pytest
import torch

from conftest import save_small_model
from samba_lm.data import train_tokenizer
from samba_lm.eval import phonebook as pb


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    books = [pb.phonebook(20, rng) for _ in range(5)]
    texts = [pb.phonebook_prompt(book, book[0][0]) + " " + book[0][1] for book in books]
    return train_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    return save_small_model(tok, tmp_path_factory.mktemp("phonebook_model"))


def test_books_are_distinct_and_seeded():
    book = pb.phonebook(500, random.Random(7))
    names, numbers = zip(*book)
    assert len(set(names)) == 500 and len(set(numbers)) == 500
    assert all(re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", n) for n in names)
    assert all(re.fullmatch(r"\d{3}-\d{3}-\d{4}", n) for n in numbers)
    assert pb.phonebook(500, random.Random(7)) == book != pb.phonebook(500, random.Random(8))
    assert len(pb.phonebook(pb.MAX_ENTRIES, random.Random(0))) == pb.MAX_ENTRIES  # every name once


def test_prompt_lists_the_book_then_asks():
    book = pb.phonebook(6, random.Random(1))
    name, number = book[3]
    prompt = pb.phonebook_prompt(book, name)
    lines = prompt.split("\n")
    assert lines[:6] == [f"{n}: {p}" for n, p in book]
    assert lines[6] == f"What is the phone number of {name}? The phone number of {name} is"
    assert prompt.count(number) == 1 and prompt.count(name) == 3


@pytest.mark.parametrize("text, ok", [(" 609-373-1813.", True), ("609-373-1813", True), (" 609-373-18134", False),
                                      (" 609-373-181", False), (" 609 373 1813", False), (" unknown", False)])
def test_exact_match(text, ok):
    assert pb.answered(text, "609-373-1813") is ok


def fake_generate(tok, right: bool):
    """Looks the asked name up in the prompt and answers its number (or a wrong one)."""
    def generate(model, prompts, max_new_tokens, temperature, stop_tokens):
        out = []
        for ids in prompts:
            text = tok.decode(ids)
            name = re.search(r"The phone number of (.+) is$", text).group(1)
            number = re.search(rf"^{name}: (\S+)$", text, re.M).group(1)
            answer = number if right else number[:-1] + str((int(number[-1]) + 1) % 10)
            out.append(torch.tensor(ids + tok.encode(f" {answer}.\n").ids))
        return out
    return generate


@pytest.mark.parametrize("right", [True, False])
def test_evaluation_scores_the_answers(tok, monkeypatch, right):
    monkeypatch.setattr(pb, "generate", fake_generate(tok, right))
    result = pb.phonebook_eval(None, tok, [1, 5, 40], trials=3, seed=2, progress=False)
    assert result["accuracy"] == [float(right)] * 3 and len(result["trials"]) == 9
    assert result["mean_prompt_tokens"][0] < result["mean_prompt_tokens"][1] < result["mean_prompt_tokens"][2]
    trial = result["trials"][-1]
    assert trial["entries"] == 40 and 0 <= trial["position"] < 40 and trial["correct"] is right
    # the recorded prompt length is that of the prompt for this book and name
    book = pb.phonebook(40, random.Random("phonebook/2/40/2"))
    assert book[trial["position"]] == (trial["name"], trial["number"])
    assert trial["prompt_tokens"] == len(tok.encode(pb.phonebook_prompt(book, trial["name"])).ids)
    assert pb.phonebook_eval(None, tok, [1, 5, 40], trials=3, seed=2, progress=False) == result
    assert pb.phonebook_eval(None, tok, [1, 5, 40], trials=3, seed=3, progress=False) != result


def test_run_writes_json_png_and_the_record(model_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    pb.add_arguments(parser)
    args = parser.parse_args(["--model", str(model_dir), "--entries", "2", "8", "--trials", "2",
                              "--max-new-tokens", "4", "--out", str(tmp_path)])
    payload = pb.run(args)
    saved = json.loads((tmp_path / "phonebook.json").read_text())
    assert saved == json.loads(json.dumps(payload))
    assert saved["task"] == "phonebook" and saved["entries"] == [2, 8] and len(saved["accuracy"]) == 2
    assert len(saved["trials"]) == 4 and all(0 <= a <= 1 for a in saved["accuracy"])
    assert saved["run"]["model_path"] == str(model_dir) and len(saved["run"]["weights_sha256"]) == 64
    assert (tmp_path / "phonebook.png").stat().st_size > 0
    assert "prompt tokens" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [(["--entries", "0"], "--entries"),
                                            (["--entries", str(pb.MAX_ENTRIES + 1)], "--entries"),
                                            (["--trials", "0"], "--trials"),
                                            (["--max-new-tokens", "0"], "--max-new-tokens")])
def test_bad_arguments(tmp_path, flags, message):
    parser = argparse.ArgumentParser()
    pb.add_arguments(parser)
    with pytest.raises(ValueError, match=message):
        pb.run(parser.parse_args(["--model", str(tmp_path / "none"), *flags]))
