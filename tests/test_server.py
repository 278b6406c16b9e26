"""The OpenAI-compatible server on loopback: concurrent streaming clients against generate(), every
bad input, overload, disconnects, metrics, and SIGTERM on a real process.

Servers run in-process (uvicorn in a thread, on a port the OS picks) over the real continuous-batching
scheduler and a tiny float64 model, in which the scheduler generates exactly what generate() does
for each prompt alone; a scripted scheduler (fake_scheduler.py) covers what needs exact control.
The real scheduler runs both ways `samba-lm serve` runs it: in a thread of the server's process, and
in an engine process of its own (the same model, saved and loaded there), which is also killed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import samba_lm  # noqa: E402
from conftest import save_small_model, small_model  # noqa: E402
from fake_scheduler import FakeScheduler  # noqa: E402
from samba_lm.data.tokenizer import EOS, train_tokenizer  # noqa: E402
from samba_lm.serving.engine_process import EngineProcess, load_model  # noqa: E402
from samba_lm.serving.protocol import TextStream  # noqa: E402
from samba_lm.serving.scheduler import GenerationRequest, Scheduler  # noqa: E402
from samba_lm.serving.arguments import add_arguments  # noqa: E402
from samba_lm.serving.command import main  # noqa: E402
from samba_lm.serving.server import build_app, make_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_CONTEXT = 1024
LONG = 1000  # tokens: a request that runs until it is cancelled
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda".split()
DOCS = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(60)) for i in range(20)] + ["héllo wörld, café"]
UNSEEN = "Ωμέγα ∑ 𝄞 🎉 日本"  # 2- to 4-byte characters without merges: split across tokens
WHERE = ["thread", "engine-process"]  # where the scheduler runs
PROC = Path("/proc/self/stat").exists()  # where engine_pid() finds an engine process


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(DOCS, 300)


@pytest.fixture(scope="module")
def model(tokenizer):
    return small_model(vocab_size=tokenizer.get_vocab_size())  # float64: batched == alone, exactly


@pytest.fixture(scope="module")
def model_dir(model, tokenizer, tmp_path_factory):
    """The model saved with its tokenizer, for an engine process to load."""
    path = tmp_path_factory.mktemp("tiny")
    samba_lm.save_pretrained(model, path)
    tokenizer.save(str(path / "tokenizer.json"))
    return path


def start_scheduler(where: str, model, model_dir, **options):
    """A started Scheduler in a thread, or one in an engine process that loads `model_dir` (float64, as
    saved) on the CPU."""
    if where == "thread":
        return Scheduler(model, **options).start()
    load = functools.partial(load_model, model_dir, torch.device("cpu"), None, options.get("max_context"))
    return EngineProcess(load, **options).start()


@contextlib.contextmanager
def serving(app):
    """Run `app` with uvicorn in a thread on a free loopback port; yield its base URL."""
    server = make_server(app, log_level="warning")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module", params=WHERE)
def server(request, model, tokenizer, model_dir):
    """(base URL, scheduler) of a server with 4 batch slots, its scheduler in a thread or a process."""
    scheduler = start_scheduler(request.param, model, model_dir, max_batch=4, max_queue=64, max_context=MAX_CONTEXT)
    app = build_app(scheduler, tokenizer, "tiny", MAX_CONTEXT, vocab_size=model.config.vocab_size)
    with serving(app) as url:
        yield url, scheduler


def reference(model, tokenizer, ids, max_tokens, temperature=0.0, top_k=None, top_p=None, seed=None, ignore_eos=False):
    """(text, tokens, finish_reason) that generate() gives for this prompt alone."""
    stops = [] if ignore_eos else [tokenizer.token_to_id(EOS)]
    new = samba_lm.generate(model, [ids], max_new_tokens=max_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed, stop_tokens=stops)[0][len(ids):].tolist()
    return tokenizer.decode(new), len(new), "stop" if new and new[-1] in stops else "length"


def wait_for(condition, what: str, timeout: float = 30.0):
    """Poll `condition` (a bounded wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def idle(url) -> bool:
    health = httpx.get(f"{url}/health").json()
    return health["running"] == 0 and health["queued"] == 0


def sse(response) -> list:
    """The data of each server-sent event of a streaming response, [DONE] included."""
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


def metric(url, name: str, labels: str = "") -> float:
    pattern = re.compile(rf"^{re.escape(name + labels)} (\S+)$", re.M)
    found = pattern.search(httpx.get(f"{url}/metrics").text)
    return float(found.group(1)) if found else 0.0


# ----------------------------------------------------------------------------- load
def test_concurrent_clients_match_generate(server, model, tokenizer):
    """24 requests from 8 threads through the openai client, streaming and not, greedy and seeded
    sampling (top-k, top-p), text and token-id prompts: each gets what generate() gives it alone."""
    url, scheduler = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)

    def case(i):
        text = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 5))
        prompt = tokenizer.encode(text).ids if i % 4 == 3 else text
        sampling = [dict(temperature=0.0), dict(temperature=0.9, seed=i, top_k=20),
                    dict(temperature=1.0, seed=i, top_p=0.9)]
        return prompt, 6 + i % 9, sampling[i % 3], i % 2 == 0

    def ask(i):
        prompt, max_tokens, sampling, stream = case(i)
        kwargs = dict(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=sampling["temperature"])
        kwargs.update({k: sampling[k] for k in ("seed", "top_p") if k in sampling})
        if "top_k" in sampling:
            kwargs["extra_body"] = {"top_k": sampling["top_k"]}
        if not stream:
            reply = client.completions.create(**kwargs)
            return reply.choices[0].text, reply.usage.completion_tokens, reply.choices[0].finish_reason
        text, reason, used = "", None, None
        for chunk in client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
            if chunk.choices:
                text += chunk.choices[0].text
                reason = chunk.choices[0].finish_reason or reason
            if chunk.usage is not None:
                used = chunk.usage.completion_tokens
        return text, used, reason

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(ask, range(24)))
    for i, answer in enumerate(got):
        prompt, max_tokens, sampling, _ = case(i)
        ids = prompt if isinstance(prompt, list) else tokenizer.encode(prompt).ids
        assert answer == reference(model, tokenizer, ids, max_tokens, **sampling), f"request {i}"
    wait_for(lambda: idle(url), "the batch to empty")


