"""Per-request sampling parameters, validated once at the edge (vLLM's conventions)."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from .validation import reject_unknown_keys, require


class RequestOutputKind(enum.Enum):
    """Which outputs a request gets (vLLM's ``RequestOutputKind``).

    ``CUMULATIVE``: after every step with a new token, all tokens and text so far.
    ``DELTA``: after every step with a new token, only what is new (``text == delta_text``).
    ``FINAL_ONLY``: one output when the request finishes; without stop strings the engine then
    skips per-token detokenization and decodes once at the end (same text).
    """
    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL_ONLY = "final_only"


@dataclass
class SamplingParams:
    """What to generate and when to stop.

    Conventions follow vLLM: ``temperature == 0`` is greedy; ``top_k`` of 0 or -1 and ``top_p`` of
    1 switch those filters off; penalties of 1.0 (repetition) and 0.0 (presence, frequency) are off.
    """

    max_tokens: int = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: bool = False
    skip_special_tokens: bool = True
    # False: outputs carry token ids only (empty text); whoever streams them detokenizes (vLLM's
    # field). A serving process does that for its streams, off the engine's busy thread.
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if isinstance(self.output_kind, str):   # JSON: "cumulative" | "delta" | "final_only"
            kinds = [k.value for k in RequestOutputKind]
            require(self.output_kind in kinds, f"output_kind must be one of {kinds}, got {self.output_kind!r}")
            self.output_kind = RequestOutputKind(self.output_kind)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        require(isinstance(self.max_tokens, int) and self.max_tokens >= 1,
                 f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        require(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
                 f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        require(_finite(self.temperature) and self.temperature >= 0,
                 f"temperature must be a finite number >= 0, got {self.temperature!r}")
        require(isinstance(self.top_k, int) and self.top_k >= -1,
                 f"top_k must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        require(_finite(self.top_p) and 0 < self.top_p <= 1,
                 f"top_p must be in (0, 1], got {self.top_p!r}")
        require(_finite(self.min_p) and 0 <= self.min_p <= 1,
                 f"min_p must be in [0, 1], got {self.min_p!r}")
        require(_finite(self.repetition_penalty) and self.repetition_penalty > 0,
                 f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        require(_finite(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
                 f"presence_penalty must be in [-2, 2], got {self.presence_penalty!r}")
        require(_finite(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
                 f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty!r}")
        require(self.seed is None or isinstance(self.seed, int),
                 f"seed must be an integer, got {self.seed!r}")
        require(all(isinstance(s, str) for s in self.stop), "stop must be a list of strings")
        require(self.detokenize or not self.stop, "stop strings are matched on text: they need detokenize=True")
        require(all(isinstance(t, int) for t in self.stop_token_ids),
                 "stop_token_ids must be a list of integers")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_dict(cls, values: dict) -> "SamplingParams":
        """Build from a JSON-like dict, rejecting unknown keys by name."""
        reject_unknown_keys(cls, values, "sampling parameter(s)")
        return cls(**values)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
