#!/usr/bin/env python3
"""Generate text with the `gpt` model: gRPC streaming, HTTP generate / generate_stream, cancellation.

    python clients/gpt_client.py "The capital of France is"                # gRPC stream, tokens as they come
    python clients/gpt_client.py --mode http "Write a haiku about GPUs"     # POST /v2/models/gpt/generate
    python clients/gpt_client.py --mode sse --temperature 0.8 --seed 7 "Once upon a time"
    python clients/gpt_client.py --mode cancel "Count to one thousand:"    # cancel a stream mid-way

`gpt` is a decoupled model: Triton refuses unary `infer` on it. Use gRPC `stream_infer` (what this
client's --mode grpc does) or the HTTP generate endpoints.
"""
from __future__ import annotations

import argparse
import json
import queue
import sys
import time
import urllib.request

import numpy as np

SAMPLING_FIELDS = {  # name -> (Triton dtype, numpy dtype)
    "max_tokens": ("INT32", np.int32), "min_tokens": ("INT32", np.int32),
    "temperature": ("FP32", np.float32), "top_k": ("INT32", np.int32), "top_p": ("FP32", np.float32),
    "min_p": ("FP32", np.float32), "repetition_penalty": ("FP32", np.float32),
    "presence_penalty": ("FP32", np.float32), "frequency_penalty": ("FP32", np.float32),
    "seed": ("INT64", np.int64), "ignore_eos": ("BOOL", np.bool_), "stream": ("BOOL", np.bool_),
    "exclude_input_in_output": ("BOOL", np.bool_), "return_logprobs": ("BOOL", np.bool_),
}


def grpc_inputs(prompt: str, options: dict, stop: list[str] | None = None) -> list:
    """The request as Triton input tensors (every field but text_input is optional)."""
    import tritonclient.grpc as grpcclient

    def tensor(name, datatype, array):
        inp = grpcclient.InferInput(name, list(array.shape), datatype)
        inp.set_data_from_numpy(array)
        return inp

    inputs = [tensor("text_input", "BYTES", np.array([prompt.encode()], dtype=np.object_))]
    for name, value in options.items():
        datatype, dtype = SAMPLING_FIELDS[name]
        inputs.append(tensor(name, datatype, np.array([value], dtype=dtype)))
    if stop:
        inputs.append(tensor("stop", "BYTES", np.array([s.encode() for s in stop], dtype=np.object_)))
    return inputs


def stream_grpc(url: str, prompt: str, options: dict, stop=None, cancel_after: int | None = None,
                model: str = "gpt"):
    """Yield (text_delta, final, finish_reason) as responses arrive over a gRPC stream."""
    import tritonclient.grpc as grpcclient

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(model, grpc_inputs(prompt, options, stop), request_id="1",
                                  enable_empty_final_response=True)
        received = 0
        while True:
            result, error = responses.get(timeout=300)
            if error is not None:
                raise RuntimeError(str(error))
            final = result.get_response().parameters["triton_final_response"].bool_param
            text = result.as_numpy("text_output")
            delta = text.reshape(-1)[0].decode() if text is not None else ""
            reason = result.as_numpy("finish_reason")
            yield delta, final, (reason.reshape(-1)[0].decode() if reason is not None else "")
            received += 1
            if final:
                return
            if cancel_after is not None and received >= cancel_after:
                client.stop_stream(cancel_requests=True)
                yield "", True, "cancelled by client"
                return
    finally:
        client.stop_stream()
        client.close()


def generate_http(url: str, prompt: str, options: dict, stop=None, model: str = "gpt") -> dict:
    """POST /v2/models/<model>/generate: one JSON answer."""
    body = {"text_input": prompt, **options, **({"stop": stop} if stop else {})}
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/generate", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def stream_http(url: str, prompt: str, options: dict, stop=None, model: str = "gpt"):
    """POST /v2/models/<model>/generate_stream: yield each server-sent event's JSON."""
    body = {"text_input": prompt, **options, "stream": True, **({"stop": stop} if stop else {})}
    request = urllib.request.Request(f"http://{url}/v2/models/{model}/generate_stream",
                                     json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        for line in response:
            line = line.decode().strip()
            if line.startswith("data:"):
                event = json.loads(line[len("data:"):])
                if "error" in event:
                    raise RuntimeError(event["error"])
                yield event


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", default="The capital of France is")
    parser.add_argument("--mode", choices=["grpc", "http", "sse", "cancel"], default="grpc")
    parser.add_argument("--grpc-url", default="localhost:8001")
    parser.add_argument("--http-url", default="localhost:8000")
    parser.add_argument("--model", default="gpt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--min-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--presence-penalty", type=float)
    parser.add_argument("--frequency-penalty", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")
    parser.add_argument("--echo", action="store_true", help="include the prompt in the output")
    args = parser.parse_args(argv)

    options = {k: v for k, v in {
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k,
        "top_p": args.top_p, "min_p": args.min_p, "repetition_penalty": args.repetition_penalty,
        "presence_penalty": args.presence_penalty, "frequency_penalty": args.frequency_penalty,
        "seed": args.seed, "ignore_eos": args.ignore_eos or None,
        "exclude_input_in_output": False if args.echo else None}.items() if v is not None}

    start = time.perf_counter()
    if args.mode == "http":
        answer = generate_http(args.http_url, args.prompt, options, args.stop, args.model)
        print(answer["text_output"])
        print(f"\n[finish_reason={answer['finish_reason']} tokens={answer['num_output_tokens']} "
              f"{time.perf_counter() - start:.2f}s]", file=sys.stderr)
        return 0
    if args.mode == "sse":
        for event in stream_http(args.http_url, args.prompt, options, args.stop, args.model):
            print(event["text_output"], end="", flush=True)
            reason = event.get("finish_reason")
        print(f"\n[finish_reason={reason} {time.perf_counter() - start:.2f}s]", file=sys.stderr)
        return 0
    options["stream"] = True
    cancel_after = 5 if args.mode == "cancel" else None
    if cancel_after:
        options.setdefault("ignore_eos", True)
        options["max_tokens"] = max(options["max_tokens"], 512)
    first = None
    for delta, final, reason in stream_grpc(args.grpc_url, args.prompt, options, args.stop, cancel_after,
                                            args.model):
        first = first or time.perf_counter()
        print(delta, end="", flush=True)
        if final:
            print(f"\n[finish_reason={reason} ttft={first - start:.3f}s total={time.perf_counter() - start:.2f}s]",
                  file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
