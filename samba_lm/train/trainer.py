"""The training recipe: setup -> data -> build on meta -> init or resume -> parallelize -> loop.

The same `train(cfg)` runs in one process or under `torchrun --nproc_per_node N` (DDP or FSDP2).
A run lives in `cfg.out_dir` (where each part goes: loading.RunDir): tokenizer.json,
train_config.json, metrics.jsonl, tensorboard/, checkpoints/step_*/ (resumable bit-exactly), and at
the end model/ (save_pretrained + tokenizer) and loss.png. `cfg.task` picks the training data: token
shards ("lm") or passkey prompts made on the fly ("passkey"); `cfg.init_from` fine-tunes a trained
model instead of initialising one. SIGINT (Ctrl-C) or SIGTERM stops a run at the next step boundary
with a checkpoint (signals.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import time
from pathlib import Path
from typing import NamedTuple

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from tqdm import tqdm

from ..checkpoint import (load_checkpoint, newest_intact_checkpoint, prune_checkpoints, read_checkpoint_meta,
                          save_checkpoint, save_pretrained)
from ..config import SambaConfig
from ..data import BlockLoader, TokenShards, TokenStream, eos_id, load_tokenizer
from ..documents import documents_from_eos
from ..data.passkey import PasskeyBlocks
from ..flops import flops_per_token
from ..loading import TOKENIZER_FILE, RunDir, load_model_and_tokenizer_path
from ..model import SambaLM
from ..options import check_out_dir
from . import distributed as D
from .config import TrainConfig
from .metrics import MetricsLogger, perplexity, plot_losses
from .optim import build_optimizer, lr_at
from .signals import Interrupted, StopRequest

RECENT_SAVE_S = 60  # a stop by signal writes no checkpoint when one is younger than this


def train(cfg: TrainConfig) -> dict:
    env = D.setup(cfg.device)
    try:
        with StopRequest() as stop:  # armed at the first step: until then a signal stops at once
            return _run(cfg, env, stop)
    finally:
        D.teardown()


def _run(cfg: TrainConfig, env: D.DistEnv, stop: StopRequest) -> dict:
    out = check_out_dir(cfg.out_dir, "out_dir")
    init, init_tokenizer = pretrained(cfg.init_from) if cfg.init_from else (None, None)
    data = task_data(cfg, env, init_tokenizer)
    model_cfg = model_config(cfg, data.vocab_size, init.config if init is not None else None)
    micro, accum = batch_plan(cfg, env.world_size)
    train_loader, val_stream = data.train, data.val if cfg.eval_batches else None
    resume = _resumable(cfg, model_cfg, train_loader, env.device)  # incompatible ones fail here, before any work
    log = MetricsLogger(out, env.is_main, cfg.tensorboard, resume_step=resume[1]["step"] if resume else None)
    _announce(cfg, env, model_cfg, micro, accum, data, resume, log)

    model = build_model(model_cfg, env.device, cfg.seed)
    if init is not None and not resume:
        model.load_state_dict(init.state_dict())  # cast to the fp32 master weights
    del init  # one copy of the weights is enough
    model = D.parallelize(model, cfg.parallel, env, compile=cfg.compile, checkpoint=cfg.activation_checkpointing,
                          recompute_mamba=cfg.recompute_mamba)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps, cfg.exempt_from_decay)
    step = _restore(resume[0], model, optimizer) if resume else _start_run(cfg, env, data.tokenizer, model_cfg)
    autocast = _autocast(cfg, env.device)
    eos = eos_id(load_tokenizer(data.tokenizer)) if cfg.pack == "documents" else None

    bar = _progress(cfg, env, step)
    tokens_per_step, last = cfg.batch_size * cfg.seq_len, {}
    saved = None, -math.inf  # (path, time) of this process's last checkpoint
    # On a GPU a step's loss and gradient norm are read (a wait) only once the next step is queued, so
    # the GPU never idles while the host starts a step; steps that evaluate, save or stop are read at
    # once, before any later step changes the weights. A CPU step is done when it returns: read at once.
    pending, read_at = None, -math.inf
    stop.arm()
    try:
        while step < cfg.steps:
            started = time.perf_counter()
            lr = lr_at(step, cfg.steps, cfg.lr, round(cfg.warmup_fraction * cfg.steps), cfg.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            stats = HostCopy(*train_step(model, optimizer, train_loader, micro, accum, autocast, env, cfg.grad_clip,
                                         eos))
            step += 1
            if pending is not None:
                last, read_at = _read_step(pending, read_at, tokens_per_step, env, log, bar, cfg)
            pending = step, lr, stats, started
            signum = D.max_across_ranks(stop.signum or 0, env.device)  # every rank stops at the same step
            evaluate_now = val_stream is not None and (step % cfg.eval_every == 0 or step == cfg.steps)
            save_now = step % cfg.save_every == 0 or step == cfg.steps
            if stats.in_flight and not (evaluate_now or save_now or signum):  # save_now at the last step too
                continue
            last, read_at = _read_step(pending, read_at, tokens_per_step, env, log, bar, cfg, report=not evaluate_now)
            pending = None
            if evaluate_now:
                last["val_loss"] = evaluate(model, val_stream, cfg, micro, autocast, env, eos)
                log.log(step, val_loss=last["val_loss"], val_ppl=perplexity(last["val_loss"]))
                _report(bar, step, cfg, last, env.is_main)
            if save_now:
                saved = _save(out, step, model, optimizer, train_loader, model_cfg, cfg), time.monotonic()
            if signum and step < cfg.steps:  # at the last step the run ends as it would have anyway
                bar.close()
                if time.monotonic() - saved[1] > RECENT_SAVE_S:
                    saved = _save(out, step, model, optimizer, train_loader, model_cfg, cfg), time.monotonic()
                raise Interrupted(signum, _stopped(signum, step, saved) if env.is_main else "")
    except BaseException:
        if pending is not None:  # a crash while the next step was queued: this step's numbers are kept
            with contextlib.suppress(Exception):  # unless the GPU itself failed; the first error is raised
                _read_step(pending, read_at, tokens_per_step, env, log, bar, cfg)
        raise
    bar.close()
    log.close()
    export(model, model_cfg, RunDir(out).model, RunDir(out).tokenizer, env)
    if env.is_main:
        png = plot_losses(out / "metrics.jsonl", out / "loss.png", f"{_model_name(cfg)} on {data.name}")
        _where_it_went(out, step, cfg, png)
    return last


# ----------------------------------------------------------------------------- setup
class TaskData(NamedTuple):
    train: BlockLoader | PasskeyBlocks
    val: TokenStream | None  # the validation split, if the task has one
    tokenizer: Path  # the tokenizer.json the token ids come from
    vocab_size: int
    name: str  # for the console and the loss plot
    about: str  # one line for the console


def task_data(cfg: TrainConfig, env: D.DistEnv, init_tokenizer: Path | None) -> TaskData:
    """The training data of `cfg.task`. Fine-tuning (init_from) keeps the model's tokenizer, so the
    shards of the "lm" task must have been written with it."""
    if cfg.task == "passkey":
        if init_tokenizer is None:
            raise FileNotFoundError(f"no tokenizer.json beside {cfg.init_from}: the passkey task needs the "
                                    "tokenizer the model was trained with")
        tokenizer = load_tokenizer(init_tokenizer)
        loader = PasskeyBlocks(tokenizer, cfg.seq_len, cfg.seed, env.rank, env.world_size)
        return TaskData(loader, None, init_tokenizer, tokenizer.get_vocab_size(), "passkey",
                        "passkey prompts made on the fly, a random key and depth per sequence")
    shards = TokenShards(cfg.data)
    if init_tokenizer is not None and load_tokenizer(init_tokenizer).get_vocab() != load_tokenizer(
            shards.tokenizer_path).get_vocab():
        raise ValueError(f"{cfg.data} was tokenized with another tokenizer than {cfg.init_from}'s: rebuild it "
                         f"with `samba-lm data --tokenizer {init_tokenizer}`")
    loader = BlockLoader(shards.split("train"), cfg.seq_len, cfg.seed, env.rank, env.world_size)
    val = shards.split("val") if "val" in shards.index["splits"] else None
    return TaskData(loader, val, shards.tokenizer_path, shards.vocab_size, Path(cfg.data).name,
                    f"the training split of {cfg.data} holds {loader.n_blocks} blocks "
                    f"({loader.n_blocks / cfg.batch_size:.0f} steps/epoch)")


def pretrained(path: str) -> tuple[SambaLM, Path | None]:
    """The model to fine-tune (a saved model, a training checkpoint or a run directory) and the
    tokenizer.json beside it or its run, if any (where `samba-lm generate` looks)."""
    return load_model_and_tokenizer_path(path)


def model_config(cfg: TrainConfig, data_vocab: int, init: SambaConfig | None = None) -> SambaConfig:
    """The config of the model to fine-tune (init), else the preset with its overrides."""
    model_cfg = init if init is not None else SambaConfig.from_preset(cfg.model, **{"vocab_size": data_vocab,
                                                                                     **cfg.model_args})
    if model_cfg.vocab_size < data_vocab:
        raise ValueError(f"the tokenizer of {cfg.init_from or cfg.data} has {data_vocab} tokens but model "
                         f"vocab_size is {model_cfg.vocab_size}: the vocabulary does not fit the model")
    return model_cfg


def _model_name(cfg: TrainConfig) -> str:
    return Path(cfg.init_from).name if cfg.init_from else cfg.model


def batch_plan(cfg: TrainConfig, world: int) -> tuple[int, int]:
    """(micro batch per forward, accumulation steps) such that micro * accum * world = batch_size."""
    if cfg.batch_size % world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the number of processes ({world})")
    per_rank = cfg.batch_size // world
    micro = cfg.micro_batch_size or per_rank
    if per_rank % micro:
        raise ValueError(f"micro_batch_size={micro} must divide batch_size / processes = {per_rank}")
    return micro, per_rank // micro


def build_model(model_cfg: SambaConfig, device: torch.device, seed: int) -> SambaLM:
    """Build on meta, allocate on the device, initialise from the seed (identical on every rank)."""
    with torch.device("meta"):
        model = SambaLM(model_cfg)
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.init_weights()
    return model


def _autocast(cfg: TrainConfig, device: torch.device):
    bf16 = cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda")
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext


def _start_run(cfg, env, tokenizer, model_cfg) -> int:
    if env.is_main:
        run = RunDir(cfg.out_dir)
        run.root.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tokenizer, run.tokenizer)
        run.train_config.write_text(json.dumps(
            {"train": cfg.to_dict(), "model": model_cfg.to_dict()}, indent=2) + "\n")
    D.barrier()
    return 0


def _announce(cfg, env, model_cfg, micro, accum, data, resume, log):
    if not env.is_main:
        return
    with torch.device("meta"):
        n_params = sum(p.numel() for p in SambaLM(model_cfg).parameters())
    fpt = flops_per_token(model_cfg, cfg.seq_len)
    lines = [
        f"samba-lm train: {'fine-tuning ' + cfg.init_from if cfg.init_from else cfg.model} "
        f"({n_params / 1e6:.2f}M parameters), task {cfg.task}",
        f"  processes {env.world_size} x {env.device} ({cfg.parallel if env.distributed else 'single'}), "
        f"dtype {cfg.dtype}" + (", activation checkpointing" if cfg.activation_checkpointing else "")
        + (", Mamba mixers recomputed" if cfg.recompute_mamba else ""),
        f"  batch {cfg.batch_size} x {cfg.seq_len} = {cfg.batch_size * cfg.seq_len} tokens/step "
        f"(micro {micro} x accumulation {accum} x processes {env.world_size})",
        f"  {cfg.steps} steps = {cfg.steps * cfg.batch_size * cfg.seq_len / 1e6:.2f}M tokens; {data.about}",
        f"  training FLOPs/token {3 * fpt / 1e6:.1f}M (forward {fpt / 1e6:.1f}M)",
        f"  config: {json.dumps(cfg.to_dict())}",
        f"  model:  {json.dumps(model_cfg.to_dict())}",
    ]
    if resume:
        lines += [f"  {note}" for note in resume.notes]
        at = resume.meta["step"]
        if at > cfg.steps:
            lines.append(f"  nothing to train: the newest checkpoint, {resume.path}, is at step {at}, past --steps "
                         f"{cfg.steps}; raise --steps to train further, or start a new run in another --out-dir")
        else:
            lines.append(f"  {'already trained' if at == cfg.steps else 'resuming'}: {resume.path} (step {at})"
                         + ("; raise --steps to train further" if at == cfg.steps else ""))
    print("\n".join(lines), flush=True)


def _progress(cfg, env, step):
    return tqdm(total=cfg.steps, initial=step, disable=not (env.is_main and cfg.progress) or step >= cfg.steps,
                unit="step", dynamic_ncols=True, mininterval=1.0)


def _stopped(signum: int, step: int, saved: tuple) -> str:
    path, at = saved
    older = "" if path.name.endswith(f"_{step:08d}") else f" (written {time.monotonic() - at:.0f} s ago, so kept)"
    return (f"stopped by {signal.Signals(signum).name} at step {step}: checkpoint {path}{older}; "
            f"run the same command again to resume")


def _where_it_went(out: Path, step: int, cfg: TrainConfig, png: Path | None):
    lines = [f"samba-lm train: done at step {step}. The run is in {out}:",
             f"  model:   {RunDir(out).model} (config.json, model.safetensors, tokenizer.json)",
             f"  loss:    {png if png is not None else 'no loss.png (matplotlib is not installed)'}",
             f"  metrics: {out / 'metrics.jsonl'}" + (f", {out / 'tensorboard'}" if cfg.tensorboard else "")]
    print("\n".join(lines), flush=True)


def _read_step(pending, read_at, tokens_per_step, env, log, bar, cfg, report=True):
    """Waits for a queued step's numbers and logs them (and shows them, `report`). Returns its metrics
    and when they were read. Its time runs from its start, or from the previous step's read when the
    GPU was still busy with that one then (the host queues ahead)."""
    step, lr, stats, started = pending
    loss, grad_norm = stats.get()
    now = time.perf_counter()
    last = dict(loss=loss, lr=lr, grad_norm=grad_norm, tokens=step * tokens_per_step,
                tok_per_s=tokens_per_step / (now - max(started, read_at)))
    if env.device.type == "cuda":  # this process's, since the run began
        last["peak_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
    log.log(step, **last)
    if report:
        _report(bar, step, cfg, last, env.is_main)
    return last, now


class HostCopy:
    """0-d device tensors' values on their way to the host: the copy is queued behind the work that
    makes them, so the host can queue more work before it waits for them (`get`). (`.item()` would
    wait for everything queued by then, the next step included.)"""

    def __init__(self, *values: torch.Tensor):
        flat = torch.stack([v.detach().float().reshape(()) for v in values])
        self._done = None
        self.in_flight = flat.device.type == "cuda"  # whether the work may still be running
        if self.in_flight:
            self._host = torch.empty(flat.shape, dtype=torch.float32, pin_memory=True)
            self._host.copy_(flat, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._host = flat

    def get(self) -> list[float]:
        if self._done is not None:
            self._done.synchronize()
        return self._host.tolist()


def _report(bar, step, cfg, last, is_main):
    bar.update(1)
    bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tok_per_s']:.0f}", refresh=False)
    if step % cfg.log_every == 0 or step == cfg.steps or "val_loss" in last:
        msg = (f"step {step}/{cfg.steps} | loss {last['loss']:.4f} | lr {last['lr']:.2e} | "
               f"grad {last['grad_norm']:.2f} | {last['tok_per_s']:.0f} tok/s")
        if "val_loss" in last:
            msg += f" | val loss {last['val_loss']:.4f} (ppl {perplexity(last['val_loss']):.1f})"
        if is_main and bar.disable:
            print(msg, flush=True)
        elif is_main:
            bar.write(msg)


# ----------------------------------------------------------------------------- the step
def _documents(inputs: torch.Tensor, eos: int | None) -> torch.Tensor | None:
    """--pack documents: a new document after every EOS of the block's inputs; else None (concat)."""
    return documents_from_eos(inputs, eos) if eos is not None else None


