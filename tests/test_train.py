"""The trainer: loss falls, exact resume, crash-safe checkpoints, DDP/FSDP2 == one process, the CLI."""

import contextlib
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import samba_lm
from samba_lm.checkpoint import list_checkpoints, model_from_training_checkpoint
from samba_lm.cli import main as cli
from samba_lm.data import build_shards
from samba_lm.train import TrainConfig, train
from samba_lm.train import trainer as trainer_module

SMALL_MODEL = {"d_model": 32, "n_heads": 2, "n_kv_heads": 1, "head_dim": 16, "mlp_hidden": 64, "window": 16,
               "d_state": 4, "layers": ["mamba", "mlp", "swa", "mlp"]}


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A small patterned corpus (so that loss can fall fast) tokenized into shards."""
    rng = random.Random(0)
    subjects, verbs, objects = ["the cat", "a dog", "my bird", "the king"], ["sees", "eats", "finds"], ["a fish", "the moon", "bread"]
    root = tmp_path_factory.mktemp("corpus")
    (root / "text").mkdir()
    for d in range(24):
        lines = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(120)]
        (root / "text" / f"doc{d:02d}.txt").write_text(" ".join(lines))
    build_shards(str(root / "text"), root / "shards", vocab_size=300, val_fraction=0.1, progress=False)
    return root / "shards"


def small_run(corpus, out, **kw) -> TrainConfig:
    values = dict(model="tiny", model_args=SMALL_MODEL, data=str(corpus), seq_len=32, batch_size=4, steps=6,
                  lr=3e-3, eval_every=3, eval_batches=2, save_every=3, log_every=1, out_dir=str(out),
                  tensorboard=False, progress=False)
    values.update(kw)
    return TrainConfig(**values)


def losses(out) -> list[float]:
    return [r["loss"] for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_loss_falls_and_a_run_leaves_everything_behind(corpus, tmp_path):
    last = train(small_run(corpus, tmp_path, steps=30, save_every=30, eval_every=15))
    curve = losses(tmp_path)
    assert len(curve) == 30 and sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 1.0
    assert last["val_loss"] < curve[0]
    for name in ("tokenizer.json", "train_config.json", "metrics.jsonl", "loss.png", "model/config.json",
                 "model/model.safetensors", "model/tokenizer.json"):
        assert (tmp_path / name).is_file(), name
    exported = samba_lm.load_pretrained(tmp_path / "model")
    from_ckpt = model_from_training_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])
    for (n, a), (_, b) in zip(exported.state_dict().items(), from_ckpt.state_dict().items()):
        assert torch.equal(a, b), n


def test_resume_after_a_crash_gives_the_same_losses(corpus, tmp_path, monkeypatch):
    train(small_run(corpus, tmp_path / "straight", micro_batch_size=2))
    calls = {"n": 0}
    real_step = trainer_module.train_step

    def crash_on_fifth(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated crash after the step-3 checkpoint")
        return real_step(*a, **k)

    monkeypatch.setattr(trainer_module, "train_step", crash_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        train(small_run(corpus, tmp_path / "crashed", micro_batch_size=2))
    assert len(losses(tmp_path / "crashed")) == 4  # step 4 was logged, then the process died
    with open(tmp_path / "crashed" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # and it died writing the next row
    monkeypatch.setattr(trainer_module, "train_step", real_step)
    train(small_run(corpus, tmp_path / "crashed", micro_batch_size=2))
    assert losses(tmp_path / "crashed") == losses(tmp_path / "straight")  # bit-exact, step for step


def test_a_step_is_read_once_the_next_is_queued_but_before_a_save_or_eval(corpus, tmp_path, monkeypatch):
    """On a GPU the trainer waits on a step's numbers only after queueing the next step (the GPU never
    idles while the host starts one); a step that saves or evaluates is read before the next one runs."""
    events, real_step = [], trainer_module.train_step

    class LoggedCopy(trainer_module.HostCopy):  # reading a step's numbers is the wait on the device
        def __init__(self, *values):
            super().__init__(*values)
            self.in_flight = True  # as on a GPU

        def get(self):
            events.append(("read", len([e for e in events if e[0] == "read"]) + 1))
            return super().get()

    def logged_step(*a, **k):
        events.append(("queue", len([e for e in events if e[0] == "queue"]) + 1))
        return real_step(*a, **k)

    monkeypatch.setattr(trainer_module, "HostCopy", LoggedCopy)
    monkeypatch.setattr(trainer_module, "train_step", logged_step)
    train(small_run(corpus, tmp_path, steps=5, save_every=3, eval_every=100))
    assert events == [("queue", 1), ("queue", 2), ("read", 1), ("queue", 3), ("read", 2), ("read", 3),
                     ("queue", 4), ("queue", 5), ("read", 4), ("read", 5)]  # saves at 3 and 5 (the end)
    assert len(losses(tmp_path)) == 5


def test_activation_checkpointing_gives_the_same_run(corpus, tmp_path, capsys):
    """Bit-exact: the recompute in the backward is the forward's own computation, deterministic on a CPU."""
    train(small_run(corpus, tmp_path / "plain", micro_batch_size=2))
    capsys.readouterr()
    train(small_run(corpus, tmp_path / "checkpointed", micro_batch_size=2, activation_checkpointing=True))
    assert ", activation checkpointing" in capsys.readouterr().out
    assert losses(tmp_path / "checkpointed") == losses(tmp_path / "plain")
    plain = samba_lm.load_pretrained(tmp_path / "plain" / "model").state_dict()
    checkpointed = samba_lm.load_pretrained(tmp_path / "checkpointed" / "model").state_dict()
    assert all(torch.equal(checkpointed[n], plain[n]) for n in plain)


