"""Triton Python model `gpt` (decoupled): a thin adapter over the engine, which runs in its own process.

vLLM V1's frontend / engine-core split (trident.engine.engine_process): this stub process parses and
tokenizes requests, sends token ids to the engine process, and turns the engine's per-step outputs
into Triton responses; the engine process does nothing but schedule, run the model and detokenize,
on a GIL no serving thread competes for. Each instance of the model (instance_group count) is such a
stub process, and they all share one engine process: Triton spreads the requests over them, so the
per-request and per-response work runs on as many interpreters.

Threads here: Triton's execute() (parse, queue); the admission thread (tokenizes what has queued
in one batch, submits to the engine); the router (takes the engine's steps, records metrics, hands
each request's new outputs to its sender shard); ``response_threads`` sender
shards; the engine connection's reader and the metrics thread (trident.triton.gpt_metrics).
A response send is an IPC round trip to the server process that releases the GIL while it waits,
so shards overlap those waits. Each request belongs to one shard, and every call on its response
sender (sends and ``is_cancelled()`` polls) is made by that shard's thread, so none can race the
request's FINAL response (Triton frees a request's response factory once that is sent; an
``is_cancelled()`` racing it crashed the server). When sends fall behind the tokens, a shard sends
last and first responses first and a stream's pending tokens as one response (SenderShard), so
streaming keeps up under load. Every request gets exactly one FINAL response, errors, a dead
engine process and shutdown included.
"""
from __future__ import annotations

import dataclasses
import faulthandler
import itertools
import json
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from trident.engine.config import EngineConfig
from trident.engine.detokenizer import StreamDetokenizer, fast_decoder
from trident.engine.engine_process import CoreOutput, CoreStep, EngineDied, EngineProcess
from trident.engine.outputs import RequestTimings
from trident.engine.tokenizer import encode_batch, load_tokenizer
from trident.triton.gpt_metrics import GptMetrics
from trident.triton.gpt_request import GenerateRequest, parse_request
from trident.triton.io import RequestError, string_array
from trident.phase_log import GPT_PHASES_ENV, PhaseLog
from trident.triton.shutdown import on_sigterm

CANCEL_CHECK_INTERVAL_S = 0.02
# is_cancelled() calls per interval, shared by the shards: ~800 IPC round trips a second at most.
# Each costs 0.3-1 ms of a sender's time under load (64 per interval took 3.1 of the 4 shards'
# 14 busy seconds in an H200 stream run), so with a thousand requests in flight a cancelled one
# is found within ~1.3 s; with up to 16 in flight, within one interval.
CANCEL_CHECKS_PER_PASS = 16
# Default of the model config parameter `response_threads`. H200, 1000 requests at once (docs/
# benchmarks.md): non-streaming, whose thousand final responses come within a few steps, gains
# from parallel sends (4 threads: 72-80% of in-process in four runs, 1-2 threads: 53-74%);
# streaming loses (more, smaller responses and more GIL contention: 1 thread 40-50%, 4: 31-40%).
RESPONSE_THREADS = 4
ADMIT_BATCH_MAX = 256           # prompts tokenized in one call
SENDS_PER_ROUND = 32            # responses a sender shard sends between looks at its queue
ADMISSION_YIELD_S = 0.002       # how long a sender holding stream updates waits between looks
GIL_SWITCH_INTERVAL_S = 0.0002
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
SHUTDOWN_MESSAGE = "the server is shutting down; the request was not completed"
# Profiling: with TRIDENT_GPT_PHASES=<directory> in the server's environment, execute(), the
# admission thread, the router and the senders record where their time goes
# (trident.phase_log); bench_gpt.py reads it.
PHASES_FLUSH_S = 1.0


