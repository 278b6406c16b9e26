"""The command line as a user meets it: help, one list syntax, bad input (one line, exit status 1,
nothing lost), files that are not text, a resume on other data, damaged checkpoints, Ctrl-C and SIGTERM."""

import argparse
import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import samba_lm
from samba_lm import cli as cli_module
from samba_lm.checkpoint import list_checkpoints
from samba_lm.cli import build_parser
from samba_lm.cli import main as cli
from samba_lm.data import TokenShards, build_shards
from samba_lm.train import signals

from conftest import save_small_model

RUN_MODEL = {"d_model": 32, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16, "mlp_hidden": 64, "window": 16,
             "d_state": 4, "layers": ["mamba", "mlp", "swa", "mlp"]}
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


def write_docs(root: Path, reverse: bool = False) -> Path:
    """Ten documents of words; `reverse` writes each one's words backwards: other tokens, as many."""
    rng = random.Random(5)
    root.mkdir(parents=True)
    for i in range(10):
        words = [rng.choice(WORDS) for _ in range(150)]
        (root / f"doc{i}.txt").write_text("doc " + " ".join(words[::-1] if reverse else words) + "\n")
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli_data")
    build_shards(str(write_docs(root / "text")), root / "shards", vocab_size=300, val_fraction=0.1, progress=False)
    return root / "shards"


def train_argv(shards, out, *extra) -> list[str]:
    return ["train", "--model-args", json.dumps(RUN_MODEL), "--data", str(shards), "--seq-len", "16",
            "--batch-size", "2", "--steps", "2", "--save-every", "1", "--eval-every", "2", "--eval-batches", "1",
            "--log-every", "1", "--out-dir", str(out), "--no-tensorboard", "--no-progress", *extra]


@pytest.fixture(scope="module")
def run(shards, tmp_path_factory) -> Path:
    """A finished two-step run: checkpoints at steps 1 and 2, model/, the run's tokenizer.json."""
    out = tmp_path_factory.mktemp("cli_run") / "run"
    cli(train_argv(shards, out))
    return out


def fails(capsys, argv) -> str:
    """Run a command that must fail as every bad input does: one line, exit status 1. Its message."""
    with pytest.raises(SystemExit) as stopped:
        cli(argv)
    code = stopped.value.code  # main's errors carry their message; argparse's print it and exit 1
    message = code if isinstance(code, str) else capsys.readouterr().err
    assert isinstance(code, str) or code == 1, code
    assert len(message.strip().splitlines()) == 1, message
    return message


def losses(out) -> list[float]:
    rows = map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines())
    return [r["loss"] for r in rows if "loss" in r]


# ----------------------------------------------------------------------------- help and lists
def subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in subparsers(sub))


def test_every_flag_of_every_command_has_help_and_shows_its_default():
    commands = dict(subparsers(build_parser()))
    assert {"data", "train", "generate", "serve", "info", "export", "convert", "eval ppl", "eval passkey",
            "eval phonebook", "eval harness"} <= set(commands)
    for name, parser in commands.items():
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            flag = action.option_strings[0] if action.option_strings else action.metavar or action.dest  # or a positional
            assert action.help, f"samba-lm {name} {flag} has no help"
            shown = parser._get_formatter()._expand_help(action)  # the text --help prints for it
            nothing_to_show = action.required or action.default is None or action.default is False
            assert nothing_to_show or "(default: " in shown, f"samba-lm {name} {flag} does not show its default"
    train = commands["train"].format_help()
    assert "--lr LR" in train and "peak learning rate (default: 0.002)" in train
    assert "(default: --resume)" in train and "(default: 0.9,0.95)" in train


@pytest.mark.parametrize("argv, dest, expected", [
    (["eval", "passkey", "--model", "m", "--lengths"], "lengths", [4096, 8192, 300]),
    (["eval", "ppl", "--model", "m", "--lengths"], "lengths", [4096, 8192, 300]),
    (["eval", "phonebook", "--model", "m", "--entries"], "entries", [4096, 8192, 300]),
])
def test_lists_take_commas_spaces_or_both(argv, dest, expected):
    items = [str(n) for n in expected] if dest == "entries" else ["4K", "8k", "300"]
    for typed in (",".join(items), items, [f"{items[0]},{items[1]}", items[2]]):
        args = build_parser().parse_args(argv + ([typed] if isinstance(typed, str) else typed))
        assert getattr(args, dest) == expected, typed


