"""The one module that touches the device: loads the model, owns the KV cache, runs forward steps.

KV layout, defined here and nowhere else: one tensor
``kv_cache [2, num_layers, num_blocks, block_size, num_kv_heads, head_dim]`` (keys at index 0,
values at 1). Position ``p`` of a sequence lives in slot
``block_table[p // block_size] * block_size + p % block_size``; block tables are padded with 0
(a real block, always masked out) to a rectangle.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from trident.engine import kernels
from trident.engine.attention import AttentionMetadata
from trident.engine.config import CacheCapacity, EngineConfig
from trident.engine.cuda_graph import DecodeGraphs
from trident.engine.sequence import Sequence
from trident.engine.tokenizer import load_tokenizer
from trident.models.layers import ModelShape
from trident.models.loader import load_hf_config, load_model, read_eos_token_ids
from trident.models.quant import cache_dtype

logger = logging.getLogger(__name__)

# Without an explicit budget on CPU: room for every sequence at full length, but at most this.
CPU_DEFAULT_KV_CACHE_BYTES = 1 << 30
BLOCK_TABLE_PAD = 0
# vLLM's name: run every step eagerly (no CUDA graphs), e.g. to profile kernels one by one.
ENFORCE_EAGER_ENV = "TRIDENT_ENFORCE_EAGER"


@dataclass
class ModelInput:
    """One step's packed batch, ready for the model."""
    input_ids: torch.Tensor       # [num_tokens]
    positions: torch.Tensor       # [num_tokens]
    metadata: AttentionMetadata
    sample_rows: torch.Tensor     # [num_sampled] rows whose hidden state feeds the LM head


@dataclass
class StepLogits:
    """The forward's result for the sampled rows, still on the device."""
    logits: torch.Tensor          # [num_sampled, vocab] model dtype
    token_ids: torch.Tensor       # [num_sampled] greedy argmax


class PendingTokens:
    """The tokens of a launched step (and their log-probs, when a row asked for them). On CUDA they
    are on their way to pinned host memory behind a recorded event and ``result()`` waits for it
    (the step's one host sync); on the CPU they are there at once. ``device`` keeps the tokens where
    the step left them, for a next step launched before they reach the host (async scheduling:
    ``launch_greedy`` / ``launch_sampled`` with ``inputs_from``)."""

    def __init__(self, token_ids: list[int] | None = None, host: torch.Tensor | None = None,
                 event: "torch.cuda.Event | None" = None, device: torch.Tensor | None = None,
                 logprobs: list[float] | torch.Tensor | None = None):
        self._token_ids = token_ids
        self._host = host          # [num_sampled] pinned
        self._event = event
        self.device = device       # [num_sampled] on the model's device
        self._logprobs = logprobs  # a list, or [num_sampled] pinned fp32 on its way like the tokens

    def result(self) -> list[int]:
        if self._token_ids is None:
            self._event.synchronize()
            self._token_ids = self._host.tolist()
        return self._token_ids

    def logprobs(self) -> list[float] | None:
        """The chosen tokens' log-probs (after ``result()``), or None when no row asked."""
        if isinstance(self._logprobs, torch.Tensor):
            self.result()
            self._logprobs = self._logprobs.tolist()
        return self._logprobs


@dataclass
class InputsFrom:
    """Async scheduling: the input token of each row of a decode step is the token that row's
    sequence sampled in the previous step, still on the device (``PendingTokens.device``) while the
    host has a placeholder for it. ``rows[i]``: where row i's token is in ``tokens``."""
    tokens: torch.Tensor          # [num_sampled_before] on the device
    rows: list[int]

    def gathered(self, num_padding: int = 0, pad: int = -1) -> torch.Tensor:
        """tokens[rows] on the device, then ``num_padding`` times ``pad`` [num_rows + num_padding]
        (for the sampler's penalties: rows admitted into the step have no in-flight token)."""
        gathered = torch.index_select(self.tokens, 0, self._index())
        if num_padding:
            gathered = torch.cat([gathered, gathered.new_full((num_padding,), pad)])
        return gathered

    def gather_into(self, input_ids: torch.Tensor) -> None:
        """The eager path's gather (a graph step stages ``rows`` with its other inputs instead)."""
        torch.index_select(self.tokens, 0, self._index(), out=input_ids)

    def _index(self) -> torch.Tensor:
        """``rows`` [num_rows] on the tokens' device. From pageable memory, non_blocking still
        copies the source before returning: no sync."""
        index = torch.from_numpy(np.fromiter(self.rows, np.int64, len(self.rows)))  # [num_rows]
        return index.to(self.tokens.device, non_blocking=True)


