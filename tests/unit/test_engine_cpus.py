"""CPUs kept for the GPT engine (``launch --engine-cpus``): the launcher's split and the engine process
moving itself onto them (engine_core._take_reserved_cpus, in a child process)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from trident.engine.config import ENGINE_CPUS_ENV
from trident.server import launch

BACKENDS = Path(__file__).resolve().parents[2] / "backends"


def test_the_split_keeps_the_last_cpus_and_never_all_of_them(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 2, 5, 7})
    assert launch.engine_cpu_split(2) == ([5, 7], [0, 2])
    assert launch.engine_cpu_split(0) == ([], [0, 2, 5, 7])
    assert launch.engine_cpu_split(4) == ([], [0, 2, 5, 7])


def _affinity_after_take(device: str, cpus: str) -> set[int]:
    script = ("import os; from trident.engine.config import EngineConfig; from trident.engine import engine_core; "
              f"engine_core._take_reserved_cpus(EngineConfig(model='m', device={device!r})); "
              "print(sorted(os.sched_getaffinity(0)))")
    env = {**os.environ, ENGINE_CPUS_ENV: cpus, "PYTHONPATH": str(BACKENDS)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    return set(eval(out.stdout.strip().splitlines()[-1]))


def test_a_gpu_engine_moves_onto_the_kept_cpus_and_a_cpu_engine_keeps_them_all():
    mine = os.sched_getaffinity(0)
    kept = max(mine)
    assert _affinity_after_take("cuda", str(kept)) == {kept}
    assert _affinity_after_take("cpu", str(kept)) == mine