def test_every_list_flag_uses_the_same_syntax(tmp_path):
    parse = build_parser().parse_args
    assert parse(["eval", "passkey", "--model", "m", "--depths", "0,0.5", "1"]).depths == [0.0, 0.5, 1.0]
    assert parse(["eval", "harness", "--model", "m", "--tasks", "a,b", "c"]).tasks == ["a", "b", "c"]
    assert parse(["train", "--betas", "0.8,0.9"]).betas == parse(["train", "--betas", "0.8", "0.9"]).betas == [0.8, 0.9]
    assert parse(["data", "--source", "shakespeare,python-stdlib"]).source == ["shakespeare", "python-stdlib"]
    odd = tmp_path / "a,b.txt"  # a path that exists is taken whole
    odd.write_text("x")
    assert parse(["data", "--source", str(odd), "shakespeare"]).source == [str(odd), "shakespeare"]


# ----------------------------------------------------------------------------- bad input: one line, status 1
@pytest.mark.parametrize("argv, match", [
    (["train", "--steps", "abc"], "argument --steps: invalid int value: 'abc'"),
    (["train", "--learning-rate", "1"], "unrecognized arguments: --learning-rate"),
    (["train", "--model-args", "{d_model: 3}"], "--model-args: '{d_model: 3}' is not valid JSON"),
    (["train", "--model-args", "[1]"], "is not a JSON object"),
    (["train", "--betas", "0.9"], "argument --betas: expected 2 values"),
    (["eval", "passkey", "--model", "m", "--lengths", "4K,x"], "'x' is not a token count"),
    (["eval", "phonebook", "--model", "m", "--entries", "10,ten"], "invalid int value: 'ten'"),
    (["eval", "ppl", "--model", "m", "--lengths", ","], "expected one or more values"),
    (["eval", "ppl", "--model", "m", "--lengths", "1K,x"], "'x' is not a token count"),
    (["eval", "harness", "--model", "m", "--tasks", " , "], "argument --tasks: expected one or more values"),
    ([], "the following arguments are required: command"),
])
def test_bad_flags(capsys, argv, match):
    message = fails(capsys, argv)
    assert match in message and "(see samba-lm" in message


def test_model_args_with_an_unknown_field_names_it_and_the_valid_ones(shards, tmp_path, capsys):
    message = fails(capsys, train_argv(shards, tmp_path / "run", "--model-args", '{"d_modle": 64}'))
    assert "samba-lm train: error: TrainConfig.model_args" in message
    assert "unknown SambaConfig fields ['d_modle']; valid fields: d_model, vocab_size" in message
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=r"unknown SambaConfig fields \['d_modle'\]; valid fields: d_model"):
        samba_lm.SambaConfig(d_modle=64)  # the constructor itself, not a bare TypeError
    with pytest.raises(ValueError, match="SambaConfig.rope_base='big': must be a number"):
        samba_lm.SambaConfig.from_preset("tiny", rope_base="big")