def test_stop_string_and_stop_token_ids(server, model, tokenizer):
    url, _ = server
    ids = tokenizer.encode("gamma delta").ids
    full, _, _ = reference(model, tokenizer, ids, 40, temperature=1.0, seed=7, ignore_eos=True)
    stop = next(full[i:i + 3] for i in range(4, len(full) - 3) if "\ufffd" not in full[i:i + 3])
    body = dict(prompt=ids, max_tokens=40, temperature=1.0, seed=7, ignore_eos=True, stop=[stop, "never seen"])
    reply = httpx.post(f"{url}/v1/completions", json=body).json()
    expected = {"index": 0, "text": full[:full.find(stop)], "logprobs": None, "finish_reason": "stop"}
    assert reply["choices"][0] == expected
    with httpx.stream("POST", f"{url}/v1/completions", json=body | {"stream": True}) as response:
        events = sse(response)
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full[:full.find(stop)]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and events[-1] == "[DONE]"

    new = samba_lm.generate(model, [ids], max_new_tokens=12, temperature=1.0, seed=3)[0][len(ids):].tolist()
    body = dict(prompt=ids, max_tokens=12, temperature=1.0, seed=3, ignore_eos=True, stop_token_ids=[new[5]])
    reply = httpx.post(f"{url}/v1/completions", json=body).json()
    cut = new.index(new[5]) + 1  # the stop token is emitted, then generation ends
    assert reply["choices"][0]["text"] == tokenizer.decode(new[:cut])
    assert reply["choices"][0]["finish_reason"] == "stop" and reply["usage"]["completion_tokens"] == cut
    wait_for(lambda: idle(url), "the stopped requests to leave the batch")


