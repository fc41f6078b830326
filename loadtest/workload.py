"""What the load test sends and how it reads the answers: pure functions, no locust, no gevent.

The locust file (locustfile.py) and the step shape (shapes.py) import this module; the test suite
imports it directly (importing locust itself would monkey-patch the test process with gevent).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field

# Frequent English words that are one token each, with their leading space, in GPT-2-style BPE
# vocabularies (GPT-2, SmolLM2, Llama 3): an N-word prompt is N prompt tokens, near enough; the
# server reports the exact count (num_input_tokens), which the TTFT rows carry as their size.
WORDS = tuple(dict.fromkeys((
    "the of and to in is was for that on as with by he at from his it an were are which this be or "
    "had not first one their its new after but who they have her she two been other when there all "
    "during into school time may years more most only over city some world would where later up "
    "such used many can state about national out known university united then made also between "
    "team three people game company year under year part well best life family war high since film "
    "series before music name because government each through both great any while album second "
    "number back early found being called area same last several against long four large place "
    "well home what league river how these work water north south until five public general"
).split()))

# Stats rows. The request rows are named by model; the timing rows add the metric to the name, so
# the locust UI lists "gpt", "gpt itl", "gpt tpot", "gpt ttft" together under one protocol.
TTFT, ITL, TPOT = "ttft", "itl", "tpot"
TIMING_METRICS = (TTFT, ITL, TPOT)
# Stats row types (locust's "Type" column): the protocol each user speaks.
GRPC, HTTP, GRPC_STREAM, HTTP_SSE = "grpc", "http", "grpc-stream", "http-sse"
STREAMING_TYPES = (GRPC_STREAM, HTTP_SSE)


def metric_row_name(model: str, metric: str) -> str:
    return f"{model} {metric}"


def is_timing_row(name: str) -> bool:
    return name.rsplit(" ", 1)[-1] in TIMING_METRICS and " " in name


def make_prompt(rng: random.Random, num_words: int) -> str:
    """A prompt of `num_words` random frequent words (no leading space: text starts the prompt)."""
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def make_texts(rng: random.Random, num_texts: int, num_words: int) -> list[str]:
    return [make_prompt(rng, num_words) for _ in range(num_texts)]


@dataclass(frozen=True)
class GenerateParams:
    """The GPT request every user sends (vLLM benchmark style: fixed lengths, EOS ignored)."""
    max_tokens: int = 64
    ignore_eos: bool = True
    temperature: float = 0.0

    def json_fields(self) -> dict:
        """The HTTP generate body's fields besides text_input (named like the input tensors)."""
        return {"max_tokens": self.max_tokens, "ignore_eos": self.ignore_eos,
                "temperature": self.temperature, "stream": True}


