"""One request's state inside the engine."""
from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # queued, or preempted and waiting to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SequenceTimings:
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


class Sequence:
    """A request in flight: its tokens, how many of them have KV in the cache, and its blocks.

    ``token_ids`` holds prompt + output tokens. ``num_computed_tokens`` counts the tokens whose KV
    is in the cache; each step the scheduler gives a sequence ``num_tokens - num_computed_tokens``
    new tokens (or fewer, when prefill is chunked), so prefill, chunked prefill, decode, prefix-cache
    hits and recompute after preemption are all the same operation.
    """

    def __init__(self, seq_id: int, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 request_id: str | None = None, arrival_time: float | None = None,
                 max_model_len: int | None = None, eos_token_ids: Iterable[int] = ()):
        if not prompt_token_ids:
            raise ValueError("prompt must have at least one token")
        self.seq_id = seq_id
        self.request_id = request_id if request_id is not None else str(seq_id)
        self.sampling_params = sampling_params
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0          # prompt tokens served by the prefix cache (last admission)
        self.block_table: list[int] = []
        # Chained prefix-cache hashes of the full blocks of `token_ids`, extended lazily by the block
        # manager; they depend only on the tokens, so they survive preemption.
        self.block_hashes: list[int] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None  # "stop" | "length" | "abort"
        self.stop_reason: str | int | None = None  # the stop string or token id that matched
        self.num_preemptions = 0
        self.cumulative_logprob = 0.0
        self.output_logprobs: list[float] = []
        self.timings = SequenceTimings(arrival=arrival_time or time.monotonic())
        # The token-level stop rules (``stop_checker.check_token_stop``) as three numbers, for the
        # engine's loops that visit every row every step: at ``max_num_tokens`` tokens the sequence
        # ends by length; once it holds ``stop_tokens_from`` tokens, a token in ``stop_token_set``
        # (EOS unless ignored, ``stop_token_ids``) ends it. (min_tokens <= max_tokens is validated.)
        params = sampling_params
        max_num_tokens = self.num_prompt_tokens + params.max_tokens
        self.max_num_tokens = max_num_tokens if max_model_len is None else min(max_num_tokens, max_model_len)
        self.stop_tokens_from = self.num_prompt_tokens + params.min_tokens
        self.stop_token_set = frozenset(params.stop_token_ids).union(() if params.ignore_eos else eos_token_ids)

    # -- tokens ------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    def append_token(self, token_id: int, logprob: float | None = None) -> None:
        self.token_ids.append(token_id)
        if logprob is not None:
            self.add_logprob(logprob)

    def add_logprob(self, logprob: float) -> None:
        """The log-prob of the last output token (appended already, or as a placeholder)."""
        self.cumulative_logprob += logprob
        self.output_logprobs.append(logprob)

    # -- status ------------------------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.timings.finished = time.monotonic()

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, status={self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")
