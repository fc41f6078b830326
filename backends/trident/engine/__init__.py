"""The GPT generation engine: continuous batching over a paged KV cache.

Importable without Triton. The core (config, sequence, block_manager, scheduler) is pure Python;
model_runner is the only module that touches tensors on a device. The public names below load
lazily, so that importing the core never imports torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "LLM": "engine", "LLMEngine": "engine",
    "EngineConfig": "config", "CacheCapacity": "config",
    "SamplingParams": "sampling_params",
    "RequestOutput": "outputs", "RequestTimings": "outputs",
    "EngineStats": "metrics",
    "QueueFullError": "scheduler",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
