"""What the engine hands back for a request after a step: ``RequestOutput`` (vLLM's name and fields)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RequestTimings:
    """Monotonic-clock timestamps (``time.monotonic()``) of one request's life."""
    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None

    @property
    def queue_time(self) -> float | None:
        """Seconds from arrival to first being scheduled (``request_queue_time_seconds``)."""
        return _between(self.arrival, self.first_scheduled)

    @property
    def time_to_first_token(self) -> float | None:
        return _between(self.arrival, self.first_token)

    @property
    def e2e_latency(self) -> float | None:
        return _between(self.arrival, self.finished)


@dataclass(frozen=True)
class RequestOutput:
    """A request's state after a step in which it produced a token (or was aborted).

    ``text`` is everything safe to show so far: a trailing piece that could still become a stop
    string is held back, so the concatenation of ``delta_text`` over a request's outputs always
    equals the final ``text`` (streamed text is never retracted). ``output_token_ids`` holds every
    generated token, including a matched EOS or stop token.
    """
    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    text: str
    delta_text: str
    finished: bool
    finish_reason: str | None           # "stop" | "length" | "abort" once finished
    stop_reason: str | int | None       # the stop string or token id that ended it
    cumulative_logprob: float | None    # only when SamplingParams.logprobs
    logprobs: list[float] | None        # log-prob of each chosen token, when requested
    num_cached_tokens: int              # prompt tokens served by the prefix cache
    timings: RequestTimings

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)


def _between(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else max(0.0, end - start)
