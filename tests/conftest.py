"""Session fixtures shared by the whole suite: the live Triton server used by tests/e2e.

The server is the real `tritonserver` (see trident.server.launch), started once per session on free
ports, serving a temporary repository that links the real `model_repository/` models and adds the
test-only models that tests/e2e/repository.py builds (e.g. a small classification checkpoint).
"""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class TritonServer:
    http_port: int
    grpc_port: int
    metrics_port: int
    repository: Path
    log_path: Path
    process: subprocess.Popen

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def start_server(repository: Path, workdir: Path, extra: list[str] | None = None,
                 ready_timeout_s: float = 300) -> TritonServer:
    """A tritonserver of its own on ``repository`` (free ports, log in ``workdir/server.log``),
    ready to serve; the caller stops it (``launch.stop(server.process)``)."""
    from trident.server import launch

    http_port, grpc_port, metrics_port = free_ports(3)
    log_path = workdir / "server.log"
    with open(log_path, "wb") as log:
        process = launch.start(repository, http_port, grpc_port, metrics_port, stdout=log, extra=extra)
    server = TritonServer(http_port, grpc_port, metrics_port, repository, log_path, process)
    try:
        launch.wait_ready(http_port, process, timeout_s=ready_timeout_s)
    except Exception as e:
        launch.stop(process)
        pytest.fail(f"Triton did not become ready ({e}); log tail:\n{server.log()[-6000:]}")
    return server


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory) -> TritonServer:
    from tests.e2e.repository import assemble_repository
    from trident.server import launch

    reuse = os.environ.get("TRIDENT_TEST_SERVER")
    if reuse:  # developer loop: "HTTP,GRPC,METRICS,REPOSITORY,LOG" of a server started by hand
        http_port, grpc_port, metrics_port, repository, log_path = reuse.split(",")
        yield TritonServer(int(http_port), int(grpc_port), int(metrics_port), Path(repository),
                           Path(log_path), None)
        return

    workdir = tmp_path_factory.mktemp("triton")
    repository = assemble_repository(workdir / "model_repository")
    server = start_server(repository, workdir, ready_timeout_s=600)
    yield server
    code = launch.stop(server.process)
    assert code == 0, f"Triton exited with {code} on shutdown; log tail:\n{server.log()[-4000:]}"


@pytest.fixture(scope="session")
def gpt_model_dir() -> Path:
    model = ROOT / "model_repository" / "gpt"
    if not (model / "1" / "artifacts").is_dir():
        pytest.fail("the gpt model is not built: run `python -m build.gpt_convert`")
    return model
