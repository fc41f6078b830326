"""GPT through the live Triton server: gRPC stream_infer, HTTP generate / generate_stream, against the
in-process engine and Hugging Face generate on the real SmolLM2-135M-Instruct."""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from clients.gpt_client import generate_http, grpc_inputs, stream_http

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "model_repository/gpt/1/artifacts/smollm2-135m-instruct"

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "Water boils at",
    "List three fruits:",
    "The Python programming language was created by",
    "Translate to French: Good morning",
    "2 + 2 =",
    "The largest planet in the solar system is",
    "A haiku about the sea:",
    "The speed of light is",
    "My favourite book is",
    "In machine learning, a transformer is",
    "The opposite of hot is",
    "Q: What is the boiling point of water in Fahrenheit?\nA:",
]


@pytest.fixture(scope="module")
def gpt_server(triton_server):
    if not (triton_server.repository / "gpt").exists():
        pytest.fail("the gpt model is not built: run `python -m build.gpt_convert`")
    return triton_server


class Stream:
    """Requests over gRPC bidirectional streams, one stream per request so that an error (which
    carries no request id on a stream) is attributed to the right request."""

    def __init__(self, url: str):
        self.url = url
        self.clients: dict[str, grpcclient.InferenceServerClient] = {}
        self.responses: dict[str, list] = {}
        self.finals: dict[str, threading.Event] = {}

    def send(self, request_id: str, prompt: str, stop=None, model="gpt", inputs=None, outputs=None, **options):
        client = grpcclient.InferenceServerClient(self.url)
        self.clients[request_id] = client
        self.responses[request_id] = []
        self.finals[request_id] = threading.Event()
        client.start_stream(callback=lambda result, error: self._on_response(request_id, result, error))
        requested = [grpcclient.InferRequestedOutput(name) for name in outputs] if outputs else None
        client.async_stream_infer(model, inputs or grpc_inputs(prompt, options, stop), request_id=request_id,
                                  outputs=requested, enable_empty_final_response=True)

    def _on_response(self, request_id, result, error):
        self.responses[request_id].append(error if error is not None else result)
        if error is not None or result.get_response().parameters["triton_final_response"].bool_param:
            self.finals[request_id].set()

    def wait(self, request_id: str, timeout: float = 300) -> list:
        assert self.finals[request_id].wait(timeout), f"request {request_id}: no final response in {timeout}s"
        return self.responses[request_id]

    def close(self, cancel=False):
        """Close every stream; with ``cancel``, cancel the requests still waiting for their final
        response. A stream whose request has ended is closed, not cancelled: in Triton 2.51's gRPC
        frontend a cancellation that races a request's final response can leave the stream's state
        behind (the kind of race triton-inference-server/server#8078 fixed later), and that state
        holds the model, so the server cannot unload it at shutdown (a suite-end hang on
        `gpt_small_queue`, once in four CI runs, after its queue-full test cancelled an answered stream)."""
        for request_id, client in self.clients.items():
            client.stop_stream(cancel_requests=cancel and not self.finals[request_id].is_set())
            client.close()


def joined(results) -> tuple[str, list[int], str]:
    """Concatenate a request's responses: (text, output ids, finish_reason); raise on an error."""
    text, ids, reason = "", [], ""
    for result in results:
        if isinstance(result, Exception):
            raise result
        out = result.as_numpy("text_output")
        if out is None:  # the empty final response
            continue
        text += out.reshape(-1)[0].decode()
        ids += result.as_numpy("output_ids").reshape(-1).tolist()
        reason = result.as_numpy("finish_reason").reshape(-1)[0].decode() or reason
    return text, ids, reason


def metrics(server) -> dict[str, float]:
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("trident:") and 'model="gpt"' in line:
            name_labels, value = line.rsplit(" ", 1)
            name = name_labels.split("{")[0]
            labels = dict(re.findall(r'(\w+)="([^"]*)"', name_labels))
            key = name if "finished_reason" not in labels else f"{name}[{labels['finished_reason']}]"
            if "le" in labels:
                key = f"{name}[le={labels['le']}]"
            values[key] = float(value)
    return values


# -- references ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_greedy():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()

    def generate(prompt: str, max_tokens: int) -> list[int]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False)
        new = out[0, ids.shape[1]:].tolist()
        eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
                  else [model.generation_config.eos_token_id])
        return [t for i, t in enumerate(new) if not any(e in eos for e in new[:i])]

    return generate


# -- tests --------------------------------------------------------------------------------------
MAX_TOKENS = 16