def test_models_health_and_openai_errors(server):
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{url}/v1/models").json()["object"] == "list"
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="gpt-4", prompt="alpha", max_tokens=2)
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny", prompt="alpha", temperature=-1)
    assert bad.value.body["param"] == "temperature"


ERRORS = [  # (body, status, param, code)
    ('{"prompt": "alpha",', 400, None, "json_invalid"),
    ("[1, 2]", 400, None, None),
    ("{}", 400, "prompt", "missing"),
    ('{"prompt": "alpha", "max_token": 4}', 400, "max_token", "extra_forbidden"),
    ('{"prompt": "alpha", "stream_options": {"usage": true}}', 400, "stream_options.usage", "extra_forbidden"),
    ('{"prompt": "alpha", "temperature": -0.5}', 400, "temperature", None),
    ('{"prompt": "alpha", "temperature": NaN}', 400, "temperature", None),
    ('{"prompt": "alpha", "top_p": 0}', 400, "top_p", None),
    ('{"prompt": "alpha", "top_p": 1.5}', 400, "top_p", None),
    ('{"prompt": "alpha", "top_k": 0}', 400, "top_k", None),
    ('{"prompt": "alpha", "max_tokens": 0}', 400, "max_tokens", None),
    ('{"prompt": "alpha", "max_tokens": "16"}', 400, "max_tokens", None),
    ('{"prompt": "alpha", "stream": "yes"}', 400, "stream", None),
    ('{"prompt": ""}', 400, "prompt", None),
    ('{"prompt": []}', 400, "prompt", None),
    ('{"prompt": ["alpha", "beta"]}', 400, "prompt", None),
    ('{"prompt": [3, 100000]}', 400, "prompt[1]", "token_out_of_range"),
    ('{"prompt": [-1]}', 400, "prompt[0]", "token_out_of_range"),
    ('{"prompt": "alpha", "stop_token_ids": [100000]}', 400, "stop_token_ids[0]", "token_out_of_range"),
    ('{"prompt": "alpha", "stop": ""}', 400, "stop", None),
    ('{"prompt": "alpha", "max_tokens": 2000}', 400, "max_tokens", "context_length_exceeded"),
    (json.dumps({"prompt": [5] * 1100}), 400, "prompt", "context_length_exceeded"),
    ('{"prompt": "alpha", "echo": true}', 400, "echo", None),
    ('{"prompt": "alpha", "n": 2}', 400, "n", None),
    ('{"prompt": "alpha", "logprobs": 1}', 400, "logprobs", None),
    ('{"prompt": "alpha", "model": "gpt-4"}', 404, "model", "model_not_found"),
]


def test_bad_requests_are_named_and_the_server_keeps_serving(server):
    url, _ = server
    with httpx.Client(base_url=url) as client:
        for body, status, param, code in ERRORS:
            response = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert response.status_code == status, body
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"], body
            assert code is None or error["code"] == code, body
            if param:
                assert param.split("[")[0].split(".")[0] in error["message"], body
        # As curl -d sends it: a form's Content-Type, JSON all the same.
        form = {"content-type": "application/x-www-form-urlencoded"}
        reply = client.post("/v1/completions", content='{"prompt": "alpha", "max_tokens": 3, "model": "tiny"}',
                            headers=form)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] <= 3
        assert client.get("/v1/nothing").json()["error"]["message"]
    assert metric(url, "samba_lm_requests_total", '{status="400"}') >= len(ERRORS) - 1


