"""Locust users for trident on Triton: BERT over gRPC and HTTP, GPT over a gRPC stream and HTTP SSE.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000              # web UI on :8089
    locust -f loadtest/locustfile.py,loadtest/shapes.py --host ...              # step load (saturation)
    python loadtest/run_locust.py --users 8 --run-time 60s BertGrpcUser         # headless + plots

--host is Triton's HTTP address; the gRPC users use the same machine on --grpc-port. The workload
options (loadtest/workload.py OPTIONS: --prompt-tokens, --max-tokens, --bert-batch, ...) are locust
custom arguments, also read from TRIDENT_* environment variables, and shown in the web UI.

Every request fires exactly one request event, and a success only once its final response arrived
and checked out: an error, a timeout, a response missing its final flag or finish_reason, the
wrong number of tokens, or a user stopped mid-request are failures. Completed GPT requests also
fire timing rows: "<model> ttft" (size = prompt tokens), "<model> itl" (one per streamed response
after the first) and "<model> tpot". The request rows' size is the embeddings or the output tokens.
"""
from __future__ import annotations

import itertools
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import gevent
from gevent.queue import Empty, Queue
from locust import FastHttpUser, User, constant, events, task

# locust has monkey-patched the process for gevent on import; gRPC needs its own hook before any
# channel exists, or its blocking calls would stall every other user of this process.
import grpc.experimental.gevent as grpc_gevent  # noqa: E402

grpc_gevent.init_gevent()

import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
import tritonclient.http as httpclient  # noqa: E402
from workload import (GRPC, GRPC_STREAM, HTTP, HTTP_SSE, ITL, OPTIONS, TPOT, TTFT,  # noqa: E402
                      GenerateParams, StreamTimeline, first_value, make_prompt, make_texts, metric_row_name,
                      parse_sse)

USER_INDEX = itertools.count()


@events.init_command_line_parser.add_listener
def add_workload_options(parser) -> None:
    for option in OPTIONS:
        parser.add_argument(option.flag, type=option.type, default=option.default, env_var=option.env_var,
                            include_in_web_ui=option.in_web_ui, help=f"{option.help} (env {option.env_var})")


class BadResponse(Exception):
    """A response arrived but is not what a complete, correct answer looks like."""


class StoppedMidRequest(Exception):
    """The user was stopped (test end) before the request's final response came."""


class RequestFailed(Exception):
    """Any other error, with its message in the text locust reports (tritonclient's exceptions
    print an empty repr)."""

    @classmethod
    def wrap(cls, error: Exception) -> Exception:
        return error if isinstance(error, (BadResponse, StoppedMidRequest)) else cls(f"{type(error).__name__}: {error}")


@dataclass
class Outcome:
    """Filled in by a request while it runs; fired as one locust request event when it ends."""
    start: float
    response_length: int = 0
    is_success: bool = False


class TritonUser:
    """What every user here shares: workload options, a seeded prompt generator, one-event-per-request."""

    def setup_workload(self) -> None:
        self.options = self.environment.parsed_options
        runner = self.environment.runner
        worker = getattr(runner, "worker_index", 0) if runner else 0
        # Distinct, reproducible prompts per user (and per worker process when distributed).
        self.rng = random.Random(self.options.seed * 1_000_003 + worker * 10_007 + next(USER_INDEX))
        split = urlsplit(self.host if "//" in self.host else f"http://{self.host}")
        self.http_url = split.netloc
        self.grpc_url = f"{split.hostname}:{self.options.grpc_port}"

    @contextmanager
    def request(self, request_type: str, name: str):
        """Fire exactly one request event for the block: a failure on any exception, even when the
        user is being stopped (GreenletExit is re-raised after it is counted)."""
        outcome = Outcome(start=time.perf_counter())
        exception = None
        try:
            yield outcome
            outcome.is_success = True
        except gevent.GreenletExit:
            exception = StoppedMidRequest("user stopped before the final response")
            raise
        except Exception as e:  # noqa: BLE001 -- every failure is counted, none stops the user
            exception = RequestFailed.wrap(e)
        finally:
            self.environment.events.request.fire(
                request_type=request_type, name=name, response_time=(time.perf_counter() - outcome.start) * 1000,
                response_length=outcome.response_length, exception=exception, context={})

    def fire_timeline(self, request_type: str, model: str, timeline: StreamTimeline) -> None:
        def fire(metric: str, seconds: float, length: int = 0) -> None:
            self.environment.events.request.fire(
                request_type=request_type, name=metric_row_name(model, metric), response_time=seconds * 1000,
                response_length=length, exception=None, context={})

        if timeline.ttft_s is not None:
            fire(TTFT, timeline.ttft_s, timeline.num_input_tokens)
        for gap in timeline.itls_s:
            fire(ITL, gap)
        if timeline.tpot_s is not None:
            fire(TPOT, timeline.tpot_s)

    def generate_params(self) -> GenerateParams:
        return GenerateParams(max_tokens=self.options.max_tokens)


