"""A real tritonserver for the benchmarks (started by our launcher, stopped after) and gRPC text clients.

    server = TritonServer(repository, work_dir)      # waits until every model is ready
    records, errors = run_text_clients(server.grpc_url, "bert", "embedding", texts_json, 8, 6, 16, 5.0)
    server.stop()

The clients run as separate processes of this file under the Triton interpreter (tritonclient, no
torch: they start in well under a second), so that the client side is not the bottleneck.

On the GPU machine `.gpu/env.sh` puts Triton and a `python3` with numpy 1.26 and tritonclient first
on PATH (Triton 2.51's Python stub mis-serialises numpy 2 arrays). Server, stub and clients run under
that interpreter (``triton_python()``); a benchmark may itself run under another one (HF, in-process
torch). The stub ignores PYTHONPATH, so our code reaches it through a .pth file in that interpreter's
site directory for the server's lifetime (``stub_path``).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

PTH_NAME = "trident-backends-{pid}.pth"  # one per benchmark process: parallel runs keep their own
# The machine's scipy / scikit-learn are built for numpy 2; transformers imports them when it finds
# them, which fails under the stub's numpy 1.26. The .pth hides them from that interpreter only.
HIDE_NUMPY2_PACKAGES = "import sys; [sys.modules.setdefault(m, None) for m in ('sklearn', 'scipy')]"


def triton_python() -> str:
    """The interpreter Triton's stub runs: the `python3` on PATH (.gpu/env.sh's venv there)."""
    return shutil.which("python3") or sys.executable


def site_dir(python: str) -> str:
    """``python``'s site-packages (clients spawned under it append it to find tritonclient)."""
    return subprocess.check_output([python, "-c", "import site; print(site.getsitepackages()[0])"],
                                   text=True).strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def add_stub_path(python: str) -> Path:
    """Points ``python`` (the stub's interpreter) at backends/ with a .pth; returns the file to remove."""
    needs_hiding = subprocess.run([python, "-c", "import scipy.sparse"], capture_output=True).returncode != 0
    lines = [str(REPO_ROOT / "backends")] + ([HIDE_NUMPY2_PACKAGES] if needs_hiding else [])
    path = Path(site_dir(python)) / PTH_NAME.format(pid=os.getpid())
    path.write_text("\n".join(lines) + "\n")
    return path


class TritonServer:
    """tritonserver over ``repository`` via ``python -m trident.server.launch``; log in ``work``;
    ``extra``: further tritonserver options (``--rate-limit=execution_count``...); ``engine_cpus``: the
    launcher's ``--engine-cpus``."""

    def __init__(self, repository: Path, work: Path, ready_timeout_s: float = 600,
                 extra: list[str] | None = None, engine_cpus: int = 0) -> None:
        self.python = triton_python()
        self.pth = add_stub_path(self.python)
        self.http, self.grpc, self.metrics = free_port(), free_port(), free_port()
        self.log_path = work / "tritonserver.log"
        self.log = open(self.log_path, "w")
        env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT / 'backends'}:{REPO_ROOT}"}
        self.process = subprocess.Popen(
            [self.python, "-m", "trident.server.launch", "--model-repository", str(repository),
             "--http-port", str(self.http), "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
             "--engine-cpus", str(engine_cpus), *(["--", *extra] if extra else [])],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=REPO_ROOT)
        sys.path.insert(0, str(REPO_ROOT / "backends"))
        from trident.server import launch

        # CPUs the launcher keeps for the GPT engine alone: the bench and its client processes (which a
        # real deployment runs elsewhere) stay off them too while this server runs.
        self.engine_cpus, rest = launch.engine_cpu_split(engine_cpus)
        self._affinity = os.sched_getaffinity(0)
        if self.engine_cpus:
            os.sched_setaffinity(0, rest)
        try:
            launch.wait_ready(self.http, self.process, ready_timeout_s)
        except (RuntimeError, TimeoutError) as e:  # the server died or hung: show why, clean up
            self.stop()
            raise RuntimeError(f"{e}; log tail:\n{self.log_tail()}") from None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    def log_tail(self, max_chars: int = 6000) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        wanted = [line[:400] for line in lines if line[:1] == "E" or "rror" in line or "  File" in line]
        return "\n".join(wanted or lines[-40:])[-max_chars:]

    def stop(self) -> None:
        self.pth.unlink(missing_ok=True)
        os.sched_setaffinity(0, self._affinity)
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


# ---- text clients: closed-loop gRPC `infer` of BYTES `text_input`, in their own processes -----------

def run_text_clients(url: str, model: str, output: str, texts_file: Path, num_clients: int, num_threads: int,
                     max_texts: int = 1, duration_s: float = 0.0, sizes: list[int] | None = None,
                     start_delay_s: float = 2.0) -> tuple[list, list]:
    """``num_clients`` processes x ``num_threads`` threads of `infer` on ``model``.

    Each request carries 1..``max_texts`` consecutive texts of ``texts_file`` (a JSON list) for
    ``duration_s`` seconds, or, with ``sizes``, exactly those request sizes in order, once per thread.
    Every process starts at the same moment (after ``start_delay_s``, time to import tritonclient).
    Returns the (sent, done, num_texts) records of the answered requests (num_texts 0 when the answer
    had the wrong number of rows) and the error messages.
    """
    start_at = time.time() + start_delay_s
    spec = {"url": url, "model": model, "output": output, "texts_file": str(texts_file), "max_texts": max_texts,
            "num_threads": num_threads, "start_at": start_at, "stop_at": start_at + duration_s, "sizes": sizes}
    procs = [subprocess.Popen([triton_python(), __file__, json.dumps(spec | {"seed": seed})],
                              stdout=subprocess.PIPE, text=True) for seed in range(num_clients)]
    records, errors = [], []
    for proc in procs:
        out, _ = proc.communicate(timeout=start_delay_s + duration_s + 300)
        if proc.returncode != 0:
            raise RuntimeError(f"a client process failed with code {proc.returncode} (traceback above)")
        report = json.loads(out)
        records += [tuple(r) for r in report["records"]]
        errors += report["errors"]
    return records, errors


def _client_main(spec: dict) -> None:
    import random
    import threading

    import numpy as np
    import tritonclient.grpc as grpcclient

    texts = json.loads(Path(spec["texts_file"]).read_text())
    records, errors = [], []

    def one(client, rng, k: int) -> None:
        first = rng.randrange(len(texts) - k + 1)
        data = np.array([t.encode() for t in texts[first:first + k]], dtype=np.object_).reshape(k, 1)
        tensor = grpcclient.InferInput("text_input", [k, 1], "BYTES")
        tensor.set_data_from_numpy(data)
        sent = time.time()
        try:
            rows = client.infer(spec["model"], [tensor]).as_numpy(spec["output"]).shape[0]
        except Exception as e:  # counted and reported; the run goes on
            errors.append(str(e))
            return
        records.append((sent, time.time(), k if rows == k else 0))

    def loop(index: int) -> None:
        client = grpcclient.InferenceServerClient(spec["url"])
        rng = random.Random(spec["seed"] * 1000 + index)
        time.sleep(max(0.0, spec["start_at"] - time.time()))
        if spec["sizes"] is not None:
            for k in spec["sizes"]:
                one(client, rng, k)
        while spec["sizes"] is None and time.time() < spec["stop_at"]:
            one(client, rng, rng.randint(1, spec["max_texts"]))
        client.close()

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(spec["num_threads"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"records": records, "errors": errors}))


if __name__ == "__main__":
    _client_main(json.loads(sys.argv[1]))
