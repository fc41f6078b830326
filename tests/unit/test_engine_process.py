"""EngineProcess: the engine in a spawned child process, driven through its pipe.

The reference is the same engine in this process (itself checked against Hugging Face in
test_engine.py): the child must produce the same tokens and text, and must answer every request
exactly once, through aborts, bad requests and its own death.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import time

import pytest

from trident.engine.config import EngineConfig
from trident.engine.engine import LLMEngine
from trident.engine.engine_process import CoreStep, EngineDied, EngineProcess
from trident.engine.sampling_params import RequestOutputKind, SamplingParams
from trident.models.testing import save_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["The quick brown fox", "assert statements are", "Hello", "x = [i for i in range(10)] and then"]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> EngineConfig:
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-process"))
    return EngineConfig(model=str(path), device="cpu", dtype="float32", block_size=8, max_model_len=128,
                        max_num_seqs=8, max_num_batched_tokens=256)


@pytest.fixture(scope="module")
def core(config):
    process = EngineProcess(config)
    yield process
    process.shutdown()


def messages(core: EngineProcess, what: str, timeout_s: float = 120):
    """The core's steps as they come, failing after ``timeout_s`` with no ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert time.monotonic() < deadline, f"no {what}"
        for message in core.get(timeout=0.5):
            assert not isinstance(message, EngineDied), message
            yield message


def collect(core: EngineProcess, request_ids: set[str], timeout_s: float = 120) -> dict[str, list]:
    """Every output and error of the given requests, until each has its final answer."""
    seen: dict[str, list] = {rid: [] for rid in request_ids}
    open_ids = set(request_ids)
    if not open_ids:
        return seen
    for message in messages(core, f"final answer for {sorted(open_ids)}", timeout_s):
        for out in message.outputs():
            seen[out.request_id].append(out)
            if out.finished:
                open_ids.discard(out.request_id)
        for request_id, error in message.errors:
            seen[request_id].append(error)
            open_ids.discard(request_id)
        if not open_ids:
            return seen


def first_output(core: EngineProcess, request_id: str, timeout_s: float = 120):
    """The first output of ``request_id`` (the others are dropped)."""
    for message in messages(core, f"output for {request_id}", timeout_s):
        for out in message.outputs():
            if out.request_id == request_id:
                return out


