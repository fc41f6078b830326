"""Several instances of the gpt model (instance_group count > 1) on a live Triton server: separate
stub processes that share one engine process, each answering the requests Triton hands it."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.conftest import start_server
from tests.e2e.test_gpt import PROMPTS, Stream, hf_greedy, joined, metrics  # noqa: F401  (hf_greedy: a fixture)
from trident.engine.engine_process import pid_alive
from trident.server import launch
from trident.phase_log import GPT_PHASES_ENV, read_records

pytestmark = pytest.mark.e2e
MAX_TOKENS = 12


def instances_repository(root: Path, model: Path, count: int) -> Path:
    """The real gpt model with ``count`` instances: its files linked, its config edited."""
    version = root / "gpt" / "1"
    version.mkdir(parents=True)
    for entry in (model / "1").iterdir():
        (version / entry.name).symlink_to(entry.resolve())
    config = (model / "config.pbtxt").read_text()
    edited, found = re.subn(r"instance_group \[.*?\]", f"instance_group [ {{ count: {count}, kind: KIND_CPU }} ]",
                            config, flags=re.S)
    assert found == 1
    (root / "gpt" / "config.pbtxt").write_text(edited)
    return root


def test_instances_share_one_engine_split_the_requests_and_count_metrics_once(tmp_path, gpt_model_dir, hf_greedy,
                                                                               monkeypatch):
    repository = instances_repository(tmp_path / "repository", gpt_model_dir, count=3)
    phases = tmp_path / "phases"
    monkeypatch.setenv(GPT_PHASES_ENV, str(phases))   # each stub logs its execute() calls
    server = start_server(repository, tmp_path)
    try:
        started = re.findall(r"gpt: engine process (\d+): .*\((started by|shared with) instance (\S+)\)",
                             server.log())
        assert len(started) == 3, server.log()[-3000:]
        assert len({pid for pid, _, _ in started}) == 1               # one engine
        assert sorted(how for _, how, _ in started) == ["shared with", "shared with", "started by"]
        engine_pid = int(started[0][0])

        prompts = PROMPTS[:10]
        stream = Stream(server.grpc_url)
        try:
            for i, prompt in enumerate(prompts):
                stream.send(f"r{i}", prompt, stream=i % 2 == 0, max_tokens=MAX_TOKENS, temperature=0.0)
            served = [joined(stream.wait(f"r{i}")) for i in range(len(prompts))]
        finally:
            stream.close()
        for prompt, (_, ids, _) in zip(prompts, served):
            assert ids == hf_greedy(prompt, MAX_TOKENS), prompt

        # The instances took requests (Triton spreads concurrent ones over idle instances).
        time.sleep(1.5)   # the phase logs flush every second
        per_stub = {pid: len(rows) for pid, rows in read_records(phases, "gpt-execute").items()}
        assert len(per_stub) == 3 and sum(per_stub.values()) == len(prompts), per_stub

        # Shared counters count each request and token once, whichever instance recorded them.
        num_tokens = sum(len(ids) for _, ids, _ in served)
        deadline = time.monotonic() + 5
        while True:
            values = metrics(server)
            finished = sum(v for k, v in values.items() if k.startswith("trident:request_success_total["))
            landed = finished == len(prompts) and values.get("trident:generation_tokens_total") == num_tokens
            if landed or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert finished == len(prompts), values
        assert values["trident:generation_tokens_total"] == num_tokens, values
        assert values["trident:inter_token_latency_seconds_count"] == num_tokens - len(prompts), values
    finally:
        code = launch.stop(server.process)
    assert code == 0, server.log()[-3000:]
    deadline = time.monotonic() + 10
    while pid_alive(engine_pid) and time.monotonic() < deadline:   # the last instance out stops it
        time.sleep(0.1)
    assert not pid_alive(engine_pid)