@dataclass
class StreamTimeline:
    """Arrival times of one streamed generation's responses; TTFT, ITL and TPOT follow from it.

    `chunks` holds (seconds since the request was sent, number of new tokens) for every response
    that carried text; with coalesced responses one chunk may hold several tokens.
    """
    chunks: list[tuple[float, int]] = field(default_factory=list)
    is_final: bool = False
    finish_reason: str = ""
    num_input_tokens: int = 0
    num_output_tokens: int = 0

    def add(self, elapsed_s: float, num_new_tokens: int) -> None:
        if num_new_tokens > 0:
            self.chunks.append((elapsed_s, num_new_tokens))

    @property
    def ttft_s(self) -> float | None:
        return self.chunks[0][0] if self.chunks else None

    @property
    def itls_s(self) -> list[float]:
        """Gaps between successive responses (vLLM's ITL: per streamed chunk, not per token)."""
        times = [t for t, _ in self.chunks]
        return [later - earlier for earlier, later in zip(times, times[1:])]

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first: (last - first) / (tokens - 1)."""
        num_tokens = sum(n for _, n in self.chunks)
        if num_tokens < 2:
            return None
        return (self.chunks[-1][0] - self.chunks[0][0]) / (num_tokens - 1)

    def problem(self, expected_tokens: int | None) -> str | None:
        """Why this generation does not count as complete, or None when it does."""
        if not self.is_final:
            return "no final response"
        if not self.finish_reason:
            return "final response without finish_reason"
        if expected_tokens is not None and self.num_output_tokens != expected_tokens:
            return f"expected {expected_tokens} output tokens (ignore_eos), got {self.num_output_tokens}"
        streamed = sum(n for _, n in self.chunks)
        if streamed and streamed != self.num_output_tokens:
            return f"streamed {streamed} token ids but num_output_tokens is {self.num_output_tokens}"
        return None


def parse_sse(buffer: str) -> tuple[list[dict], str]:
    """Split server-sent events off the front of `buffer`: (their JSON payloads, the unparsed rest).

    Triton's generate_stream sends one `data: {json}` event per response, events separated by a
    blank line.
    """
    events = []
    while "\n\n" in buffer:
        block, buffer = buffer.split("\n\n", 1)
        data = "".join(line[5:].strip() for line in block.splitlines() if line.startswith("data:"))
        if data:
            events.append(json.loads(data))
    return events, buffer


def first_value(value, default=None):
    """JSON fields of the generate endpoints may come as scalars or one-element lists."""
    if isinstance(value, list):
        return value[0] if value else default
    return default if value is None else value


# -- step load ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepPlan:
    """Add `step_users` every `step_time_s` until `max_users`; stop at the end of the last step.

    Each step lasts long enough for the sliding-window percentiles of locust's history (10 s) to
    describe that step alone when step_time_s >= 10, which is what the latency-vs-users plot reads.
    """
    step_users: int
    step_time_s: float
    max_users: int

    def __post_init__(self) -> None:
        if self.step_users < 1 or self.max_users < 1 or self.step_time_s <= 0:
            raise ValueError(f"step load needs step_users >= 1, max_users >= 1, step_time > 0: {self}")

    @property
    def num_steps(self) -> int:
        return math.ceil(self.max_users / self.step_users)

    @property
    def duration_s(self) -> float:
        return self.num_steps * self.step_time_s

    def users_at(self, run_time_s: float) -> int | None:
        """Users wanted at `run_time_s` into the test, or None once the plan is over."""
        if run_time_s >= self.duration_s:
            return None
        step = int(run_time_s // self.step_time_s) + 1
        return min(self.max_users, step * self.step_users)


# -- options ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    """A workload option: a locust custom argument (also settable by its environment variable) that
    run_locust.py accepts and forwards."""
    flag: str
    type: type
    default: object
    help: str
    in_web_ui: bool = True

    @property
    def env_var(self) -> str:
        return "TRIDENT_" + self.flag.lstrip("-").replace("-", "_").upper()

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


OPTIONS = (
    Option("--grpc-port", int, 8001, "Triton gRPC port on the --host machine (HTTP goes to --host itself)"),
    Option("--bert-model", str, "bert", "name of the BERT embedding model"),
    Option("--gpt-model", str, "gpt", "name of the decoupled GPT model"),
    Option("--text-tokens", int, 32, "words (~tokens) per BERT text"),
    Option("--bert-batch", int, 1, "texts per BERT request"),
    Option("--prompt-tokens", int, 128, "words (~tokens) per GPT prompt; TTFT rows report the exact count"),
    Option("--max-tokens", int, 128, "output tokens per GPT request (EOS ignored, so exactly this many)"),
    Option("--request-timeout", float, 300.0, "seconds to wait for a request's final response"),
    Option("--seed", int, 0, "seed of the prompt generator (each user adds its own index)"),
    Option("--step-users", int, 4, "step load: users added per step", in_web_ui=False),
    Option("--step-time", float, 30.0, "step load: seconds per step", in_web_ui=False),
    Option("--step-max-users", int, 32, "step load: users in the last step", in_web_ui=False),
)