def is_decode_step(seqs: list[Sequence], num_new_tokens: list[int], inputs_from: InputsFrom | None = None) -> bool:
    """Every sequence computes exactly its one last token: a continuation of running decodes
    (``Scheduler.schedule_continuation``; one that also admits prefills is not), or rows that each
    have one token left. What a decode CUDA graph can replay."""
    if len(seqs) != len(num_new_tokens) or not seqs:
        return False
    if inputs_from is not None:
        return len(inputs_from.rows) == len(seqs)
    return all(n == 1 and seq.num_tokens - seq.num_computed_tokens == 1 for seq, n in zip(seqs, num_new_tokens))


class ModelRunner:
    """Loads the model directory, picks device/dtype, sizes and allocates the paged KV cache."""

    def __init__(self, config: EngineConfig) -> None:
        t0 = time.perf_counter()
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        hf_config = load_hf_config(config.model)
        self.max_model_len = _max_model_len(config, hf_config)
        # INT8 hook (build/gpt_int8.py, docs/int8.md): quantized linears and an int8 KV cache.
        self.model = load_model(config.model, self.device, self.dtype, self.max_model_len, hf_config,
                                quantization=config.quantization, kv_cache_dtype=config.kv_cache_dtype)
        self.kv_dtype = cache_dtype(config.kv_cache_dtype, self.dtype)
        shape: ModelShape = self.model.shape
        self.vocab_size = shape.vocab_size
        self.eos_token_ids = read_eos_token_ids(config.model, hf_config)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        self.block_size = config.block_size
        self.capacity = CacheCapacity(num_blocks=self._num_kv_blocks(shape), block_size=self.block_size,
                                      bytes_per_token=_kv_bytes_per_token(shape, self.kv_dtype),
                                      max_model_len=self.max_model_len)
        self.kv_cache = torch.zeros(2, shape.num_layers, self.capacity.num_blocks, self.block_size,
                                    shape.num_kv_heads, shape.head_dim, dtype=self.kv_dtype, device=self.device)
        # Triton kernels where they run (an int8 cache too); tests switch this off to compare
        # with the plain path.
        self.use_attention_kernels = self.device.type == "cuda" and kernels.IS_AVAILABLE
        logger.info("loaded %s on %s (%s) in %.1f s; attention: %s", config.model, self.device, self.dtype,
                    time.perf_counter() - t0,
                    "Triton paged kernels" if self.use_attention_kernels else "plain PyTorch")
        logger.info(self.capacity.describe())
        # Decode steps replay CUDA graphs (needs the kernels: the plain path syncs and gathers).
        self.graphs: DecodeGraphs | None = None
        if self.use_attention_kernels and os.environ.get(ENFORCE_EAGER_ENV, "0") != "1":
            self.graphs = DecodeGraphs(self.model, self.kv_cache, config.max_num_seqs, self.block_size,
                                       self.max_model_len, self.device)
            self.graphs.capture()
        self.use_cuda_graphs = self.graphs is not None
        is_cuda = self.device.type == "cuda"
        # Two steps may be in flight (async scheduling launches one before taking the last one's
        # tokens): their host copies alternate between two pinned buffers, each with its event.
        self._token_ids_host = [torch.zeros(config.max_num_seqs, dtype=torch.long, pin_memory=True)
                                for _ in range(2)] if is_cuda else None
        self._logprobs_host = [torch.zeros(config.max_num_seqs, dtype=torch.float32, pin_memory=True)
                               for _ in range(2)] if is_cuda else None
        self._copy_done = [torch.cuda.Event() for _ in range(2)] if is_cuda else None
        self._num_launched = 0

    @torch.inference_mode()
    def execute(self, seqs: list[Sequence], num_new_tokens: list[int]) -> torch.Tensor:
        """Forward the packed new tokens of ``seqs``; fp32 logits [num_sampled, vocab] for the
        sequences whose last token was computed this step, in input order."""
        # A copy: a graph's logits live in its pool and the next replay overwrites them.
        return self.forward(seqs, num_new_tokens).logits.to(torch.float32, copy=True)  # [num_sampled, vocab]

    @torch.inference_mode()
    def launch_greedy(self, seqs: list[Sequence], num_new_tokens: list[int],
                      inputs_from: "InputsFrom | None" = None) -> "PendingTokens":
        """Launch the forward and the copy of its argmax tokens to pinned host memory; returns at
        once on CUDA, so the host can do other work while the GPU runs (the engine's pipeline).
        ``inputs_from``: the input tokens are still on the device (see ``InputsFrom``)."""
        return self._pending(self.forward(seqs, num_new_tokens, inputs_from).token_ids)  # [num_sampled]

    @torch.inference_mode()
    def launch_sampled(self, seqs: list[Sequence], num_new_tokens: list[int], sample,
                       inputs_from: "InputsFrom | None" = None) -> "PendingTokens":
        """``launch_greedy`` for steps whose tokens the sampler picks: the forward, then
        ``sample(logits)`` (``Sampler.sample`` bound to the sampled rows: fp32 logits
        [num_sampled, vocab] -> tokens and log-probs on the device, queued without a host sync),
        then the copies to pinned host memory. Returns at once on CUDA."""
        logits = self.forward(seqs, num_new_tokens, inputs_from).logits  # [num_sampled, vocab] model dtype
        # fp32 as ``execute`` hands it: a copy, so the sampler never reads graph memory that the
        # next replay (queued after it on the same stream) rewrites.
        token_ids, logprobs = sample(logits.to(torch.float32, copy=True))
        return self._pending(token_ids, logprobs)

    def _pending(self, token_ids: torch.Tensor, logprobs: torch.Tensor | None = None) -> "PendingTokens":
        """Start the copy of a step's tokens [num_sampled] (and log-probs) to pinned host memory."""
        num_sampled = token_ids.shape[0]
        if num_sampled == 0 or self._token_ids_host is None or num_sampled > self._token_ids_host[0].shape[0]:
            return PendingTokens(token_ids.tolist(), device=token_ids,   # CPU (or nothing sampled): resolved
                                 logprobs=None if logprobs is None else logprobs.tolist())
        k = self._num_launched % 2
        self._num_launched += 1
        host, event = self._token_ids_host[k][:num_sampled], self._copy_done[k]
        host.copy_(token_ids, non_blocking=True)
        host_logprobs = None
        if logprobs is not None:
            host_logprobs = self._logprobs_host[k][:num_sampled]
            host_logprobs.copy_(logprobs, non_blocking=True)
        event.record()
        return PendingTokens(host=host, event=event, device=token_ids, logprobs=host_logprobs)

    def forward(self, seqs: list[Sequence], num_new_tokens: list[int],
                inputs_from: "InputsFrom | None" = None) -> StepLogits:
        """Logits and greedy tokens of the sampled rows; a decode-only step replays a CUDA graph."""
        if self._is_graphable(seqs, num_new_tokens, inputs_from):
            out = self.graphs.run(seqs, inputs_from)
            return StepLogits(out.logits, out.token_ids)
        batch = self.prepare(seqs, num_new_tokens)
        if inputs_from is not None:   # the leading decode rows: row i is sequence i's one token
            inputs_from.gather_into(batch.input_ids[:len(inputs_from.rows)])
        hidden = self.model(batch.input_ids, batch.positions, self.kv_cache, batch.metadata)  # [num_tokens, hidden]
        logits = self.model.compute_logits(hidden[batch.sample_rows])  # [num_sampled, vocab]
        return StepLogits(logits, logits.argmax(dim=-1))

    def _is_graphable(self, seqs: list[Sequence], num_new_tokens: list[int],
                      inputs_from: "InputsFrom | None" = None) -> bool:
        """A decode step (``is_decode_step``) that a graph holds. (Block-table coverage is checked
        as the rows are staged; the scheduler keeps positions within max_model_len.)"""
        if not (self.use_cuda_graphs and self.use_attention_kernels) or len(seqs) > self.graphs.max_batch:
            return False
        return is_decode_step(seqs, num_new_tokens, inputs_from)

    def prepare(self, seqs: list[Sequence], num_new_tokens: list[int]) -> ModelInput:
        """Pack the step's new tokens. Per-token work is numpy over whole arrays: a prefill step
        packs ~16k tokens, and per-token Python here would idle the GPU for milliseconds."""
        num_seqs = len(seqs)
        if num_seqs != len(num_new_tokens) or not seqs:
            raise ValueError(f"need one token count per sequence, got {num_seqs} seqs and {len(num_new_tokens)} counts")
        counts = np.array(num_new_tokens, dtype=np.int64)                                   # [num_seqs]
        computed = np.fromiter((seq.num_computed_tokens for seq in seqs), np.int64, num_seqs)  # [num_seqs]
        num_tokens = np.fromiter((len(seq.token_ids) for seq in seqs), np.int64, num_seqs)    # [num_seqs]
        num_blocks = np.fromiter((len(seq.block_table) for seq in seqs), np.int64, num_seqs)  # [num_seqs]
        ends = computed + counts                                                            # [num_seqs]
        self._check_schedulable(seqs, counts, ends, num_tokens, num_blocks)
        context_lens = ends.tolist()
        input_ids: list[int] = []
        for seq, start, end in zip(seqs, computed.tolist(), context_lens):
            input_ids += seq.token_ids[start:end]
        cu_seqlens = np.zeros(num_seqs + 1, dtype=np.int64)                                 # [num_seqs + 1]
        np.cumsum(counts, out=cu_seqlens[1:])
        total = int(cu_seqlens[-1])
        # Row r of sequence i sits at position computed[i] + (r - cu_seqlens[i]).
        seq_index = np.repeat(np.arange(num_seqs), counts)                                  # [num_tokens]
        positions = np.arange(total, dtype=np.int64) + (computed - cu_seqlens[:-1])[seq_index]  # [num_tokens]
        sample_rows = cu_seqlens[1:][ends == num_tokens] - 1                                # [num_sampled]
        block_tables = np.full((num_seqs, int(num_blocks.max())), BLOCK_TABLE_PAD, dtype=np.int64)  # [num_seqs, max_blocks]
        for i, seq in enumerate(seqs):
            block_tables[i, :len(seq.block_table)] = seq.block_table
        bs = self.block_size
        slot_mapping = block_tables[seq_index, positions // bs] * bs + positions % bs       # [num_tokens]
        to = dict(device=self.device)
        metadata = AttentionMetadata.build(torch.from_numpy(slot_mapping).to(**to), torch.from_numpy(block_tables).to(**to),
                                           list(num_new_tokens), context_lens, bs,
                                           use_kernels=self.use_attention_kernels)
        input_ids_np = np.fromiter(input_ids, np.int64, total)  # [num_tokens] (3x faster than torch.tensor on a list)
        return ModelInput(input_ids=torch.from_numpy(input_ids_np).to(**to),
                          positions=torch.from_numpy(positions).to(**to),
                          metadata=metadata,
                          sample_rows=torch.from_numpy(sample_rows).to(**to))

    def _check_schedulable(self, seqs: list[Sequence], counts: np.ndarray, ends: np.ndarray,
                           num_tokens: np.ndarray, num_blocks: np.ndarray) -> None:
        """The scheduler's promises, checked over the whole step; the message names the first
        sequence that breaks one."""
        bad = (counts < 1) | (ends > num_tokens) | (ends > self.max_model_len) | (num_blocks * self.block_size < ends)
        if not bad.any():
            return
        i = int(np.argmax(bad))
        seq, n, end = seqs[i], int(counts[i]), int(ends[i])
        if n < 1 or end > seq.num_tokens:
            raise ValueError(f"seq {seq.seq_id}: cannot compute {n} new tokens "
                             f"({seq.num_computed_tokens} computed of {seq.num_tokens})")
        if end > self.max_model_len:
            raise ValueError(f"seq {seq.seq_id}: position {end - 1} is beyond max_model_len={self.max_model_len}")
        raise ValueError(f"seq {seq.seq_id}: block table covers {len(seq.block_table) * self.block_size} "
                         f"positions, step needs {end}")

    def _num_kv_blocks(self, shape: ModelShape) -> int:
        c = self.config
        block_bytes = _kv_bytes_per_token(shape, self.kv_dtype) * c.block_size
        if c.max_tokens_in_paged_kv_cache is not None:
            num_blocks = c.max_tokens_in_paged_kv_cache // c.block_size
        elif c.kv_cache_memory_bytes is not None:
            num_blocks = c.kv_cache_memory_bytes // block_bytes
        elif self.device.type == "cuda":
            num_blocks = self._cuda_kv_budget(shape) // block_bytes
        else:
            blocks_per_seq = -(-self.max_model_len // c.block_size)
            num_blocks = max(min(c.max_num_seqs * blocks_per_seq, CPU_DEFAULT_KV_CACHE_BYTES // block_bytes),
                             blocks_per_seq)
        if num_blocks < 1:
            raise ValueError(f"KV cache budget holds no block of {c.block_size} tokens ({block_bytes} B each)")
        return int(num_blocks)

    def _cuda_kv_budget(self, shape: ModelShape) -> int:
        """``kv_cache_free_gpu_mem_fraction`` of the memory free after the weights (TensorRT-LLM's
        meaning), less an estimate of the largest step's activations and logits."""
        free, _ = torch.cuda.mem_get_info(self.device)
        c = self.config
        element = torch.tensor([], dtype=self.dtype).element_size()
        hidden = self.model.args.hidden_size
        intermediate = getattr(self.model.args, "intermediate_size", 4 * hidden)
        activations = c.max_num_batched_tokens * (6 * hidden + 3 * intermediate) * element
        logits = c.max_num_seqs * shape.vocab_size * 4 * 3  # fp32 logits plus the sampler's copies
        return int(max(free - activations - logits, 0) * c.kv_cache_free_gpu_mem_fraction)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def _max_model_len(config: EngineConfig, hf_config) -> int:
    limit = hf_config.max_position_embeddings
    if config.max_model_len is None:
        return limit
    if config.max_model_len > limit:
        raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's "
                         f"max_position_embeddings={limit}")
    return config.max_model_len


def _kv_bytes_per_token(shape: ModelShape, dtype: torch.dtype) -> int:
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * element
