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
# (max_num_seqs, max_num_batched_tokens) per runtime; torch's token cap is its largest CUDA graph.
MICRO_BATCH_LIMITS = {"onnxruntime": (64, 8192), "torch": (256, 16384)}


@dataclass(frozen=True)
class EncoderOptions:
    runtime: str = "onnxruntime"
    precision: str = "int8"
    device: str = "cpu"
    max_length: int | None = None        # None: the length the model was built for (manifest)
    num_threads: int | None = None       # ORT intra-op threads; None: ORT's default (all cores)
    # Micro-batch limits (None: the runtime's default, MICRO_BATCH_LIMITS). Texts are sorted by
    # length first, so an ONNX Runtime micro-batch pads to the longest of similar lengths; the token
    # cap bounds the padded [batch, seq] tensor. The torch runtime packs tokens (no padding) and wants
    # whole dynamic-batcher batches: splitting 128 texts in two halves its GPU efficiency.
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None

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
        if min(self.micro_batch_limits) < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")

    @property
    def micro_batch_limits(self) -> tuple[int, int]:
        """(max_num_seqs, max_num_batched_tokens), the runtime's defaults where unset."""
        seqs, tokens = MICRO_BATCH_LIMITS[self.runtime]
        return (seqs if self.max_num_seqs is None else self.max_num_seqs,
                tokens if self.max_num_batched_tokens is None else self.max_num_batched_tokens)


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
