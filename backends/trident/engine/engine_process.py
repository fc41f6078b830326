"""``LLMEngine`` in a child process, driven through a pipe: vLLM V1's frontend / engine-core split.

The engine is host-bound (scheduling, staging, detokenizing a thousand sequences a step) and is
driven by one Python thread. Inside a serving process that thread shares the GIL with everything
else the server does per request and per response (parsing, tokenizing, building and sending
responses, polling cancellation), and each of those takes the GIL away from the engine between two
GPU steps: in Triton's Python stub the same engine ran 1.8x slower than alone. In its own process
the engine keeps a GIL to itself; the serving side sends it token ids and receives, once per step,
the outputs of that step.

Wire protocol (``multiprocessing`` pipe, pickled tuples; order is preserved):
    serving -> engine   ("add", [(request_id, prompt_token_ids, SamplingParams, arrival_time), ...])
                        ("abort", request_id)        the request's final output ("abort") follows,
                                                     unless it finished before the abort arrived
                        ("abort_all", message)       every live request ends with that error
                        ("stop",)                    exit after failing what is live
    engine -> serving   EngineInfo once at start (or StartupError), then one CoreStep per engine
                        step that produced anything.

``time.monotonic()`` reads the same clock in both processes (CLOCK_MONOTONIC), so arrival times
set by the serving side and token times set by the engine subtract correctly.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import queue
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .config import EngineConfig
from .metrics import EngineStats
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineInfo:
    """What the serving side needs to know about the started engine."""
    capacity: str          # CacheCapacity.describe()
    max_model_len: int
    pid: int


@dataclass(frozen=True)
class StartupError:
    message: str           # the engine's traceback


class CoreOutput(NamedTuple):
    """One request's output of one step, as the serving side reads it (``CoreStep.outputs``).

    ``text`` / ``token_ids`` are what the request's output kind holds: the new part for DELTA,
    everything for FINAL_ONLY and CUMULATIVE (``RequestOutput.text`` / ``.output_token_ids``);
    ``text`` is "" for a request run with ``detokenize=False``; ``num_prompt_tokens`` and ``times``
    are set on a request's final output only (0 and None before).
    """
    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    cumulative_logprob: float | None
    times: tuple | None    # RequestTimings fields


class CoreStep(NamedTuple):
    """What one engine step produced, in columns: a step of a thousand streams is a few lists of
    strings and ints, which pickle ~25x faster than a thousand small objects."""
    request_ids: list[str]
    token_ids: list[list[int]]
    texts: list[str]
    finals: dict[int, tuple]             # column index -> (finish_reason, num_prompt_tokens, times)
    logprobs: dict[int, float]           # column index -> cumulative logprob, where requested
    errors: list[tuple[str, str]]        # (request_id, message): the request's final answer
    inter_token_latencies: list[float]
    stats: EngineStats

    def outputs(self):
        """The step's outputs, one ``CoreOutput`` each."""
        finals, logprobs = self.finals, self.logprobs
        for i, (request_id, token_ids, text) in enumerate(zip(self.request_ids, self.token_ids, self.texts)):
            final = finals.get(i)
            if final is None:
                yield CoreOutput(request_id, text, token_ids, False, None, 0, logprobs.get(i), None)
            else:
                yield CoreOutput(request_id, text, token_ids, True, final[0], final[1], logprobs.get(i), final[2])


class EngineDied(NamedTuple):
    """Put on the output queue when the engine process is gone."""
    message: str


