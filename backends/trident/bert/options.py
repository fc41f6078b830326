"""Encoder options: one frozen object, validated once.

``runtime``, ``precision`` and ``device`` name the execution path: ONNX Runtime on CPU (int8 | fp32)
or our PyTorch encoder on CUDA (``runtime="torch"``: fp16 | bf16 | int8 | fp32, see
``trident.bert.torch_runtime``). Other combinations are reserved so configs written for a TensorRT
plan fail with a clear message instead of a KeyError deep inside a session factory.
"""
from __future__ import annotations

from dataclasses import dataclass

RUNTIMES = ("onnxruntime", "torch")
PLANNED_RUNTIMES = ("tensorrt",)
PRECISIONS = ("int8", "fp32")
TORCH_PRECISIONS = ("int8", "fp16", "bf16", "fp32")
DEVICES = ("cpu", "cuda")
PLANNED_DEVICES = ()
DEVICE_OF_RUNTIME = {"onnxruntime": "cpu", "torch": "cuda"}


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
        _check_pairing(self.runtime, _device_kind(self.device))
        precisions = TORCH_PRECISIONS if self.runtime == "torch" else PRECISIONS
        if self.precision not in precisions:
            raise ValueError(f"precision must be one of {precisions} for runtime {self.runtime!r}, "
                             f"got {self.precision!r}")
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {self.max_length}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")


def _device_kind(device: str) -> str:
    return device.split(":", 1)[0]  # "cuda:1" -> "cuda"


def _check_pairing(runtime: str, device: str) -> None:
    if DEVICE_OF_RUNTIME[runtime] != device:
        raise NotImplementedError(f"runtime {runtime!r} on device {device!r} is planned but not implemented "
                                  f"yet; supported: onnxruntime on cpu, torch on cuda")


def _check_choice(name: str, value: str, supported: tuple, planned: tuple) -> None:
    if value in supported:
        return
    if value in planned:
        raise NotImplementedError(f"{name} {value!r} is planned but not implemented yet; "
                                  f"supported: {', '.join(supported)}")
    raise ValueError(f"unknown {name} {value!r}; supported: {', '.join(supported)} "
                     f"(planned: {', '.join(planned)})")
