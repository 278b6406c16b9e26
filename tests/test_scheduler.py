"""The continuous-batching scheduler: every request as generate() gives it alone, however requests
interleave; slots freed by finishing and cancelling; the queue, shutdown, bad requests, failures and
asyncio streams. On the CPU the decode step runs eagerly, over the same buckets a GPU captures."""

import asyncio
import dataclasses
import logging
import threading
import time

import pytest
import torch

import samba_lm
from samba_lm.sampling import Sampling
from samba_lm.serving import GenerationRequest, QueueFull, Scheduler, SchedulerClosed
from samba_lm.serving.batch import buckets
from samba_lm.serving.prefill import PrefillBatch, length_buckets

from conftest import small_model

RECURRENT = ("mamba", "mlp", "swa", "mlp")  # no full attention: no max_context needed


def alone(model, request: GenerationRequest, seed=None) -> list[int]:
    """What generate() gives for the request in a batch of one."""
    out = samba_lm.generate(model, [list(request.prompt_ids)], max_new_tokens=request.max_tokens,
                            temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                            seed=request.seed if seed is None else seed, stop_tokens=request.stop_tokens)[0]
    return out[len(request.prompt_ids):].tolist()


def prompt(n: int) -> tuple[int, ...]:
    return tuple(torch.randint(0, 97, (n,)).tolist())


def test_buckets():
    assert buckets(1) == [1] and buckets(4) == [1, 2, 4] and buckets(6) == [1, 2, 4, 6]


def test_assign_copies_a_stream_into_a_row():
    """Rows prefilled alone, copied into a larger state, decode on a view of its first rows as alone."""
    model = small_model(torch.float64)
    prompts = [torch.randint(0, 97, (1, n)) for n in (11, 3)]  # beyond the window, and within it
    big = model.init_state(3, capacity=32)
    with torch.no_grad():
        for row, ids in enumerate(prompts):
            single = model.init_state(1, capacity=32)
            samba_lm.prefill(model, ids, single)
            big.assign(row, single)
        logits = model(torch.tensor([[5], [6]]), state=big.rows(2)).logits
        for row, (ids, token) in enumerate(zip(prompts, (5, 6))):
            full = model(torch.cat([ids, torch.tensor([[token]])], 1)).logits[0, -1]
            torch.testing.assert_close(logits[row, -1], full, rtol=1e-10, atol=1e-10)
    assert big.pos.tolist() == [12, 4, 0]  # the view advanced the rows it covers only
    with pytest.raises(ValueError, match="capacity"):
        big.assign(0, model.init_state(1, capacity=16))


def test_sampling_rows_share_the_buffers():
    sampling = Sampling.empty(4, "cpu")
    sampling.set_row(2, 0.5, 3, None, 9)
    sampling.copy_row(0, 2)
    view = sampling.rows(2)
    assert view.temperature.tolist() == [0.5, 0.0] and view.top_k.tolist() == [3, 0]
    assert view.top_p.tolist() == [1.0, 1.0] and view.seeds.tolist() == [9, 0]
    view.seeds[1] = 4
    assert sampling.seeds[1] == 4