# -- BERT -----------------------------------------------------------------------------------------
def check_embeddings(embeddings: np.ndarray | None, num_texts: int) -> None:
    if embeddings is None or embeddings.ndim != 2 or embeddings.shape[0] != num_texts:
        shape = None if embeddings is None else embeddings.shape
        raise BadResponse(f"expected {num_texts} embeddings, got an array of shape {shape}")
    if not np.isfinite(embeddings).all():
        raise BadResponse("embedding has non-finite values")


def text_tensor(texts: list[str]) -> np.ndarray:
    return np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)  # [num_texts, 1]


class BertUser(TritonUser, User):
    """Sends `--bert-batch` texts of `--text-tokens` words per request, one request at a time."""
    abstract = True
    wait_time = constant(0)
    protocol = ""
    client_lib = None

    def on_start(self) -> None:
        self.setup_workload()
        url = self.grpc_url if self.protocol == GRPC else self.http_url
        self.client = self.client_lib.InferenceServerClient(url, **self.client_options())

    def client_options(self) -> dict:
        return {}

    def on_stop(self) -> None:
        self.client.close()

    @task
    def embed(self) -> None:
        texts = make_texts(self.rng, self.options.bert_batch, self.options.text_tokens)
        data = text_tensor(texts)
        text_input = self.client_lib.InferInput("text_input", list(data.shape), "BYTES")
        text_input.set_data_from_numpy(data)
        model = self.options.bert_model
        with self.request(self.protocol, model) as outcome:
            result = self.infer(model, text_input)
            check_embeddings(result.as_numpy("embedding"), len(texts))
            outcome.response_length = len(texts)

    def infer(self, model: str, text_input):
        raise NotImplementedError


class BertGrpcUser(BertUser):
    protocol = GRPC
    client_lib = grpcclient

    def infer(self, model: str, text_input):
        return self.client.infer(model, [text_input], outputs=[grpcclient.InferRequestedOutput("embedding")],
                                 client_timeout=self.options.request_timeout)


class BertHttpUser(BertUser):
    protocol = HTTP
    client_lib = httpclient

    def client_options(self) -> dict:
        return {"connection_timeout": self.options.request_timeout, "network_timeout": self.options.request_timeout}

    def infer(self, model: str, text_input):
        return self.client.infer(model, [text_input], outputs=[httpclient.InferRequestedOutput("embedding")])


# -- GPT over a gRPC stream -----------------------------------------------------------------------
def gpt_inputs(prompt: str, params: GenerateParams) -> list:
    def tensor(name: str, datatype: str, array: np.ndarray):
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        return tensor

    return [
        tensor("text_input", "BYTES", np.array([prompt.encode("utf-8")], dtype=np.object_)),  # [1]
        tensor("max_tokens", "INT32", np.array([params.max_tokens], dtype=np.int32)),
        tensor("ignore_eos", "BOOL", np.array([params.ignore_eos])),
        tensor("temperature", "FP32", np.array([params.temperature], dtype=np.float32)),
        tensor("stream", "BOOL", np.array([True])),
    ]


def read_stream_response(result, timeline: StreamTimeline, elapsed_s: float) -> None:
    """Fold one streamed response into the timeline; the last one carries the final flag."""
    ids = result.as_numpy("output_ids")
    timeline.add(elapsed_s, 0 if ids is None else int(ids.size))
    reason = result.as_numpy("finish_reason")
    if reason is not None and reason.size and reason.reshape(-1)[0]:
        timeline.finish_reason = reason.reshape(-1)[0].decode("utf-8")
    for name in ("num_input_tokens", "num_output_tokens"):
        value = result.as_numpy(name)
        if value is not None and value.size:
            setattr(timeline, name, int(value.reshape(-1)[0]))
    if result.get_response().parameters["triton_final_response"].bool_param:
        timeline.is_final = True