class EngineProcess:
    """Starts ``LLMEngine(config)`` in a spawned process and talks to it.

    ``add_request`` / ``abort`` may be called from any thread; ``get`` from one consumer thread.
    Construction blocks until the engine has loaded its model (or raises ``RuntimeError`` with the
    engine's traceback).
    """

    def __init__(self, config: EngineConfig, start_timeout_s: float = 900.0):
        ctx = multiprocessing.get_context("spawn")
        # Under Triton's Python stub sys.executable is the stub binary, not an interpreter.
        ctx.set_executable(python_executable())
        self._conn, child_conn = ctx.Pipe(duplex=True)
        self._process = ctx.Process(target=serve, args=(config, child_conn), name="trident-engine", daemon=True)
        self._process.start()
        child_conn.close()   # so that the child's exit reads as EOF here
        self._send_lock = threading.Lock()
        self._outputs: queue.Queue = queue.Queue()
        self.info = self._wait_started(start_timeout_s)
        self._reader = threading.Thread(target=self._read_loop, name="trident-engine-reader", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def is_alive(self) -> bool:
        return self._process.is_alive()

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float) -> None:
        self.add_requests([(request_id, prompt_token_ids, params, arrival_time)])

    def add_requests(self, requests: list[tuple[str, list[int], SamplingParams, float]]) -> None:
        """(request_id, prompt_token_ids, params, arrival_time) each, in one message."""
        self._send(("add", requests))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def abort_all(self, message: str) -> None:
        self._send(("abort_all", message))

    def get(self, timeout: float) -> list[CoreStep | EngineDied]:
        """Everything the engine sent since the last call; waits up to ``timeout`` for the first."""
        try:
            items = [self._outputs.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self._outputs.get_nowait())
            except queue.Empty:
                return items

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Ask the engine to exit; kill it if it does not within ``timeout_s``."""
        try:
            self._send(("stop",))
        except (OSError, EOFError, BrokenPipeError):
            pass   # already gone
        self._process.join(timeout_s)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._conn.close()

    # -- internals ---------------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _wait_started(self, timeout_s: float) -> EngineInfo:
        if not self._conn.poll(timeout_s):
            self._process.kill()
            raise RuntimeError(f"the engine process did not start within {timeout_s:.0f} s")
        try:
            first = self._conn.recv()
        except EOFError:
            self._process.join(5)
            raise RuntimeError(f"the engine process exited while starting (exit code {self._process.exitcode})") from None
        if isinstance(first, StartupError):
            self._process.join(30)
            raise RuntimeError(f"the engine failed to start:\n{first.message}")
        return first

    def _read_loop(self) -> None:
        """Keep the pipe drained, so that a slow consumer never blocks the engine's sends."""
        while True:
            try:
                self._outputs.put(self._conn.recv())
            except (EOFError, OSError):
                break
        self._process.join(5)
        self._outputs.put(EngineDied(f"the engine process exited (exit code {self._process.exitcode})"))


def python_executable() -> str:
    """The interpreter to spawn: this process's, found through ``sys.prefix`` when the running
    binary is not Python itself (an embedding host such as the Triton Python stub)."""
    if Path(sys.executable).name.startswith("python"):
        return sys.executable
    for name in (f"python{sys.version_info.major}.{sys.version_info.minor}", f"python{sys.version_info.major}", "python"):
        candidate = Path(sys.prefix) / "bin" / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise RuntimeError(f"no Python interpreter found for the engine process (sys.executable={sys.executable}, "
                       f"sys.prefix={sys.prefix})")


# -- the engine process ----------------------------------------------------------------------------
def serve(config: EngineConfig, conn) -> None:
    """Run the engine until told to stop or until the parent goes away (the pipe reads EOF)."""
    # The server's process group gets SIGTERM / SIGINT on shutdown; the parent decides when the
    # engine stops (after failing what is in flight), so the engine must not die first.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="trident-engine: %(message)s")
    try:
        from .engine import LLMEngine

        engine = LLMEngine(config)
    except BaseException:
        conn.send(StartupError(traceback.format_exc()))
        return
    conn.send(EngineInfo(engine.capacity.describe(), engine.max_model_len, os.getpid()))
    try:
        _Core(engine, conn).run()
    except (BrokenPipeError, ConnectionResetError):   # the serving process is gone: nobody to answer
        pass


