"""Prometheus metrics of the `gpt` model, exported on Triton's :8002/metrics through the Python
backend's custom-metrics API. Names follow vLLM's, under the `trident:` prefix.

Each metric update is an IPC round trip to the server process, and a busy engine makes hundreds per
step (one inter-token latency per running request), so the record_* methods only queue the update
and one thread applies them; engine-wide stats are coalesced to the latest snapshot.
"""
from __future__ import annotations

import bisect
import queue
import threading

import triton_python_backend_utils as pb_utils

LATENCY_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
FINISH_REASONS = ("stop", "length", "abort")


class GptMetrics:
    def __init__(self, model_name: str, model_version: str):
        self.labels = {"model": model_name, "version": model_version}
        self._families = []
        self.ttft = self._histogram("time_to_first_token_seconds", "Time to first token")
        self.itl = CounterHistogram(self, "inter_token_latency_seconds", "Time between consecutive output tokens")
        self.e2e = self._histogram("e2e_request_latency_seconds", "End-to-end request latency")
        self.queue = self._histogram("request_queue_time_seconds", "Time from arrival to first scheduling")
        self.running = self._gauge("num_requests_running", "Requests running in the engine")
        self.waiting = self._gauge("num_requests_waiting", "Requests waiting in the engine's queue")
        self.kv_usage = self._gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)")
        self.prefix_hit_rate = self._gauge("prefix_cache_hit_rate", "Prefix-cache hits / queries, in prompt tokens")
        self.prefix_queries = self._counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_hits = self._counter("prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.prompt_tokens = self._counter("prompt_tokens_total", "Prompt tokens processed")
        self.generation_tokens = self._counter("generation_tokens_total", "Tokens generated")
        self.preemptions = self._counter("num_preemptions_total", "Sequences preempted (recomputed later)")
        family = self._family("request_success_total", "Finished requests by finish reason",
                              pb_utils.MetricFamily.COUNTER)
        self.finished = {reason: family.Metric(labels={**self.labels, "finished_reason": reason})
                         for reason in FINISH_REASONS}
        self._pending_increments: dict[str, int] = {}
        self._updates: queue.Queue = queue.Queue()
        self._latest_stats = None
        self._stats_lock = threading.Lock()
        self._thread = threading.Thread(target=self._apply_loop, name="gpt-metrics", daemon=True)
        self._thread.start()

    # -- what the engine thread calls: queue only ---------------------------------------------------
    def record_stats(self, stats, increments: dict[str, int]) -> None:
        """``increments``: what the engine's totals grew by since it last reported them to any
        instance (the engine reports to one instance at a time, so counters shared by the model's
        instances count each token once)."""
        with self._stats_lock:
            self._latest_stats = stats
            for name, delta in increments.items():
                self._pending_increments[name] = self._pending_increments.get(name, 0) + delta
        self._updates.put(self._apply_latest_stats)

    def record_finished(self, finish_reason: str, queue_s: float | None, ttft_s: float | None,
                        e2e_s: float | None) -> None:
        self._updates.put(lambda: self._apply_finished(finish_reason, queue_s, ttft_s, e2e_s))

    def record_inter_tokens(self, latencies: list[float]) -> None:
        """One observation per token (after each request's first), queued as one update per step."""
        if latencies:
            self._updates.put(lambda: self._apply_inter_tokens(latencies))

    def close(self) -> None:
        self._updates.put(None)
        self._thread.join(timeout=10)

    def _apply_loop(self) -> None:
        while (update := self._updates.get()) is not None:
            update()

    def _apply_latest_stats(self) -> None:
        with self._stats_lock:
            stats, self._latest_stats = self._latest_stats, None
            increments, self._pending_increments = self._pending_increments, {}
        if stats is not None:  # later snapshots already applied this one's successor
            self._apply_stats(stats, increments)

    def _family(self, name, description, kind):
        family = pb_utils.MetricFamily(name=f"trident:{name}", description=description, kind=kind)
        self._families.append(family)
        return family

    def _histogram(self, name, description):
        family = self._family(name, description, pb_utils.MetricFamily.HISTOGRAM)
        return family.Metric(labels=self.labels, buckets=LATENCY_BUCKETS)

    def _gauge(self, name, description):
        return self._family(name, description, pb_utils.MetricFamily.GAUGE).Metric(labels=self.labels)

    def _counter(self, name, description):
        return self._family(name, description, pb_utils.MetricFamily.COUNTER).Metric(labels=self.labels)

    # -- the metrics thread ------------------------------------------------------------------------
    def _apply_stats(self, stats, increments: dict[str, int]) -> None:
        """Engine-wide figures after a step: gauges set, totals' growth added to the counters."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self.prefix_hit_rate.set(stats.prefix_cache_hit_rate)
        for name, counter in (("prefix_cache_queries", self.prefix_queries),
                              ("prefix_cache_hits", self.prefix_hits),
                              ("prompt_tokens_total", self.prompt_tokens),
                              ("generation_tokens_total", self.generation_tokens),
                              ("num_preemptions_total", self.preemptions)):
            if increments.get(name, 0) > 0:
                counter.increment(increments[name])

    def _apply_finished(self, finish_reason: str, queue_s: float | None, ttft_s: float | None,
                        e2e_s: float | None) -> None:
        if finish_reason in self.finished:
            self.finished[finish_reason].increment(1)
        for histogram, value in ((self.queue, queue_s), (self.ttft, ttft_s), (self.e2e, e2e_s)):
            if value is not None:
                histogram.observe(value)

    def _apply_inter_tokens(self, latencies: list[float]) -> None:
        self.itl.observe_many(latencies)


class CounterHistogram:
    """A Prometheus classic histogram with one observation per token, exported as the counters
    ``<name>_bucket{le=...}``, ``<name>_sum`` and ``<name>_count``: the series a native histogram
    exposes, so ``histogram_quantile(0.99, rate(trident:inter_token_latency_seconds_bucket[1m]))``
    works unchanged (only the ``# TYPE`` line says counter).

    Why not the backend's histogram: its ``observe`` takes one value per IPC round trip, and a
    thousand running requests make a thousand observations per engine step. Counted here, a step
    costs at most one increment per bucket, whatever the batch.
    """

    def __init__(self, metrics: GptMetrics, name: str, description: str):
        labels = metrics.labels
        bucket_family = metrics._family(f"{name}_bucket", f"{description} (cumulative bucket counts)",
                                        pb_utils.MetricFamily.COUNTER)
        self.bounds = list(LATENCY_BUCKETS)
        les = [_le(b) for b in self.bounds] + ["+Inf"]
        self.buckets = [bucket_family.Metric(labels={**labels, "le": le}) for le in les]
        self.sum = metrics._family(f"{name}_sum", f"{description} (sum)",
                                   pb_utils.MetricFamily.COUNTER).Metric(labels=labels)
        self.count = metrics._family(f"{name}_count", f"{description} (count)",
                                     pb_utils.MetricFamily.COUNTER).Metric(labels=labels)

    def observe_many(self, values: list[float]) -> None:
        if not values:
            return
        per_bucket = [0] * (len(self.bounds) + 1)
        for v in values:
            per_bucket[bisect.bisect_left(self.bounds, v)] += 1  # le is inclusive: v == bound counts there
        cumulative = 0
        for counter, n in zip(self.buckets, per_bucket):
            cumulative += n
            if cumulative:
                counter.increment(cumulative)
        self.sum.increment(float(sum(values)))
        self.count.increment(len(values))


def _le(bound: float) -> str:
    """The ``le`` label as Prometheus clients print it (0.5 -> "0.5", 1.0 -> "1")."""
    return repr(bound) if bound != int(bound) else str(int(bound))
