"""Triton Python model `bert`: text in, sentence embedding (or classification) out.

A thin adapter over trident.bert.BertEncoder. Triton's dynamic batcher hands execute() several
requests; their texts are encoded together in one call, and each request gets exactly one response:
its slice of the outputs, or its own error (a bad request never fails the others).

Model config parameters (string values):
    artifacts   directory of the build's artifacts, relative to the version directory (default "artifacts")
    runtime     "onnxruntime" (default, CPU) | "torch" (CUDA: packed tokens, CUDA graphs)
    precision   "int8" (default) | "fp32"; with runtime "torch" also "fp16" | "bf16"
    device      "cpu" (default) | "cuda[:N]"     num_threads  intra-op threads ("" = runtime default)
    max_length  truncate texts to this many tokens ("" = the model's maximum)
    max_num_seqs, max_num_batched_tokens   micro-batch limits of one execute() ("" = the runtime's:
                64 / 8192 for ONNX Runtime, 256 / 16384 for torch, which wants the batcher's whole batch)

The GPU configuration (runtime torch, KIND_GPU, batcher sized for the GPU) is written by
``python -m build.bert_gpu`` from the built artifacts (see that module).

Where execute() spends its time: with ``TRIDENT_BERT_PHASES=<directory>`` in the server's
environment every instance records, per execute(), the wall time of decoding the inputs,
tokenizing, running the model and building the responses (trident.phase_log), and writes
them to ``<directory>/<model>.<pid>.jsonl`` (every ``PhaseLog.FLUSH_EVERY`` calls and at unload);
loadtest/bench_bert.py sets it and prints the breakdown beside Triton's own queue/compute split.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from trident.bert.encoder import BertEncoder
from trident.triton.io import RequestError, decode_texts, string_array
from trident.phase_log import BERT_PHASES_ENV, PhaseLog
from trident.triton.shutdown import on_sigterm

OUTPUTS_BY_TASK = {"embedding": {"embedding"}, "classification": {"logits", "label"}}
PHASES = ("decode", "tokenize", "model", "respond")


def _parameters(model_config: dict) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def _device(device: str, args: dict) -> str:
    """"cuda" on a KIND_GPU instance means the GPU Triton placed that instance on."""
    if device == "cuda" and args.get("model_instance_kind") == "GPU":
        return f"cuda:{args['model_instance_device_id']}"
    return device


def _int_or_none(params: dict[str, str], key: str) -> int | None:
    return int(params[key]) if params.get(key) else None


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.logger = pb_utils.Logger
        # The launcher signals the whole process group on shutdown; Triton's own unload path is
        # all this model needs, so only keep the signal from killing the stub.
        on_sigterm(lambda: None)
        model_config = json.loads(args["model_config"])
        params = _parameters(model_config)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        artifacts = version_dir / params.get("artifacts", "artifacts")
        if not (artifacts / "manifest.json").is_file():
            raise pb_utils.TritonModelException(
                f"no built artifacts in {artifacts}: run `make build` (python -m build.bert) first")
        self.encoder = BertEncoder.from_artifacts(
            artifacts,
            precision=params.get("precision") or "int8",
            runtime=params.get("runtime") or "onnxruntime",
            device=_device(params.get("device") or "cpu", args),
            max_length=_int_or_none(params, "max_length"),
            num_threads=_int_or_none(params, "num_threads"),
            max_num_seqs=_int_or_none(params, "max_num_seqs"),
            max_num_batched_tokens=_int_or_none(params, "max_num_batched_tokens"),
        )
        declared = {o["name"] for o in model_config.get("output", [])}
        expected = OUTPUTS_BY_TASK[self.encoder.task]
        if declared != expected:
            raise pb_utils.TritonModelException(
                f"artifacts in {artifacts} are a {self.encoder.task} model with outputs {sorted(expected)}, "
                f"but config.pbtxt declares {sorted(declared)}")
        self.phases = PhaseLog.from_env(BERT_PHASES_ENV, args["model_name"], ("num_requests", "num_texts"), PHASES)
        options = self.encoder.options
        self.logger.log_info(f"bert: {self.encoder.task} model from {artifacts}, runtime={options.runtime} "
                             f"device={options.device} precision={options.precision}, "
                             f"max_length={self.encoder.max_length}, hidden={self.encoder.hidden_size}")

    def execute(self, requests):
        started, marks = time.time(), [time.perf_counter()]
        texts, spans, responses = [], [], [None] * len(requests)
        for index, request in enumerate(requests):
            try:
                tensor = pb_utils.get_input_tensor_by_name(request, "text_input")
                request_texts = decode_texts(None if tensor is None else tensor.as_numpy())
            except RequestError as e:
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e)))
                continue
            spans.append((index, len(texts), len(texts) + len(request_texts)))
            texts.extend(request_texts)
        if not spans:
            return responses
        marks.append(time.perf_counter())
        try:
            encodings = self.encoder.tokenize(texts)
            marks.append(time.perf_counter())
            outputs = self.encoder.encode_tokens(encodings)
            marks.append(time.perf_counter())
        except Exception as e:  # one failed batch must still answer every request
            message = f"bert encode failed: {type(e).__name__}: {e}"
            self.logger.log_error(message)
            for index, _, _ in spans:
                responses[index] = pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
            return responses
        for index, start, end in spans:
            responses[index] = pb_utils.InferenceResponse(self._tensors(outputs, start, end))
        if self.phases is not None:
            marks.append(time.perf_counter())
            self.phases.record(started, (len(requests), len(texts)), marks)
        return responses

    def _tensors(self, outputs: dict[str, np.ndarray], start: int, end: int) -> list:
        tensors = []
        for name, values in outputs.items():
            rows = values[start:end]
            if name == "label":
                rows = string_array(list(rows), (end - start, 1))
            tensors.append(pb_utils.Tensor(name, np.ascontiguousarray(rows)))
        return tensors

    def finalize(self) -> None:
        if self.phases is not None:
            self.phases.flush()
        self.encoder = None