def test_concurrent_greedy_equals_in_process_engine_and_hugging_face(gpt_server, hf_greedy):
    from trident.engine.config import EngineConfig
    from trident.engine.engine import LLMEngine
    from trident.engine.sampling_params import SamplingParams

    stream = Stream(gpt_server.grpc_url)
    try:
        for i, prompt in enumerate(PROMPTS):
            stream.send(f"g{i}", prompt, max_tokens=MAX_TOKENS, temperature=0.0)
        served = [joined(stream.wait(f"g{i}")) for i in range(len(PROMPTS))]
    finally:
        stream.close()
    engine = LLMEngine(EngineConfig.from_json(ROOT / "model_repository/gpt/1/engine.json", model=str(MODEL_DIR)))
    local = engine.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    for prompt, (text, ids, reason), mine in zip(PROMPTS, served, local):
        assert ids == list(mine.output_token_ids), prompt
        assert text == mine.text, prompt
        assert ids == hf_greedy(prompt, MAX_TOKENS), prompt
        assert reason in ("stop", "length")


def test_many_short_streams_finish_while_cancellation_is_polled(gpt_server):
    """Requests that finish while cancellation is being polled: an is_cancelled() on a request whose
    FINAL response had just been sent (its response factory freed) used to crash the server."""
    for round_ in range(3):
        stream = Stream(gpt_server.grpc_url)
        try:
            ids = [f"short{round_}-{i}" for i in range(24)]
            for i, request_id in enumerate(ids):
                stream.send(request_id, f"Count to {i}:", max_tokens=1 + i % 4, temperature=0.0, stream=True)
            for request_id in ids:
                text, tokens, reason = joined(stream.wait(request_id, timeout=120))
                assert reason in ("stop", "length") and tokens, request_id
        finally:
            stream.close()
    live = urllib.request.urlopen(f"http://{gpt_server.http_url}/v2/health/live", timeout=5)
    assert live.status == 200


def test_streaming_concatenation_equals_non_streaming_for_the_same_seed(gpt_server):
    options = dict(max_tokens=40, temperature=0.9, top_p=0.95, seed=1234)
    stream = Stream(gpt_server.grpc_url)
    try:
        stream.send("s", "Write a short poem about the ocean:", stream=True, **options)
        stream.send("n", "Write a short poem about the ocean:", stream=False, **options)
        streamed, nonstreamed = stream.wait("s"), stream.wait("n")
    finally:
        stream.close()
    assert len([r for r in nonstreamed if r.as_numpy("text_output") is not None]) == 1
    assert len(streamed) > 2
    assert joined(streamed) == joined(nonstreamed)


def test_a_stream_gets_only_the_outputs_it_asks_for(gpt_server):
    options = dict(max_tokens=24, temperature=0.0, ignore_eos=True)
    stream = Stream(gpt_server.grpc_url)
    try:
        stream.send("all", "The three primary colors are", stream=True, **options)
        stream.send("some", "The three primary colors are", stream=True, outputs=["text_output", "num_output_tokens"],
                    **options)
        everything, some = stream.wait("all"), stream.wait("some")
    finally:
        stream.close()
    named = [{o.name for o in r.get_response().outputs} for r in some]
    content = [names for names in named if names]   # the empty final response has none
    assert len(content) > 1 and all(names == {"text_output", "num_output_tokens"} for names in content), named
    text = "".join(r.as_numpy("text_output").reshape(-1)[0].decode() for r in some if r.as_numpy("text_output") is not None)
    counts = [int(r.as_numpy("num_output_tokens").reshape(-1)[0]) for r in some if r.as_numpy("num_output_tokens") is not None]
    full_text, full_ids, _ = joined(everything)
    assert text == full_text
    assert counts == sorted(counts) and counts[-1] == len(full_ids) == 24


def test_http_generate_and_generate_stream_agree(gpt_server):
    options = {"max_tokens": 20, "temperature": 0}
    answer = generate_http(gpt_server.http_url, "The capital of France is", options)
    events = list(stream_http(gpt_server.http_url, "The capital of France is", options))
    assert "Paris" in answer["text_output"]
    assert "".join(e["text_output"] for e in events) == answer["text_output"]
    assert answer["num_output_tokens"] == events[-1]["num_output_tokens"] <= 20
    assert answer["finish_reason"] in ("stop", "length")


def test_prompt_is_echoed_only_when_asked(gpt_server):
    options = {"max_tokens": 4, "temperature": 0}
    plain = generate_http(gpt_server.http_url, "Hello there", options)["text_output"]
    echoed = generate_http(gpt_server.http_url, "Hello there", {**options, "exclude_input_in_output": False})
    assert echoed["text_output"] == "Hello there" + plain