@dataclass
class Active:
    """A request the engine is working on, seen from the Triton side."""
    request_id: str
    request: GenerateRequest
    sender: object
    shard: int                   # the sender shard that makes every call on `sender`
    arrival: float               # time.monotonic() when execute() took it
    outputs: frozenset[str] = frozenset()   # the outputs the client asked for (all, unless it named some)
    num_prompt_tokens: int = 0
    detokenizer: StreamDetokenizer | None = None   # a stream's text is built here (see _admit_batch)
    num_output_tokens: int = 0   # tokens already sent (streaming)
    prompt_sent: bool = False
    cancel_reported: bool = False
    final_sent: bool = False     # no sender call may follow the FINAL response


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.logger = pb_utils.Logger
        model_config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        config = self._engine_config(version_dir / params.get("engine_config", "engine.json"), version_dir)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        self.decoder = fast_decoder(self.tokenizer)
        # The model's instances (instance_group count) are stub processes of their own, each with
        # its own interpreter for the per-request and per-response work; they share one engine:
        # the first to load starts it, the others attach (trident.engine.engine_process). The
        # server's pid is in the key, so a second server on the same host gets its own engine, and
        # the engine exits if the server dies.
        server_pid = os.getppid()
        try:
            self.core = EngineProcess(config, key=f"{server_pid}-{args['model_name']}-{args['model_version']}",
                                      watch_pid=server_pid)
        except RuntimeError as e:
            raise pb_utils.TritonModelException(f"gpt: {e}") from None
        how = "started by" if self.core.started_here else "shared with"
        self.logger.log_info(f"gpt: engine process {self.core.pid}: {self.core.info.capacity} "
                             f"({how} instance {args['model_instance_name']})")
        self.max_tokens_limit = self.core.info.max_model_len
        self.metrics = GptMetrics(args["model_name"], args["model_version"])
        self.active: dict[str, Active] = {}
        self.ids = itertools.count()
        self.id_prefix = f"{os.getpid()}-"   # request ids are unique across the engine's frontends
        self.engine_error: str | None = None    # set once the engine process is gone
        self.stopping = threading.Event()
        self.shutting_down = threading.Event()
        on_sigterm(self.shutting_down.set)
        # Triton hands requests to execute() on the stub's main thread, one call per request, and
        # each call first waits for the GIL, which a busy thread gives up only every switch
        # interval (5 ms by default): a thousand requests sent at once would trickle in over
        # seconds behind the response thread. A short interval bounds that wait.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        # `kill -USR1 <stub pid>` prints every thread's Python stack to the server log: the way to
        # see what a busy or stuck model is doing without stopping it.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        name = args["model_name"]
        self.execute_log = PhaseLog.from_env(GPT_PHASES_ENV, f"{name}-execute", (), ("inputs", "parse", "queue"))
        self.admit_log = PhaseLog.from_env(GPT_PHASES_ENV, f"{name}-admit", ("requests",), ("tokenize", "submit"))
        self.router_log = PhaseLog.from_env(GPT_PHASES_ENV, f"{name}-router", ("steps", "outputs", "requests"),
                                            ("wait", "take", "dispatch"))
        self.sender_log = PhaseLog.from_env(GPT_PHASES_ENV, f"{name}-senders", ("responses",), ("send", "poll"))
        self._logs = (self.execute_log, self.admit_log, self.router_log, self.sender_log)
        num_shards = int(params.get("response_threads") or RESPONSE_THREADS)
        if num_shards < 1:
            raise pb_utils.TritonModelException(f"response_threads must be >= 1, got {num_shards}")
        self.admissions: queue.Queue = queue.Queue()
        self._admitting = False
        self.shards = [SenderShard(self, k) for k in range(num_shards)]
        self.admitter = threading.Thread(target=self._admit_loop, name="gpt-admission", daemon=True)
        self.router = threading.Thread(target=self._route_loop, name="gpt-router", daemon=True)
        self.admitter.start()
        self.router.start()

    @staticmethod
    def _engine_config(path: Path, version_dir: Path) -> EngineConfig:
        if not path.is_file():
            raise pb_utils.TritonModelException(f"engine config {path} not found")
        values = json.loads(path.read_text())
        for key in ("model", "tokenizer"):
            if values.get(key) and not Path(values[key]).is_absolute():
                values[key] = str(version_dir / values[key])
        if not Path(values["model"]).is_dir():
            raise pb_utils.TritonModelException(
                f"no model at {values['model']}: run `make build` (python -m build.gpt_convert) first")
        return EngineConfig.from_dict(values)

    # -- Triton entry points ------------------------------------------------------------------------
    def execute(self, requests):
        """Parse and queue: tokenizing is left to the admission thread, which encodes whatever has
        queued up in one batch (on all cores, GIL released), so a burst of requests is not
        tokenized one by one on this thread, through which Triton hands over every request."""
        for request in requests:
            started, marks = time.time(), [time.perf_counter()]
            sender = request.get_response_sender()
            refusal = SHUTDOWN_MESSAGE if self.shutting_down.is_set() else self.engine_error
            if refusal:
                _send_error(sender, refusal)
                continue
            try:
                # One pass: get_input_tensor_by_name would list the inputs again for each name.
                inputs = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
                marks.append(time.perf_counter())
                parsed = parse_request(inputs, self.max_tokens_limit)
                marks.append(time.perf_counter())
            except RequestError as e:
                _send_error(sender, str(e))
                continue
            number = next(self.ids)
            self.admissions.put(Active(f"{self.id_prefix}{number}", parsed, sender, shard=number % len(self.shards),
                                       arrival=time.monotonic(), outputs=frozenset(request.requested_output_names())))
            if self.execute_log:
                self.execute_log.record(started, (), marks + [time.perf_counter()])
        return None

    def finalize(self) -> None:
        self.logger.log_info("gpt: finalize: stopping the engine")
        self.stopping.set()
        self.admissions.put(None)
        self.admitter.join(timeout=30)
        self.router.join(timeout=30)
        for shard in self.shards:
            shard.thread.join(timeout=30)
        for log in self._logs:
            if log:
                log.flush()
        self.core.shutdown()
        self.metrics.close()
        self.logger.log_info("gpt: finalize: done")

    # -- admission thread ---------------------------------------------------------------------------
    def _admit_loop(self) -> None:
        stopping = False
        while not stopping:
            batch = [self.admissions.get()]
            while len(batch) < ADMIT_BATCH_MAX:
                try:
                    batch.append(self.admissions.get_nowait())
                except queue.Empty:
                    break
            stopping = None in batch
            items = [item for item in batch if item is not None]
            if items:
                self._admit(items)

    def is_admitting(self) -> bool:
        return self._admitting or not self.admissions.empty()

    def _admit(self, items: list[Active]) -> None:
        """Tokenize a batch and hand it to the engine. Until then no other thread knows these
        requests, so errors are answered from here."""
        self._admitting = True
        try:
            self._admit_batch(items)
        finally:
            self._admitting = False

    def _admit_batch(self, items: list[Active]) -> None:
        refusal = SHUTDOWN_MESSAGE if self.shutting_down.is_set() or self.stopping.is_set() else self.engine_error
        if refusal:
            for item in items:
                _send_error(item.sender, refusal)
            return
        started, marks = time.time(), [time.perf_counter()]
        try:
            all_ids = encode_batch(self.tokenizer, [item.request.prompt for item in items])
        except Exception as e:   # this thread must outlive any prompt: answer the batch, keep admitting
            self.logger.log_error(f"gpt: tokenizing {len(items)} prompts failed: {type(e).__name__}: {e}")
            for item in items:
                _send_error(item.sender, f"tokenizing the prompt failed: {type(e).__name__}: {e}")
            return
        marks.append(time.perf_counter())
        submissions = []
        for item, token_ids in zip(items, all_ids):
            item.num_prompt_tokens = len(token_ids)
            params = item.request.sampling_params
            if item.request.stream and not params.stop:
                # The engine sends this stream's token ids only and its text is decoded here, once
                # per response rather than once per token on the engine's thread. (Stop strings are
                # matched on text, so those streams are still detokenized by the engine.)
                params = dataclasses.replace(params, detokenize=False)
                item.detokenizer = StreamDetokenizer(self.decoder, token_ids, params)
            self.active[item.request_id] = item    # before the engine can answer for it
            submissions.append((item.request_id, token_ids, params, item.arrival))
        try:
            self.core.add_requests(submissions)
        except OSError:   # the engine process is gone; the router reports it to them with the others
            pass
        if self.admit_log:
            self.admit_log.record(started, (len(items),), marks + [time.perf_counter()])

    # -- router thread ------------------------------------------------------------------------------
    def _route_loop(self) -> None:
        shutdown_handled, next_flush = False, 0.0
        while not self.stopping.is_set():
            pending: dict[str, list] = {}
            marks = [time.perf_counter()]
            messages = self.core.get(timeout=CANCEL_CHECK_INTERVAL_S)
            started = time.time()
            marks.append(time.perf_counter())
            for message in messages:
                if isinstance(message, CoreStep):
                    try:
                        self._take_step(message, pending)
                    except Exception as e:   # a bug here must not stop routing; its step's requests end
                        self.logger.log_error(f"gpt: routing an engine step failed: {e!r}")
                        for request_id in message.request_ids:
                            pending[request_id] = [RequestError(f"internal error routing the output: {e!r}")]
                            self._tell_engine(self.core.abort, request_id)
                elif isinstance(message, EngineDied):
                    self.engine_error = f"gpt: {message.message}; the model must be reloaded"
                    self.logger.log_error(self.engine_error)
            marks.append(time.perf_counter())
            self._dispatch(pending)
            if self.engine_error:   # every request in flight, and any that came in meanwhile
                self._fail_all(self.engine_error)
            if self.shutting_down.is_set() and not shutdown_handled:
                shutdown_handled = True
                self.logger.log_info(f"gpt: shutting down: answering {len(self.active)} request(s) in flight "
                                     f"({', '.join(list(self.active)[:8])})")
                self._fail_all(SHUTDOWN_MESSAGE)
                self._tell_engine(self.core.abort_all, SHUTDOWN_MESSAGE)
            if self.router_log:
                if messages:
                    marks.append(time.perf_counter())
                    num_outputs = sum(len(m.request_ids) for m in messages if isinstance(m, CoreStep))
                    self.router_log.record(started, (len(messages), num_outputs, len(pending)), marks)
                if time.monotonic() >= next_flush:   # so that a profiler sees a run soon after it ends
                    for log in self._logs:
                        log.flush()
                    next_flush = time.monotonic() + PHASES_FLUSH_S
        self._fail_all(SHUTDOWN_MESSAGE)
        for shard in self.shards:
            shard.stop()

    def _take_step(self, step: CoreStep, pending: dict[str, list]) -> None:
        """Group a step's outputs and errors by request; record its metrics. Inter-token latencies
        go first, so that a request's last latencies land before its finish counts."""
        self.metrics.record_inter_tokens(step.inter_token_latencies)
        for out in step.outputs():
            pending.setdefault(out.request_id, []).append(out)
            if out.finished:
                t = RequestTimings(*out.times)
                self.metrics.record_finished(out.finish_reason, queue_s=t.queue_time,
                                             ttft_s=t.time_to_first_token, e2e_s=t.e2e_latency)
        for request_id, message in step.errors:
            pending.setdefault(request_id, []).append(RequestError(message))
        if step.stats is not None:   # this instance is the engine's lead frontend
            self.metrics.record_stats(step.stats, step.stat_increments)

    def _poll_cancelled(self, shard: int, cursor: int) -> int:
        """``is_cancelled()`` for the shard's share of CANCEL_CHECKS_PER_PASS of its requests,
        round robin: each call is an IPC round trip to the server, so a thousand running requests
        are not all polled every pass (see CANCEL_CHECKS_PER_PASS)."""
        items = [item for item in list(self.active.values()) if item.shard == shard]   # a snapshot
        if not items:
            return 0
        cursor %= len(items)
        checks = max(1, CANCEL_CHECKS_PER_PASS // len(self.shards))
        for item in (items[cursor:] + items[:cursor])[:checks]:
            if item.cancel_reported or item.final_sent:
                continue
            try:
                is_cancelled = item.sender.is_cancelled()
            except Exception as e:
                self.logger.log_warn(f"gpt: is_cancelled failed for request {item.request_id}: {e}")
                continue
            if is_cancelled:
                item.cancel_reported = True   # its final output ("abort") comes back from the engine
                self._tell_engine(self.core.abort, item.request_id)
        return cursor + checks

    def _tell_engine(self, call, arg) -> None:
        try:
            call(arg)
        except OSError:   # the engine process is gone: its reader reports that to every request
            pass

    def _dispatch(self, pending: dict[str, list]) -> None:
        """Hand each shard its requests' new chunks, one queue item per shard."""
        work: list[list] = [[] for _ in self.shards]
        active = self.active
        for request_id, chunks in pending.items():
            item = active.get(request_id)
            if item is not None:
                work[item.shard].append((item, chunks))
        for shard, entries in zip(self.shards, work):
            if entries:
                shard.put(entries)

    def _fail_all(self, message: str) -> None:
        self._dispatch({item.request_id: [RequestError(message)]
                        for item in list(self.active.values()) if not item.final_sent})

    def _send(self, item: Active, chunks: list) -> None:
        """chunks: a request's CoreOutputs since its last response, oldest first; an error (which
        ends the request) anywhere among them wins. Called by the request's shard only."""
        if item.final_sent:
            self.active.pop(item.request_id, None)
            return
        error = next((c for c in chunks if isinstance(c, Exception)), None)
        finished = _ends(chunks)
        response = None
        if error is None:
            try:
                response = pb_utils.InferenceResponse(self._tensors(item, chunks))
            except Exception as e:   # a bug here must still end the request with an answer
                self.logger.log_error(f"gpt: building a response for request {item.request_id} failed: {e!r}")
                error = RuntimeError(f"building the response failed: {type(e).__name__}: {e}")
                if not finished:
                    self._tell_engine(self.core.abort, item.request_id)
                finished = True
        if finished:
            self.active.pop(item.request_id, None)
        item.final_sent = finished
        try:
            if error is not None:
                item.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error))), flags=FINAL)
            else:
                item.sender.send(response, flags=FINAL if finished else 0)
        except Exception as e:   # e.g. the client went away; nothing else to tell it
            self.logger.log_warn(f"gpt: could not send response for request {item.request_id}: {e}")

    def _tensors(self, item: Active, chunks: list[CoreOutput]) -> list:
        last = chunks[-1]
        request = item.request
        if request.stream:   # DELTA outputs: each chunk holds only what is new
            ids = [token for out in chunks for token in out.token_ids]
            if item.detokenizer is not None:
                text = item.detokenizer.add(ids, last.finish_reason if last.finished else None)
            else:
                text = "".join(out.text for out in chunks)
            item.num_output_tokens += len(ids)
        else:                # FINAL_ONLY: one output with everything
            text, ids = last.text, last.token_ids
            item.num_output_tokens = len(ids)
        if not request.exclude_input_in_output and not item.prompt_sent:
            text = request.prompt + text
            item.prompt_sent = True
        # Only the outputs the client asked for (Triton asks for all when it names none): each
        # tensor is serialized into shared memory and copied once more by the server (two of six
        # took a streamed response from 1.0-1.1 to 0.8 ms of sender time on the H200,
        # docs/benchmarks.md), and Triton would drop an unrequested one after paying for it.
        wanted = item.outputs
        tensors = []
        if "text_output" in wanted:
            tensors.append(pb_utils.Tensor("text_output", string_array([text], (1,))))
        if "output_ids" in wanted:
            tensors.append(pb_utils.Tensor("output_ids", np.asarray(ids, dtype=np.int32)))
        if "finish_reason" in wanted:
            reason = (last.finish_reason or "") if last.finished else ""
            tensors.append(pb_utils.Tensor("finish_reason", string_array([reason], (1,))))
        if "num_input_tokens" in wanted:
            tensors.append(pb_utils.Tensor("num_input_tokens", np.array([item.num_prompt_tokens], dtype=np.int32)))
        if "num_output_tokens" in wanted:
            tensors.append(pb_utils.Tensor("num_output_tokens", np.array([item.num_output_tokens], dtype=np.int32)))
        if request.sampling_params.logprobs and "cumulative_logprob" in wanted:
            tensors.append(pb_utils.Tensor("cumulative_logprob",
                                           np.array([last.cumulative_logprob or 0.0], dtype=np.float32)))
        return tensors


