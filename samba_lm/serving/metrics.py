"""Server metrics in Prometheus' text exposition format (version 0.0.4), written by hand.

Counters and histograms are updated by the server as requests end (on its event loop, one thread);
the gauges are read from the scheduler's stats when /metrics is scraped. Latencies come from the
scheduler's clock: a handle's submitted_at and the perf_counter time of each of its tokens, so they
measure queueing + prefill (time to first token) and decode steps (inter-token latency), not HTTP.
An engine process stamps its tokens with its own perf_counter, which on Linux is the same clock
(CLOCK_MONOTONIC) in every process; its stats reach /metrics with its last message.
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict

PREFIX = "samba_lm"
# Seconds: from a sub-millisecond GPU step to a long queue under load.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Counter:
    def __init__(self, name: str, help_: str, label: str | None = None):
        self.name, self.help, self.label = name, help_, label
        self.values: dict[str, float] = defaultdict(float)

    def inc(self, label_value: str = "", amount: float = 1.0):
        self.values[label_value] += amount

    def lines(self, const: str = "") -> list[str]:
        """const: labels every sample carries (`api_process="0"`), or nothing."""
        out = _header(self.name, self.help, "counter")
        if self.label is None:
            return out + [f"{self.name}{_labels(const)} {_number(self.values.get('', 0.0))}"]
        return out + [f"{self.name}{_labels(const, _pair(self.label, _escape(v)))} {_number(n)}"
                      for v, n in sorted(self.values.items())]


class Histogram:
    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_, tuple(sorted(buckets))
        self.counts = [0] * len(self.buckets)  # per bucket, not cumulative
        self.sum, self.count = 0.0, 0

    def observe(self, value: float):
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.sum += value
        self.count += 1

    def lines(self, const: str = "") -> list[str]:
        out, total = _header(self.name, self.help, "histogram"), 0
        for bound, n in zip(self.buckets, self.counts):
            total += n
            out.append(f"{self.name}_bucket{_labels(const, _pair('le', _number(bound)))} {total}")
        out += [f"{self.name}_bucket{_labels(const, _pair('le', '+Inf'))} {self.count}",
                f"{self.name}_sum{_labels(const)} {_number(self.sum)}", f"{self.name}_count{_labels(const)} {self.count}"]
        return out


class Metrics:
    """Everything /metrics shows. `request_done` records one generation when its reply has ended.

    api_process: this HTTP process's index when several serve one engine (--api-processes N). Each
    knows only the requests it answered, so its counters and histograms carry `api_process="k"`; the
    gauges, the steps and the engine's totals come from the engine's stats, the same in every one."""

    def __init__(self, api_process: int | None = None):
        self.const = "" if api_process is None else _pair("api_process", str(api_process))
        self._lock = threading.Lock()  # a scrape may run while a request is recorded
        m = PREFIX
        self.requests = Counter(f"{m}_requests_total", "completion requests answered, by HTTP status", "status")
        self.finished = Counter(f"{m}_requests_finished_total",
                                "generations ended, by finish reason (stop, length, cancelled, error, ...)",
                                "finish_reason")
        self.generated = Counter(f"{m}_generation_tokens_total", "tokens generated")
        self.prompt = Counter(f"{m}_prompt_tokens_total", "prompt tokens of the generations started")
        self.ttft = Histogram(f"{m}_time_to_first_token_seconds",
                              "from submission to the scheduler to the first token (queue + prefill)", TTFT_BUCKETS)
        self.itl = Histogram(f"{m}_inter_token_latency_seconds", "between consecutive tokens of a generation",
                             ITL_BUCKETS)
        self.latency = Histogram(f"{m}_request_latency_seconds", "from submission to the last token",
                                 LATENCY_BUCKETS)

    def response(self, status: int):
        with self._lock:
            self.requests.inc(str(status))

    def request_done(self, finish_reason: str, prompt_tokens: int, submitted_at: float, token_times: list[float]):
        times = list(token_times)  # the scheduler may still append to the handle's list
        with self._lock:
            self.finished.inc(finish_reason)
            self.prompt.inc(amount=prompt_tokens)
            self.generated.inc(amount=len(times))
            if times:
                self.ttft.observe(times[0] - submitted_at)
                self.latency.observe(times[-1] - submitted_at)
            for a, b in zip(times, times[1:]):
                self.itl.observe(b - a)

    def render(self, stats) -> str:
        """The exposition text; `stats`: the scheduler's SchedulerStats, for the gauges."""
        m = PREFIX
        gauges = [(f"{m}_queued_requests", "requests waiting for a batch slot", stats.queued),
                  (f"{m}_running_requests", "requests in the running batch", stats.running),
                  (f"{m}_max_batch", "batch slots", stats.max_batch),
                  (f"{m}_batch_occupancy", "running requests / batch slots",
                   stats.running / stats.max_batch if stats.max_batch else 0.0)]
        lines = []
        for name, help_, value in gauges:
            lines += _header(name, help_, "gauge") + [f"{name} {_number(value)}"]
        lines += _header(f"{m}_scheduler_steps_total", "batched model steps the scheduler has run", "counter")
        lines.append(f"{m}_scheduler_steps_total {stats.steps}")
        if self.const:  # the engine's own totals: what every process's labelled counters add up to
            for name, help_, value in ((f"{m}_engine_generation_tokens_total", "tokens the engine generated",
                                        stats.tokens_generated),
                                       (f"{m}_engine_requests_finished_total", "requests the engine ended",
                                        stats.requests_finished)):
                lines += _header(name, help_, "counter") + [f"{name} {value}"]
        with self._lock:
            for metric in (self.requests, self.finished, self.generated, self.prompt, self.ttft, self.itl,
                           self.latency):
                lines += metric.lines(self.const)
        return "\n".join(lines) + "\n"


def _header(name: str, help_: str, kind: str) -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]


def _labels(*pairs: str) -> str:
    """`{a="1",b="2"}` of the non-empty pairs, or nothing."""
    pairs = [p for p in pairs if p]
    return "{" + ",".join(pairs) + "}" if pairs else ""


def _pair(name: str, value: str) -> str:
    return f'{name}="{value}"'


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, float) and math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))
