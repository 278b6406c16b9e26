"""lm-evaluation-harness adapter: `--model samba-lm`, and `samba-lm eval harness`.

What is notable:
- Nothing is truncated. Samba carries a recurrent state, so every input of any length is streamed
  through `model(chunk, state=state)` in chunks of `chunk_size` tokens, which equals one full forward.
  Batches of requests of different lengths are left-padded with their rows starting at a negative
  position, as in `samba_lm.generate`, so padding never enters the state.
- Continuation scores are reduced chunk by chunk (log-prob sum and greedy match), so memory holds one
  chunk's logits whatever the lengths.
- Rolling log-likelihood follows lm-eval's convention: the document is prefixed with `<|endoftext|>`
  (`prefix_token_id`) and every one of its n tokens is scored. It is `stream_nll` (what `eval ppl`
  runs) on the n + 1 tokens `[EOS] + doc`: ll = -(sum of its n NLLs). Constant memory at any length.
- generate_until decodes with the state (linear time), stops a row at `<|endoftext|>` or once its text
  holds one of the request's `until` strings, and cuts the text at the first of them.
- lm-eval is an optional extra (`pip install 'samba-lm[eval]'`); `import samba_lm` never imports it.
  lm-eval finds models only through `register_model` at import time and has no plugin entry points,
  so its own command line is reached as `python -m samba_lm.eval.harness ...`, which registers the
  model first.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..generation import generate_stream
from ..loading import load_model_and_tokenizer_path, resolve_device
from ..options import DEVICE_HELP, ListOption, check_out_dir
from ..prompts import left_pad
from .ppl import DTYPES, stream_nll
from .record import run_record, write_json

try:
    import lm_eval.models  # noqa: F401  lm-eval's own backends, registered lazily, before ours: it looks
    # them up only while its registry is empty, so registering ours first would hide "hf" and the rest
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # the adapter needs lm-eval; the rest of samba_lm does not
    _NO_LM_EVAL, TemplateLM = e, object

    def register_model(*names):
        return lambda cls: cls
else:
    _NO_LM_EVAL = None

TASKS_DIR = Path(__file__).parent / "tasks"  # the local tasks shipped with samba-lm (samba_tiny_mc, samba_tiny_ppl)
GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p"}


def _require_lm_eval():
    if _NO_LM_EVAL is not None:
        raise ImportError("the lm-eval adapter needs lm-eval: pip install 'samba-lm[eval]'") from _NO_LM_EVAL


def _positive_int(name: str, value) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"samba-lm model_args: {name} must be a positive int, got {value!r}")
    return value


@register_model("samba-lm")
class SambaHarnessLM(TemplateLM):
    """`--model samba-lm --model_args pretrained=PATH[,device=cpu][,batch_size=8][,chunk_size=2048][,dtype=...]`,
    PATH a saved model, training checkpoint or run directory with its tokenizer.json; or, in Python,
    `SambaHarnessLM(model=model, tokenizer=tokenizer)` with a SambaLM and a `tokenizers.Tokenizer`."""

    def __init__(self, pretrained=None, model=None, tokenizer=None, device=None, batch_size=1, chunk_size=2048,
                 dtype=None, max_batch_size=None, **unknown):
        _require_lm_eval()
        super().__init__()
        if unknown:
            raise ValueError(f"samba-lm model_args: unknown argument(s) {sorted(unknown)}; known: pretrained, "
                             f"device, batch_size, chunk_size, dtype")
        from ..data import eos_id, load_tokenizer

        self.batch_size = _positive_int("batch_size", batch_size)  # max_batch_size matters to 'auto' only
        self.chunk_size = _positive_int("chunk_size", chunk_size)
        if dtype not in (None, "auto", *DTYPES):
            raise ValueError(f"samba-lm model_args: dtype must be one of {['auto', *DTYPES]}, got {dtype!r}")
        try:
            self._device = resolve_device(device)
        except ValueError as e:
            raise ValueError(f"samba-lm model_args: {e}") from None
        if (pretrained is None) == (model is None):
            raise ValueError("samba-lm model_args: give pretrained=PATH (a saved model, training checkpoint or run "
                             "directory), or model= and tokenizer= in Python; not both")
        self.model_path = str(pretrained) if pretrained is not None else None
        if pretrained is not None:
            try:
                model, tokenizer_file = load_model_and_tokenizer_path(pretrained, self._device)
            except (FileNotFoundError, ValueError) as e:
                raise type(e)(f"samba-lm model_args: pretrained={pretrained}: {e}") from None
            if tokenizer is None and tokenizer_file is None:
                raise ValueError(f"samba-lm model_args: pretrained={pretrained}: no tokenizer.json beside the model")
            tokenizer = tokenizer or tokenizer_file
        if tokenizer is None:
            raise ValueError("samba-lm: model= needs tokenizer= (a tokenizers.Tokenizer or a tokenizer.json path)")
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        if dtype not in (None, "auto"):
            model = model.to(DTYPES[dtype])
        self.model = model.to(self._device).eval()
        self._eot = eos_id(self.tokenizer)

    # ------------------------------------------------------------------------ tokens
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def tokenizer_name(self) -> str:
        return (self.model_path or "samba-lm").replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)).ids

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens))

    def get_model_info(self) -> dict:
        import samba_lm

        return {"model_path": self.model_path, "chunk_size": self.chunk_size, "samba_lm": samba_lm.__version__,
                "model_dtype": str(next(self.model.parameters()).dtype)}

    # ------------------------------------------------------------------------ log-likelihood
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """requests: ((context, continuation), context ids, continuation ids) -> (log p(cont | ctx), greedy).
        Longest first, so that a batch holds similar lengths (and memory trouble shows at once)."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        size, results = override_bs or self.batch_size, [None] * len(requests)
        with tqdm(total=len(order), desc="loglikelihood", disable=disable_tqdm) as bar:
            for b in range(0, len(order), size):
                rows = order[b:b + size]
                scores = self.score([requests[i][1] for i in rows], [requests[i][2] for i in rows])
                for i, score in zip(rows, scores):
                    results[i] = score
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
                bar.update(len(rows))
        return results

    @torch.no_grad()
    def score(self, contexts, continuations) -> list[tuple[float, bool]]:
        """One batch: for each row, the sum of log p(continuation token | all before it) in float64 and
        whether every continuation token is the argmax. The rows are streamed in chunks."""
        if any(len(c) == 0 for c in contexts):
            raise ValueError("every context needs at least one token (lm-eval gives an empty one the EOT prefix)")
        seqs = [list(c) + list(k) for c, k in zip(contexts, continuations)]
        ids, pad = left_pad(seqs, self.model.config.vocab_size)  # [B, W]: inputs ids[:, :-1], targets ids[:, 1:]
        ids = ids.to(self._device)
        batch, steps = ids.shape[0], ids.shape[1] - 1
        n = torch.tensor([len(k) for k in continuations], device=self._device)
        first = steps - int(n.max())  # the first input position whose prediction some row scores
        state = self.model.init_state(batch, start=-pad)  # padding at negative positions stays out of the state
        logprob = torch.zeros(batch, dtype=torch.float64, device=self._device)
        greedy = torch.ones(batch, dtype=torch.bool, device=self._device)
        for t0 in range(0, steps, self.chunk_size):
            t1 = min(t0 + self.chunk_size, steps)
            keep = t1 - max(t0, first)  # positions of this chunk whose logits are needed
            logits = self.model(ids[:, t0:t1], state=state, logits_to_keep=max(keep, 1)).logits
            if keep <= 0:
                continue
            pos = torch.arange(t1 - keep, t1, device=self._device)
            target = ids[:, pos + 1]
            scored = pos[None] >= (steps - n)[:, None]  # row i scores its last n_i predictions
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            lp = F.log_softmax(logits, dim=-1).gather(-1, target[..., None])[..., 0]
            logprob += torch.where(scored, lp, 0).double().sum(1)
            greedy &= ((logits.argmax(-1) == target) | ~scored).all(1)
        return list(zip(logprob.tolist(), greedy.tolist()))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(doc) = sum over its n tokens of log p(token | EOT prefix + the tokens before it)."""
        results = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            ids = [self.prefix_token_id] + self.tok_encode(req.args[0])
            ll = 0.0
            if len(ids) > 1:
                sums = stream_nll(self.model, torch.tensor(ids), self.chunk_size, progress=False)
                ll = -math.fsum(sums.bucket_sum)
            results.append(ll)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, ll)
        return results

    # ------------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batches of requests with equal gen_kwargs, longest context first."""
        encoded = [self.tok_encode(req.args[0]) or [self.eot_token_id] for req in requests]
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        results = [None] * len(requests)
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm) as bar:
            for members in groups.values():
                members.sort(key=lambda i: -len(encoded[i]))
                for b in range(0, len(members), self.batch_size):
                    rows = members[b:b + self.batch_size]
                    texts = self.generate([encoded[i] for i in rows], **requests[rows[0]].args[1])
                    for i, text in zip(rows, texts):
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(rows))
        return results

    def generate(self, prompts, until=(), max_gen_toks=256, do_sample=None, temperature=0.0, top_k=None,
                 top_p=None, **unknown) -> list[str]:
        """Continue token prompts; each text ends before its first `until` string (or at EOT)."""
        if unknown:
            raise ValueError(f"samba-lm generate_until: unsupported gen_kwargs {sorted(unknown)}; "
                             f"supported: {sorted(GEN_KWARGS)}")
        until = [until] if isinstance(until, str) else list(until)
        if not all(isinstance(s, str) and s for s in until):
            raise ValueError(f"samba-lm generate_until: until must be non-empty strings, got {until!r}")
        temperature = float(temperature or 0.0)
        if do_sample is False:
            temperature = 0.0  # greedy, as in Hugging Face generate
        elif do_sample and temperature == 0:
            temperature = 1.0
        new = [[] for _ in prompts]
        done = [False] * len(prompts)
        for step in generate_stream(self.model, prompts, int(max_gen_toks), temperature, top_k, top_p,
                                    stop_tokens=[self.eot_token_id], prefill_chunk=self.chunk_size):
            for i, token in enumerate(step.tolist()):
                if done[i]:
                    continue
                if token == self.eot_token_id:
                    done[i] = True
                    continue
                new[i].append(token)
                text = self.tok_decode(new[i])
                done[i] = any(s in text for s in until)
            if all(done):
                break
        return [_cut(self.tok_decode(tokens), until) for tokens in new]


