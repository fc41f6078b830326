"""Where the serving threads spend their time (the Triton models' and the engine process's), for
profiling a server under load.

Off unless the server's environment names a directory (``PhaseLog.from_env``). A record is a
wall-clock start (``time.time()``, comparable with a client's clock on the same host), a few counts,
and the seconds between consecutive marks of ``time.perf_counter()``; records are kept in memory
and appended to ``<directory>/<name>.<pid>.jsonl`` in blocks, off the timed path.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path


# The server-environment switches of the models' phase logs (read by loadtest/ and tests/ too).
GPT_PHASES_ENV = "TRIDENT_GPT_PHASES"
BERT_PHASES_ENV = "TRIDENT_BERT_PHASES"


class PhaseLog:
    FLUSH_EVERY = 512

    def __init__(self, path: Path, counts: tuple[str, ...], phases: tuple[str, ...]) -> None:
        self.path = path
        self.keys = ("start", *counts, *phases)
        self.records: list[list] = []
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, env: str, name: str, counts: tuple[str, ...], phases: tuple[str, ...]) -> "PhaseLog | None":
        directory = os.environ.get(env)
        if not directory:
            return None
        Path(directory).mkdir(parents=True, exist_ok=True)
        return cls(Path(directory) / f"{name}.{os.getpid()}.jsonl", counts, phases)

    def record(self, started: float, counts: tuple, marks: list[float]) -> None:
        """``marks``: perf_counter readings, one more than there are phases."""
        phases = [round(end - start, 7) for start, end in zip(marks, marks[1:])]
        with self._lock:
            self.records.append([started, *counts, *phases])
            full = len(self.records) >= self.FLUSH_EVERY
        if full:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            records, self.records = self.records, []
        if records:
            with open(self.path, "a") as f:
                f.writelines(json.dumps(dict(zip(self.keys, r))) + "\n" for r in records)


def read_records(directory: Path, name: str, window: tuple[float, float] | None = None) -> dict[int, list[dict]]:
    """The records of the logs called ``name`` under ``directory``, per writing process (pid), as
    dicts of ``PhaseLog.keys``; ``window``: only those whose start lies in it (wall clock)."""
    records: dict[int, list[dict]] = {}
    for path in sorted(Path(directory).glob(f"{name}.*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        if window is not None:
            rows = [r for r in rows if window[0] <= r["start"] <= window[1]]
        records[int(path.name[len(name) + 1:-len(".jsonl")])] = rows
    return records
