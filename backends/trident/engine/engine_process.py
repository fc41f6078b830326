"""The serving side of the engine process: vLLM V1's frontend / engine-core split.

The engine is host-bound (scheduling, staging, detokenizing a thousand sequences a step) and is
driven by one Python thread. Inside a serving process that thread shares the GIL with everything
else the server does per request and per response (parsing, tokenizing, building and sending
responses, polling cancellation), and each of those takes the GIL away from the engine between two
GPU steps: in Triton's Python stub the same engine ran 1.8x slower than alone. So the engine runs in
a process of its own (``trident.engine.engine_core``) and the serving side sends it token ids and
receives, once per step, the outputs of that step.

One engine, several frontends: ``EngineProcess(config, key=...)`` connects to the engine that
others with the same key (and the same config) started, or starts it. Triton's model instances are
separate stub processes, each with one interpreter; with ``count: N`` in the model's
``instance_group`` they split the per-request and per-response work N ways while the model, its
weights and its KV cache exist once (vLLM's ``--api-server-count``). The engine lives while any
frontend is attached, and exits when the last one detaches or when the process it watches (the
server) is gone.

Wire protocol (a Unix socket per engine, ``multiprocessing.connection`` framing, pickled tuples;
order is preserved per connection):
    frontend -> engine  ("add", [(request_id, prompt_token_ids, SamplingParams, arrival_time), ...])
                        ("abort", request_id)        the request's final output ("abort") follows,
                                                     unless it finished before the abort arrived
                        ("abort_all", message)       every live request of this frontend ends with
                                                     that error
                        ("ready",)                   the last step sent was taken: send the next
                                                     (until then outputs merge, per request)
                        ("detach",)                  this frontend's requests are dropped; answered
                                                     with ("detached", frontends_left)
    engine -> frontend  EngineInfo once on connecting (or StartupError), then CoreSteps: the
                        outputs of the engine steps since the last one (one step's when the
                        frontend keeps up), and, for the lead frontend, engine-wide stats.

Request ids are the frontends' own and must be unique across them (the engine refuses a duplicate).
``time.monotonic()`` reads the same clock in every process (CLOCK_MONOTONIC), so arrival times set
by a frontend and token times set by the engine subtract correctly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import pickle
import queue
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Client, Connection
from pathlib import Path
from typing import NamedTuple

from .config import EngineConfig
from .metrics import EngineStats
from .sampling_params import SamplingParams

logger = logging.getLogger(__name__)

STATS_FIELDS_TOTAL = ("prefix_cache_queries", "prefix_cache_hits", "num_preemptions_total",
                      "prompt_tokens_total", "generation_tokens_total")


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
    # Engine-wide, for the lead frontend only (None for the others), so that N frontends exporting
    # shared metrics count each token once: the snapshot, and what its totals grew by since the
    # last snapshot sent to any frontend (STATS_FIELDS_TOTAL -> increment).
    stats: EngineStats | None
    stat_increments: dict[str, int] | None

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
    """A frontend's handle on an engine process: starts it, or attaches to the one already running
    under ``key`` with the same config.

    ``key=None`` starts a private engine. With a key (Triton's gpt model uses the server's pid, the
    model name and version), the first caller starts the engine and later callers, in any process,
    attach to it; a different config (weights rebuilt, engine.json edited) gets an engine of its
    own. The engine exits once nobody is attached, or once ``watch_pid`` (default: this process)
    is gone. ``add_requests`` / ``abort`` may be called from any thread; ``get`` from one consumer
    thread. Construction blocks until the engine has loaded its model (or raises ``RuntimeError``
    with the engine's traceback).
    """

    def __init__(self, config: EngineConfig, key: str | None = None, watch_pid: int | None = None,
                 start_timeout_s: float = 900.0):
        name = f"{key}-{config_fingerprint(config)}" if key else f"private-{os.getpid()}-{secrets.token_hex(4)}"
        self.address, self._lock_path = engine_paths(name)
        self._popen: subprocess.Popen | None = None
        # Under the lock: whether an engine is there, starting one, and the handshake, so that two
        # frontends never start two engines and an engine never exits under a frontend attaching.
        remove_stale(self._lock_path.parent)
        with file_lock(self._lock_path):
            conn = connect(self.address)
            if conn is None:
                watched = watch_pid or os.getpid()
                self._lock_path.write_text(str(watched))   # for remove_stale, should the engine be killed
                self._popen = spawn(config, self.address, self._lock_path, watched)
                conn = self._connect_spawned(start_timeout_s)
            self.info = self._handshake(conn, start_timeout_s)
        self._conn = conn
        self._send_lock = threading.Lock()
        self._outputs: queue.Queue = queue.Queue()
        self._detached = threading.Event()
        self._frontends_left: int | None = None
        self._reader = threading.Thread(target=self._read_loop, name="trident-engine-reader", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.info.pid

    @property
    def started_here(self) -> bool:
        """Whether this frontend started the engine (the others attached to it)."""
        return self._popen is not None

    def is_alive(self) -> bool:
        return pid_alive(self.pid)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float) -> None:
        self.add_requests([(request_id, prompt_token_ids, params, arrival_time)])

    def add_requests(self, requests: list[tuple[str, list[int], SamplingParams, float]]) -> None:
        """(request_id, prompt_token_ids, params, arrival_time) each, in one message."""
        self._send(("add", requests))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def abort_all(self, message: str) -> None:
        """End every live request of this frontend with ``message``."""
        self._send(("abort_all", message))

    def get(self, timeout: float) -> list[CoreStep | EngineDied]:
        """Everything the engine sent since the last call; waits up to ``timeout`` for the first.
        Taking a step tells the engine to send the next: until then it merges this frontend's
        outputs (backpressure: engine_core._Frontend), so call this from the one consumer thread."""
        try:
            items = [self._outputs.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                items.append(self._outputs.get_nowait())
            except queue.Empty:
                break
        if not isinstance(items[-1], EngineDied):
            try:
                self._send(("ready",))
            except OSError:   # the engine is gone; its EngineDied is on its way
                pass
        return items

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Detach; the last frontend out also waits for the engine to exit (its GPU memory is free
        when this returns), and kills it if it does not exit within ``timeout_s``."""
        try:
            self._send(("detach",))
        except (OSError, EOFError, BrokenPipeError):
            pass   # already gone
        acknowledged = self._detached.wait(timeout_s)
        if not acknowledged or self._frontends_left == 0:
            # Unacknowledged: the engine is stuck or dead, and of no use to anyone.
            self._wait_exit(timeout_s if acknowledged else 0.0)
        self._conn.close()

    # -- internals ---------------------------------------------------------------------------------
    def _send(self, message: tuple) -> None:
        with self._send_lock:
            self._conn.send(message)

    def _connect_spawned(self, timeout_s: float) -> Connection:
        deadline = time.monotonic() + timeout_s
        while (conn := connect(self.address)) is None:
            if self._popen.poll() is not None:
                raise RuntimeError(f"the engine process exited while starting (exit code {self._popen.returncode})")
            if time.monotonic() > deadline:
                self._popen.kill()
                raise RuntimeError(f"the engine process did not start within {timeout_s:.0f} s")
            time.sleep(0.05)
        return conn

    def _handshake(self, conn: Connection, timeout_s: float) -> EngineInfo:
        deadline = time.monotonic() + timeout_s
        while not conn.poll(1.0):
            if self._popen is not None and self._popen.poll() is not None:
                break   # exited: recv() below reads EOF
            if time.monotonic() > deadline:
                if self._popen is not None:
                    self._popen.kill()
                raise RuntimeError(f"the engine process did not start within {timeout_s:.0f} s")
        try:
            first = conn.recv()
        except (EOFError, OSError):
            code = f" (exit code {self._popen.wait(5)})" if self._popen is not None else ""
            raise RuntimeError(f"the engine process exited while starting{code}") from None
        if isinstance(first, StartupError):
            if self._popen is not None:
                self._popen.wait(30)
            raise RuntimeError(f"the engine failed to start:\n{first.message}")
        return first

    def _read_loop(self) -> None:
        """Keep the socket drained, so that a slow consumer never blocks the engine's sends."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            if type(message) is tuple and message[0] == "detached":   # not a CoreStep (a NamedTuple)
                self._frontends_left = message[1]
                self._detached.set()
            else:
                self._outputs.put(message)
        if self._detached.is_set():   # closed after our detach: the engine may serve others on
            return
        self._detached.set()          # nobody is left to acknowledge a detach
        code = None
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                code = self._popen.wait(5)
        how = f"exit code {code}" if code is not None else f"pid {self.pid}"
        self._outputs.put(EngineDied(f"the engine process exited ({how})"))
        if code is not None or not pid_alive(self.pid):
            self._remove_files_of_dead_engine()

    def _remove_files_of_dead_engine(self) -> None:
        """A killed engine leaves its socket and lock file: gone once someone finds it dead."""
        try:
            with file_lock(self._lock_path):
                if (conn := connect(self.address)) is not None:   # refused: connect() removes the socket
                    conn.close()   # a new engine is already there
                    return
                self._lock_path.unlink(missing_ok=True)
        except OSError:
            pass

    def _wait_exit(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while pid_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(self.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if self._popen is not None:
            self._popen.wait(10)


# -- finding, starting and watching engine processes -------------------------------------------------
def engine_paths(name: str) -> tuple[Path, Path]:
    """The socket and lock file of the engine called ``name``, in a directory only this user can
    enter (whoever can connect to the socket can run requests on the engine)."""
    directory = Path(tempfile.gettempdir()) / f"trident-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    if directory.stat().st_uid != os.getuid() or directory.stat().st_mode & 0o077:
        raise RuntimeError(f"{directory} must belong to this user and be private (mode 0700)")
    # A Unix socket path holds at most 107 bytes: a readable prefix and a hash of the whole name.
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    stem = f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:32]}-{digest}"
    return directory / f"{stem}.sock", directory / f"{stem}.lock"


@contextlib.contextmanager
def file_lock(path: Path | str):
    """An exclusive lock on ``path``. The engine removes its lock file as it exits (holding the
    lock): whoever was waiting on the removed file then takes the file now at ``path`` instead."""
    while True:
        f = open(path, "a")
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if os.fstat(f.fileno()).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        f.close()
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def remove_stale(directory: Path) -> list[Path]:
    """Remove the socket and lock files of engines whose watched process (the server) is gone and
    that nobody holds: an engine killed with its server (SIGKILL, OOM) cannot remove its own. A
    lock file names the watched pid; one without a pid, or whose pid runs, or that someone holds,
    stays. Returns what was removed."""
    removed = []
    for lock_path in directory.glob("*.lock"):
        try:
            with open(lock_path) as f:
                text = f.read().strip()
                if not text.isdigit() or pid_alive(int(text)):
                    continue
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:   # held: an engine exiting, or a frontend attaching
                    continue
                for path in (lock_path.with_suffix(".sock"), lock_path):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        removed.append(path)
        except OSError:   # vanished meanwhile, or unreadable: not ours to judge
            continue
    return removed


def connect(address: Path) -> Connection | None:
    """A connection to the engine listening at ``address``; None when none does (a socket file left
    by an engine that died is removed)."""
    try:
        return Client(str(address), family="AF_UNIX")
    except FileNotFoundError:
        return None
    except ConnectionRefusedError:
        with contextlib.suppress(FileNotFoundError):
            address.unlink()
        return None


def spawn(config: EngineConfig, address: Path, lock_path: Path, watch_pid: int) -> subprocess.Popen:
    """Start ``python -m trident.engine.engine_core``, the config on its stdin."""
    env = dict(os.environ)
    # The module must import in the child as it does here (the Triton stub puts backends/ on
    # sys.path itself and ignores PYTHONPATH).
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    command = [python_executable(), "-m", "trident.engine.engine_core", "--address", str(address),
               "--lock", str(lock_path), "--watch-pid", str(watch_pid)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, env=env)
    process.stdin.write(pickle.dumps(config))
    process.stdin.close()
    return process


def config_fingerprint(config: EngineConfig) -> str:
    """Changes with the config and with the files of the model it names: frontends attach to an
    engine only if it runs what they would have run (a reloaded model with new weights gets a new
    engine; one reloaded unchanged attaches to the running engine)."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode())
    for directory in {config.model, config.tokenizer or config.model}:
        path = Path(directory)
        if path.is_dir():
            for f in sorted(path.iterdir()):
                if f.is_file():
                    st = f.stat()
                    h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:12]


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True   # no /proc: kill(0) said it exists


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