def _cut(text: str, until) -> str:
    found = [text.find(s) for s in until if s in text]
    return text[:min(found)] if found else text


# ---------------------------------------------------------------------------- command line
def add_arguments(parser):
    parser.add_argument("--model", required=True, help="a saved model, a training checkpoint or a run directory")
    parser.add_argument("--tasks", required=True, action=ListOption, metavar="TASK,TASK,...",
                        help="lm-eval task names or task YAML files, e.g. samba_tiny_mc,samba_tiny_ppl")
    parser.add_argument("--include-path", action="append", default=[],
                        help="a directory of lm-eval task YAML files (repeatable); samba-lm's own is always included")
    parser.add_argument("--limit", type=float, help="examples per task (a fraction of them if < 1; default: all)")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: each task's own)")
    parser.add_argument("--batch-size", type=int, default=8, help="requests scored or generated together")
    parser.add_argument("--chunk-size", type=int, default=2048, help="tokens per forward call when streaming")
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)
    parser.add_argument("--seed", type=int, default=0, help="lm-eval's seeds (sampling, few-shot examples)")
    parser.add_argument("--out", default="eval/harness", help="directory for harness.json")


def run(args) -> dict:
    """Evaluate with lm_eval.simple_evaluate, print lm-eval's table, write OUT/harness.json."""
    _require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table

    tasks = args.tasks
    check_out_dir(args.out, "--out")
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be > 0, got {args.limit}")
    for name, value in (("--batch-size", args.batch_size), ("--chunk-size", args.chunk_size)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    for path in args.include_path:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--include-path {path} is not a directory")
    paths = [str(TASKS_DIR), *args.include_path]
    manager = TaskManager(include_path=paths, include_defaults=False)
    missing = [t for t in tasks if t not in manager.all_tasks and not Path(t).is_file()]  # a name or a YAML file
    if missing:  # lm-eval's own tasks too (indexing them takes ~15 s)
        manager = TaskManager(include_path=paths)
        missing = [t for t in missing if t not in manager.all_tasks]
        if missing:
            raise ValueError(f"--tasks: no task named {missing} in lm-eval or in {paths}")
    lm = SambaHarnessLM(pretrained=args.model, device=args.device, batch_size=args.batch_size,
                        chunk_size=args.chunk_size)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    started = time.perf_counter()
    with _quiet_git_hash():
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit,
                                          num_fewshot=args.num_fewshot, log_samples=False, random_seed=args.seed,
                                          numpy_random_seed=args.seed, torch_random_seed=args.seed,
                                          fewshot_random_seed=args.seed)
    seconds = time.perf_counter() - started
    payload = json.loads(json.dumps(results, default=handle_non_serializable))
    payload.update(seconds=round(seconds, 2), lm_eval=lm_eval.__version__,
                   run_record=run_record(lm.model, args.model, getattr(args, "argv", None)))
    out = Path(args.out)
    write_json(out / "harness.json", payload)
    print(make_table(results))
    print(f"{seconds:.1f} s; wrote {out / 'harness.json'}")
    return payload


@contextlib.contextmanager
def _quiet_git_hash():
    """lm-eval records `git describe` of the working directory and lets git print "fatal: not a git
    repository" outside one; ask git the same with its complaints silenced."""
    import lm_eval.evaluator

    def git_hash():
        try:
            found = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True)
        except FileNotFoundError:  # no git here
            return None
        return found.stdout.strip() if found.returncode == 0 else None

    real, lm_eval.evaluator.get_git_commit_hash = lm_eval.evaluator.get_git_commit_hash, git_hash
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = real


def main():
    """`python -m samba_lm.eval.harness [lm-eval arguments]`: lm-eval's own command line, with samba-lm
    registered, e.g. `... --model samba-lm --model_args pretrained=RUN --tasks samba_tiny_mc
    --include_path $(python -c 'import samba_lm.eval.harness as h; print(h.TASKS_DIR)')`."""
    _require_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    with contextlib.suppress(ImportError):  # `--model hf` on a model saved by samba_lm.hf
        import samba_lm.hf  # noqa: F401
    cli_evaluate()


if __name__ == "__main__":
    main()