def _requests(model, n):
    """Mixed requests: lengths below and beyond the window and the prefill chunk, one token or many,
    greedy and sampled, top-k and top-p beside rows without them, stop tokens that fire (taken from
    the unstopped output, the first token among them)."""
    requests = []
    for i in range(n):
        sampled = i % 3 != 0
        request = GenerationRequest(prompt(1 + (7 * i) % 19), max_tokens=1 + (5 * i) % 13,
                                    temperature=(0.6 + 0.1 * (i % 5)) if sampled else 0.0,
                                    top_k=(5 if i % 4 == 1 else None), top_p=(0.9 if i % 4 == 2 else None),
                                    seed=100 + i)
        if i % 4 == 3:
            unstopped = alone(model, request)
            at = min((i // 4) % 3, len(unstopped) - 1)  # the first token, or a later one
            request = dataclasses.replace(request, stop_tokens=(unstopped[at], 96))
        requests.append(request)
    return requests


@pytest.mark.parametrize("layers", [None, RECURRENT])
def test_interleaved_requests_equal_generate_alone(layers):
    model = small_model(torch.float64) if layers is None else small_model(torch.float64, layers=layers)
    requests = _requests(model, 14)
    requests[5] = dataclasses.replace(requests[5], seed=None)  # drawn at submit
    max_context = 40 if layers is None else None
    with Scheduler(model, max_batch=4, max_queue=16, prefill_chunk=4, max_context=max_context) as scheduler:
        handles = []
        for wave in (requests[:5], requests[5:9], requests[9:]):  # later waves join a running batch
            handles += [scheduler.submit(r) for r in wave]
            next(handles[-1].tokens(timeout=60))
        outputs = [list(h.tokens(timeout=60)) for h in handles]
        stats = scheduler.stats()
    for request, handle, output in zip(requests, handles, outputs):
        assert output == alone(model, request, seed=handle.request.seed), handle.id
        stopped = bool(set(output) & set(request.stop_tokens))
        assert handle.finish_reason == ("stop" if stopped else "length")
        assert len(handle.token_times) == len(output)
    assert isinstance(handles[5].request.seed, int)
    assert sum(h.finish_reason == "stop" for h in handles) >= 2
    assert stats.requests_finished == 14 and stats.tokens_generated == sum(map(len, outputs))
    assert stats.steps < stats.tokens_generated - 14  # rows decoded together
    assert (stats.queued, stats.running) == (0, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the captured decode steps need a GPU")
def test_captured_buckets_equal_generate_alone_on_a_gpu():
    """The CUDA-graph path: each bucket captured once, then replayed; float32 through the Triton kernels."""
    model = small_model(torch.float32, layers=RECURRENT).cuda()
    requests = _requests(model, 10)
    with Scheduler(model, max_batch=4, prefill_chunk=4, cuda_graph=True) as scheduler:
        handles = [scheduler.submit(r) for r in requests]
        outputs = [list(h.tokens(timeout=120)) for h in handles]
        captured = len(scheduler._batch._graphs), len(scheduler._short._graphs)
    for request, output in zip(requests, outputs):
        assert output == alone(model, request)
    assert captured == (2 * len(buckets(4)), len(buckets(4)))  # all at start(): prefills of 4 tokens, 1-4 rows


def test_a_long_prefill_is_interleaved_with_the_running_decode():
    model = small_model(torch.float64, layers=RECURRENT)
    with Scheduler(model, max_batch=2, prefill_chunk=4) as scheduler:
        running = scheduler.submit(GenerationRequest(prompt(3), max_tokens=100_000))
        next(running.tokens(timeout=60))
        late = GenerationRequest(prompt(40), max_tokens=5, temperature=0.9, seed=3)  # 10 chunks
        handle = scheduler.submit(late)
        output = list(handle.tokens(timeout=60))
        running.cancel()
    during = [t for t in running.token_times if handle.submitted_at < t < handle.token_times[0]]
    assert len(during) >= 9  # a decode step after each chunk but the last
    assert output == alone(model, late)
    assert running.finish_reason == "cancelled"


def test_short_prompts_join_together_within_the_prefill_budget():
    """Three 4-token prompts fit one turn's 16-token budget: they join before the first decode step,
    so their 3 tokens each take 2 steps of the batch (one prompt a turn would take at least 4), and a
    third that runs while the second's tokens, which end them, are delivered."""
    model = small_model(torch.float64, layers=RECURRENT)
    scheduler = Scheduler(model, max_batch=4, prefill_chunk=16)
    requests = [GenerationRequest(prompt(4), max_tokens=3, seed=i, temperature=0.5 * i) for i in range(3)]
    handles = [scheduler.submit(r) for r in requests]  # queued before the loop starts
    runs = []
    run = scheduler._short.run
    scheduler._short.run = lambda prompts: runs.append(len(prompts)) or run(prompts)
    with scheduler:  # starts it
        outputs = [list(h.tokens(timeout=60)) for h in handles]
        steps = scheduler.stats().steps
    assert steps == 3 and runs == [3]  # one forward prefilled all three
    assert outputs == [alone(model, r) for r in requests]


@pytest.mark.parametrize("layers", [None, RECURRENT])
def test_prompts_prefilled_together_are_each_alone(layers):
    """Three prompts left-padded to 16 tokens in a 4-row bucket (the fourth a dummy): each row's
    last logits are its prompt's alone, in float64, and so is its state: the same continuation
    (a chunk, then a step) gives the same logits (the caches' slots may hold padding, never seen)."""
    model = small_model(torch.float64) if layers is None else small_model(torch.float64, layers=layers)
    capacity = 24 if layers is None else None
    short = PrefillBatch(model, rows=4, longest=16, capacity=capacity, cuda_graph=False)
    assert short.lengths == [16] and length_buckets(300) == [16, 32, 64, 128, 256, 300]
    prompts = [list(prompt(n)) for n in (1, 16, 5)]
    state, logits = short.run(prompts)
    for i, ids in enumerate(prompts):
        alone_state = model.init_state(1, capacity=capacity)
        expected = model(torch.tensor([ids]), state=alone_state, logits_to_keep=1).logits[:, -1]
        torch.testing.assert_close(logits[i:i + 1], expected, rtol=1e-12, atol=1e-12)
        row = model.init_state(1, capacity=capacity)
        row.assign(0, state, i)
        for ids_next in ([[3, 7]], [[11]]):
            mine = model(torch.tensor(ids_next), state=row).logits
            torch.testing.assert_close(mine, model(torch.tensor(ids_next), state=alone_state).logits,
                                       rtol=1e-12, atol=1e-12)
        assert torch.equal(row.pos, alone_state.pos)
    with pytest.raises(ValueError, match="1 to 4 prompts of 1 to 16 tokens"):
        short.run([list(prompt(17))])


def test_cancel_frees_the_slot():
    model = small_model(torch.float64, layers=RECURRENT)
    with Scheduler(model, max_batch=1) as scheduler:
        first = scheduler.submit(GenerationRequest(prompt(4), max_tokens=100_000))
        second = scheduler.submit(GenerationRequest(prompt(6), max_tokens=100_000, temperature=1.0, seed=1))
        third = scheduler.submit(GenerationRequest(prompt(2), max_tokens=4))
        tokens = first.tokens(timeout=60)
        next(tokens), next(tokens)
        assert scheduler.stats().queued == 2 and scheduler.stats().running == 1 and not second.output
        third.cancel("client gone")  # still queued
        first.cancel()
        first.cancel("again")  # idempotent
        next(second.tokens(timeout=60))  # it got the slot
        stats = scheduler.stats()
        assert (stats.queued, stats.running, stats.requests_finished) == (0, 1, 2)
        second.cancel()
        list(second.tokens(timeout=60))
    assert (first.finish_reason, second.finish_reason, third.finish_reason) == ("cancelled", "cancelled",
                                                                                 "client gone")
    assert not third.output and first.done
    n = len(second.output)
    request = GenerationRequest(second.request.prompt_ids, max_tokens=n, temperature=1.0, seed=1)
    assert second.output == alone(model, request)  # cut short, but what it gave is generate's
    second.cancel()
    assert second.finish_reason == "cancelled"  # cancelling a finished request changes nothing


def test_queue_full_and_closed():
    model = small_model(torch.float64, layers=RECURRENT)
    scheduler = Scheduler(model, max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    handles = [scheduler.submit(GenerationRequest((1, 2), max_tokens=3)) for _ in range(2)]
    with pytest.raises(QueueFull):
        scheduler.submit(GenerationRequest((1, 2), max_tokens=3))
    assert scheduler.stats().queued == 2
    scheduler.shutdown()
    assert [h.finish_reason for h in handles] == ["cancelled", "cancelled"]
    with pytest.raises(SchedulerClosed):
        scheduler.submit(GenerationRequest((1, 2), max_tokens=3))
    with pytest.raises(SchedulerClosed):
        scheduler.start()


def test_shutdown_lets_requests_finish_within_the_grace():
    model = small_model(torch.float64, layers=RECURRENT)
    scheduler = Scheduler(model, max_batch=2).start()
    requests = [GenerationRequest(prompt(n), max_tokens=6, temperature=0.7, seed=n) for n in (3, 8, 5, 2)]
    handles = [scheduler.submit(r) for r in requests]  # two run, two wait: all finish within the grace
    scheduler.shutdown(grace_s=60)
    assert not scheduler._thread.is_alive()
    assert [h.output for h in handles] == [alone(model, r) for r in requests]
    assert all(h.finish_reason == "length" for h in handles)

    scheduler = Scheduler(model, max_batch=1).start()
    endless = scheduler.submit(GenerationRequest(prompt(3), max_tokens=100_000))
    waiting = scheduler.submit(GenerationRequest(prompt(3), max_tokens=100_000))
    next(endless.tokens(timeout=60))
    scheduler.shutdown(grace_s=0)
    assert not scheduler._thread.is_alive()
    assert endless.finish_reason == waiting.finish_reason == "cancelled" and not waiting.output
    with pytest.raises(SchedulerClosed):
        scheduler.submit(GenerationRequest((1,), max_tokens=1))


@pytest.mark.parametrize("field, value", [
    ("prompt_ids", ()), ("prompt_ids", (97,)), ("prompt_ids", (1.0,)), ("prompt_ids", "abc"),
    ("max_tokens", 0), ("max_tokens", 2.0), ("temperature", -0.1), ("temperature", float("nan")),
    ("top_k", 0), ("top_p", 0.0), ("top_p", 1.5), ("seed", "7"), ("stop_tokens", (97,)),
    ("max_context", None)])
def test_bad_requests_name_the_field(field, value):
    scheduler = Scheduler(small_model(torch.float64), max_context=20)
    request = GenerationRequest((1, 2, 3), max_tokens=18)  # 3 + 18 > max_context
    if field != "max_context":
        request = dataclasses.replace(request, **{"max_tokens": 4, field: value})
    with pytest.raises(ValueError, match=field):
        scheduler.submit(request)
    assert scheduler.stats().queued == 0


def test_bad_scheduler_arguments():
    model = small_model(torch.float64)
    with pytest.raises(ValueError, match="max_context"):
        Scheduler(model)  # full attention needs a capacity
    for name in ("max_batch", "max_queue", "prefill_chunk"):
        with pytest.raises(ValueError, match=name):
            Scheduler(model, max_context=16, **{name: 0})
    with pytest.raises(ValueError, match="model"):
        Scheduler(object())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graph"):
            Scheduler(model, max_context=16, cuda_graph=True)


def test_a_failure_ends_its_requests_with_error_and_the_scheduler_serves_on(monkeypatch, caplog):
    model = small_model(torch.float64, layers=RECURRENT)
    failures = []  # the next forward raises while this holds an item
    forward = model.forward

    def flaky(*args, **kwargs):
        if failures:
            raise failures.pop()
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", flaky)
    request = GenerationRequest(prompt(5), max_tokens=6, temperature=0.8, seed=2)
    with caplog.at_level(logging.ERROR, logger="samba_lm.serving"), Scheduler(model, max_batch=2) as scheduler:
        decoding = scheduler.submit(GenerationRequest(prompt(4), max_tokens=100_000))
        next(decoding.tokens(timeout=60))
        failures.append(RuntimeError("injected in a decode step"))
        list(decoding.tokens(timeout=60))
        failures.append(RuntimeError("injected in a prefill"))
        prefilling = scheduler.submit(request)
        list(prefilling.tokens(timeout=60))
        after = scheduler.submit(request)
        output = list(after.tokens(timeout=60))
    assert decoding.finish_reason == "error" and "decode" in str(decoding.error)
    assert prefilling.finish_reason == "error" and not prefilling.output
    assert after.finish_reason == "length" and output == alone(model, request)
    assert sum("injected" in r.exc_text for r in caplog.records if r.exc_text) == 2


def test_a_failure_outside_the_model_resets_the_slots_and_the_scheduler_serves_on(monkeypatch):
    model = small_model(torch.float64, layers=RECURRENT)
    request = GenerationRequest(prompt(5), max_tokens=6, temperature=0.8, seed=2)
    with Scheduler(model, max_batch=2) as scheduler:
        remove, failures = scheduler._batch.remove, [RuntimeError("injected in the bookkeeping")]

        def flaky(row):
            if failures:
                raise failures.pop()
            remove(row)

        monkeypatch.setattr(scheduler._batch, "remove", flaky)
        long = scheduler.submit(GenerationRequest(prompt(4), max_tokens=100_000))
        short = scheduler.submit(GenerationRequest(prompt(3), max_tokens=2))
        assert len(list(short.tokens(timeout=60))) == 2  # its row's removal fails
        list(long.tokens(timeout=60))
        after = scheduler.submit(request)
        output = list(after.tokens(timeout=60))
    assert short.finish_reason == "length" and long.finish_reason == "error"
    assert output == alone(model, request) and scheduler.stats().running == 0


def test_on_delivered_has_seen_every_token_when_the_loop_waits_and_when_it_dies(monkeypatch):
    """The hook (an engine process's one message a step) runs on the scheduler thread after tokens reach
    their handles: once the loop is idle its last call has seen every token and finish, and when the
    loop dies it runs once more, after every request has ended and `failed` says why."""
    class Fatal(BaseException):
        pass

    model = small_model(torch.float64, layers=RECURRENT)
    handles, seen = [], []

    def hook():
        seen.append((threading.get_ident(), [(len(h.output), h.finish_reason) for h in handles]))

    scheduler = Scheduler(model, max_batch=2, on_delivered=hook).start()
    handles += [scheduler.submit(GenerationRequest(prompt(n), max_tokens=5)) for n in (3, 6, 4)]
    for handle in handles:
        list(handle.tokens(timeout=60))
    deadline = time.monotonic() + 30
    while seen[-1][1] != [(5, "length")] * 3:  # the idle turn's call, once the last token is in
        assert time.monotonic() < deadline, seen[-1]
        time.sleep(0.01)
    assert {thread for thread, _ in seen} == {scheduler._thread.ident}

    handles[:] = [scheduler.submit(GenerationRequest(prompt(4), max_tokens=100_000))]
    next(handles[0].tokens(timeout=60))

    def launch():
        raise Fatal("injected: what no turn survives")

    monkeypatch.setattr(scheduler, "_launch", launch)
    list(handles[0].tokens(timeout=60))
    scheduler._thread.join(60)
    assert isinstance(scheduler.failed, Fatal) and handles[0].finish_reason == "error"
    assert seen[-1][1] == [(len(handles[0].output), "error")]
    with pytest.raises(SchedulerClosed):
        scheduler.submit(GenerationRequest((1,), max_tokens=1))


def test_stream_from_asyncio():
    model = small_model(torch.float64, layers=RECURRENT)
    requests = [GenerationRequest(prompt(n), max_tokens=12, temperature=0.9, seed=n, stop_tokens=(96,))
                for n in (2, 9, 4)]

    async def main(scheduler):
        ticks = [0]

        async def consume(request):
            handle = scheduler.submit(request)
            start = ticks[0]
            tokens = [t async for t in handle.stream()]
            return tokens, ticks[0] - start, handle

        async def ticker():
            while True:
                ticks[0] += 1
                await asyncio.sleep(0.001)

        clock = asyncio.create_task(ticker())
        results = await asyncio.gather(*(consume(r) for r in requests))
        clock.cancel()
        return results

    with Scheduler(model, max_batch=2) as scheduler:
        results = asyncio.run(main(scheduler))
    for request, (tokens, ticks, handle) in zip(requests, results):
        assert tokens == alone(model, request) == handle.output == list(handle.tokens())
        assert ticks > 0  # the loop ran another task while this stream waited


def test_a_row_without_top_k_or_top_p_has_no_floor():
    """So a request draws alike whether or not its neighbours in the batch truncate (truncate=True)."""
    from samba_lm.sampling import truncation_floor

    logits = torch.randn(3, 97)
    floor = truncation_floor(logits, torch.tensor([1.0, 0.7, 1.0]), torch.tensor([0, 5, 0]),
                             torch.tensor([1.0, 1.0, 0.5]))
    assert floor[0] == float("-inf")
    assert floor[1] == logits[1].sort(descending=True).values[4] and floor[2] > float("-inf")
