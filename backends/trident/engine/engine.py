"""The generation engine: ``LLMEngine`` (online: add_request / step / abort) and ``LLM`` (offline).

One step is pipelined so that the host's per-token work hides behind the GPU (docs/engine.md,
"The step pipeline"): resolve the tokens of the step in flight -> append them and apply the stop
rules scheduling needs -> scheduler.update -> schedule and launch the next step -> detokenize,
match stop strings and build outputs for the resolved tokens while the GPU runs. The engine is
driven by one thread; ``add_request``, ``abort`` and ``step`` hold one lock, so another thread may
call ``abort`` or ``add_request`` safely (it waits for the current step to end).
"""
from __future__ import annotations

import bisect
import dataclasses
import gc
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass

from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer, add_tokens_at_end, fast_decoder
from .metrics import EngineStats
from .model_runner import InputsFrom, ModelRunner, PendingTokens
from .outputs import RequestOutput
from .sampler import Sampler, has_penalties
from .sampling_params import RequestOutputKind, SamplingParams
from .scheduler import QueueFullError, Scheduler, SchedulerOutput
from .sequence import Sequence, SequenceStatus
from .stop_checker import StopDecision, check_stop, check_token_stop

__all__ = ["LLM", "LLMEngine", "QueueFullError"]

logger = logging.getLogger(__name__)

Prompt = str | list[int]


@dataclass
class _Request:
    """Engine-side bookkeeping of one request around its sequence."""
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    kind: RequestOutputKind
    # Detokenized token by token: its outputs stream, or stop strings must be matched as it goes.
    # Otherwise (FINAL_ONLY, no stop strings) the text is decoded once when it finishes.
    is_incremental: bool
    text_len: int = 0            # how much of detokenizer.text is safe to show
    num_text_emitted: int = 0    # text length at the previous output
    num_tokens_emitted: int = 0  # token count at the previous output (DELTA outputs start there)

    def output(self) -> RequestOutput:
        # (Built for every streamed row every step: plain attribute reads, no property calls.)
        seq = self.seq
        with_logprobs = seq.sampling_params.logprobs
        t = seq.timings
        num_tokens = len(seq.token_ids)
        out = RequestOutput(
            seq.request_id, token_ids=seq.token_ids, num_prompt_tokens=seq.num_prompt_tokens,
            num_tokens=num_tokens, text_source=self.detokenizer, text_len=self.text_len,
            prev_text_len=self.num_text_emitted,
            first_id=self.num_tokens_emitted if self.kind is RequestOutputKind.DELTA else None,
            finished=seq.status is SequenceStatus.FINISHED, finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason, num_cached_tokens=seq.num_cached_tokens,
            times=(t.arrival, t.first_scheduled, t.first_token, t.finished),
            logprobs=seq.output_logprobs if with_logprobs else None,
            cumulative_logprob=seq.cumulative_logprob if with_logprobs else None)
        self.num_text_emitted, self.num_tokens_emitted = self.text_len, num_tokens
        return out


@dataclass
class _Flight:
    """A launched step whose sampled tokens the host has not taken yet."""
    scheduled: SchedulerOutput
    sampled: list[Sequence]
    tokens: PendingTokens
    # Its tokens are the raw logits' argmax (``Sampler.is_plain_greedy``): picked inside the
    # forward's graph. Otherwise the sampler picked them on the device after the forward.
    greedy: bool = True
    # Set when the next step was launched before this one's tokens were taken (async scheduling):
    # the scheduler has advanced past this step, and each live sampled sequence holds a
    # placeholder where this step's token goes.
    advanced: bool = False


PLACEHOLDER = -1   # a token id still on the device (async scheduling); never seen outside step()