def test_stop_strings_cut_the_text_across_token_boundaries(gpt_server):
    full = generate_http(gpt_server.http_url, "List three fruits:", {"max_tokens": 40, "temperature": 0,
                                                                     "ignore_eos": True})["text_output"]
    # A stop string that straddles tokens: two characters taken from the middle of the text.
    cut = len(full) // 2
    stop = full[cut:cut + 2]
    answer = generate_http(gpt_server.http_url, "List three fruits:",
                           {"max_tokens": 40, "temperature": 0, "ignore_eos": True, "stop": [stop]})
    assert answer["finish_reason"] == "stop"
    assert answer["text_output"] == full[:full.index(stop)]


def test_cancelled_stream_frees_its_blocks(gpt_server):
    stream = Stream(gpt_server.grpc_url)
    stream.send("c", "Count from one to one thousand: one, two,", stream=True, max_tokens=1500,
                ignore_eos=True, temperature=0.0)
    deadline = time.monotonic() + 120
    while len(stream.responses.get("c", [])) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert metrics(gpt_server)["trident:kv_cache_usage_perc"] > 0
    cancelled_at = time.monotonic()
    stream.close(cancel=True)
    freed_after = None
    while time.monotonic() - cancelled_at < 5:
        m = metrics(gpt_server)
        if m["trident:kv_cache_usage_perc"] == 0 and m["trident:num_requests_running"] == 0:
            freed_after = time.monotonic() - cancelled_at
            break
        time.sleep(0.005)
    assert freed_after is not None, "blocks of the cancelled request were not freed within 5 s"
    print(f"cancelled request freed its blocks after {freed_after * 1000:.0f} ms (as seen on /metrics)")
    assert freed_after < 0.5
    assert metrics(gpt_server)["trident:request_success_total[abort]"] >= 1


