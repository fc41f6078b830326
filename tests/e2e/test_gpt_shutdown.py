"""Server shutdown while requests are in flight: each gets a final error response, none is lost."""
from __future__ import annotations

import time

import pytest

from tests.conftest import free_ports
from tests.e2e.test_gpt import Stream
from trident.server import launch

pytestmark = pytest.mark.e2e


def test_in_flight_requests_get_a_final_error_on_shutdown(tmp_path, gpt_model_dir):
    repository = tmp_path / "repository"
    repository.mkdir()
    (repository / "gpt").symlink_to(gpt_model_dir)
    http_port, grpc_port, metrics_port = free_ports(3)
    with open(tmp_path / "server.log", "wb") as log:
        # A short exit timeout: Triton waits that long for in-flight requests, then unloads the model.
        process = launch.start(repository, http_port, grpc_port, metrics_port, stdout=log,
                               extra=["--exit-timeout-secs=20"])
    try:
        launch.wait_ready(http_port, process, timeout_s=300)
        stream = Stream(f"127.0.0.1:{grpc_port}")
        for i in range(3):
            stream.send(f"r{i}", "Count to ten thousand:", stream=True, max_tokens=1500, ignore_eos=True,
                        temperature=0.0)
        deadline = time.monotonic() + 120
        while not all(stream.responses[f"r{i}"] for i in range(3)) and time.monotonic() < deadline:
            time.sleep(0.05)
        launch.terminate(process)
        for i in range(3):
            results = stream.wait(f"r{i}", timeout=60)
            errors = [r for r in results if isinstance(r, Exception)]
            # The first error is the request's final response; the stream itself (still open on
            # the client side) may then be closed by the exiting server, which is not a response.
            assert errors and "server is shutting down" in str(errors[0]), f"r{i}: {errors}"
            assert all("GOAWAY" in str(e) or "Socket closed" in str(e) for e in errors[1:]), errors
        # Triton keeps a model alive while a client holds a gRPC stream open to it, even an idle
        # one; a client that got its final responses closes the stream, and the server exits.
        stream.close()
        assert process.wait(60) == 0, (tmp_path / "server.log").read_text()[-3000:]
    finally:
        launch.stop(process)