def test_a_resume_with_other_numerics_says_so(corpus, tmp_path, monkeypatch, capsys):
    """Bit-exact resume needs the same threads and kernels (trainer.numerics): a resume without them
    goes on, and says that its losses may differ in the last bits."""
    train(small_run(corpus, tmp_path, steps=3))
    real = trainer_module.numerics
    monkeypatch.setattr(trainer_module, "numerics", lambda device: {**real(device), "threads": 99})
    capsys.readouterr()
    train(small_run(corpus, tmp_path, steps=4))
    out = capsys.readouterr().out
    assert "other numerics" in out and f"threads {torch.get_num_threads()} -> 99" in out


def test_killed_during_a_save_keeps_the_previous_checkpoint(corpus, tmp_path):
    (tmp_path / "cfg.json").write_text(json.dumps(small_run(corpus, tmp_path).to_dict()))
    script = textwrap.dedent(f"""
        import json, os, signal
        from samba_lm.train import TrainConfig, train
        real_replace, commits = os.replace, []
        def dying_replace(src, dst):  # SIGKILL the second checkpoint after its files, before its commit
            if str(src).endswith(".tmp") and "step_" in str(src):
                commits.append(src)
                if len(commits) == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real_replace(src, dst)
        os.replace = dying_replace
        train(TrainConfig(**json.loads(open({str(tmp_path / "cfg.json")!r}).read())))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    committed = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in committed] == ["step_00000003"]
    assert (tmp_path / "checkpoints" / "step_00000006.tmp").is_dir()
    model_from_training_checkpoint(committed[0])  # intact and loadable
    train(small_run(corpus, tmp_path))  # resumes from step 3 and finishes
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000003", "step_00000006"]
    assert not (tmp_path / "checkpoints" / "step_00000006.tmp").exists()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one(corpus, tmp_path, parallel):
    single = small_run(corpus, tmp_path / "one", steps=4, save_every=2)
    train(single)
    args = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(29500 + os.getpid() % 1000 + (7 if parallel == "fsdp" else 0)), "-m", "samba_lm.cli", "train",
            "--model-args", json.dumps(SMALL_MODEL), "--data", str(corpus), "--seq-len", "32", "--batch-size", "4",
            "--steps", "4", "--lr", "3e-3", "--eval-every", "3", "--eval-batches", "2", "--save-every", "2",
            "--out-dir", str(tmp_path / parallel), "--no-tensorboard", "--no-progress", "--parallel", parallel]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(losses(tmp_path / parallel)), torch.tensor(losses(tmp_path / "one")),
                               rtol=1e-5, atol=1e-5)
    one = samba_lm.load_pretrained(tmp_path / "one" / "model").state_dict()
    two = samba_lm.load_pretrained(tmp_path / parallel / "model").state_dict()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
    # the sharded checkpoint exports to the same single model
    exported = model_from_training_checkpoint(list_checkpoints(tmp_path / parallel / "checkpoints")[-1])
    assert all(torch.equal(exported.state_dict()[n], two[n]) for n in two)


def torchrun(corpus, out, processes: int, steps: int, fault: dict | None = None, restarts: int = 0):
    """`samba-lm train` (tests/train_with_fault.py with a fault) on `processes` gloo processes; the
    completed process."""
    script = ["-m", "samba_lm.cli"] if fault is None else [str(Path(__file__).with_name("train_with_fault.py"))]
    # --standalone: a c10d rendezvous on a free port, whose restarts start from a fresh store (a static
    # one keeps the dead workers' addresses: the restarted group then cannot connect)
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "--max-restarts", str(restarts), *script, "train", "--model-args", json.dumps(SMALL_MODEL),
            "--data", str(corpus), "--seq-len", "32", "--batch-size", "4", "--steps", str(steps), "--lr", "3e-3",
            "--eval-every", "3", "--eval-batches", "2", "--save-every", "2", "--out-dir", str(out),
            "--no-tensorboard", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1]), **(fault or {})}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def one_process_run(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one")
    train(small_run(corpus, out, steps=4, save_every=2))
    return out


@pytest.mark.parametrize("before, after", [(2, 4), (4, 2)])
def test_resume_on_another_number_of_processes(corpus, tmp_path, one_process_run, before, after):
    """A run checkpointed at step 2 on `before` processes resumes on `after`: the same global batch and
    data order, so one process's losses and weights up to the reduction order."""
    stopped = torchrun(corpus, tmp_path, before, 4, fault={"FAULT": "stop", "FAULT_AT_STEP": "2"})
    assert stopped.returncode != 0, "the injected stop did not happen"
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000002"]
    resumed = torchrun(corpus, tmp_path, after, 4)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    torch.testing.assert_close(torch.tensor(losses(tmp_path)), torch.tensor(losses(one_process_run)),
                               rtol=1e-5, atol=1e-5)
    one = samba_lm.load_pretrained(one_process_run / "model").state_dict()
    for name, tensor in samba_lm.load_pretrained(tmp_path / "model").state_dict().items():
        torch.testing.assert_close(tensor, one[name], rtol=1e-4, atol=1e-5)


def test_a_killed_rank_restarts_from_the_last_checkpoint(corpus, tmp_path, one_process_run):
    """Rank 1 is SIGKILLed after the step-2 checkpoint; torchrun (--max-restarts 1) restarts the group,
    which resumes there and ends as an uninterrupted run: every step logged once, the same losses."""
    proc = torchrun(corpus, tmp_path, 2, 4, fault={"FAULT": "kill", "FAULT_AT_STEP": "2"}, restarts=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming" in proc.stdout  # the second attempt's
    assert [json.loads(r)["step"] for r in (tmp_path / "metrics.jsonl").read_text().splitlines()
            if "loss" in json.loads(r)] == [1, 2, 3, 4]
    torch.testing.assert_close(torch.tensor(losses(tmp_path)), torch.tensor(losses(one_process_run)),
                               rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- bad input
def test_missing_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="samba-lm data"):
        train(small_run(tmp_path / "nothing", tmp_path / "out"))


def test_seq_len_longer_than_the_data(corpus, tmp_path):
    with pytest.raises(ValueError, match="seq_len"):
        train(small_run(corpus, tmp_path, seq_len=1_000_000))


def test_tokenizer_that_does_not_fit_the_model(corpus, tmp_path):
    with pytest.raises(ValueError, match="does not fit"):
        train(small_run(corpus, tmp_path, model_args={**SMALL_MODEL, "vocab_size": 100}))


def test_incompatible_checkpoint_on_resume_fails_before_work(corpus, tmp_path):
    train(small_run(corpus, tmp_path, steps=3))
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="another model.*d_model"):
        train(small_run(corpus, tmp_path, steps=6, model_args={**SMALL_MODEL, "d_model": 48}))
    with pytest.raises(ValueError, match="seq_len"):
        train(small_run(corpus, tmp_path, steps=6, seq_len=16))
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000003"]


@pytest.mark.parametrize("field, value", [("lr", -1.0), ("batch_size", 0), ("parallel", "zero3"),
                                          ("dtype", "fp8"), ("model", "gpt2"), ("pack", "zip")])
def test_bad_train_config(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


def test_batch_not_divisible(corpus, tmp_path):
    with pytest.raises(ValueError, match="micro_batch_size"):
        train(small_run(corpus, tmp_path, micro_batch_size=3))


# ----------------------------------------------------------------------------- CLI and YAML
def test_cli_yaml_and_flags(corpus, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: tiny\nmodel_args: {json.dumps(SMALL_MODEL)}\ndata: {corpus}\nseq_len: 32\n"
                   f"batch_size: 4\nsteps: 50\nsave_every: 2\neval_every: 2\ntensorboard: false\nprogress: false\n")
    cli(["train", "--config", str(cfg), "--steps", "2", "--out-dir", str(tmp_path / "run")])  # flag wins
    assert len(losses(tmp_path / "run")) == 2
    capsys.readouterr()
    cli(["generate", "--model", str(tmp_path / "run"), "--prompt", "the cat", "--max-new-tokens", "8"])
    assert capsys.readouterr().out.startswith("the cat")
    cli(["info", "--model", str(tmp_path / "run"), "--batch-size", "2", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == sum(p.numel() for p in samba_lm.load_pretrained(tmp_path / "run" / "model").parameters())
    cli(["export", "--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "exported")])
    assert (tmp_path / "exported" / "tokenizer.json").is_file()
    cfg.write_text("model: tiny\nlearning_rate: 0.1\n")
    with pytest.raises(SystemExit, match="unknown TrainConfig fields \\['learning_rate'\\]"):
        cli(["train", "--config", str(cfg)])


def test_cli_info_on_presets(capsys):
    cli(["info", "--preset", "samba-421m", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 421_793_280
    # 6 Mamba layers: conv [3072, 3] + ssm [3072, 16] fp32; 6 SWA rings of 2047 x 12 heads x 128, bf16
    mamba = 6 * (3072 * 3 * 2 + 3072 * 16 * 4)
    ring = 6 * (2 * 2047 * 12 * 128 * 2 + 2047 * 8)
    assert info["state_bytes_batch_1_bfloat16"] == mamba + ring + 3 * 8  # pos, document id and start


def test_shipped_yaml_recipes_are_valid():
    from samba_lm.train.config import load_yaml, make_config

    recipes = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert recipes
    for path in recipes:
        cfg = make_config(load_yaml(path))
        assert cfg.batch_size % cfg.micro_batch_size == 0, path


class FixedBlocks:
    def __init__(self, block):
        self.block = block

    def next_batch(self, n):
        return self.block.expand(n, -1)


def test_pack_documents_trains_each_document_on_its_own():
    """--pack documents: the step's loss over a block with EOS inside is the loss of each document
    run alone (the EOS ends the document it closes); concatenated, the same block gives another."""
    from conftest import small_model

    from samba_lm.train import distributed as D

    eos, model = 0, small_model(torch.float64).train()
    block = torch.tensor([[5, 7, 0, 9, 3, 3, 0, 4, 4, 2, 8, 0, 6]])
    inputs, labels = block[0, :-1], block[0, 1:]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    env = D.setup("cpu")

    def step(eos):  # no autocast (float64), no clipping
        return trainer_module.train_step(model, optimizer, FixedBlocks(block), 1, 1, contextlib.nullcontext, env, 0.0,
                                         eos)[0].item()

    ends = [i + 1 for i, t in enumerate(inputs.tolist()) if t == eos]
    bounds = [0] + ends + [len(inputs)]
    with torch.no_grad():
        alone = sum(model(inputs[None, a:b], labels=labels[None, a:b]).losses.sum() for a, b in zip(bounds, bounds[1:])
                    if a < b)
    assert step(eos) == pytest.approx(alone.item() / len(inputs), rel=1e-6)  # the step sums its loss in float32
    assert step(None) != pytest.approx(step(eos), rel=1e-6)
    with pytest.raises(ValueError, match="TrainConfig.pack"):
        TrainConfig(task="passkey", init_from="somewhere", pack="documents")


@pytest.mark.parametrize("clip, scale", [(1.0, 10.0), (1.0, 1e-3), (0.0, 10.0)], ids=["clipped", "under", "no-clip"])
def test_clip_folded_into_the_fused_step_equals_clip_grad_norm(clip, scale):
    """clip_and_step hands the clip to the fused AdamW as its grad_scale: the same step as
    clip_grad_norm_ then step, the same norm returned, and no grad_scale left on the optimizer."""
    from samba_lm.train.optim import build_optimizer

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    optimizers = [build_optimizer(m, 1e-2, 0.1, (0.9, 0.95), 1e-8, exempt_from_decay=True) for m in models]
    x = torch.randn(16, 8)
    for _ in range(2):
        for m in models:
            (m(x).pow(2).sum() * scale).backward()
        folded = trainer_module.clip_and_step(models[0], optimizers[0], clip)
        plain = torch.nn.utils.clip_grad_norm_(models[1].parameters(), clip or float("inf"))
        optimizers[1].step()
        assert torch.allclose(folded, plain)
        assert not hasattr(optimizers[0], "grad_scale")
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for o in optimizers:
            o.zero_grad(set_to_none=True)
    assert folded > 1.0 if scale > 1 else folded < 1.0, "each case sits on its side of the clip"