def train_step(model, optimizer, loader, micro, accum, autocast, env, clip,
               eos=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step, queued: returns its mean loss and the gradients' norm before clipping as
    0-d tensors on the device, without waiting for them. `eos`: the EOS id when documents are packed
    with resets (--pack documents)."""
    batch = loader.next_batch(micro * accum * env.world_size)  # this rank's share of the global batch
    total = torch.zeros((), device=env.device)
    for i, block in enumerate(batch.split(micro)):
        block = block.to(env.device, non_blocking=True)
        inputs = block[:, :-1]
        with D.gradient_sync(model, i == accum - 1), autocast():
            loss = model(inputs, labels=block[:, 1:], document_ids=_documents(inputs, eos)).loss / accum
            loss.backward()
        total += loss.detach()
    grad_norm = clip_and_step(model, optimizer, clip)
    optimizer.zero_grad(set_to_none=True)
    return D.mean_across_ranks(total), grad_norm


def clip_and_step(model, optimizer, clip: float) -> torch.Tensor:
    """clip_grad_norm_ (clip 0: none) and the optimizer's step; returns the gradients' norm before
    clipping. The fused AdamW scales the gradients as it reads them (GradScaler's protocol: it divides
    them by `optimizer.grad_scale`), so the clipping makes no pass over them of its own; FSDP2's
    DTensor gradients take the plain clip."""
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    sharded = hasattr(grad_norm, "full_tensor")
    if clip and sharded:
        torch.nn.utils.clip_grads_with_norm_(model.parameters(), clip, grad_norm)
    elif clip:  # clip_grad_norm_'s factor min(1, clip / (norm + 1e-6)), as a divisor
        optimizer.grad_scale = torch.clamp((grad_norm + 1e-6) / clip, min=1.0)
    try:
        optimizer.step()
    finally:
        optimizer.__dict__.pop("grad_scale", None)
    return grad_norm.full_tensor() if sharded else grad_norm


@torch.no_grad()
def evaluate(model, stream, cfg, micro, autocast, env, eos=None) -> float:
    """Mean loss over the first eval_batches global micro-batches of the validation split (fixed),
    packed as in training."""
    loader = BlockLoader(stream, cfg.seq_len, cfg.seed, env.rank, env.world_size, shuffle=False)
    n = max(1, min(cfg.eval_batches, loader.n_blocks // (micro * env.world_size)))
    model.eval()
    total = torch.zeros((), device=env.device)
    for _ in range(n):
        block = loader.next_batch(micro * env.world_size).to(env.device)
        with autocast():
            total += model(block[:, :-1], labels=block[:, 1:], document_ids=_documents(block[:, :-1], eos)).loss
    model.train()
    return D.mean_across_ranks(total / n).item()


# ----------------------------------------------------------------------------- checkpoints
def _stateful(model, optimizer):
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _save(out, step, model, optimizer, loader, model_cfg, cfg) -> Path:
    meta = {"loader": loader.state_dict(), "model_config": model_cfg.to_dict(), "train_config": cfg.to_dict(),
            "numerics": numerics(next(model.parameters()).device)}
    root = RunDir(out).checkpoints
    path = save_checkpoint(root, step, _stateful(model, optimizer), _rng_state(), meta)
    prune_checkpoints(root, cfg.keep_last)
    return path


class Resume(NamedTuple):
    path: Path
    meta: dict
    notes: list[str]  # for the console: checkpoints passed over, checks that could not be made


def _resumable(cfg, model_cfg, loader, device) -> Resume | None:
    """The newest intact checkpoint to resume from, after checking it fits this run; the loader is
    positioned there already."""
    root = RunDir(cfg.out_dir).checkpoints
    found, damaged = newest_intact_checkpoint(root) if cfg.resume else (None, [])
    if found is None:
        if damaged:
            raise ValueError(f"no checkpoint in {root} can be resumed: {'; '.join(damaged)}. Delete the damaged "
                             f"ones to start this run again, or choose another out_dir")
        return None
    notes = [f"{why}; passed over for an older checkpoint" for why in damaged]
    meta = read_checkpoint_meta(found)
    saved, now = meta["model_config"], model_cfg.to_dict()
    diff = {k: (saved.get(k), now[k]) for k in now if k != "name" and saved.get(k) != now[k]}
    if diff:
        raise ValueError(f"checkpoint {found} was written for another model ({diff}, saved vs now); "
                         f"to train this one, choose another out_dir")
    try:
        loader.load_state_dict(meta["loader"])
    except ValueError as e:
        raise ValueError(f"checkpoint {found} cannot resume on {cfg.data}: {e}. To train on this data from the "
                         f"start, choose another out_dir (or delete {root})") from None
    then, now = meta.get("numerics"), numerics(device)
    if then is not None and then != now:
        changed = ", ".join(f"{k} {then.get(k)} -> {now.get(k)}" for k in now if then.get(k) != now.get(k))
        notes.append(f"resuming with other numerics than {found} was written with ({changed}): the run continues, "
                     "but its losses may differ from an uninterrupted run's in the last bits")
    if cfg.task == "lm" and not (meta["loader"].get("data_sha256") and loader.stream.sha256):
        notes.append(f"the data cannot be checked against {found} beyond its size: the checkpoint or the shards "
                     f"predate data fingerprints (rebuilding the shards with `samba-lm data` records one)")
    return Resume(found, meta, notes)


def numerics(device: torch.device) -> dict:
    """What a bit-exact resume needs to be the same (it is checked, and a difference noted): on a CPU the
    intra-op threads and the vector kernels torch dispatches to (reductions split by thread), on a GPU
    its name and the torch version."""
    if device.type == "cpu":
        return {"device": "cpu", "threads": torch.get_num_threads(),
                "kernels": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__}
    return {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}


def _restore(path, model, optimizer) -> int:
    state = _stateful(model, optimizer)
    meta, rng = load_checkpoint(path, state)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return meta["step"]


def export(model, model_cfg, directory: Path, tokenizer: Path, env):
    """Gather the full weights (collective) and write one safetensors model on the main rank."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.is_main:
        with torch.device("meta"):
            plain = SambaLM(model_cfg)
        plain.load_state_dict(full, assign=True)
        save_pretrained(plain, directory)
        if Path(tokenizer).is_file():
            shutil.copyfile(tokenizer, Path(directory) / TOKENIZER_FILE)
    D.barrier()
