"""The generation engine: ``LLMEngine`` (online: add_request / step / abort) and ``LLM`` (offline).

One step is schedule -> forward -> sample -> append, detokenize, check stops -> outputs. The
engine is driven by one thread; ``add_request``, ``abort`` and ``step`` hold one lock, so another
thread may call ``abort`` or ``add_request`` safely (it waits for the current step to end).
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .metrics import EngineStats
from .model_runner import ModelRunner
from .outputs import RequestOutput, RequestTimings
from .sampler import SampleResult, Sampler
from .sampling_params import SamplingParams
from .scheduler import QueueFullError, Scheduler
from .sequence import Sequence
from .stop_checker import check_stop

__all__ = ["LLM", "LLMEngine", "QueueFullError"]

logger = logging.getLogger(__name__)

Prompt = str | list[int]


@dataclass
class _Request:
    """Engine-side bookkeeping of one request around its sequence."""
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    num_text_emitted: int = 0

    def output(self, text_len: int) -> RequestOutput:
        seq = self.seq
        text = self.detokenizer.text[:max(text_len, self.num_text_emitted)]
        delta = text[self.num_text_emitted:]
        self.num_text_emitted = len(text)
        params = seq.sampling_params
        t = seq.timings
        return RequestOutput(
            request_id=seq.request_id,
            prompt_token_ids=seq.token_ids[:seq.num_prompt_tokens],
            output_token_ids=seq.token_ids[seq.num_prompt_tokens:],
            text=text, delta_text=delta,
            finished=seq.is_finished, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            cumulative_logprob=seq.cumulative_logprob if params.logprobs else None,
            logprobs=list(seq.output_logprobs) if params.logprobs else None,
            num_cached_tokens=seq.num_cached_tokens,
            timings=RequestTimings(t.arrival, t.first_scheduled, t.first_token, t.finished))


class LLMEngine:
    """Continuous-batching generation over a paged KV cache, importable without Triton.

    Online use (what the Triton backend drives)::

        engine = LLMEngine(EngineConfig(model="path/to/hf_dir"))
        engine.add_request("r1", "Hello", SamplingParams(max_tokens=32))
        while engine.has_unfinished():
            for out in engine.step():       # one RequestOutput per request that got a token
                print(out.request_id, out.delta_text, out.finished)

    ``runner`` is injectable so that tests can share one loaded model between engines.
    """

    def __init__(self, config: EngineConfig, runner: ModelRunner | None = None):
        self.config = config
        self.runner = runner if runner is not None else ModelRunner(config)
        self.capacity = self.runner.capacity
        self.max_model_len = self.runner.max_model_len
        self.tokenizer = self.runner.tokenizer
        self._decoder = fast_decoder(self.tokenizer)
        self.scheduler = Scheduler(config, self.capacity.num_blocks, self.max_model_len)
        self._eos_token_ids = list(self.runner.eos_token_ids)
        self.sampler = Sampler(seed=config.seed, eos_token_ids=self._eos_token_ids)
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self._requests: dict[str, _Request] = {}
        self._seq_ids = itertools.count()
        self._lock = threading.RLock()
        logger.info(self.capacity.describe())

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLMEngine":
        return cls(config)

    # -- online API --------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Prompt, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request. Raises ValueError if it can never run, QueueFullError if the queue is full."""
        params = params if params is not None else SamplingParams()
        token_ids = self._tokenize(prompt)
        with self._lock:
            if request_id in self._requests:
                raise ValueError(f"request id {request_id!r} is already in flight")
            self._validate(token_ids, params)
            seq = Sequence(next(self._seq_ids), token_ids, params, request_id, arrival_time)
            self.scheduler.add(seq)
            detokenizer = IncrementalDetokenizer(self._decoder, token_ids, params.skip_special_tokens)
            self._requests[request_id] = _Request(seq, detokenizer)

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Stop a request now and free its KV blocks. Returns its final output ("abort"), if it was live."""
        with self._lock:
            request = self._requests.pop(request_id, None)
            if request is None:
                return []
            self.scheduler.abort(request.seq.seq_id)
            self.sampler.free(request.seq.seq_id)
            return [request.output(request.num_text_emitted)]

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step and return an output for every request that got a token."""
        with self._lock:
            out = self.scheduler.schedule()
            if out.is_empty:
                return []
            sampled = [seq for seq, is_sampled in zip(out.seqs, out.is_sampled) if is_sampled]
            if self.sampler.is_plain_greedy(sampled):
                # On-device argmax: only the token ids cross to the host (one sync per step).
                token_ids = self.runner.execute_greedy(out.seqs, out.num_new_tokens)
                results = [SampleResult(token_id, None) for token_id in token_ids]
            else:
                logits = self.runner.execute(out.seqs, out.num_new_tokens)   # [num_sampled, vocab]
                results = self.sampler(logits, sampled) if sampled else []
            now = time.monotonic()
            outputs = [self._append(seq, result, now) for seq, result in zip(sampled, results)]
            self.scheduler.update(out)
            for seq in sampled:
                if seq.is_finished:
                    self._retire(seq)
            return outputs

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        bm = self.scheduler.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=bm.usage, prefix_cache_queries=bm.prefix_queries,
            prefix_cache_hits=bm.prefix_hits, num_preemptions_total=self.scheduler.num_preemptions_total,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total)

    # -- offline API -------------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run a batch to completion; final outputs in prompt order. Not for use beside online requests."""
        prompts = [prompts] if isinstance(prompts, str) or _is_token_list(prompts) else list(prompts)
        params = _per_prompt(sampling_params, len(prompts))
        request_ids = [f"generate-{next(self._seq_ids)}" for _ in prompts]
        pending = deque(zip(request_ids, prompts, params))
        finals: dict[str, RequestOutput] = {}
        try:
            while pending or self.has_unfinished():
                self._feed(pending)
                finals.update((out.request_id, out) for out in self.step() if out.finished)
        except BaseException:   # e.g. an invalid prompt in the middle: leave nothing running
            for request_id in request_ids:
                self.abort(request_id)
            raise
        return [finals[request_id] for request_id in request_ids]

    def _feed(self, pending: deque) -> None:
        """Add queued prompts while the waiting queue has room (generate may exceed max_queue_size)."""
        limit = self.config.max_queue_size
        while pending and not (limit and self.scheduler.num_waiting >= limit):
            self.add_request(*pending.popleft())

    # -- internals ---------------------------------------------------------------------------------
    def _tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty: give at least one character or token")
            return list(self.tokenizer.encode(prompt))
        token_ids = [int(t) for t in prompt]
        if not token_ids:
            raise ValueError("prompt is empty: give at least one character or token")
        bad = [t for t in token_ids if not 0 <= t < self.runner.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {self.runner.vocab_size}): {bad[:5]}")
        return token_ids

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        num_prompt, max_len = len(token_ids), self.max_model_len
        if num_prompt >= max_len:
            raise ValueError(f"prompt has {num_prompt} tokens but max_model_len is {max_len}; "
                             f"it must be at most {max_len - 1} tokens to leave room for output")
        if num_prompt + params.max_tokens > max_len:
            raise ValueError(f"prompt ({num_prompt} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"max_model_len ({max_len}); use max_tokens <= {max_len - num_prompt}")
        pool = self.capacity.num_tokens
        if num_prompt + params.max_tokens > pool:
            raise ValueError(f"prompt ({num_prompt} tokens) + max_tokens ({params.max_tokens}) exceeds "
                             f"the whole KV cache ({pool} tokens); lower max_tokens or grow the cache")

    def _append(self, seq: Sequence, result: SampleResult, now: float) -> RequestOutput:
        request = self._requests[seq.request_id]
        seq.append_token(result.token_id, result.logprob)
        if seq.timings.first_token is None:
            seq.timings.first_token = now
            self.prompt_tokens_total += seq.num_prompt_tokens
        seq.timings.last_token = now
        self.generation_tokens_total += 1
        detokenizer = request.detokenizer
        new_text = detokenizer.add_tokens([result.token_id])
        decision = check_stop(seq, detokenizer.text, len(new_text), self._eos_token_ids, self.max_model_len)
        text_len = decision.text_len
        if decision.finish_reason is not None:
            seq.finish(decision.finish_reason, decision.stop_reason)
            if decision.finish_reason == "length":   # nothing more will come: release what is held
                detokenizer.flush()
                text_len = len(detokenizer.text)
        return request.output(text_len)

    def _retire(self, seq: Sequence) -> None:
        self._requests.pop(seq.request_id, None)
        self.sampler.free(seq.seq_id)


class LLM:
    """Offline batch generation in the spirit of vLLM's ``LLM``.

    >>> llm = LLM("model_repository/gpt/1/artifacts/smollm2-135m-instruct", max_model_len=512)
    >>> [out.text for out in llm.generate(["The capital of France is"], SamplingParams(temperature=0))]
    """

    def __init__(self, model: str, **config):
        self.engine = LLMEngine(EngineConfig(model=model, **config))

    def generate(self, prompts: Prompt | Seq[Prompt],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        return self.engine.generate(prompts, sampling_params)


class _RustDecoder:
    """``tokenizer.decode`` straight through the Rust ``tokenizers`` object.

    The detokenizer decodes two short windows per output token; through the transformers wrapper
    each call pays ~10 us of argument conversion, several times the decode itself, and at hundreds
    of sequences per step that is milliseconds. Same text as the wrapper with
    ``clean_up_tokenization_spaces=False`` (which is all the detokenizer asks for).
    """

    def __init__(self, backend):
        self._decode = backend.decode

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False,
               clean_up_tokenization_spaces: bool = False) -> str:
        if clean_up_tokenization_spaces:
            raise ValueError("the fast decoder does not clean up tokenization spaces")
        return self._decode(token_ids, skip_special_tokens=skip_special_tokens)


def fast_decoder(tokenizer):
    """The Rust decoder of a fast tokenizer, else the tokenizer itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return tokenizer if backend is None else _RustDecoder(backend)


def _is_token_list(prompts) -> bool:
    return isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], int)


def _per_prompt(sampling_params, num_prompts: int) -> list[SamplingParams]:
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return [sampling_params or SamplingParams()] * num_prompts
    params = list(sampling_params)
    if len(params) != num_prompts:
        raise ValueError(f"got {len(params)} sampling params for {num_prompts} prompts")
    return params