class _Core:
    """The engine process's loop: take what the pipe holds, step, hand the step's outputs to the
    writer thread. The loop never waits on the serving side: if that falls behind, steps queue
    here (in memory) and go out as soon as it reads again, as vLLM's engine core does with its
    output thread."""

    def __init__(self, engine, conn):
        self.engine = engine
        self.conn = conn
        self.live: set[str] = set()          # request ids added and not yet finished
        self._clear()
        self.writes: queue.SimpleQueue = queue.SimpleQueue()
        self.writer = threading.Thread(target=self._write_loop, name="trident-engine-writer", daemon=True)

    def run(self) -> None:
        from .scheduler import QueueFullError

        self._queue_full = QueueFullError
        self.writer.start()
        try:
            while True:
                # Idle, wait for a message; a vanished parent reads as EOF and ends the wait too.
                if self.conn.poll(0 if self.engine.has_unfinished() else None):
                    if not self._take_messages():
                        return
                if self.engine.has_unfinished():
                    self._step()
                if self.request_ids or self.errors:
                    self._send()
        finally:
            self.writes.put(None)
            self.writer.join(timeout=10)

    def _write_loop(self) -> None:
        while (data := self.writes.get()) is not None:
            try:
                self.conn.send_bytes(data)   # releases the GIL while the pipe is full
            except OSError:   # the serving process is gone; the loop sees EOF and exits
                return

    def _take_messages(self) -> bool:
        """Apply every queued message; False when the engine must exit."""
        while True:
            try:
                message = self.conn.recv()
            except EOFError:   # the serving process is gone
                return False
            kind = message[0]
            if kind == "add":
                for request in message[1]:
                    self._add(*request)
            elif kind == "abort":
                self._collect(self.engine.abort(message[1]))
            elif kind == "abort_all":
                self._fail_all(message[1])
            elif kind == "stop":
                self._fail_all("the server is shutting down; the request was not completed")
                self._send()
                return False
            if not self.conn.poll(0):
                return True

    def _add(self, request_id: str, token_ids: list[int], params: SamplingParams, arrival: float) -> None:
        try:
            self.engine.add_request(request_id, token_ids, params, arrival_time=arrival)
            self.live.add(request_id)
        except (self._queue_full, ValueError) as e:   # the request's fault: tell its client why
            self.errors.append((request_id, str(e)))
        except Exception as e:   # ours: the request still gets an answer, and the engine goes on
            logger.exception("adding request %s failed", request_id)
            self.errors.append((request_id, f"engine error: {type(e).__name__}: {e}"))

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:   # a broken step must not strand requests: fail what is in flight
            logger.exception("engine step failed")
            self._fail_all(f"engine error: {type(e).__name__}: {e}")
            return
        self._collect(outputs)

    def _collect(self, outputs) -> None:
        request_ids, token_ids, texts = self.request_ids, self.token_ids, self.texts
        for out in outputs:
            if out.finished:
                self.live.discard(out.request_id)
                t = out.timings
                self.finals[len(request_ids)] = (out.finish_reason, out.num_prompt_tokens,
                                                 (t.arrival, t.first_scheduled, t.first_token, t.finished))
            if out.cumulative_logprob is not None:
                self.logprobs[len(request_ids)] = out.cumulative_logprob
            request_ids.append(out.request_id)
            token_ids.append(out.output_token_ids)
            texts.append(out.text)

    def _fail_all(self, message: str) -> None:
        for request_id in list(self.live):
            try:
                self.engine.abort(request_id)
            except Exception:   # the engine may be what failed; the client must still hear back
                pass
            self.errors.append((request_id, message))
        self.live.clear()

    def _send(self) -> None:
        step = CoreStep(self.request_ids, self.token_ids, self.texts, self.finals, self.logprobs, self.errors,
                        self.engine.drain_inter_token_latencies(), self.engine.stats())
        self._clear()
        self.writes.put(pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL))

    def _clear(self) -> None:
        self.request_ids: list[str] = []
        self.token_ids: list[list[int]] = []
        self.texts: list[str] = []
        self.finals: dict[int, tuple] = {}
        self.logprobs: dict[int, float] = {}
        self.errors: list[tuple[str, str]] = []
