"""Engine-wide statistics, read after a step and exported by the serving layer (vLLM's names)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineStats:
    """A snapshot. Gauges describe now; ``*_total`` and prefix counters only grow.

    Prefix-cache counters count tokens (as vLLM does): ``prefix_cache_queries`` are the tokens of
    admitted sequences looked up, ``prefix_cache_hits`` those found in the cache.
    """
    num_running: int                 # num_requests_running
    num_waiting: int                 # num_requests_waiting (queued or preempted)
    kv_cache_usage: float            # kv_cache_usage_perc, 0..1: blocks held by live sequences
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions_total: int
    prompt_tokens_total: int         # prompt tokens of requests that produced a first token
    generation_tokens_total: int     # tokens sampled

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