def test_cuda_on_a_machine_without_it(run, shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (train_argv(shards, tmp_path / "t"), ["generate", "--model", str(run)],
                 ["eval", "ppl", "--model", str(run), "--out", str(tmp_path / "e")],
                 ["eval", "passkey", "--model", str(run), "--out", str(tmp_path / "e")],
                 ["eval", "phonebook", "--model", str(run), "--out", str(tmp_path / "e")]):
        message = fails(capsys, [*argv, "--device", "cuda"])
        assert "error: --device cuda: CUDA is not available on this machine" in message, argv
        assert "use --device cpu" in message
    assert not (tmp_path / "t").exists() and not (tmp_path / "e").exists()
    assert "--device must be auto, cpu, cuda or cuda:N" in fails(capsys, ["generate", "--model", str(run),
                                                                          "--device", "gpu"])


def test_output_paths_that_are_files(run, shards, tmp_path, capsys):
    file = tmp_path / "a-file"
    file.write_text("keep me")
    for argv in (train_argv(shards, file), train_argv(shards, file / "sub"),
                 ["data", "--source", str(shards.parent / "text"), "--out", str(file)],
                 ["export", "--checkpoint", str(run), "--out", str(file)],
                 ["eval", "ppl", "--model", str(run), "--out", str(file)],
                 ["eval", "passkey", "--model", str(run), "--out", str(file)],
                 ["eval", "phonebook", "--model", str(run), "--out", str(file)],
                 ["eval", "harness", "--model", str(run), "--tasks", "samba_tiny_mc", "--out", str(file)]):
        message = fails(capsys, argv)
        assert f"{file} is a file, not a directory" in message or f"({file} is a file)" in message, argv
    assert file.read_text() == "keep me"


def test_yaml_mistakes(shards, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("steps: [2\n")
    assert "is not valid YAML (" in fails(capsys, train_argv(shards, tmp_path / "r", "--config", str(config)))
    config.write_text("steps: ten\n")
    assert "TrainConfig.steps='ten': must be an int" in fails(capsys, ["train", "--config", str(config)])
    config.write_text("lr: 3e-4\n")  # YAML 1.1 reads this as a string; it is the number meant
    from samba_lm.train.config import config_from_args

    assert config_from_args(build_parser().parse_args(["train", "--config", str(config)])).lr == 3e-4


def test_keyboard_interrupt_and_file_system_errors_are_one_line(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "cmd_info", interrupted)
    with pytest.raises(SystemExit) as stopped:
        cli(["info"])
    assert stopped.value.code == 130 and capsys.readouterr().err.strip() == "samba-lm info: interrupted"

    def disk_full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "out/model.safetensors")

    monkeypatch.setattr(cli_module, "cmd_info", disk_full)
    assert fails(capsys, ["info"]) == "samba-lm info: error: No space left on device: out/model.safetensors"


# ----------------------------------------------------------------------------- files that are not text
def write_mixed_corpus(root: Path) -> Path:
    """Two text files, a PNG, a .gz and a UTF-16 file: the issue's example."""
    root.mkdir()
    (root / "a.txt").write_text("the first document, plain text\n")
    (root / "b.txt").write_text("the second document, also text\n")
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40)
    (root / "notes.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 40)
    (root / "wide.txt").write_bytes("wide text".encode("utf-16"))
    return root


def test_data_leaves_out_what_is_not_text_and_says_so(tmp_path, capsys):
    corpus = write_mixed_corpus(tmp_path / "corpus")
    cli(["data", "--source", str(corpus), "--out", str(tmp_path / "out"), "--vocab-size", "300", "--no-progress"])
    captured = capsys.readouterr()
    for name, why in (("image.png", "a PNG image"), ("notes.gz", "gzip-compressed"), ("wide.txt", "UTF-16 text")):
        assert f"warning: skipping {corpus / name}: {why}" in captured.err
        assert f"left out {corpus / name}: {why}" in captured.out
    assert "read 2 files (2 documents), 3 left out as not text" in captured.out
    stream = TokenShards(tmp_path / "out").split("train")
    text = samba_lm.data.load_tokenizer(tmp_path / "out").decode(stream.read(0, len(stream)).tolist())
    assert "\ufffd" not in text and "\x00" not in text

    before = {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()}
    message = fails(capsys, ["data", "--source", str(corpus), "--out", str(tmp_path / "out"), "--on-bad-file",
                             "error", "--no-progress"])
    assert f"samba-lm data: error: {corpus / 'image.png'}: a PNG image, not text" in message
    assert {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()} == before  # the old build is intact


def test_eval_ppl_refuses_a_binary_file(run, tmp_path, capsys):
    corpus = write_mixed_corpus(tmp_path / "corpus")
    for policy in ("skip", "error"):
        message = fails(capsys, ["eval", "ppl", "--model", str(run), "--source", str(corpus / "image.png"),
                                 "--on-bad-file", policy, "--out", str(tmp_path / "e"), "--no-progress"])
        assert message.startswith("samba-lm eval ppl: error: ") and "image.png" in message
        assert "a PNG image, not text" in message
    assert not (tmp_path / "e" / "ppl.json").exists()


# ----------------------------------------------------------------------------- training runs
def copy_run(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def test_a_run_says_where_everything_went(shards, tmp_path, capsys):
    cli(train_argv(shards, tmp_path, "--steps", "1"))
    out = capsys.readouterr().out
    assert f"samba-lm train: done at step 1. The run is in {tmp_path}:" in out
    assert f"model:   {tmp_path / 'model'} (config.json, model.safetensors, tokenizer.json)" in out
    assert f"loss:    {tmp_path / 'loss.png'}" in out and f"metrics: {tmp_path / 'metrics.jsonl'}" in out


def test_fewer_steps_than_the_checkpoint_has_is_said_without_a_progress_bar(run, shards, tmp_path, capsys):
    out = copy_run(run, tmp_path)
    cli([*train_argv(shards, out, "--steps", "1"), "--progress"])
    captured = capsys.readouterr()
    assert (f"nothing to train: the newest checkpoint, {out / 'checkpoints' / 'step_00000002'}, is at step 2, "
            f"past --steps 1; raise --steps") in captured.out
    assert "step/s" not in captured.err and "|" not in captured.err  # no progress bar at all
    assert losses(out) == losses(run)


def test_a_resume_on_other_data_of_the_same_size_is_refused(run, shards, tmp_path, capsys):
    other = tmp_path / "other"
    build_shards(str(write_docs(tmp_path / "text", reverse=True)), other, tokenizer=str(shards / "tokenizer.json"),
                 val_fraction=0.1, progress=False)
    ours, theirs = TokenShards(shards).index["splits"]["train"], TokenShards(other).index["splits"]["train"]
    assert ours["tokens"] == theirs["tokens"] and ours["sha256"] != theirs["sha256"]  # the same size, other tokens
    out = copy_run(run, tmp_path)
    message = fails(capsys, train_argv(other, out, "--steps", "4"))
    assert f"checkpoint {out / 'checkpoints' / 'step_00000002'} cannot resume on {other}: the data differs" in message
    assert "To train on this data from the start, choose another out_dir" in message
    assert losses(out) == losses(run) and len(list_checkpoints(out / "checkpoints")) == 2


def test_a_checkpoint_from_before_fingerprints_resumes_with_a_note(run, shards, tmp_path, capsys):
    out = copy_run(run, tmp_path)
    meta_file = out / "checkpoints" / "step_00000002" / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["loader"]["data_sha256"], meta["files"]  # as an older samba-lm wrote it
    meta_file.write_text(json.dumps(meta))
    cli(train_argv(shards, out, "--steps", "3"))
    printed = capsys.readouterr().out
    assert "the data cannot be checked against" in printed and "beyond its size" in printed
    assert "resuming: " in printed and len(losses(out)) == 3


def test_a_damaged_checkpoint_is_named_and_passed_over_on_resume(run, shards, tmp_path, capsys):
    out = copy_run(run, tmp_path)
    shutil.rmtree(out / "model")  # so that generate and export read the checkpoints
    newest = out / "checkpoints" / "step_00000002"
    shard = newest / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    for argv in (["generate", "--model", str(out), "--max-new-tokens", "2"],
                 ["export", "--checkpoint", str(out), "--out", str(tmp_path / "exported")]):
        message = fails(capsys, argv)
        assert f"checkpoint {newest} is damaged: {shard} holds 1,000 bytes" in message, argv
    assert not (tmp_path / "exported").exists()
    cli(train_argv(shards, out, "--steps", "3"))
    printed = capsys.readouterr().out
    assert f"checkpoint {newest} is damaged: {shard} holds 1,000 bytes" in printed and "passed over" in printed
    assert f"resuming: {out / 'checkpoints' / 'step_00000001'} (step 1)" in printed
    assert losses(out)[:2] == losses(run) and len(losses(out)) == 3  # step 2 again, bit for bit, then step 3
    samba_lm.load_pretrained(out / "model")


def test_generate_checks_its_arguments_before_anything(run, tmp_path, capsys):
    assert "temperature must be >= 0" in fails(capsys, ["generate", "--model", str(tmp_path / "nowhere"),
                                                        "--temperature", "-1"])
    for flags in (["--top-p", "0"], ["--top-k", "0"], ["--sync-every", "0"], ["--max-new-tokens", "-1"]):
        fails(capsys, ["generate", "--model", str(run), "--prompt", "alpha beta", *flags])
        assert capsys.readouterr().out == "", flags  # not even the prompt


def test_a_run_without_model_tokenizer_uses_the_runs(run, tmp_path, capsys):
    out = copy_run(run, tmp_path)
    (out / "model" / "tokenizer.json").unlink()
    for model in (out, out / "model"):
        cli(["generate", "--model", str(model), "--prompt", "alpha", "--max-new-tokens", "3", "--temperature", "0"])
        assert capsys.readouterr().out.startswith("alpha")
    samba_lm.save_pretrained(samba_lm.load_pretrained(out / "model"), tmp_path / "alone")
    assert "no tokenizer.json beside" in fails(capsys, ["generate", "--model", str(tmp_path / "alone")])


def test_exported_files_are_readable_by_other_users(run, tmp_path):
    cli(["export", "--checkpoint", str(run), "--out", str(tmp_path / "exported")])
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tmp_path / "exported" / name).stat().st_mode & 0o044 == 0o044, name
    assert (run / "model" / "model.safetensors").stat().st_mode & 0o777 == 0o644


# ----------------------------------------------------------------------------- Ctrl-C and SIGTERM
def start_training(shards, out, steps: int) -> subprocess.Popen:
    """`samba-lm train` in a process of its own, returned once it has logged its first step."""
    argv = [sys.executable, "-m", "samba_lm.cli",
            *train_argv(shards, out, "--steps", str(steps), "--save-every", "1000")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[1], env={**os.environ, "OMP_NUM_THREADS": "1"})
    for line in proc.stdout:
        if line.startswith(f"step 1/{steps} "):
            return proc
    raise AssertionError(f"training ended before its first step: {proc.communicate()[1][-2000:]}")


def test_ctrl_c_writes_a_checkpoint_that_resumes_exactly(shards, tmp_path):
    proc = start_training(shards, tmp_path / "stopped", steps=10)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "SIGINT: stopping at the end of this step, with a checkpoint (press Ctrl-C again" in err
    (checkpoint,) = list_checkpoints(tmp_path / "stopped" / "checkpoints")
    step = int(checkpoint.name.split("_")[1])
    assert 1 <= step < 10 and "Traceback" not in err
    assert (f"samba-lm train: stopped by SIGINT at step {step}: checkpoint {checkpoint}; run the same command "
            f"again to resume") in err
    assert len(losses(tmp_path / "stopped")) == step
    cli(train_argv(shards, tmp_path / "stopped", "--steps", "10", "--save-every", "1000"))
    cli(train_argv(shards, tmp_path / "straight", "--steps", "10", "--save-every", "1000"))
    assert losses(tmp_path / "stopped") == losses(tmp_path / "straight")


def test_sigterm_writes_a_checkpoint_and_exits_143(shards, tmp_path):
    proc = start_training(shards, tmp_path, steps=10)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    (checkpoint,) = list_checkpoints(tmp_path / "checkpoints")
    assert f"samba-lm train: stopped by SIGTERM at step {checkpoint.name.split('_')[1].lstrip('0')}" in err
    samba_lm.checkpoint.verify_checkpoint(checkpoint)


def test_a_second_signal_stops_at_once(monkeypatch, capfd):
    clock = iter([100.0, 100.4, 101.5])
    monkeypatch.setattr(signals.time, "monotonic", lambda: next(clock))
    before = signal.getsignal(signal.SIGINT)
    with signals.StopRequest() as stop:
        stop.arm()
        assert signal.getsignal(signal.SIGINT) == stop._handle
        stop._handle(signal.SIGINT, None)  # a request: the run stops at the end of its step
        assert stop.signum == signal.SIGINT
        stop._handle(signal.SIGINT, None)  # 0.4 s later: the same Ctrl-C, passed on by a launcher
        stop._handle(signal.SIGTERM, None)  # another signal: the stop is already under way
        with pytest.raises(signals.Interrupted) as interrupted:
            stop._handle(signal.SIGINT, None)  # 1.5 s later: a second Ctrl-C
        assert interrupted.value.signum == signal.SIGINT and "stopped at once" in str(interrupted.value)
    assert signal.getsignal(signal.SIGINT) == before
    assert capfd.readouterr().err.count("SIGINT: stopping at the end of this step") == 1
