"""Triton GPT request parsing (pure functions, no server): defaults, conventions, clear errors."""
import json

import numpy as np
import pytest

from trident.triton.gpt_request import DEFAULT_MAX_TOKENS, parse_request
from trident.triton.io import RequestError, decode_texts


def text(value) -> np.ndarray:
    return np.array([value.encode() if isinstance(value, str) else value], dtype=np.object_)


def request(prompt="Hello", **tensors):
    inputs = {"text_input": text(prompt)}
    for name, value in tensors.items():
        if name in ("stop",):
            inputs[name] = np.array([s.encode() for s in value], dtype=np.object_)
        elif name == "sampling_parameters":
            inputs[name] = text(value if isinstance(value, str) else json.dumps(value))
        else:
            inputs[name] = np.array([value])
    return inputs


def test_defaults_follow_the_issue_and_vllm():
    parsed = parse_request(request())
    assert parsed.prompt == "Hello"
    assert parsed.sampling_params.max_tokens == DEFAULT_MAX_TOKENS == 128
    assert parsed.stream is False and parsed.exclude_input_in_output is True


def test_tensors_override_sampling_parameters_json():
    parsed = parse_request(request(temperature=np.float32(0.0), top_k=np.int32(0),
                                   sampling_parameters={"temperature": "0.7", "top_p": "0.9", "seed": 3,
                                                        "max_tokens": 5}))
    params = parsed.sampling_params
    assert params.temperature == 0.0 and params.is_greedy
    assert params.top_k == -1          # 0 means off, as in vLLM
    assert params.top_p == pytest.approx(0.9) and params.seed == 3 and params.max_tokens == 5


def test_stop_list_and_flags():
    parsed = parse_request(request(stop=["\n\n", "###"], stream=True, exclude_input_in_output=False,
                                   ignore_eos=True))
    assert parsed.sampling_params.stop == ["\n\n", "###"]
    assert parsed.stream and not parsed.exclude_input_in_output and parsed.sampling_params.ignore_eos


@pytest.mark.parametrize("inputs, message", [
    (request(""), "text_input is empty"),
    ({"text_input": text(b"\xff\xfe")}, "not valid UTF-8"),
    ({}, "missing required input 'text_input'"),
    (request(max_tokens=np.int32(0)), "max_tokens must be an integer >= 1"),
    (request(max_tokens=np.int32(-4)), "max_tokens must be an integer >= 1"),
    (request(temperature=np.float32(-1)), "temperature must be"),
    (request(temperature=np.float32("nan")), "NaN"),
    (request(top_p=np.float32(0)), "top_p must be in (0, 1]"),
    (request(top_p=np.float32(1.5)), "top_p must be in (0, 1]"),
    (request(sampling_parameters="{not json"), "not valid JSON"),
    (request(sampling_parameters={"temprature": 0.1}), "unknown key(s) in sampling_parameters: temprature"),
    (request(sampling_parameters={"temperature": "warm"}), "sampling_parameters.temperature"),
    (request(sampling_parameters="[1, 2]"), "must be a JSON object"),
])
def test_bad_requests_get_clear_errors(inputs, message):
    with pytest.raises(RequestError) as error:
        parse_request(inputs)
    assert message in str(error.value)


def test_max_tokens_beyond_the_model_limit():
    with pytest.raises(RequestError, match="exceeds this model's limit of 2048"):
        parse_request(request(max_tokens=np.int32(5000)), max_tokens_limit=2048)


def test_decode_texts_accepts_str_and_bytes_and_keeps_order():
    assert decode_texts(np.array([[b"a"], ["b"], ["\u00e9".encode()]], dtype=np.object_)) == ["a", "b", "\u00e9"]
    with pytest.raises(RequestError, match="must be BYTES"):
        decode_texts(np.array([1, 2], dtype=np.int32))
