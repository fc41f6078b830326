"""Triton Python model `gpt` (decoupled): a thin adapter over trident.engine.LLMEngine.

vllm_backend's architecture: execute() only validates and enqueues; one engine thread admits
requests and runs engine steps; one response thread sends what the engine produced. When a stream
falls behind, the response thread coalesces the pending chunks of a request into one response, so
streaming keeps up under load. Every request gets exactly one FINAL response, errors and shutdown
included. Every call that crosses to the Triton server process (is_cancelled, metrics, sends) is an
IPC round trip, so none of them runs on the engine thread: the response thread makes every call on
a response sender (sends and cancellation polls, so none can race a request's FINAL response) and
the metrics have their own thread (trident.triton.gpt_metrics).
"""
from __future__ import annotations

import faulthandler
import itertools
import json
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
from trident.engine.engine import LLMEngine
from trident.engine.scheduler import QueueFullError
from trident.triton.gpt_metrics import GptMetrics
from trident.triton.gpt_request import GenerateRequest, parse_request
from trident.triton.io import RequestError, string_array
from trident.triton.shutdown import on_sigterm

INPUT_NAMES = ("text_input", "max_tokens", "min_tokens", "stream", "temperature", "top_k", "top_p", "min_p",
               "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "stop", "ignore_eos",
               "exclude_input_in_output", "return_logprobs", "sampling_parameters")
CANCEL_CHECK_INTERVAL_S = 0.02   # cancelled requests free their KV blocks well within 100 ms
CANCEL_CHECKS_PER_PASS = 64
IDLE_WAIT_S = 0.05
GIL_SWITCH_INTERVAL_S = 0.0002
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
SHUTDOWN_MESSAGE = "the server is shutting down; the request was not completed"


