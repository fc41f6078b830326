"""The engine process: ``LLMEngine`` serving the frontends attached to its socket.

Started by ``trident.engine.engine_process.EngineProcess`` (``python -m trident.engine.engine_core
--address A --lock L --watch-pid P``, the pickled EngineConfig on stdin); the wire protocol is in
that module's docstring. One thread steps the engine and never waits on a frontend: each frontend
has a writer thread that sends its steps (if one falls behind, its steps queue here in memory and
go out as soon as it reads again, as vLLM's engine core does with its output thread). An acceptor
thread takes new frontends at any time; a watchdog ends the process when the watched process (the
server) is gone, so that a killed server never leaves an engine holding the GPU.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection, Listener, Pipe, wait

from .config import ENGINE_CPUS_ENV, EngineConfig
from .engine_process import STATS_FIELDS_TOTAL, CoreStep, EngineInfo, StartupError, file_lock, pid_alive
from .sampling_params import RequestOutputKind, SamplingParams
from ..phase_log import GPT_PHASES_ENV, PhaseLog

logger = logging.getLogger("trident.engine_core")
WATCH_INTERVAL_S = 1.0


def _take_reserved_cpus(config: EngineConfig) -> None:
    # The launcher kept these CPUs free of Triton for this process: a GPU engine's loop runs on them
    # alone (set before torch is imported, so its thread pools are sized to them). A CPU engine does
    # its matmuls on the host and keeps every core.
    cpus = os.environ.get(ENGINE_CPUS_ENV)
    if not cpus or config.device == "cpu":
        return
    if config.device == "auto":
        import torch  # noqa: PLC0415 (only to resolve "auto")
        if not torch.cuda.is_available():
            return
    chosen = {int(c) for c in cpus.split(",")}
    os.sched_setaffinity(0, chosen)
    logging.info("on CPUs %s, kept for the engine", sorted(chosen))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", required=True, help="the Unix socket to listen on")
    parser.add_argument("--lock", required=True, help="the lock file frontends hold while attaching")
    parser.add_argument("--watch-pid", type=int, required=True, help="exit when this process is gone")
    args = parser.parse_args(argv)
    config: EngineConfig = pickle.load(sys.stdin.buffer)
    # The server's process group gets SIGTERM / SIGINT on shutdown; the frontends decide when the
    # engine stops (after failing what is in flight), so the engine must not die first.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="trident-engine: %(message)s")
    _take_reserved_cpus(config)
    # Listening before the model loads: the frontend that started us connects at once and waits in
    # the backlog for EngineInfo, and sees our exit as EOF if loading fails.
    listener = Listener(args.address, family="AF_UNIX", backlog=128)
    threading.Thread(target=_watch, args=(args.watch_pid, args.address, args.lock), name="trident-engine-watchdog",
                     daemon=True).start()
    try:
        from .engine import LLMEngine

        engine = LLMEngine(config)
    except BaseException:
        conn = listener.accept()   # the frontend that started us (it holds the lock)
        conn.send(StartupError(traceback.format_exc()))
        conn.close()
        listener.close()
        _remove(args.lock)
        return 1
    info = EngineInfo(engine.capacity.describe(), engine.max_model_len, os.getpid())
    _Core(engine, listener, args.lock, info).run()
    return 0


def _watch(pid: int, address: str, lock_path: str) -> None:
    while pid_alive(pid):
        time.sleep(WATCH_INTERVAL_S)
    logger.warning("process %d is gone: exiting", pid)
    # No frontend is left to attach: the key names the watched process (the server).
    _remove(address)
    _remove(lock_path)
    os._exit(0)   # nothing to save; exiting frees the GPU


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Frontend:
    """One attached frontend: its connection, its live requests, the columns of what it has not
    been sent yet, and the writer thread that sends its steps.

    Backpressure (vLLM's output collector): a frontend gets a step only once it has taken the
    previous one (it says "ready"). Until then its outputs wait here, and a request's outputs of
    several steps merge into one (DELTA: the new tokens and text appended; otherwise the latest
    replaces), so a frontend that falls behind receives fewer, larger outputs instead of a backlog
    of per-step ones, and takes them apart at a cost per request rather than per token.
    """

    def __init__(self, conn: Connection, index: int):
        self.conn = conn
        self.index = index
        self.live: dict[str, bool] = {}          # live request id -> its outputs are DELTA
        self.waiting_ready = False               # a step was sent and not yet taken
        self.latencies: list[float] = []         # inter-token latencies not yet sent (the lead's)
        self.writes: queue.SimpleQueue = queue.SimpleQueue()
        self.writer = threading.Thread(target=self._write_loop, name=f"trident-engine-writer-{index}", daemon=True)
        self.writer.start()
        self.clear()

    def clear(self) -> None:
        self.request_ids: list[str] = []
        self.token_ids: list[list[int]] = []
        self.texts: list[str] = []
        self.finals: dict[int, tuple] = {}
        self.logprobs: dict[int, float] = {}
        self.errors: list[tuple[str, str]] = []
        self.column_of: dict[str, int] = {}      # request id -> its column, for merging

    def has_output(self) -> bool:
        return bool(self.request_ids or self.errors)

    def add_output(self, out, is_delta: bool) -> None:
        """One request's output of this step, merged into its column when it already has one."""
        column = self.column_of.get(out.request_id)
        if column is None:
            column = self.column_of[out.request_id] = len(self.request_ids)
            self.request_ids.append(out.request_id)
            self.token_ids.append(out.output_token_ids)
            self.texts.append(out.text)
        elif is_delta:
            self.token_ids[column] = self.token_ids[column] + out.output_token_ids
            self.texts[column] += out.text
        else:   # CUMULATIVE / FINAL_ONLY: the latest output holds everything
            self.token_ids[column] = out.output_token_ids
            self.texts[column] = out.text
        if out.finished:
            t = out.timings
            self.finals[column] = (out.finish_reason, out.num_prompt_tokens,
                                   (t.arrival, t.first_scheduled, t.first_token, t.finished))
        if out.cumulative_logprob is not None:
            self.logprobs[column] = out.cumulative_logprob

    def send(self, message) -> None:
        self.writes.put(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def close(self) -> None:
        self.writes.put(None)
        self.writer.join(timeout=10)
        self.conn.close()

    def _write_loop(self) -> None:
        while (data := self.writes.get()) is not None:
            try:
                self.conn.send_bytes(data)   # releases the GIL while the socket is full
            except OSError:   # the frontend is gone; the loop reads EOF and drops it
                return


class _Core:
    """The loop: take what the frontends sent, step, hand each frontend its share of the step."""

    def __init__(self, engine, listener: Listener, lock_path: str, info: EngineInfo):
        from .scheduler import QueueFullError

        self._queue_full = QueueFullError
        self.engine = engine
        self.listener = listener
        self.lock_path = lock_path
        self.info = info
        self.frontends: list[_Frontend] = []    # attach order: the first is the lead
        self.by_conn: dict[Connection, _Frontend] = {}
        self.owner: dict[str, _Frontend] = {}   # live request id -> its frontend
        self.arrivals: queue.SimpleQueue = queue.SimpleQueue()
        self._wake_recv, self._wake_send = Pipe(duplex=False)
        self._indexes = itertools.count()
        self._reported_totals = {name: 0 for name in STATS_FIELDS_TOTAL}
        self._stats_due = False      # a step produced outputs since the lead was last sent stats
        # Profiling (TRIDENT_GPT_PHASES, which the server's stubs pass on): per loop, the wait for
        # messages, taking them, the engine step, sorting its outputs, sending the frontends theirs.
        self.phase_log = PhaseLog.from_env(GPT_PHASES_ENV, "gpt-engine", ("outputs", "sent"),
                                           ("wait", "take", "step", "collect", "send"))
        self._next_flush = 0.0
        threading.Thread(target=self._accept_loop, name="trident-engine-acceptor", daemon=True).start()

    # -- frontends come and go --------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while True:
            try:
                conn = self.listener.accept()
            except OSError:   # the listener closed: the engine is exiting
                return
            # Queued before the frontend hears back: once it has EngineInfo it holds no lock, and
            # the loop, deciding whether to exit, must already see it (see _exit_if_unused).
            frontend = _Frontend(conn, next(self._indexes))
            self.arrivals.put(frontend)
            frontend.send(self.info)
            self._wake_send.send_bytes(b"")

    def _take_arrivals(self) -> None:
        while self._wake_recv.poll(0):
            self._wake_recv.recv_bytes()
        while True:
            try:
                frontend = self.arrivals.get_nowait()
            except queue.Empty:
                return
            self.frontends.append(frontend)
            self.by_conn[frontend.conn] = frontend
            logger.info("frontend %d attached (%d attached)", frontend.index, len(self.frontends))

    def _detach(self, frontend: _Frontend, acknowledge: bool) -> None:
        """Drop a frontend: its requests are aborted (nobody is left to answer them)."""
        for request_id in frontend.live:
            self.owner.pop(request_id, None)
            try:
                self.engine.abort(request_id)
            except Exception:
                logger.exception("aborting request %s failed", request_id)
        self.frontends.remove(frontend)
        del self.by_conn[frontend.conn]
        if acknowledge:
            frontend.send(("detached", len(self.frontends)))
        frontend.close()
        logger.info("frontend %d detached (%d attached)", frontend.index, len(self.frontends))

    def _exit_if_unused(self) -> bool:
        """With no frontend attached: close the socket and return True, unless one attached since.
        Under the frontends' lock: a frontend attaching holds it until it has EngineInfo, by when
        it is in ``arrivals``; one that comes after finds no socket and starts a new engine."""
        with file_lock(self.lock_path):
            self._take_arrivals()
            if self.frontends:
                return False
            self.listener.close()   # removes the socket file
            _remove(self.lock_path)  # frontends waiting on it move to a new one (file_lock)
            return True

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> None:
        log = self.phase_log
        while True:
            busy = self.engine.has_unfinished()
            if log and not busy:   # about to idle: a profiler reads what the last burst did
                log.flush()
            marks = [time.perf_counter()]
            ready = wait([self._wake_recv, *self.by_conn], timeout=0 if busy else None)
            started = time.time()
            marks.append(time.perf_counter())
            if not busy:   # idle time is not loop time
                marks[0] = marks[1]
            for conn in ready:
                if conn is self._wake_recv:
                    self._take_arrivals()
                else:
                    self._take_messages(self.by_conn[conn])
            if not self.frontends and self._exit_if_unused():
                if log:
                    log.flush()
                return
            marks.append(time.perf_counter())
            num_outputs = 0
            if self.engine.has_unfinished():
                num_outputs = self._step(marks)
            else:
                marks += [marks[-1]] * 2
            sent = self._send()
            if log:
                marks.append(time.perf_counter())
                log.record(started, (num_outputs, sent), marks)
                if started >= self._next_flush:
                    log.flush()
                    self._next_flush = started + 1.0

    def _take_messages(self, frontend: _Frontend) -> None:
        conn = frontend.conn
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):   # the frontend's process is gone
                self._detach(frontend, acknowledge=False)
                return
            kind = message[0]
            if kind == "add":
                for request in message[1]:
                    self._add(frontend, *request)
            elif kind == "abort":
                if self.owner.get(message[1]) is frontend:
                    self._collect(self.engine.abort(message[1]))
            elif kind == "abort_all":
                self._fail(frontend, message[1])
            elif kind == "ready":
                frontend.waiting_ready = False
            elif kind == "detach":
                self._detach(frontend, acknowledge=True)
                return
            if not conn.poll(0):
                return

    def _add(self, frontend: _Frontend, request_id: str, token_ids: list[int], params: SamplingParams,
             arrival: float) -> None:
        try:
            self.engine.add_request(request_id, token_ids, params, arrival_time=arrival)
        except (self._queue_full, ValueError) as e:   # the request's fault: tell its client why
            frontend.errors.append((request_id, str(e)))
            return
        except Exception as e:   # ours: the request still gets an answer, and the engine goes on
            logger.exception("adding request %s failed", request_id)
            frontend.errors.append((request_id, f"engine error: {type(e).__name__}: {e}"))
            return
        frontend.live[request_id] = params.output_kind is RequestOutputKind.DELTA
        self.owner[request_id] = frontend

    def _step(self, marks: list[float]) -> int:
        """One engine step and its outputs sorted to their frontends; appends two marks (after the
        step, after sorting); returns the number of outputs."""
        try:
            outputs = self.engine.step()
        except Exception as e:   # a broken step must not strand requests: fail what is in flight
            logger.exception("engine step failed")
            for frontend in self.frontends:
                self._fail(frontend, f"engine error: {type(e).__name__}: {e}")
            marks += [time.perf_counter()] * 2
            return 0
        marks.append(time.perf_counter())
        self._collect(outputs)
        marks.append(time.perf_counter())
        return len(outputs)

    def _collect(self, outputs) -> None:
        owner = self.owner
        for out in outputs:
            frontend = owner.get(out.request_id)
            if frontend is None:   # its frontend detached
                continue
            is_delta = frontend.live[out.request_id]
            if out.finished:
                del owner[out.request_id]
                del frontend.live[out.request_id]
            frontend.add_output(out, is_delta)

    def _fail(self, frontend: _Frontend, message: str) -> None:
        """End every live request of ``frontend`` with ``message``."""
        for request_id in list(frontend.live):
            try:
                self.engine.abort(request_id)
            except Exception:   # the engine may be what failed; the client must still hear back
                pass
            self.owner.pop(request_id, None)
            frontend.errors.append((request_id, message))
        frontend.live.clear()

    def _send(self) -> int:
        """Each frontend that has taken its previous step gets what it has waiting; the lead gets a
        step whenever anyone has outputs, with the engine-wide stats and the inter-token latencies.
        Returns how many frontends were sent a step."""
        frontends = self.frontends
        sent = 0
        if not frontends:
            return sent
        lead = frontends[0]
        lead.latencies += self.engine.drain_inter_token_latencies()
        if any(frontend.has_output() for frontend in frontends):
            self._stats_due = True   # kept until the lead can take them, even if the engine idles
        for frontend in frontends:
            is_lead = frontend is lead
            if frontend.waiting_ready or not (frontend.has_output() or (is_lead and self._stats_due)):
                continue
            stats = increments = None
            if is_lead:
                self._stats_due = False
                stats, increments = self.engine.stats(), {}
                for name in STATS_FIELDS_TOTAL:   # since the last stats any frontend was sent
                    total = getattr(stats, name)
                    increments[name] = total - self._reported_totals[name]
                    self._reported_totals[name] = total
            frontend.send(CoreStep(frontend.request_ids, frontend.token_ids, frontend.texts, frontend.finals,
                                   frontend.logprobs, frontend.errors, frontend.latencies if is_lead else [],
                                   stats, increments))
            frontend.waiting_ready = True
            frontend.clear()
            sent += 1
            if is_lead:
                frontend.latencies = []
        return sent


if __name__ == "__main__":
    sys.exit(main())