class LLMEngine:
    """Continuous-batching generation over a paged KV cache, importable without Triton.

    Online use (what the Triton backend drives)::

        engine = LLMEngine(EngineConfig(model="path/to/hf_dir"))
        engine.add_request("r1", "Hello", SamplingParams(max_tokens=32))
        while engine.has_unfinished():
            for out in engine.step():       # per request that got a token (FINAL_ONLY: once, at the end)
                print(out.request_id, out.delta_text, out.finished)

    A step returns the outputs of the tokens of the step launched by the previous call (the first
    call launches and returns []); ``has_unfinished()`` stays true until every request's final
    output has been returned.

    ``runner`` is injectable so that tests can share one loaded model between engines.
    """

    def __init__(self, config: EngineConfig, runner: ModelRunner | None = None):
        # What is alive before the engine (imported modules: torch, transformers, ~10^6 objects)
        # outlives it: out of the collector's sight, a full collection walks only what the engine
        # and its requests create. Without it one took ~0.2 s inside the step that finished 1000
        # requests (vLLM freezes its heap after start-up for the same reason). Frozen first, so
        # that the engine's own objects (its KV cache) stay in the collector's sight.
        gc.collect()
        gc.freeze()
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
        # Requests whose outputs need work at every token (streamed, or decoded as they go); the
        # others need it only at their last token, and the steps before skip them.
        self._each_token: set[str] = set()
        self._seq_ids = itertools.count()
        self._lock = threading.RLock()
        self._in_flight: _Flight | None = None
        self.num_launched_ahead = 0   # steps launched before the previous step's tokens were taken
        self._inter_token_latencies: list[float] = []
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
            seq = Sequence(next(self._seq_ids), token_ids, params, request_id, arrival_time,
                           max_model_len=self.max_model_len, eos_token_ids=self._eos_token_ids)
            self.scheduler.add(seq)
            detokenizer = IncrementalDetokenizer(self._decoder, token_ids, params.skip_special_tokens)
            kind = params.output_kind
            incremental = params.detokenize and (kind is not RequestOutputKind.FINAL_ONLY or bool(params.stop))
            self._requests[request_id] = _Request(seq, detokenizer, kind, is_incremental=incremental,
                                                  num_tokens_emitted=len(token_ids))
            if incremental or kind is not RequestOutputKind.FINAL_ONLY:
                self._each_token.add(request_id)

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Stop a request now and free its KV blocks. Returns its final output ("abort"), if it was live."""
        with self._lock:
            request = self._requests.pop(request_id, None)
            if request is None:
                return []
            self._each_token.discard(request_id)
            self.scheduler.abort(request.seq.seq_id)  # a token still in flight for it is dropped
            if not request.is_incremental and request.seq.sampling_params.detokenize:
                request.detokenizer.add_tokens_at_once(request.seq.output_token_ids)
                request.text_len = len(request.detokenizer.text)
            return [request.output()]

    def step(self) -> list[RequestOutput]:
        """Take the tokens of the step in flight, launch the next one, then return the outputs of
        the taken tokens (built while the GPU runs the new step). Under async scheduling a step of
        decodes launches its successor first, its input tokens still on the device, so that the
        GPU does not wait while the host takes the tokens and schedules."""
        with self._lock:
            ahead = self._launch_ahead() if self.config.async_scheduling else None
            produced = self._resolve()
            if ahead is not None:
                self._in_flight = ahead
            else:
                self._launch()
            return self._postprocess(produced)

    def drain_inter_token_latencies(self) -> list[float]:
        """Seconds between consecutive tokens of each request, one per token after a request's
        first, recorded as tokens arrive since the previous call (``inter_token_latency_seconds``)."""
        with self._lock:
            latencies, self._inter_token_latencies = self._inter_token_latencies, []
            return latencies

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
        # One output per request, as vLLM's LLM does: no per-token outputs, no per-token decoding.
        params = _final_only(_per_prompt(sampling_params, len(prompts)))
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
        token_ids = list(map(int, prompt))   # (C loops: a thousand prompts arrive in one step)
        if not token_ids:
            raise ValueError("prompt is empty: give at least one character or token")
        vocab_size = self.runner.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab_size:
            bad = [t for t in token_ids if not 0 <= t < vocab_size]
            raise ValueError(f"prompt token ids out of range [0, {vocab_size}): {bad[:5]}")
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

    # -- the step pipeline -------------------------------------------------------------------------
    def _launch(self) -> None:
        """Schedule and start the next step; greedy steps return before the GPU finishes."""
        out = self.scheduler.schedule()
        if out.is_empty:
            return
        sampled = [seq for seq, is_sampled in zip(out.seqs, out.is_sampled) if is_sampled]
        # Either way only the token ids (and log-probs) cross to the host, when the step is resolved.
        if self.sampler.is_plain_greedy(sampled):   # the argmax inside the forward
            self._in_flight = _Flight(out, sampled, self.runner.launch_greedy(out.seqs, out.num_new_tokens))
        else:   # the sampler's kernels queued behind the forward
            tokens = self.runner.launch_sampled(out.seqs, out.num_new_tokens, self._sample_rows(sampled))
            self._in_flight = _Flight(out, sampled, tokens, greedy=False)

    def _sample_rows(self, seqs: list[Sequence], in_flight=None):
        """``Sampler.sample`` for these rows, as ``ModelRunner.launch_sampled`` calls it."""
        return lambda logits: self.sampler.sample(logits, seqs, in_flight)

    def _launch_ahead(self) -> _Flight | None:
        """Async scheduling (vLLM's): launch the next step before the in-flight one's tokens reach
        the host, when the next step is the in-flight decodes again, one token each. Its input
        tokens are gathered on the device from the in-flight step's; the host holds placeholders
        until ``_resolve``. A sequence that the in-flight step's token ends (EOS, a stop token: not
        known yet) wastes one row of the new step, whose token is dropped (the sampler's noise is
        keyed on position, so that row shifts no other draw). ``min_tokens`` masking holds too (the
        sampler counts the placeholder as the output it stands for), and penalties take the
        in-flight token's value from the device. Waiting
        requests are admitted into the same step behind the decodes, as far as the token budget and
        the free blocks go (never by preempting). None, and nothing changed, when the next step
        needs anything else: a partial prefill to continue, a preemption, nothing to continue."""
        flight = self._in_flight
        if flight is None or flight.tokens.device is None:
            return None
        running_status = SequenceStatus.RUNNING
        block_size = self.scheduler.block_manager.block_size
        live, rows, continuing = [], [], []
        new_block = []   # of continuing, those whose next token starts a block
        # One pass over the rows (this runs every decode step, ~1000 rows), nothing changed yet;
        # the stop rules are the sequence's precomputed limits (check_token_stop's, ahead of a token).
        for i, seq in enumerate(flight.sampled):
            if seq.status is not running_status:
                continue
            live.append(seq)
            num_tokens = len(seq.token_ids) + 1                  # with the in-flight token
            if num_tokens >= seq.max_num_tokens:
                continue      # the in-flight token is its last ("length")
            rows.append(i)
            continuing.append(seq)
            if num_tokens > len(seq.block_table) * block_size:
                new_block.append(seq)
        if len(live) != len(self.scheduler.running):
            return None   # someone running was not sampled by the in-flight step (a partial prefill)
        if not continuing or len(new_block) > self.scheduler.block_manager.num_free_blocks:
            return None
        if len(rows) < len(flight.sampled):
            rows = _keep_places(rows)
            continuing = [flight.sampled[i] for i in rows]
        for seq in live:
            seq.token_ids.append(PLACEHOLDER)
        self.scheduler.advance(flight.scheduled)
        flight.advanced = True
        out = self.scheduler.schedule_continuation(continuing, new_block)
        self.scheduler.admit(out)   # the waiting, behind the decodes: out.seqs starts with continuing
        admitted = len(out.seqs) > len(continuing)
        sampled = [seq for seq, is_sampled in zip(out.seqs, out.is_sampled) if is_sampled] if admitted else continuing
        inputs_from = InputsFrom(flight.tokens.device, rows)
        self.num_launched_ahead += 1
        # The same rows as a greedy flight: still plain greedy. A sampled flight's rows may have
        # become so (its sampled rows ended).
        if (flight.greedy and not admitted) or self.sampler.is_plain_greedy(sampled):
            return _Flight(out, sampled, self.runner.launch_greedy(out.seqs, out.num_new_tokens, inputs_from))
        # Penalties count each continuing row's in-flight token from the device (the host has a
        # placeholder); an admitted row has none (-1).
        in_flight = None
        if any(map(has_penalties, sampled)):
            in_flight = inputs_from.gathered(len(sampled) - len(continuing), pad=-1)  # [sampled]
        tokens = self.runner.launch_sampled(out.seqs, out.num_new_tokens, self._sample_rows(sampled, in_flight),
                                            inputs_from)
        return _Flight(out, sampled, tokens, greedy=False)

    def _resolve(self) -> list[_Request]:
        """Append the in-flight step's tokens and apply the stop rules that need no text. Returns
        the requests whose tokens need more work (``_postprocess``)."""
        flight, self._in_flight = self._in_flight, None
        if flight is None:
            return []
        token_ids = flight.tokens.result()
        advanced = flight.advanced
        logprobs = flight.tokens.logprobs() or itertools.repeat(None)
        now = time.monotonic()
        requests, latencies, each_token = self._requests, self._inter_token_latencies, self._each_token
        eos, max_model_len = self._eos_token_ids, self.max_model_len
        finished = SequenceStatus.FINISHED
        produced = []
        num_tokens = 0
        for seq, token_id, logprob in zip(flight.sampled, token_ids, logprobs):
            if seq.status is finished:
                continue    # aborted, or a stop string ended it after this step was launched
            seq_token_ids = seq.token_ids
            if advanced:
                seq_token_ids[-1] = token_id   # the placeholder
            else:
                seq_token_ids.append(token_id)
            if logprob is not None and seq.sampling_params.logprobs:   # (a batch's rows all get one)
                seq.add_logprob(logprob)
            timings = seq.timings
            if timings.first_token is None:
                timings.first_token = now
                self.prompt_tokens_total += seq.num_prompt_tokens
            else:
                latencies.append(now - timings.last_token)
            timings.last_token = now
            num_tokens += 1
            # check_token_stop's rules through the sequence's precomputed limits; the exact
            # decision (and its reason) only for the rows they stop.
            n = len(seq_token_ids)
            if n >= seq.max_num_tokens or (token_id in seq.stop_token_set and n >= seq.stop_tokens_from):
                stop = check_token_stop(seq, eos, max_model_len)
                if stop is not None:
                    seq.finish(*stop)
                produced.append(requests[seq.request_id])
            elif each_token and seq.request_id in each_token:
                produced.append(requests[seq.request_id])
        self.generation_tokens_total += num_tokens
        if advanced:
            self.scheduler.retire(flight.scheduled)
        else:
            self.scheduler.update(flight.scheduled)
        return produced

    def _postprocess(self, produced: list[_Request]) -> list[RequestOutput]:
        """Detokenize, match stop strings and build the outputs of the resolved tokens."""
        outputs = []
        final_only, finished = RequestOutputKind.FINAL_ONLY, SequenceStatus.FINISHED
        at_end = [r for r in produced if not r.is_incremental and r.seq.status is finished
                  and r.seq.sampling_params.detokenize]
        if at_end:
            self._detokenize_at_end(at_end)
        for request in produced:
            seq = request.seq
            if request.is_incremental:
                self._detokenize_token(request)
            if seq.status is finished:
                self._retire(seq)
                outputs.append(request.output())
            elif request.kind is not final_only and self._stream_output_due(request):
                outputs.append(request.output())
        return outputs

    def _stream_output_due(self, request: _Request) -> bool:
        """``stream_interval``: a running stream's output goes out on its first token and then once
        it has that many new tokens; the ones held meanwhile ride in that output (DELTA outputs
        start where the previous one ended)."""
        interval = self.config.stream_interval
        if interval == 1:
            return True
        seq = request.seq
        emitted = request.num_tokens_emitted
        return emitted == seq.num_prompt_tokens or len(seq.token_ids) - emitted >= interval

    def _detokenize_token(self, request: _Request) -> None:
        seq, detokenizer = request.seq, request.detokenizer
        new_text = detokenizer.add_tokens([seq.token_ids[-1]])
        self._apply_stop(request, check_stop(seq, detokenizer.text, len(new_text), self._eos_token_ids,
                                             self.max_model_len))

    def _detokenize_at_end(self, requests: list[_Request]) -> None:
        """Whole outputs at once, the requests that ended this step decoded in one batch: the same
        text as token by token, and the last token alone so that a stop token's text is cut as
        ``check_stop`` does (``detokenizer.add_tokens_at_end``)."""
        new_texts = add_tokens_at_end([r.detokenizer for r in requests], [r.seq.output_token_ids for r in requests],
                                      self._decoder)
        for request, new_text in zip(requests, new_texts):
            seq = request.seq
            self._apply_stop(request, check_stop(seq, request.detokenizer.text, len(new_text), self._eos_token_ids,
                                                 self.max_model_len))

    def _apply_stop(self, request: _Request, decision: StopDecision) -> None:
        seq = request.seq
        text_len = decision.text_len
        if decision.finish_reason is not None:
            if seq.status is not SequenceStatus.FINISHED:
                # A stop string: the next step may be in flight for it; its token will be dropped.
                self.scheduler.finish(seq.seq_id, decision.finish_reason, decision.stop_reason)
            else:   # a stop string ending at the last token of max_tokens wins over "length"
                seq.finish_reason, seq.stop_reason = decision.finish_reason, decision.stop_reason
            if decision.finish_reason == "length":   # nothing more will come: release what is held
                request.detokenizer.flush()
                text_len = len(request.detokenizer.text)
        request.text_len = max(text_len, request.text_len)

    def _retire(self, seq: Sequence) -> None:
        self._requests.pop(seq.request_id, None)
        self._each_token.discard(seq.request_id)


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


def _keep_places(kept: list[int]) -> list[int]:
    """The row order of a continuation, from the ascending indices ``kept`` of the rows that go on:
    a row that stays below ``len(kept)`` keeps its index, and the places of the rows that ended are
    taken by the rows above ``len(kept)``, last first (vLLM's condensed persistent batch). Row i of
    the staged decode inputs then holds the same sequence as in the step before, so its block table
    needs no rewrite (``DecodeBuffers.stage``); closing the gaps in order instead would shift every
    row after the first that ended."""
    n = len(kept)
    num_stay = bisect.bisect_left(kept, n)       # kept[:num_stay] < n stay where they are
    if num_stay == n:
        return kept
    order = list(range(n))
    holes = sorted(set(order).difference(kept[:num_stay]))   # as many as kept[num_stay:]
    for hole, row in zip(holes, reversed(kept[num_stay:])):
        order[hole] = row
    return order


def _is_token_list(prompts) -> bool:
    return isinstance(prompts, list) and bool(prompts) and isinstance(prompts[0], int)


def _per_prompt(sampling_params, num_prompts: int) -> list[SamplingParams]:
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return [sampling_params or SamplingParams()] * num_prompts
    params = list(sampling_params)
    if len(params) != num_prompts:
        raise ValueError(f"got {len(params)} sampling params for {num_prompts} prompts")
    return params


def _final_only(params: list[SamplingParams]) -> list[SamplingParams]:
    copies: dict[int, SamplingParams] = {}   # one copy per distinct object: callers often share one
    for p in params:
        if id(p) not in copies:
            copies[id(p)] = dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY)
    return [copies[id(p)] for p in params]