BAD_REQUESTS = {
    "empty": (dict(prompt=""), "text_input is empty"),
    "max_tokens_zero": (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
    "max_tokens_huge": (dict(max_tokens=10_000_000), "exceeds this model's limit"),
    "negative_temperature": (dict(temperature=-0.5), "temperature must be"),
    "nan_top_p": (dict(top_p=float("nan")), "NaN"),
    "top_p_zero": (dict(top_p=0.0), "top_p must be in (0, 1]"),
    "prompt_too_long": (dict(prompt="hello " * 3000), "max_model_len"),
}


def test_bad_requests_get_errors_while_good_ones_complete(gpt_server):
    stream = Stream(gpt_server.grpc_url)
    try:
        for i in range(4):
            stream.send(f"good{i}", PROMPTS[i], max_tokens=8, temperature=0.0)
        for name, (fields, _) in BAD_REQUESTS.items():
            fields = dict(fields)
            stream.send(name, fields.pop("prompt", "Hello"), **fields)
        for i in range(4, 8):
            stream.send(f"good{i}", PROMPTS[i], max_tokens=8, temperature=0.0)
        for name, (_, message) in BAD_REQUESTS.items():
            results = stream.wait(name)
            assert len(results) == 1 and isinstance(results[0], Exception), name
            assert message in str(results[0]), f"{name}: {results[0]}"
        for i in range(8):
            text, ids, reason = joined(stream.wait(f"good{i}"))
            assert ids and reason in ("stop", "length")
    finally:
        stream.close()
    with grpcclient.InferenceServerClient(gpt_server.grpc_url) as client:
        assert client.is_model_ready("gpt")


@pytest.mark.parametrize("body, message", [
    ({"text_input": "hi", "sampling_parameters": "{not json"}, "not valid JSON"),
    ({"text_input": "hi", "sampling_parameters": json.dumps({"temprature": 1})}, "unknown key(s)"),
    ({"text_input": "hi", "max_tokens": "many"}, "Unable to parse"),  # wrong type: refused by Triton itself
    ({"max_tokens": 4}, "text_input"),                             # missing required input
])
def test_http_generate_rejects_malformed_requests(gpt_server, body, message):
    request = urllib.request.Request(f"http://{gpt_server.http_url}/v2/models/gpt/generate",
                                     json.dumps(body).encode(), {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=60)
    assert error.value.code >= 400
    assert message in error.value.read().decode()


def test_non_utf8_prompt_is_rejected(gpt_server):
    stream = Stream(gpt_server.grpc_url)
    try:
        inputs = grpc_inputs("x", {"max_tokens": 4})
        inputs[0].set_data_from_numpy(np.array([b"\xff\xfe\xfd"], dtype=np.object_))
        stream.send("u", "", inputs=inputs)
        (error,) = stream.wait("u")
        assert "not valid UTF-8" in str(error)
    finally:
        stream.close()


def test_full_queue_rejects_at_once(gpt_server):
    stream = Stream(gpt_server.grpc_url)
    long = dict(model="gpt_small_queue", max_tokens=1000, ignore_eos=True, temperature=0.0, stream=True)
    try:
        stream.send("running", "Count to a thousand:", **long)
        deadline = time.monotonic() + 60
        while not stream.responses.get("running") and time.monotonic() < deadline:
            time.sleep(0.01)
        stream.send("waiting", "Count to a thousand:", **long)
        time.sleep(0.2)
        started = time.monotonic()
        stream.send("rejected", "Count to a thousand:", **long)
        (error,) = stream.wait("rejected", timeout=10)
        assert "queue" in str(error).lower() and "full" in str(error).lower(), str(error)
        assert time.monotonic() - started < 2
    finally:
        stream.close(cancel=True)


def test_metrics_are_exported_and_move(gpt_server):
    before = metrics(gpt_server)
    answer = generate_http(gpt_server.http_url, "The capital of France is", {"max_tokens": 8, "temperature": 0})
    num_tokens = answer["num_output_tokens"]

    def delta(after, name):
        return after.get(name, 0) - before.get(name, 0)

    # Metrics are applied by their own thread: wait until this request's figures have landed.
    deadline = time.monotonic() + 5
    while True:
        after = metrics(gpt_server)
        landed = (delta(after, "trident:generation_tokens_total") == num_tokens
                  and delta(after, "trident:e2e_request_latency_seconds_count") == 1)
        if landed or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    for name in ("trident:time_to_first_token_seconds_count", "trident:e2e_request_latency_seconds_count",
                 "trident:request_queue_time_seconds_count"):
        assert delta(after, name) == 1, name
    assert delta(after, "trident:generation_tokens_total") == num_tokens
    # one inter-token latency per token after the first
    assert delta(after, "trident:inter_token_latency_seconds_count") == num_tokens - 1
    # exported as bucket/sum/count counters (one IPC per bucket per step): a valid cumulative histogram
    itl = "trident:inter_token_latency_seconds_bucket"
    buckets = sorted((float(k[len(itl) + 4:-1]), v) for k, v in after.items() if k.startswith(itl + "[le="))
    assert [v for _, v in buckets] == sorted(v for _, v in buckets), buckets
    assert buckets[-1][0] == float("inf") and delta(after, f"{itl}[le=+Inf]") == num_tokens - 1
    assert delta(after, "trident:inter_token_latency_seconds_sum") > 0
    assert delta(after, "trident:prompt_tokens_total") == answer["num_input_tokens"]
    for name in ("trident:num_requests_running", "trident:num_requests_waiting", "trident:kv_cache_usage_perc",
                 "trident:prefix_cache_hit_rate", "trident:num_preemptions_total"):
        assert name in after, name


def test_repeated_prompt_hits_the_prefix_cache(gpt_server):
    prompt = "You are a helpful assistant. Answer briefly and precisely. " * 6 + "Question: what is 2+2?"
    generate_http(gpt_server.http_url, prompt, {"max_tokens": 2, "temperature": 0})
    time.sleep(0.5)  # metrics are applied by their own thread: let the first request's land
    before = metrics(gpt_server)
    generate_http(gpt_server.http_url, prompt, {"max_tokens": 2, "temperature": 0})
    deadline = time.monotonic() + 5
    while (after := metrics(gpt_server))["trident:prefix_cache_hits"] <= before.get("trident:prefix_cache_hits", 0):
        assert time.monotonic() < deadline, "the repeated prompt did not hit the prefix cache"
        time.sleep(0.02)


def test_unary_infer_is_refused_for_the_decoupled_model(gpt_server):
    from tritonclient.utils import InferenceServerException
    with grpcclient.InferenceServerClient(gpt_server.grpc_url) as client:
        with pytest.raises(InferenceServerException, match="(?i)decoupled"):
            client.infer("gpt", grpc_inputs("Hello", {"max_tokens": 2}))


def test_closed_http_stream_frees_its_blocks(gpt_server):
    import http.client

    host, port = gpt_server.http_url.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.request("POST", "/v2/models/gpt/generate_stream", json.dumps(
        {"text_input": "Count to a thousand:", "max_tokens": 1500, "ignore_eos": True, "stream": True}))
    response = connection.getresponse()
    for _ in range(3):  # a few tokens arrive, then the client goes away
        while not response.readline().startswith(b"data:"):
            pass
    assert metrics(gpt_server)["trident:num_requests_running"] >= 1
    connection.sock.close()
    connection.close()
    closed_at = time.monotonic()
    while time.monotonic() - closed_at < 5:
        if metrics(gpt_server)["trident:num_requests_running"] == 0:
            break
        time.sleep(0.01)
    freed_after = time.monotonic() - closed_at
    print(f"closed HTTP stream: request aborted and blocks freed after {freed_after * 1000:.0f} ms")
    assert freed_after < 0.5
