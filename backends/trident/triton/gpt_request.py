"""Triton GPT request <-> engine: pure functions, tested without Triton.

Input names are the ones users of TensorRT-LLM's and vLLM's Triton backends know. Individual tensors
win over the same key in the `sampling_parameters` JSON. vLLM's conventions: temperature 0 is
greedy; top_k 0 or -1 and top_p 1 switch those filters off.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields

import numpy as np

from trident.engine.sampling_params import RequestOutputKind, SamplingParams
from trident.engine.validation import reject_unknown_keys
from trident.triton.io import RequestError, decode_texts

DEFAULT_MAX_TOKENS = 128

# tensor name -> (SamplingParams field, python type)
SCALAR_INPUTS = {
    "max_tokens": ("max_tokens", int),
    "min_tokens": ("min_tokens", int),
    "temperature": ("temperature", float),
    "top_k": ("top_k", int),
    "top_p": ("top_p", float),
    "min_p": ("min_p", float),
    "repetition_penalty": ("repetition_penalty", float),
    "presence_penalty": ("presence_penalty", float),
    "frequency_penalty": ("frequency_penalty", float),
    "seed": ("seed", int),
    "ignore_eos": ("ignore_eos", bool),
    "return_logprobs": ("logprobs", bool),
}
FLAG_INPUTS = {"stream": False, "exclude_input_in_output": True}
_PARAM_TYPES = {f.name: f.type for f in fields(SamplingParams)}


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    sampling_params: SamplingParams
    stream: bool
    exclude_input_in_output: bool


def parse_request(inputs: dict[str, np.ndarray | None], max_tokens_limit: int | None = None) -> GenerateRequest:
    """Turn a request's input tensors into engine input, or raise RequestError with a clear message."""
    texts = decode_texts(inputs.get("text_input"))
    if len(texts) != 1:
        raise RequestError(f"text_input must hold exactly one prompt, got {len(texts)}")
    prompt = texts[0]
    if not prompt:
        raise RequestError("text_input is empty: give a prompt of at least one character")

    values: dict = {"max_tokens": DEFAULT_MAX_TOKENS}
    values.update(_sampling_json(inputs.get("sampling_parameters")))
    for name, (field_name, kind) in SCALAR_INPUTS.items():
        if inputs.get(name) is not None:
            values[field_name] = _scalar(inputs[name], name, kind)
    if inputs.get("stop") is not None:
        values["stop"] = decode_texts(inputs["stop"], "stop")
    if values.get("top_k") == 0:
        values["top_k"] = -1
    if max_tokens_limit is not None and values["max_tokens"] > max_tokens_limit:
        raise RequestError(f"max_tokens={values['max_tokens']} exceeds this model's limit of {max_tokens_limit}")
    if "output_kind" in values:
        raise RequestError("sampling_parameters.output_kind is not accepted: `stream` decides it")
    flags = {name: _scalar(inputs[name], name, bool) if inputs.get(name) is not None else default
             for name, default in FLAG_INPUTS.items()}
    # A non-streaming request is answered once: the engine then skips its per-token outputs. A
    # stream takes only what is new at each step, so nothing already sent crosses the pipe again.
    values["output_kind"] = RequestOutputKind.DELTA if flags["stream"] else RequestOutputKind.FINAL_ONLY
    try:
        params = SamplingParams(**values)
    except (TypeError, ValueError) as e:
        raise RequestError(str(e)) from None
    return GenerateRequest(prompt, params, flags["stream"], flags["exclude_input_in_output"])


def _sampling_json(array: np.ndarray | None) -> dict:
    if array is None:
        return {}
    (text,) = decode_texts(array, "sampling_parameters")[:1] or [""]
    try:
        values = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as e:
        raise RequestError(f"sampling_parameters is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise RequestError("sampling_parameters must be a JSON object")
    try:
        reject_unknown_keys(SamplingParams, values, "key(s) in sampling_parameters")
    except ValueError as e:
        raise RequestError(str(e)) from None
    return {key: _coerce_json(key, value) for key, value in values.items()}


def _coerce_json(key: str, value):
    """vllm_backend users send numbers as strings ("0.7"); accept both, reject the rest clearly."""
    kind = _PARAM_TYPES[key]
    if value is None or kind.startswith("list"):
        return value
    try:
        if "bool" in kind:
            if isinstance(value, str):
                if value.lower() not in ("true", "false"):
                    raise ValueError
                return value.lower() == "true"
            return bool(value)
        if "int" in kind:
            number = float(value)
            if not number.is_integer():
                raise ValueError
            return int(number)
        if "float" in kind:
            return float(value)
    except (TypeError, ValueError):
        raise RequestError(f"sampling_parameters.{key}: cannot use {value!r} as {kind}") from None
    return value


def _scalar(array: np.ndarray, name: str, kind: type):
    flat = np.asarray(array).reshape(-1)
    if flat.size != 1:
        raise RequestError(f"input '{name}' must hold one value, got {flat.size}")
    value = flat[0]
    if kind is bool:
        return bool(value)
    if kind is int:
        return int(value)
    value = float(value)
    if math.isnan(value):
        raise RequestError(f"input '{name}' is NaN")
    return value