def test_disconnect_cancels_the_request(server):
    url, _ = server
    cancelled = metric(url, "samba_lm_requests_finished_total", '{finish_reason="cancelled"}')
    body = {"prompt": "alpha beta", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
        lines = response.iter_lines()
        while not next(lines).startswith("data: "):
            pass
    # The client went away after its first chunk: its slot is freed and it counts as cancelled.
    wait_for(lambda: metric(url, "samba_lm_requests_finished_total", '{finish_reason="cancelled"}') == cancelled + 1,
             "the request to be cancelled")
    wait_for(lambda: idle(url), "the slot to be freed")
    assert metric(url, "samba_lm_running_requests") == 0


def test_metrics_format(server):
    url, _ = server
    httpx.post(f"{url}/v1/completions", json={"prompt": "alpha", "max_tokens": 4})
    response = httpx.get(f"{url}/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    label = r'[a-zA-Z_]\w*="(?:[^"\\\n]|\\.)*"'
    sample = re.compile(rf'^([a-zA-Z_:][\w:]*)(\{{{label}(?:,{label})*\}})? '
                        r'([-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|Inf)|NaN)$')
    types, values = {}, {}
    for line in response.text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
            continue
        if line.startswith("#"):
            continue
        match = sample.match(line)
        assert match, f"not a Prometheus sample: {line!r}"
        values[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    for name in ("samba_lm_queued_requests", "samba_lm_running_requests", "samba_lm_batch_occupancy"):
        assert types[name] == "gauge" and name in values
    assert types["samba_lm_generation_tokens_total"] == "counter" and values["samba_lm_generation_tokens_total"] > 0
    assert values["samba_lm_prompt_tokens_total"] > 0 and values['samba_lm_requests_total{status="200"}'] > 0
    assert values['samba_lm_requests_finished_total{finish_reason="length"}'] > 0
    for name in ("samba_lm_time_to_first_token_seconds", "samba_lm_inter_token_latency_seconds"):
        assert types[name] == "histogram"
        buckets = [v for k, v in values.items() if k.startswith(f"{name}_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == values[f"{name}_count"] > 0
        assert values[f'{name}_bucket{{le="+Inf"}}'] == values[f"{name}_count"] and values[f"{name}_sum"] > 0


# ----------------------------------------------------------------------------- overload and shutdown
@pytest.mark.parametrize("where", WHERE)
def test_overload_answers_429_and_recovers(where, model, tokenizer, model_dir):
    """One slot and a queue of one: with both held, every further request gets 429 + Retry-After."""
    scheduler = start_scheduler(where, model, model_dir, max_batch=1, max_queue=1, max_context=MAX_CONTEXT)
    app = build_app(scheduler, tokenizer, "tiny", MAX_CONTEXT, vocab_size=model.config.vocab_size)
    long = {"prompt": "alpha", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json=long) as running:
            lines = running.iter_lines()  # kept: closing it would close the stream
            next(line for line in lines if line.startswith("data: "))  # it holds the slot
            with client.stream("POST", "/v1/completions", json=long) as queued:
                assert queued.status_code == 200
                with ThreadPoolExecutor(6) as pool:
                    refused = list(pool.map(lambda _: httpx.post(f"{url}/v1/completions",
                                                                 json={"prompt": "beta", "max_tokens": 2}), range(12)))
                for response in refused:
                    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
                    assert response.json()["error"]["code"] == "queue_full"
        wait_for(lambda: idle(url), "both streams to be cancelled")
        reply = client.post("/v1/completions", json={"prompt": "beta", "max_tokens": 2})
        assert reply.status_code == 200
        assert metric(url, "samba_lm_requests_total", '{status="429"}') == 12


def test_shutting_down_answers_503(tokenizer):
    scheduler = FakeScheduler()
    app = build_app(scheduler, tokenizer, "tiny", MAX_CONTEXT)
    with serving(app) as url:
        assert httpx.post(f"{url}/v1/completions", json={"prompt": "alpha"}).status_code == 200
        app.state.service.begin_shutdown()
        assert httpx.get(f"{url}/health").status_code == 503
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "alpha"})
        assert response.status_code == 503 and response.headers["retry-after"]
        assert response.json()["error"]["code"] == "shutting_down"
    assert scheduler.closed


@contextlib.contextmanager
def serve_process(tokenizer, tmp_path, *flags, model_dir=None):
    """A real `samba-lm serve` process on a free port, up and answering, of `model_dir` (default: a
    tiny model saved under tmp_path); yields (process, url)."""
    model_dir = model_dir or save_small_model(tokenizer, tmp_path / "tiny-model")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log_path = tmp_path / "server.log"
    log = open(log_path, "w")
    process = subprocess.Popen([sys.executable, "-m", "samba_lm.serving.command", "--model", str(model_dir), "--port",
                                str(port), "--max-context", str(MAX_CONTEXT), "--device", "cpu", "--grace", "1",
                                "--log-level", "warning", *flags], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               env=os.environ | {"PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            assert process.poll() is None, log_path.read_text()
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(f"{url}/health").status_code == 200
        wait_for(up, "the server to start", timeout=60)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
        log.close()


def spawned(parent: int) -> list[int]:
    """The processes that `parent` spawned with multiprocessing (not its resource tracker)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and b"spawn_main" in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
    return found


def engine_pid(parent: int) -> int:
    """The engine process that `parent` spawned (its other child is multiprocessing's resource tracker)."""
    found = spawned(parent)
    assert len(found) == 1, f"process {parent} has {len(found)} spawned processes, not one engine process"
    return found[0]


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie has exited: an orphan's new parent may never reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("flag", ["--no-engine-process", "--engine-process"])
def test_sigterm_drains_and_exits_0(tokenizer, tmp_path, flag):
    """A real `samba-lm serve` process: SIGTERM during a stream ends the stream (finished or cancelled
    within --grace) and the process exits 0, its engine process (if any) gone before it."""
    with serve_process(tokenizer, tmp_path, flag) as (process, url):
        engine = engine_pid(process.pid) if flag == "--engine-process" and PROC else None
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "tiny-model"  # the directory's name
        body = {"prompt": "alpha", "max_tokens": LONG, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            process.send_signal(signal.SIGTERM)
            events = [first[6:]] + [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] in ("length", "cancelled")
        assert process.wait(timeout=30) == 0, (tmp_path / "server.log").read_text()
        assert engine is None or not alive(engine)


def test_api_processes_share_one_engine(model, tokenizer, model_dir, tmp_path):
    """`--api-processes 2`: 16 concurrent requests (streaming and not) over new connections each get
    what generate() gives them alone; both HTTP processes answered some, each counting its own while
    the engine's totals are the same from either; SIGTERM drains them all and exits 0, leaving no child."""
    flags = "--engine-process", "--api-processes", "2", "--max-batch", "4", "--model-name", "tiny"
    with serve_process(tokenizer, tmp_path, *flags, model_dir=model_dir) as (process, url):  # float64, as `model`
        children = spawned(process.pid) if PROC else []
        assert not PROC or len(children) == 3  # the engine and two HTTP processes

        def ask(i):  # a client each: a connection each, for the kernel to spread
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            prompt = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 4))
            kwargs = dict(model="tiny", prompt=prompt, max_tokens=4 + i % 5, temperature=1.0, seed=i)
            if i % 2:
                reply = client.completions.create(**kwargs)
                return prompt, kwargs, reply.choices[0].text, reply.choices[0].finish_reason
            chunks = list(client.completions.create(**kwargs, stream=True))
            return prompt, kwargs, "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(ask, range(16)))
        for prompt, kwargs, text, reason in answers:
            expected = reference(model, tokenizer, tokenizer.encode(prompt).ids, kwargs["max_tokens"], temperature=1.0,
                                 seed=kwargs["seed"])
            assert (text, reason) == (expected[0], expected[2]), kwargs
        answered, engine_totals, health = {}, set(), set()
        for _ in range(200):  # a new connection each: either process may answer
            health.add(httpx.get(f"{url}/health").json()["api_process"])
            text = httpx.get(f"{url}/metrics").text
            k = re.search(r'api_process="(\d+)"', text).group(1)
            ok = re.search(rf'^samba_lm_requests_total{{api_process="{k}",status="200"}} (\S+)$', text, re.M)
            answered[k] = float(ok.group(1)) if ok else 0.0
            engine_totals.add(re.search(r"^samba_lm_engine_requests_finished_total (\S+)$", text, re.M).group(1))
            if len(answered) == 2 and len(health) == 2:
                break
        assert set(answered) == {"0", "1"} and health == {0, 1}
        assert sum(answered.values()) == 16 and min(answered.values()) > 0, answered  # each counts its own
        assert engine_totals == {"16"}  # the engine's count, whichever process is asked
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, (tmp_path / "server.log").read_text()
        wait_for(lambda: not any(alive(pid) for pid in children), "every child to exit")


@pytest.mark.skipif(not PROC, reason="finds the server's children through /proc")
def test_api_processes_when_the_engine_and_then_an_http_process_die(tokenizer, tmp_path):
    """`--api-processes 2`: a SIGKILLed engine turns every HTTP process's /health into 503; then a
    SIGKILLed HTTP process stops the whole server (status 1), leaving no child behind. (One server for
    both: each start of three processes costs seconds of the suite.)"""
    with serve_process(tokenizer, tmp_path, "--engine-process", "--api-processes", "2") as (process, url):
        children = sorted(spawned(process.pid))  # the engine first (it is spawned before the HTTP processes)
        assert len(children) == 3
        os.kill(children[0], signal.SIGKILL)
        wait_for(lambda: all(httpx.get(f"{url}/health").status_code == 503 for _ in range(20)),
                 "every HTTP process to answer 503")
        assert process.poll() is None  # a dead engine leaves the server up, answering 503
        os.kill(children[-1], signal.SIGKILL)  # an HTTP process
        assert process.wait(timeout=60) == 1, (tmp_path / "server.log").read_text()
        wait_for(lambda: not any(alive(pid) for pid in children), "every child to exit")


def test_api_processes_need_the_engine_process():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ValueError, match="--api-processes 2 needs --engine-process"):
        main(parser.parse_args(["--model", "m", "--device", "cpu", "--no-engine-process", "--api-processes", "2"]))


@pytest.mark.skipif(not PROC, reason="finds the engine process through /proc")
def test_the_engine_process_exits_with_a_killed_server(tokenizer, tmp_path):
    """A server killed with SIGKILL (no shutdown, no atexit) leaves no engine process behind."""
    with serve_process(tokenizer, tmp_path, "--engine-process") as (process, url):
        engine = engine_pid(process.pid)
        process.kill()
        process.wait(30)
        wait_for(lambda: not alive(engine), "the engine process to exit")


def test_a_dead_engine_fails_its_requests_and_the_server_answers_503(model, tokenizer, model_dir):
    """SIGKILL the engine process under a stream and a non-streaming request: both end with an error,
    /health and every new request get 503, and the server still shuts down."""
    scheduler = start_scheduler("engine-process", model, model_dir, max_batch=2, max_context=MAX_CONTEXT)
    with pytest.raises(ValueError, match="top_p"):  # checked here, before anything is sent
        scheduler.submit(GenerationRequest((1, 2), max_tokens=2, top_p=1.5))
    app = build_app(scheduler, tokenizer, "tiny", MAX_CONTEXT, vocab_size=model.config.vocab_size)
    long = {"prompt": "alpha", "max_tokens": LONG, "ignore_eos": True}
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as client, ThreadPoolExecutor(1) as pool:
        whole = pool.submit(client.post, "/v1/completions", json=long)
        with client.stream("POST", "/v1/completions", json=long | {"stream": True}) as response:
            lines = response.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            wait_for(lambda: scheduler.stats().running == 2, "both requests to hold a slot")
            os.kill(scheduler.pid, signal.SIGKILL)
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert json.loads(events[-2])["error"]["code"] == "generation_failed" and events[-1] == "[DONE]"
        assert whole.result().status_code == 500
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        refused = client.post("/v1/completions", json={"prompt": "alpha", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_failed"
        assert metric(url, "samba_lm_requests_finished_total", '{finish_reason="error"}') == 2
        assert metric(url, "samba_lm_running_requests") == 0


def test_an_engine_load_error_is_raised_before_serving(tokenizer, tmp_path):
    """What stops the engine process from loading comes back as `samba-lm serve`'s error, in its words."""
    model_dir = save_small_model(tokenizer, tmp_path / "tiny-model")  # full attention: needs --max-context
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(ValueError, match="--max-context is required"):
        main(parser.parse_args(["--model", str(model_dir), "--device", "cpu", "--engine-process"]))


# ----------------------------------------------------------------------------- scripted scheduler
def test_generation_error_is_reported(tokenizer):
    app = build_app(FakeScheduler(finish="error"), tokenizer, "tiny")
    with serving(app) as url:
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "alpha"})
        assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "alpha", "stream": True}) as response:
            events = sse(response)
        assert "error" in json.loads(events[-2]) and events[-1] == "[DONE]"
        assert metric(url, "samba_lm_requests_finished_total", '{finish_reason="error"}') == 2


def test_non_streaming_disconnect_cancels(tokenizer):
    scheduler = FakeScheduler(finish=None)  # its requests run until cancelled
    with serving(build_app(scheduler, tokenizer, "tiny")) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={"prompt": "alpha"}, timeout=0.5)
        wait_for(lambda: scheduler.handles[0].finish_reason == "cancelled", "the request to be cancelled")


def test_streamed_text_is_whole_characters_and_stops_across_chunks(tokenizer):
    ids = tokenizer.encode(UNSEEN).ids
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)  # some character spans tokens
    with serving(build_app(FakeScheduler(script=lambda _: ids), tokenizer, "tiny")) as url:
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": "alpha", "stream": True}) as response:
            deltas = [json.loads(e)["choices"][0]["text"] for e in sse(response)[:-1]]
        assert "".join(deltas) == UNSEEN and not any("\ufffd" in d for d in deltas) and len(deltas) > 3
        body = {"prompt": "alpha", "stop": ["zzz", "𝄞 🎉"], "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
            chunks = [json.loads(e)["choices"][0] for e in sse(response)[:-1]]
        assert "".join(c["text"] for c in chunks) == "Ωμέγα ∑ " and chunks[-1]["finish_reason"] == "stop"


def test_a_reader_behind_gets_the_text_in_one_chunk(tokenizer):
    ids = tokenizer.encode(UNSEEN).ids
    with serving(build_app(FakeScheduler(script=lambda _: ids, ahead=True), tokenizer, "tiny")) as url:
        body = {"prompt": "alpha", "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
            chunks = [json.loads(e) for e in sse(response)[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == [UNSEEN, ""]
    assert chunks[-1]["usage"]["completion_tokens"] == len(ids)


def test_text_stream(tokenizer):
    def run(text, stop=()):
        stream = TextStream(tokenizer, stop)
        deltas = [stream.push(t) for t in tokenizer.encode(text).ids]
        return deltas, stream.finish(), stream.stopped

    deltas, rest, stopped = run(UNSEEN)
    assert "".join(deltas) + rest == UNSEEN and not any("\ufffd" in d for d in deltas) and not stopped
    deltas, rest, stopped = run("alpha beta gamma", stop=["beta g", "amma"])
    assert "".join(deltas) + rest == "alpha " and stopped
    deltas, rest, _ = run("alpha bet", stop=["beta"])  # "bet" may begin "beta": held back to the end
    assert "".join(deltas) == "alpha " and rest == "bet"
    stream = TextStream(tokenizer)
    partial = tokenizer.encode("🎉").ids[:-1]  # generation ended inside a character
    assert [stream.push(t) for t in partial] == [""] * len(partial) and stream.finish() == tokenizer.decode(partial)


# ----------------------------------------------------------------------------- command line
def test_flags_have_help_and_bad_values_fail_first():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for action in parser._actions:
        assert action.help, action.dest
    args = parser.parse_args(["--model", "m"])
    assert (args.host, args.port, args.max_batch, args.max_queue, args.grace) == ("127.0.0.1", 8000, 16, 64, 10.0)
    with pytest.raises(ValueError, match="--max-batch"):
        main(parser.parse_args(["--model", "m", "--max-batch", "0"]))