class GptGrpcStreamUser(TritonUser, User):
    """One bidirectional gRPC stream per user, one request in flight on it at a time, so any error on
    the stream belongs to that request."""
    wait_time = constant(0)

    def on_start(self) -> None:
        self.setup_workload()
        self.client = grpcclient.InferenceServerClient(self.grpc_url)
        self.request_ids = itertools.count()
        self._open_stream()

    def _open_stream(self) -> None:
        responses = Queue()  # a fresh queue per stream: nothing late from an old stream lands in it
        self.responses = responses
        self.client.start_stream(callback=lambda result, error: responses.put((time.perf_counter(), result, error)))

    def _reopen_stream(self) -> None:
        """After an error or a timeout: cancel whatever the old stream still runs on the server."""
        self.client.stop_stream(cancel_requests=True)
        self._open_stream()

    def on_stop(self) -> None:
        self.client.stop_stream(cancel_requests=True)
        self.client.close()

    @task
    def generate(self) -> None:
        params = self.generate_params()
        prompt = make_prompt(self.rng, self.options.prompt_tokens)
        model = self.options.gpt_model
        timeline = StreamTimeline()
        with self.request(GRPC_STREAM, model) as outcome:
            request_id = f"{id(self)}-{next(self.request_ids)}"
            self.client.async_stream_infer(model, gpt_inputs(prompt, params), request_id=request_id,
                                           enable_empty_final_response=True)
            self._collect(request_id, timeline, outcome.start)
            self._check(timeline, params)
            outcome.response_length = timeline.num_output_tokens
        if outcome.is_success:
            self.fire_timeline(GRPC_STREAM, model, timeline)
        else:
            self._reopen_stream()

    def _collect(self, request_id: str, timeline: StreamTimeline, start: float) -> None:
        deadline = start + self.options.request_timeout
        while not timeline.is_final:
            try:
                arrival, result, error = self.responses.get(timeout=max(0.0, deadline - time.perf_counter()))
            except Empty:
                raise BadResponse(f"no final response within {self.options.request_timeout:.0f} s") from None
            if error is not None:
                raise error
            if result.get_response().id != request_id:
                continue  # a late answer to an earlier request that already failed
            read_stream_response(result, timeline, arrival - start)

    def _check(self, timeline: StreamTimeline, params: GenerateParams) -> None:
        problem = timeline.problem(params.max_tokens if params.ignore_eos else None)
        if problem:
            raise BadResponse(problem)


# -- GPT over HTTP generate_stream (server-sent events) ------------------------------------------
class GptHttpStreamUser(TritonUser, FastHttpUser):
    """POST /v2/models/<gpt>/generate_stream; Triton ends the event stream after the final response."""
    wait_time = constant(0)

    def __init__(self, environment) -> None:
        self.network_timeout = environment.parsed_options.request_timeout
        self.connection_timeout = environment.parsed_options.request_timeout
        super().__init__(environment)

    def on_start(self) -> None:
        self.setup_workload()

    @task
    def generate(self) -> None:
        params = self.generate_params()
        body = {"text_input": make_prompt(self.rng, self.options.prompt_tokens), **params.json_fields()}
        model = self.options.gpt_model
        timeline = StreamTimeline()
        start = time.perf_counter()
        with self.client.post(f"/v2/models/{model}/generate_stream", json=body, name=model, stream=True,
                              catch_response=True) as response:
            response.request_meta["request_type"] = HTTP_SSE
            response.request_meta["response_length"] = 0  # locust put the error body's length there
            try:
                self._read_events(response, timeline, start)
                problem = timeline.problem(params.max_tokens if params.ignore_eos else None)
                if problem:
                    raise BadResponse(problem)
                response.request_meta["response_length"] = timeline.num_output_tokens
                response.success()
            except gevent.GreenletExit:
                response.failure(StoppedMidRequest("user stopped before the final response"))
                raise
            except Exception as e:  # noqa: BLE001 -- counted as this request's failure
                response.failure(RequestFailed.wrap(e))
            finally:
                # locust timed the headers only (stream=True): the request lasts until its final event.
                response.request_meta["response_time"] = (time.perf_counter() - start) * 1000
        if response.request_meta["exception"] is None:
            self.fire_timeline(HTTP_SSE, model, timeline)

    @staticmethod
    def _read_events(response, timeline: StreamTimeline, start: float) -> None:
        if response.status_code != 200:
            raise BadResponse(f"HTTP {response.status_code}: {response.text[:300]}")
        # geventhttpclient's read(n) waits for n bytes; readline returns each line as it arrives,
        # which is what timing a server-sent event stream needs (locust exposes the raw response).
        stream = response._response
        buffer = ""
        while line := stream.readline(b"\n"):
            buffer += line.decode("utf-8")
            events_, buffer = parse_sse(buffer)
            for event in events_:
                read_sse_event(event, timeline, time.perf_counter() - start)
        # Triton ends the event stream right after the request's final response.
        timeline.is_final = not buffer.strip()


def read_sse_event(event: dict, timeline: StreamTimeline, elapsed_s: float) -> None:
    if "error" in event:
        raise BadResponse(f"server error: {event['error']}")
    ids = event.get("output_ids")
    timeline.add(elapsed_s, len(ids) if isinstance(ids, list) else int(ids is not None))
    reason = first_value(event.get("finish_reason"), "")
    if reason:
        timeline.finish_reason = reason
    for name in ("num_input_tokens", "num_output_tokens"):
        if name in event:
            setattr(timeline, name, int(first_value(event[name], 0)))
