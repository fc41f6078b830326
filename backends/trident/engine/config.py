"""Engine configuration: one frozen object, validated once, unknown keys rejected.

Knob names follow vLLM / TensorRT-LLM so that users of either recognise them. Values found at run
time (the number of KV blocks after sizing from memory) live in ``CacheCapacity``, not here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .validation import reject_unknown_keys, require

POLICIES = ("max_utilization", "guaranteed_no_evict")
DTYPES = ("auto", "float32", "float16", "bfloat16")
# INT8 (vLLM's names); "w8a8" and an int8 KV cache need a directory built by `build/gpt_int8.py`.
QUANTIZATIONS = (None, "int8_weight_only", "w8a8")
KV_CACHE_DTYPES = ("auto", "int8")


# The CPUs the launcher keeps for the engine process alone (trident.server.launch.engine_cpu_split);
# a GPU engine moves itself onto them at start (engine_core).
ENGINE_CPUS_ENV = "TRIDENT_ENGINE_CPUS"

@dataclass(frozen=True)
class EngineConfig:
    model: str                               # Hugging Face directory (config.json + safetensors)
    tokenizer: str | None = None             # defaults to `model`
    device: str = "auto"                     # "auto" | "cpu" | "cuda" | "cuda:N"
    dtype: str = "auto"                      # auto: float32 on CPU, bfloat16 on CUDA
    block_size: int = 16
    max_model_len: int | None = None         # None: the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    batch_scheduler_policy: str = "max_utilization"
    max_queue_size: int = 1024               # waiting requests beyond this are rejected; 0 = unbounded
    # KV cache sizing, first match wins: an explicit token count, else a byte budget (CPU),
    # else a fraction of the free GPU memory after the weights are loaded (CUDA).
    max_tokens_in_paged_kv_cache: int | None = None
    kv_cache_memory_bytes: int | None = None
    kv_cache_free_gpu_mem_fraction: float = 0.9
    seed: int = 0
    quantization: str | None = None          # None | "int8_weight_only" (W8A16) | "w8a8" (SmoothQuant)
    kv_cache_dtype: str = "auto"             # "auto" (the model dtype) | "int8" (per-head scales)
    # vLLM's name: a step of greedy decodes launches the next one before its tokens reach the host
    # (docs/engine.md, "The step pipeline"); False: every step waits for the previous one's tokens.
    async_scheduling: bool = True
    # SGLang's name: a stream (DELTA / CUMULATIVE outputs) gets an output once it has this many new
    # tokens, and always on its first token and its last. 1: every token. Larger values trade
    # smoothness for fewer, larger responses, each of which costs the serving path a round trip
    # (docs/benchmarks.md: the Triton stream's throughput falls with its response count).
    stream_interval: int = 1

    def __post_init__(self) -> None:
        require(self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
               f"block_size must be a power of two, got {self.block_size}")
        require(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        require(self.max_num_batched_tokens >= 1,
               f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        require(self.max_model_len is None or self.max_model_len >= 1,
               f"max_model_len must be >= 1, got {self.max_model_len}")
        require(self.batch_scheduler_policy in POLICIES,
               f"batch_scheduler_policy must be one of {POLICIES}, got {self.batch_scheduler_policy!r}")
        require(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        require(self.quantization in QUANTIZATIONS,
               f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        require(self.kv_cache_dtype in KV_CACHE_DTYPES,
               f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        require(self.max_queue_size >= 0, f"max_queue_size must be >= 0, got {self.max_queue_size}")
        require(self.stream_interval >= 1, f"stream_interval must be >= 1, got {self.stream_interval}")
        require(0 < self.kv_cache_free_gpu_mem_fraction <= 1,
               f"kv_cache_free_gpu_mem_fraction must be in (0, 1], got {self.kv_cache_free_gpu_mem_fraction}")
        require(self.max_tokens_in_paged_kv_cache is None or self.max_tokens_in_paged_kv_cache >= self.block_size,
               "max_tokens_in_paged_kv_cache must hold at least one block")
        if not self.enable_chunked_prefill and self.max_model_len is not None:
            require(self.max_num_batched_tokens >= self.max_model_len,
                   "without chunked prefill, max_num_batched_tokens must be >= max_model_len "
                   f"({self.max_num_batched_tokens} < {self.max_model_len})")

    @classmethod
    def from_dict(cls, values: dict) -> "EngineConfig":
        reject_unknown_keys(cls, values, "engine config key(s)")
        return cls(**values)

    @classmethod
    def from_json(cls, path: str | Path, **overrides) -> "EngineConfig":
        values = json.loads(Path(path).read_text())
        values.update(overrides)
        return cls.from_dict(values)


@dataclass(frozen=True)
class CacheCapacity:
    """What the KV pool turned out to hold, found at start-up and logged."""
    num_blocks: int
    block_size: int
    bytes_per_token: int
    max_model_len: int

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def max_concurrency(self) -> float:
        """Sequences of full `max_model_len` that fit at once."""
        blocks_per_seq = -(-self.max_model_len // self.block_size)
        return self.num_blocks / blocks_per_seq

    def describe(self) -> str:
        return (f"KV cache: {self.num_blocks} blocks x {self.block_size} tokens = {self.num_tokens} tokens "
                f"({self.num_tokens * self.bytes_per_token / 2**20:.1f} MiB, {self.bytes_per_token} B/token); "
                f"max concurrency at max_model_len={self.max_model_len}: {self.max_concurrency:.2f}x")