@dataclass
class Active:
    """A request the engine is working on, seen from the Triton side."""
    request_id: str
    request: GenerateRequest
    sender: object
    num_ids_sent: int = 0        # output ids already in a response (streaming)
    prompt_sent: bool = False
    cancel_reported: bool = False
    final_sent: bool = False     # set by the response thread; no sender call may follow it


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.logger = pb_utils.Logger
        model_config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        config = self._engine_config(version_dir / params.get("engine_config", "engine.json"), version_dir)
        self.engine = LLMEngine(config)
        self.logger.log_info(f"gpt: {self.engine.capacity.describe()}")
        self.max_tokens_limit = self.engine.max_model_len
        self.metrics = GptMetrics(args["model_name"], args["model_version"])
        self.inbox: queue.Queue = queue.Queue()
        self.outbox: queue.Queue = queue.Queue()
        self.cancelled: queue.Queue = queue.Queue()
        self.active: dict[str, Active] = {}
        self.ids = itertools.count()
        self.stopping = threading.Event()
        self.shutting_down = threading.Event()
        on_sigterm(self.shutting_down.set)
        # Triton hands requests to execute() on the stub's main thread, one call per request, and
        # each call first waits for the GIL, which the busy engine thread gives up only every
        # switch interval (5 ms by default): 1000 requests sent at once trickled into the engine
        # over seconds. A short interval bounds that wait; the engine thread loses little, since
        # the other threads mostly sleep or wait on IPC.
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        # `kill -USR1 <stub pid>` prints every thread's Python stack to the server log: the way to
        # see what a busy or stuck model is doing without stopping it.
        faulthandler.register(signal.SIGUSR1, all_threads=True)
        self.engine_thread = threading.Thread(target=self._engine_loop, name="gpt-engine", daemon=True)
        self.response_thread = threading.Thread(target=self._response_loop, name="gpt-responses", daemon=True)
        for thread in (self.engine_thread, self.response_thread):
            thread.start()

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
        for request in requests:
            sender = request.get_response_sender()
            if self.shutting_down.is_set():
                _send_error(sender, SHUTDOWN_MESSAGE)
                continue
            try:
                inputs = {name: _input(request, name) for name in INPUT_NAMES}
                parsed = parse_request(inputs, self.max_tokens_limit)
            except RequestError as e:
                _send_error(sender, str(e))
                continue
            self.inbox.put(Active(f"{next(self.ids)}", parsed, sender))
        return None

    def finalize(self) -> None:
        self.logger.log_info("gpt: finalize: stopping the engine")
        self.stopping.set()
        self.engine_thread.join(timeout=30)
        self.outbox.put(None)
        self.response_thread.join(timeout=30)
        self.metrics.close()
        self.logger.log_info("gpt: finalize: done")

    # -- engine thread ------------------------------------------------------------------------------
    def _engine_loop(self) -> None:
        while not self.stopping.is_set():
            self._admit(block=not self.engine.has_unfinished())
            if self.shutting_down.is_set():
                self._fail_all(SHUTDOWN_MESSAGE)
                self.metrics.record_stats(self.engine.stats())
                continue
            self._abort_cancelled()
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a broken step must not strand requests: fail what is in flight
                self.logger.log_error(f"gpt: engine step failed: {type(e).__name__}: {e}")
                self._fail_all(f"engine error: {type(e).__name__}: {e}")
                continue
            # Non-streaming requests get no per-step outputs: the engine times every token itself.
            # Recorded before routing, so a request's last latencies land before its finish counts.
            self.metrics.record_inter_tokens(self.engine.drain_inter_token_latencies())
            self._route(outputs)
            self.metrics.record_stats(self.engine.stats())
        self._fail_all(SHUTDOWN_MESSAGE)

    def _admit(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=IDLE_WAIT_S) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            try:
                self.engine.add_request(item.request_id, item.request.prompt, item.request.sampling_params)
                self.active[item.request_id] = item
            except (QueueFullError, ValueError) as e:
                _send_error(item.sender, str(e))
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                item = None

    def _abort_cancelled(self) -> None:
        aborted = False
        while True:
            try:
                request_id = self.cancelled.get_nowait()
            except queue.Empty:
                break
            self._route(self.engine.abort(request_id))  # [] when it finished meanwhile
            aborted = True
        if aborted:
            self.metrics.record_stats(self.engine.stats())

    def _route(self, outputs) -> None:
        for output in outputs:
            item = self.active.get(output.request_id)
            if item is None:
                continue
            if output.finished:
                self.active.pop(output.request_id, None)
                self._record_finished(output)
            if output.finished or item.request.stream:
                self.outbox.put((item, output, item.num_ids_sent))
                item.num_ids_sent = output.num_output_tokens

    def _record_finished(self, output) -> None:
        t = output.timings
        self.metrics.record_finished(output.finish_reason, queue_s=t.queue_time, ttft_s=t.time_to_first_token,
                                     e2e_s=t.e2e_latency)

    def _fail_all(self, message: str) -> None:
        pending = list(self.active.values())
        while True:
            try:
                pending.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        for item in pending:
            try:
                self.engine.abort(item.request_id)
            except Exception:  # the engine may be what failed; the client must still hear back
                pass
            self.outbox.put((item, RequestError(message), 0))
        self.active.clear()

    # -- response thread ----------------------------------------------------------------------------
    def _response_loop(self) -> None:
        """Send what the engine produced and poll cancellation: every call on a response sender is
        made by this one thread. (Triton frees a request's response factory once its FINAL response
        is sent; an ``is_cancelled()`` from another thread racing that send crashed the server.)"""
        next_poll, cursor = 0.0, 0
        while True:
            try:
                batch = [self.outbox.get(timeout=CANCEL_CHECK_INTERVAL_S)]
            except queue.Empty:
                batch = []
            while True:
                try:
                    batch.append(self.outbox.get_nowait())
                except queue.Empty:
                    break
            for item, outputs in _coalesce([b for b in batch if b is not None]):
                self._send(item, outputs)
            if None in batch:
                return
            if time.monotonic() >= next_poll:
                cursor = self._poll_cancelled(cursor)
                next_poll = time.monotonic() + CANCEL_CHECK_INTERVAL_S

    def _poll_cancelled(self, cursor: int) -> int:
        """``is_cancelled()`` for at most CANCEL_CHECKS_PER_PASS requests, round robin. Each call is an
        IPC round trip (~50-80 us) that must win the GIL back from the engine thread, so a thousand
        running requests are not all polled every pass: a cancelled request is aborted within ~20 ms
        plus one engine step while few are in flight, and within ~0.3 s with a thousand."""
        items = list(self.active.values())  # a snapshot: the engine thread owns the dict
        if not items:
            return 0
        cursor %= len(items)
        for item in (items[cursor:] + items[:cursor])[:CANCEL_CHECKS_PER_PASS]:
            if item.cancel_reported or item.final_sent:
                continue
            try:
                is_cancelled = item.sender.is_cancelled()
            except Exception as e:
                self.logger.log_warn(f"gpt: is_cancelled failed for request {item.request_id}: {e}")
                continue
            if is_cancelled:
                item.cancel_reported = True
                self.cancelled.put(item.request_id)
        return cursor + CANCEL_CHECKS_PER_PASS

    def _send(self, item: Active, chunks: list) -> None:
        """chunks: [(output or error, num_ids_sent_before)] of one request, oldest first."""
        last, _ = chunks[-1]
        try:
            if item.final_sent:  # e.g. failed by shutdown after its last output was queued
                return
            if isinstance(last, Exception):
                item.final_sent = True
                item.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(last))), flags=FINAL)
                return
            first_sent = chunks[0][1]
            response = pb_utils.InferenceResponse(self._tensors(item, chunks, first_sent))
            item.final_sent = last.finished
            item.sender.send(response, flags=FINAL if last.finished else 0)
        except Exception as e:  # e.g. the client went away; nothing else to tell it
            self.logger.log_warn(f"gpt: could not send response for request {item.request_id}: {e}")

    def _tensors(self, item: Active, chunks: list, first_sent: int) -> list:
        last = chunks[-1][0]
        request = item.request
        if request.stream:
            text = "".join(output.delta_text for output, _ in chunks)
            ids = last.output_token_ids[first_sent:]
        else:
            text, ids = last.text, last.output_token_ids
        if not request.exclude_input_in_output and not item.prompt_sent:
            text = request.prompt + text
            item.prompt_sent = True
        tensors = [
            pb_utils.Tensor("text_output", string_array([text], (1,))),
            pb_utils.Tensor("output_ids", np.asarray(ids, dtype=np.int32)),
            pb_utils.Tensor("finish_reason", string_array([last.finish_reason or ""] if last.finished else [""], (1,))),
            pb_utils.Tensor("num_input_tokens", np.array([len(last.prompt_token_ids)], dtype=np.int32)),
            pb_utils.Tensor("num_output_tokens", np.array([len(last.output_token_ids)], dtype=np.int32)),
        ]
        if request.sampling_params.logprobs:
            tensors.append(pb_utils.Tensor("cumulative_logprob",
                                           np.array([last.cumulative_logprob or 0.0], dtype=np.float32)))
        return tensors


def _coalesce(batch):
    """Group a drained outbox by request, keeping order: one response per request per drain."""
    grouped: dict[str, tuple[Active, list]] = {}
    for item, output, num_ids_sent in batch:
        grouped.setdefault(item.request_id, (item, []))[1].append((output, num_ids_sent))
    return grouped.values()


def _input(request, name: str):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _send_error(sender, message: str) -> None:
    sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)), flags=FINAL)
