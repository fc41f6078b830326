"""Server shutdown, or the engine process dying, while requests are in flight: each gets a final
error response, none is lost."""
from __future__ import annotations

import os
import re
import signal
import time

import pytest

from tests.conftest import start_server
from tests.e2e.test_gpt import Stream
from trident.server import launch

pytestmark = pytest.mark.e2e


def test_in_flight_requests_get_a_final_error_on_shutdown(tmp_path, gpt_model_dir):
    repository = tmp_path / "repository"
    repository.mkdir()
    (repository / "gpt").symlink_to(gpt_model_dir)
    # A short exit timeout: Triton waits that long for in-flight requests, then unloads the model.
    server = start_server(repository, tmp_path, extra=["--exit-timeout-secs=20"])
    process = server.process
    try:
        stream = Stream(server.grpc_url)
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


def test_a_dead_engine_process_fails_in_flight_and_later_requests_and_the_server_stays_up(tmp_path, gpt_model_dir):
    repository = tmp_path / "repository"
    repository.mkdir()
    (repository / "gpt").symlink_to(gpt_model_dir)
    server = start_server(repository, tmp_path)
    process = server.process
    try:
        found = re.search(r"gpt: engine process (\d+):", server.log())
        assert found, server.log()[-3000:]
        stream = Stream(server.grpc_url)
        stream.send("long", "Count to ten thousand:", stream=True, max_tokens=1500, ignore_eos=True, temperature=0.0)
        deadline = time.monotonic() + 120
        while not stream.responses["long"] and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(int(found.group(1)), signal.SIGKILL)   # e.g. the OOM killer, or a crash in a kernel
        errors = [r for r in stream.wait("long", timeout=60) if isinstance(r, Exception)]
        assert len(errors) == 1 and "engine process exited" in str(errors[0]), errors
        stream.send("later", "Hello", max_tokens=4)
        (later,) = stream.wait("later", timeout=60)
        assert isinstance(later, Exception) and "engine process exited" in str(later), later
        stream.close()
        assert process.poll() is None   # the server itself is still up
    finally:
        launch.stop(process)