def test_child_matches_the_in_process_engine_for_every_output_kind(core, config):
    engine = LLMEngine(config)
    tokenizer = engine.tokenizer
    greedy = dict(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = {p: out for p, out in zip(PROMPTS, engine.generate(PROMPTS, SamplingParams(**greedy)))}
    kinds = {"delta": RequestOutputKind.DELTA, "final": RequestOutputKind.FINAL_ONLY,
             "cumulative": RequestOutputKind.CUMULATIVE}
    ids = set()
    for i, prompt in enumerate(PROMPTS):
        for name, kind in kinds.items():
            ids.add(f"{name}-{i}")
            core.add_request(f"{name}-{i}", tokenizer.encode(prompt), SamplingParams(output_kind=kind, **greedy),
                             time.monotonic())
    seen = collect(core, ids)
    for i, prompt in enumerate(PROMPTS):
        want = expected[prompt]
        delta, final, cumulative = seen[f"delta-{i}"], seen[f"final-{i}"], seen[f"cumulative-{i}"]
        assert len(final) == 1 and final[0].finished
        assert final[0].token_ids == want.output_token_ids and final[0].text == want.text
        assert [t for out in delta for t in out.token_ids] == want.output_token_ids
        assert "".join(out.text for out in delta) == want.text
        assert 1 <= len(delta) <= 24   # one per step while the consumer keeps up; merged when it lags
        assert cumulative[-1].token_ids == want.output_token_ids and cumulative[-1].text == want.text
        assert final[0].num_prompt_tokens == len(tokenizer.encode(prompt))
        arrival, _, first_token, finished = final[0].times
        assert arrival <= first_token <= finished   # one clock in both processes


def test_abort_and_bad_requests_get_exactly_one_final_answer(core, config):
    long_prompt = list(range(1, 200))          # longer than max_model_len
    core.add_request("too-long", long_prompt, SamplingParams(max_tokens=4), time.monotonic())
    core.add_request("out-of-vocab", [10 ** 9], SamplingParams(max_tokens=4), time.monotonic())
    core.add_request("endless", [1, 2, 3], SamplingParams(max_tokens=100, ignore_eos=True, temperature=0.0),
                     time.monotonic())
    core.add_request("fine", [4, 5, 6], SamplingParams(max_tokens=5, ignore_eos=True), time.monotonic())
    core.abort("endless")
    core.abort("never-added")   # unknown ids are ignored, not an error
    seen = collect(core, {"too-long", "out-of-vocab", "endless", "fine"})
    assert "max_model_len" in seen["too-long"][0] and len(seen["too-long"]) == 1
    assert "out of range" in seen["out-of-vocab"][0] and len(seen["out-of-vocab"]) == 1
    assert seen["endless"][-1].finish_reason == "abort" and len(seen["endless"][-1].token_ids) < 100
    assert seen["fine"][-1].finish_reason == "length" and len(seen["fine"][-1].token_ids) == 5
    # The engine is still serving after all that.
    core.add_request("after", [7, 8], SamplingParams(max_tokens=3, ignore_eos=True), time.monotonic())
    assert collect(core, {"after"})["after"][-1].finished


def test_abort_all_fails_every_live_request_with_the_message(core):
    for i in range(3):
        core.add_request(f"live-{i}", [1, 2, 3 + i], SamplingParams(max_tokens=120, ignore_eos=True),
                         time.monotonic())
    core.abort_all("going away")
    seen = collect(core, {f"live-{i}" for i in range(3)})
    finals = [seen[f"live-{i}"][-1] for i in range(3)]
    # Either it finished before the message arrived, or it got the message as its final answer.
    assert all(last == "going away" or last.finished for last in finals)
    assert "going away" in finals   # 120 tokens each: not all of them can have finished first


def test_a_dead_engine_is_reported_and_a_failed_start_raises(config, tmp_path):
    process = EngineProcess(config)
    try:
        os.kill(process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        messages = []
        while not any(isinstance(m, EngineDied) for m in messages):
            assert time.monotonic() < deadline, messages
            messages += process.get(timeout=0.5)
        died = next(m for m in messages if isinstance(m, EngineDied))
        assert "exit code -9" in died.message
        with pytest.raises(OSError):
            for _ in range(100):   # the first sends may still fit the socket buffer
                process.add_request("late", [1, 2], SamplingParams(max_tokens=2), time.monotonic())
    finally:
        process.shutdown(timeout_s=5)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(RuntimeError, match="engine failed to start"):
        EngineProcess(EngineConfig(model=str(tmp_path), device="cpu"))


def test_steps_carry_stats_and_inter_token_latencies(core):
    core.add_request("timed", [1, 2, 3], SamplingParams(max_tokens=6, ignore_eos=True), time.monotonic())
    latencies, steps = [], []
    deadline = time.monotonic() + 60
    while not any(o.request_id == "timed" and o.finished for s in steps for o in s.outputs()):
        assert time.monotonic() < deadline
        batch = [m for m in core.get(timeout=0.5) if isinstance(m, CoreStep)]
        steps += batch
        latencies += [x for s in batch for x in s.inter_token_latencies]
    assert len(latencies) == 5 and all(x >= 0 for x in latencies)   # one per token after the first
    assert steps[-1].stats.generation_tokens_total >= 6


def test_logprobs_cross_the_pipe_where_requested(core, config):
    params = SamplingParams(max_tokens=5, ignore_eos=True, temperature=0.0, logprobs=True)
    (expected,) = LLMEngine(config).generate([[1, 2, 3]], params)
    core.add_request("with", [1, 2, 3], dataclasses.replace(params, output_kind=RequestOutputKind.DELTA),
                     time.monotonic())
    core.add_request("without", [1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True), time.monotonic())
    seen = collect(core, {"with", "without"})
    assert [out.cumulative_logprob for out in seen["with"]][-1] == pytest.approx(expected.cumulative_logprob)
    assert all(out.cumulative_logprob is not None for out in seen["with"])
    assert all(out.cumulative_logprob is None for out in seen["without"])


# -- several frontends on one engine (Triton's model instances) ----------------------------------------
def run_greedy(core: EngineProcess, prefix: str, prompts: list[list[int]]) -> dict[str, list]:
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for i, ids in enumerate(prompts):
        core.add_request(f"{prefix}{i}", ids, params, time.monotonic())
    return collect(core, {f"{prefix}{i}" for i in range(len(prompts))})


@pytest.fixture
def shared_key(tmp_path) -> str:
    return f"test-{tmp_path.name}"


@pytest.fixture
def pair(config, shared_key):
    """Two frontends on one key (the first starts the engine, the second attaches), detached in
    reverse order."""
    first = EngineProcess(config, key=shared_key)
    second = EngineProcess(config, key=shared_key)
    yield first, second
    second.shutdown()
    first.shutdown()


def test_frontends_with_one_key_share_one_engine_and_each_gets_only_its_own_outputs(config, pair, shared_key):
    first, second = pair
    assert first.started_here and not second.started_here
    assert second.pid == first.pid and second.info == first.info
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    (expected_a, expected_b, expected_c) = LLMEngine(config).generate(prompts, greedy)
    # Interleaved: both frontends' requests run in the same engine steps.
    first.add_request("a", prompts[0], greedy, time.monotonic())
    second.add_request("b", prompts[1], greedy, time.monotonic())
    first.add_request("c", prompts[2], greedy, time.monotonic())
    seen_first, seen_second = collect(first, {"a", "c"}), collect(second, {"b"})
    assert seen_first["a"][-1].token_ids == expected_a.output_token_ids
    assert seen_first["c"][-1].token_ids == expected_c.output_token_ids
    assert seen_second["b"][-1].token_ids == expected_b.output_token_ids
    # An id already in flight through the other frontend is refused, not crossed. (It stays in
    # flight: as long as the context allows, its first output seen before the second one is sent,
    # then aborted; a short one could end before the second arrives, and then the id is free.)
    first.add_request("dup", [1, 2], SamplingParams(max_tokens=config.max_model_len - 2, ignore_eos=True,
                                                    output_kind=RequestOutputKind.DELTA), time.monotonic())
    seen_dup = first_output(first, "dup")
    second.add_request("dup", [1, 2], SamplingParams(max_tokens=2), time.monotonic())
    assert "already in flight" in collect(second, {"dup"})["dup"][0]
    first.abort("dup")
    final = collect(first, {"dup"})["dup"][-1] if not seen_dup.finished else seen_dup
    assert final.finished
    # A different config under the same key gets an engine of its own.
    other = EngineProcess(dataclasses.replace(config, max_num_seqs=4), key=shared_key)
    assert other.started_here and other.pid != first.pid
    other.shutdown()
    assert not other.is_alive()


def test_the_engine_lives_while_any_frontend_is_attached_and_stops_with_the_last(config, shared_key):
    key = shared_key
    starter = EngineProcess(config, key=key)
    attached = EngineProcess(config, key=key)
    pid = starter.pid
    starter.add_request("dropped", [1, 2, 3], SamplingParams(max_tokens=100, ignore_eos=True), time.monotonic())
    starter.shutdown()   # the frontend that started it leaves first; its request is dropped
    assert starter.is_alive()
    assert all(outs[-1].finished for outs in run_greedy(attached, "x", [[1, 2], [3, 4]]).values())   # still serving
    attached.shutdown()  # the last one out
    assert not attached.is_alive()
    assert not attached.address.exists() and not attached._lock_path.exists()   # nothing left in $TMPDIR
    # The next frontend under that key starts a new engine.
    fresh = EngineProcess(config, key=key)
    try:
        assert fresh.started_here and fresh.pid != pid
    finally:
        fresh.shutdown()


def test_a_frontend_that_vanishes_loses_its_requests_and_the_others_keep_going(pair):
    lead, doomed = pair
    doomed.add_request("orphan", [1, 2, 3], SamplingParams(max_tokens=100, ignore_eos=True), time.monotonic())
    # As if its process had died: the engine reads EOF.
    socket.socket(fileno=os.dup(doomed._conn.fileno())).shutdown(socket.SHUT_RDWR)
    seen = run_greedy(lead, "y", [[5, 6, 7]])
    assert seen["y0"][-1].finish_reason == "length"
    assert any(isinstance(m, EngineDied) for m in doomed.get(timeout=5))


def test_only_the_lead_frontend_gets_stats_and_the_increments_add_up_to_the_totals(pair):
    lead, follower = pair
    follower.add_request("f", [1, 2, 3], SamplingParams(max_tokens=7, ignore_eos=True), time.monotonic())
    lead_steps, follower_steps = [], []
    deadline = time.monotonic() + 60
    while not any(o.finished for s in follower_steps for o in s.outputs()):
        assert time.monotonic() < deadline
        follower_steps += follower.get(timeout=0.2)
        lead_steps += lead.get(timeout=0.0)
    # The last stats reach the lead once it has taken the steps before them (backpressure),
    # even though the engine is idle by then.
    while not (lead_steps and lead_steps[-1].stats.generation_tokens_total >= 7):
        assert time.monotonic() < deadline, lead_steps[-1:]
        lead_steps += lead.get(timeout=0.2)
    assert all(s.stats is None and not s.inter_token_latencies for s in follower_steps)
    assert lead_steps and all(not s.request_ids and s.stats is not None for s in lead_steps)
    generated = sum(s.stat_increments["generation_tokens_total"] for s in lead_steps)
    assert generated == lead_steps[-1].stats.generation_tokens_total >= 7
    assert len([x for s in lead_steps for x in s.inter_token_latencies]) == 6


def test_the_engine_exits_when_the_process_it_watches_is_gone(config):
    import subprocess

    server = subprocess.Popen(["sleep", "600"])   # stands in for tritonserver
    core = EngineProcess(config, key="watched", watch_pid=server.pid)
    try:
        server.kill()
        server.wait()
        deadline = time.monotonic() + 30
        while core.is_alive():
            assert time.monotonic() < deadline, "the engine outlived the server"
            time.sleep(0.2)
        assert any(isinstance(m, EngineDied) for m in core.get(timeout=5))
    finally:
        core.shutdown(timeout_s=5)


def test_files_of_an_engine_killed_with_its_server_are_removed_by_the_next_start(config):
    """`kill -9` of the server's process group takes the engine and its frontends (whose reader
    would otherwise remove a dead engine's files) with it: the socket and lock file stay behind
    until the next start sweeps them."""
    import fcntl
    import subprocess

    from trident.engine.engine_process import engine_paths, remove_stale

    server = subprocess.Popen(["sleep", "600"])
    core = EngineProcess(config, key="killed", watch_pid=server.pid)
    try:
        assert core._lock_path.read_text() == str(server.pid)   # the spawner names what it watches
    finally:
        core.shutdown(timeout_s=30)
    server.kill()
    server.wait()
    # What such a kill leaves: a lock file naming the dead server, and a socket nobody listens on.
    sock, lock = engine_paths("killed-by-test")
    lock.write_text(str(server.pid))
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    listener.close()
    # Beside it: a lock whose watched process runs, one without a pid, one that someone holds.
    live, empty, held = (sock.parent / f"stale-test-{name}.lock" for name in ("live", "empty", "held"))
    live.write_text(str(os.getpid()))
    empty.write_text("")
    held.write_text(str(server.pid))
    with open(held) as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        fresh = EngineProcess(config)   # any start sweeps the directory first
        try:
            assert not sock.exists() and not lock.exists()
            assert live.exists() and empty.exists() and held.exists()
        finally:
            fresh.shutdown(timeout_s=30)
    assert remove_stale(sock.parent) == [held]   # no longer held
    for path in (live, empty):
        path.unlink()


def test_outputs_merge_while_the_consumer_lags_and_add_up_exactly(core, config):
    """Backpressure: the engine sends a frontend its next step only once it has taken the last one,
    and merges a request's outputs meanwhile (DELTA appended, CUMULATIVE replaced)."""
    params = dict(temperature=0.0, max_tokens=30, ignore_eos=True)
    (expected,) = LLMEngine(config).generate([[5, 6, 7]], SamplingParams(**params))
    core.add_request("lag-delta", [5, 6, 7], SamplingParams(output_kind=RequestOutputKind.DELTA, **params),
                     time.monotonic())
    core.add_request("lag-cumulative", [5, 6, 7], SamplingParams(output_kind=RequestOutputKind.CUMULATIVE, **params),
                     time.monotonic())
    time.sleep(3)   # the engine finishes both (30 steps) while nobody takes its steps
    seen = collect(core, {"lag-delta", "lag-cumulative"})
    delta, cumulative = seen["lag-delta"], seen["lag-cumulative"]
    assert len(delta) < 30 and len(cumulative) < 30                 # merged
    assert [t for out in delta for t in out.token_ids] == expected.output_token_ids
    assert "".join(out.text for out in delta) == expected.text
    assert cumulative[-1].token_ids == expected.output_token_ids and cumulative[-1].text == expected.text
    assert delta[-1].finished and delta[-1].finish_reason == "length"
