"""Encoder options: one frozen object, validated once.

``runtime``, ``precision`` and ``device`` name the execution path. Only ONNX Runtime on CPU exists
today; the other names are reserved so configs written for a GPU runtime or a TensorRT plan fail
with a clear message instead of a KeyError deep inside a session factory.
"""
from __future__ import annotations

from dataclasses import dataclass

RUNTIMES = ("onnxruntime",)
PLANNED_RUNTIMES = ("torch", "tensorrt")
PRECISIONS = ("int8", "fp32")
DEVICES = ("cpu",)
PLANNED_DEVICES = ("cuda",)


@dataclass(frozen=True)
class EncoderOptions:
    runtime: str = "onnxruntime"
    precision: str = "int8"
    device: str = "cpu"
    max_length: int | None = None        # None: the length the model was built for (manifest)
    num_threads: int | None = None       # ORT intra-op threads; None: ORT's default (all cores)
    # Micro-batch limits. Texts are sorted by length first, so a micro-batch pads to the longest of
    # similar lengths; the token cap bounds the padded [batch, seq] tensor for long inputs.
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192

    def __post_init__(self) -> None:
        _check_choice("runtime", self.runtime, RUNTIMES, PLANNED_RUNTIMES)
        _check_choice("device", _device_kind(self.device), DEVICES, PLANNED_DEVICES)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {self.max_length}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")


def _device_kind(device: str) -> str:
    return device.split(":", 1)[0]  # "cuda:1" -> "cuda"


def _check_choice(name: str, value: str, supported: tuple, planned: tuple) -> None:
    if value in supported:
        return
    if value in planned:
        raise NotImplementedError(f"{name} {value!r} is planned but not implemented yet; "
                                  f"supported: {', '.join(supported)}")
    raise ValueError(f"unknown {name} {value!r}; supported: {', '.join(supported)} "
                     f"(planned: {', '.join(planned)})")