class SenderShard:
    """A thread that makes every response-sender call of its requests: their responses, in order,
    and their cancellation polls.

    A response costs the server 0.3-1 ms however many threads send (1,500-2,500 responses a
    second on the H200's host under load), far fewer than a thousand streams make tokens. So
    chunks wait here per request, and each round sends the requests that end first (a finished
    request frees its client), then the streams that have waited longest; whatever a stream got
    meanwhile goes out as one response. Idle, this is one response per chunk as it comes.
    """

    def __init__(self, model: TritonPythonModel, index: int):
        self.model = model
        self.index = index
        self.queue: queue.Queue = queue.Queue()
        self.pending: dict[str, tuple[Active, list]] = {}   # oldest first: dict order is arrival order
        self.thread = threading.Thread(target=self._loop, name=f"gpt-sender-{index}", daemon=True)
        self.thread.start()

    def put(self, entries: list[tuple[Active, list]]) -> None:
        self.queue.put(entries)

    def stop(self) -> None:
        self.queue.put(None)

    def _loop(self) -> None:
        model, log = self.model, self.model.sender_log
        next_poll, cursor, stopping = 0.0, 0, False
        while not (stopping and not self.pending):
            # New requests before stream updates: while a burst is being admitted, only requests
            # that end are answered, and streams' tokens wait (and coalesce); the senders would
            # otherwise take the GIL from admission (1,000 streams took 1.7 s to admit, not 0.3).
            hold = model.is_admitting() and not stopping
            timeout = (ADMISSION_YIELD_S if hold else 0) if self.pending else CANCEL_CHECK_INTERVAL_S
            stopping = self._take(timeout) or stopping
            started, marks = time.time(), [time.perf_counter()]
            chosen = self._next_round(ends_only=hold)
            for item, chunks in chosen:
                model._send(item, chunks)
            marks.append(time.perf_counter())
            if time.monotonic() >= next_poll:
                cursor = model._poll_cancelled(self.index, cursor)
                next_poll = time.monotonic() + CANCEL_CHECK_INTERVAL_S
            if log and chosen:
                log.record(started, (len(chosen),), marks + [time.perf_counter()])

    def _take(self, timeout: float) -> bool:
        """Move what was queued into ``pending``; True once told to stop."""
        try:
            batch = [self.queue.get(timeout=timeout) if timeout else self.queue.get_nowait()]
        except queue.Empty:
            return False
        while True:
            try:
                batch.append(self.queue.get_nowait())
            except queue.Empty:
                break
        pending = self.pending
        for entries in batch:
            if entries is None:
                continue
            for item, chunks in entries:
                if item.request_id in pending:
                    pending[item.request_id][1].extend(chunks)
                else:
                    pending[item.request_id] = (item, list(chunks))
        return None in batch

    def _next_round(self, ends_only: bool) -> list[tuple[Active, list]]:
        """Up to SENDS_PER_ROUND requests' chunks, taken out of ``pending``: requests that end,
        then (unless ``ends_only``) the longest waiting (``pending`` is in order of arrival; a
        request sent is put back at the end when it gets more)."""
        pending = self.pending
        if not ends_only and len(pending) <= SENDS_PER_ROUND:
            chosen = list(pending.values())
            pending.clear()
            return chosen
        ids = [rid for rid, (item, chunks) in pending.items() if _ends(chunks)][:SENDS_PER_ROUND]
        if not ends_only and len(ids) < SENDS_PER_ROUND:
            taken = set(ids)
            ids += [rid for rid in pending if rid not in taken][:SENDS_PER_ROUND - len(ids)]
        return [pending.pop(rid) for rid in ids]


def _ends(chunks: list) -> bool:
    """Whether these chunks end their request: an error among them, or a finished last output."""
    return any(isinstance(c, Exception) for c in chunks) or chunks[-1].finished


def _send_error(sender, message: str) -> None:
    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)
