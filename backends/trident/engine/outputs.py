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


class RequestOutput:
    """A request's state after a step in which it produced a token (or finished, or was aborted).

    ``text`` is everything safe to show so far: a trailing piece that could still become a stop
    string is held back, so the concatenation of ``delta_text`` over a request's outputs always
    equals the final ``text`` (streamed text is never retracted). ``output_token_ids`` holds every
    generated token, including a matched EOS or stop token. With ``RequestOutputKind.DELTA``,
    ``output_token_ids`` and ``text`` hold only what is new since the request's previous output.

    Built lazily: the engine records where the request's token list and text ended at this step
    (both only ever grow) and slices on first access, so an output nobody reads costs no copies.
    """

    __slots__ = ("request_id", "finished", "finish_reason", "stop_reason", "num_cached_tokens",
                 "_token_ids", "_num_prompt_tokens", "_first_id", "_end_id", "_text_source", "_first_char",
                 "_prev_char", "_end_char", "_is_delta", "_logprobs", "_cumulative_logprob", "_times")

    def __init__(self, request_id: str, *, token_ids: list[int], num_prompt_tokens: int, num_tokens: int,
                 text_source, text_len: int, prev_text_len: int, first_id: int | None = None,
                 finished: bool, finish_reason: str | None, stop_reason: str | int | None,
                 num_cached_tokens: int, times: tuple, logprobs: list[float] | None = None,
                 cumulative_logprob: float | None = None):
        """``token_ids`` / ``text_source.text`` are the request's growing token list and text
        (an object with ``.text`` or a str); this output sees them up to ``num_tokens`` /
        ``text_len``. ``first_id`` set means DELTA: ids from there, text from ``prev_text_len``."""
        self.request_id = request_id
        self.finished = finished
        self.finish_reason = finish_reason          # "stop" | "length" | "abort" once finished
        self.stop_reason = stop_reason              # the stop string or token id that ended it
        self.num_cached_tokens = num_cached_tokens  # prompt tokens served by the prefix cache
        self._token_ids, self._num_prompt_tokens, self._end_id = token_ids, num_prompt_tokens, num_tokens
        self._is_delta = first_id is not None
        self._first_id = first_id if self._is_delta else num_prompt_tokens
        self._text_source, self._prev_char, self._end_char = text_source, prev_text_len, text_len
        self._first_char = prev_text_len if self._is_delta else 0
        self._logprobs, self._cumulative_logprob = logprobs, cumulative_logprob
        self._times = times

    @property
    def prompt_token_ids(self) -> list[int]:
        return self._token_ids[:self._num_prompt_tokens]

    @property
    def num_prompt_tokens(self) -> int:
        return self._num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self._token_ids[self._first_id:self._end_id]

    @property
    def num_output_tokens(self) -> int:
        return self._end_id - self._first_id

    @property
    def text(self) -> str:
        return self._full_text()[self._first_char:self._end_char]

    @property
    def delta_text(self) -> str:
        """What is new since this request's previous output."""
        return self._full_text()[self._prev_char:self._end_char]

    @property
    def cumulative_logprob(self) -> float | None:
        """Sum of the chosen tokens' log-probs, when ``SamplingParams.logprobs``."""
        return self._cumulative_logprob

    @property
    def logprobs(self) -> list[float] | None:
        """Log-prob of each chosen token in ``output_token_ids``, when requested."""
        if self._logprobs is None:
            return None
        return self._logprobs[self._first_id - self._num_prompt_tokens:self._end_id - self._num_prompt_tokens]

    @property
    def timings(self) -> RequestTimings:
        return RequestTimings(*self._times)

    def _full_text(self) -> str:
        source = self._text_source
        return source if isinstance(source, str) else source.text

    def __repr__(self) -> str:
        return (f"RequestOutput(request_id={self.request_id!r}, output_token_ids={self.output_token_ids}, "
                f"text={self.text!r}, finished={self.finished}, finish_reason={self.finish_reason!r})")


def _between(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else max(0.0, end - start)
