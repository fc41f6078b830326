"""Decode steps under CUDA graphs: one captured graph per batch bucket, static buffers in one place.

A decode step of the engine is the same kernels every time at a given batch size, and eager
launches from Python cost more host time than the GPU spends on a small model's step (see the
kernels README). So decode batches run as replays of graphs captured at start for buckets
1, 2, 4, 8, then every 16 up to ``max_num_seqs``; a step of ``n`` sequences replays the smallest
bucket ``>= n``, its extra rows padded (slot -1: nothing stored; context 0: zero attention).

The graph's inputs live in ``DecodeBuffers``: device tensors the graphs read, fed each step from
persistent pinned host mirrors by one asynchronous copy each. The graph ends with the LM head and
the greedy argmax, so a greedy step brings back only ``n`` token ids (the step's one host sync).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from trident.engine.attention import AttentionMetadata
from trident.engine.sequence import Sequence

logger = logging.getLogger(__name__)

PAD_SLOT = -1   # the KV store kernel skips negative slots


def decode_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then steps of 16, the last one covering ``max_num_seqs``."""
    small = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    return small + list(range(16, max_num_seqs, 16)) + [max_num_seqs]


@dataclass
class DecodeOutput:
    """A replay's results for the ``num_seqs`` real rows (views into graph memory: read before the
    next replay)."""
    logits: torch.Tensor      # [num_seqs, vocab] model dtype
    token_ids: torch.Tensor   # [num_seqs] int64 greedy argmax, on the device


class DecodeBuffers:
    """The static inputs every decode graph reads, and their pinned host mirrors."""

    def __init__(self, max_num_seqs: int, max_blocks_per_seq: int, device: torch.device):
        is_cuda = torch.device(device).type == "cuda"   # (pinned only where there is CUDA: CPU tests)

        def pair(*shape: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            return (torch.zeros(*shape, dtype=dtype, device=device),
                    torch.zeros(*shape, dtype=dtype, pin_memory=is_cuda))

        self.input_ids, self.input_ids_host = pair(max_num_seqs, dtype=torch.long)       # [max_num_seqs]
        self.positions, self.positions_host = pair(max_num_seqs, dtype=torch.long)       # [max_num_seqs]
        self.slot_mapping, self.slot_mapping_host = pair(max_num_seqs, dtype=torch.long)  # [max_num_seqs]
        self.context_lens, self.context_lens_host = pair(max_num_seqs, dtype=torch.int32)  # [max_num_seqs]
        self.block_tables, self.block_tables_host = pair(max_num_seqs, max_blocks_per_seq,
                                                         dtype=torch.int32)  # [max_num_seqs, max_blocks]
        # Async scheduling: row i's input token is the previous step's token at gather_rows[i].
        self.gather_rows, self.gather_rows_host = pair(max_num_seqs, dtype=torch.long)   # [max_num_seqs]
        self.cu_seqlens_q = torch.arange(max_num_seqs + 1, dtype=torch.int32, device=device)  # decode: one each
        # The pinned mirrors are rewritten while the previous step's copies may still be queued
        # behind the GPU's work (async scheduling launches before it resolves): staging waits for
        # the event recorded after those copies (in practice long done; a few microseconds).
        self._uploaded = torch.cuda.Event() if is_cuda else None   # (never recorded: returns at once)
        # numpy views of the pinned mirrors: filling them costs no torch dispatch per element
        self.np_input_ids = self.input_ids_host.numpy()
        self.np_positions = self.positions_host.numpy()
        self.np_slots = self.slot_mapping_host.numpy()
        self.np_context_lens = self.context_lens_host.numpy()
        self.np_block_tables = self.block_tables_host.numpy()
        self.np_gather_rows = self.gather_rows_host.numpy()
        # Persistent rows (vLLM's persistent batch): which block-table list each row of the host
        # mirror holds and how much of it is written. A sequence's table only grows in place
        # while it runs (a preemption gives it a new list), so a row that keeps its sequence needs
        # at most its new tail written, and usually nothing.
        self._row_tables: list[list[int] | None] = [None] * max_num_seqs
        self._row_num_blocks = [0] * max_num_seqs
        self._rows = np.arange(max_num_seqs)

    def stage(self, seqs: list[Sequence], bucket: int, block_size: int,
              gather_rows: list[int] | None = None) -> None:
        """Write the decode rows of ``seqs`` (and padding up to ``bucket``) into the pinned mirrors.
        ``gather_rows``: the input tokens are still on the device (async scheduling); row i takes
        the previous step's token ``gather_rows[i]`` instead of ``seqs[i]``'s last token."""
        if self._uploaded is not None:
            self._uploaded.synchronize()
        n = len(seqs)
        tables, row_tables, row_num_blocks = self.np_block_tables, self._row_tables, self._row_num_blocks
        for i, seq in enumerate(seqs):
            table = seq.block_table
            num_blocks = len(table)
            if row_tables[i] is not table:
                tables[i, :num_blocks] = table   # entries past the context are never read: no clearing
                row_tables[i] = table
            elif row_num_blocks[i] != num_blocks:
                tables[i, row_num_blocks[i]:num_blocks] = table[row_num_blocks[i]:]
            row_num_blocks[i] = num_blocks
        positions = self.np_positions[:n]  # [n]
        positions[:] = [seq.num_computed_tokens for seq in seqs]
        if gather_rows is None:
            self.np_input_ids[:n] = [seq.token_ids[-1] for seq in seqs]   # a decode computes its last token
        else:
            self.np_gather_rows[:n] = gather_rows
        # slot = block_table[pos // block_size] * block_size + pos % block_size, over the staged rows
        self.np_slots[:n] = tables[self._rows[:n], positions // block_size] * block_size + positions % block_size
        self.np_context_lens[:n] = positions + 1
        self.np_input_ids[n:bucket] = 0
        self.np_positions[n:bucket] = 0
        self.np_slots[n:bucket] = PAD_SLOT
        self.np_context_lens[n:bucket] = 0

    def upload(self, bucket: int) -> None:
        """Asynchronous copies of the staged rows into the graphs' device buffers."""
        for device_buf, host_buf in ((self.input_ids, self.input_ids_host), (self.positions, self.positions_host),
                                     (self.gather_rows, self.gather_rows_host),
                                     (self.slot_mapping, self.slot_mapping_host),
                                     (self.context_lens, self.context_lens_host),
                                     (self.block_tables, self.block_tables_host)):
            device_buf[:bucket].copy_(host_buf[:bucket], non_blocking=True)
        if self._uploaded is not None:
            self._uploaded.record()

    def gather_inputs(self, tokens: torch.Tensor, n: int) -> None:
        """Async scheduling: input ids of the ``n`` staged rows from the previous step's tokens
        (``tokens``, on the device) at the staged ``gather_rows``; one kernel, stream-ordered
        after the previous step wrote them."""
        torch.index_select(tokens, 0, self.gather_rows[:n], out=self.input_ids[:n])

    def metadata(self, bucket: int, block_size: int, max_context_len: int) -> AttentionMetadata:
        """The attention layout of a bucket: views of the static buffers, a fixed grid."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bucket], cu_seqlens_q=self.cu_seqlens_q[:bucket + 1],
            context_lens=self.context_lens[:bucket], block_tables=self.block_tables[:bucket],
            block_size=block_size, decode=None, prefills=[], max_query_len=1,
            max_context_len=max_context_len, use_kernels=True)


class DecodeGraphs:
    """Captured decode graphs, one per bucket, sharing one memory pool and one set of buffers."""

    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, max_num_seqs: int, block_size: int,
                 max_model_len: int, device: torch.device):
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        # A fixed bound keeps the decode kernel's split count, hence its grid, the same each replay.
        self.max_context_len = max_model_len
        self.buckets = decode_buckets(max_num_seqs)
        self.buffers = DecodeBuffers(self.buckets[-1], -(-max_model_len // block_size), device)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.num_replays = 0

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, num_seqs: int) -> int | None:
        for bucket in self.buckets:
            if bucket >= num_seqs:
                return bucket
        return None

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so the smaller ones reuse its pool memory."""
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        self._pad_all()
        for bucket in reversed(self.buckets):
            self._forward(bucket)   # warm-up: compiles kernels, builds lazy tables outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._outputs[bucket] = self._forward(bucket)
            self._graphs[bucket] = graph
        torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch %s) in %.1f s", len(self.buckets),
                    ",".join(map(str, self.buckets)), time.perf_counter() - t0)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], inputs_from=None) -> DecodeOutput:
        """Replay the smallest bucket that holds ``seqs`` (each computing its one last token);
        ``inputs_from`` (``model_runner.InputsFrom``): their input tokens are still on the device."""
        n = len(seqs)
        bucket = self.bucket_for(n)
        if bucket is None:
            raise ValueError(f"{n} sequences exceed the largest decode graph ({self.max_batch})")
        self.buffers.stage(seqs, bucket, self.block_size, None if inputs_from is None else inputs_from.rows)
        self.buffers.upload(bucket)
        if inputs_from is not None:
            # Stream order puts this after the previous replay wrote its tokens and before this
            # replay overwrites them (the same bucket's static output, possibly).
            self.buffers.gather_inputs(inputs_from.tokens, n)
        self._graphs[bucket].replay()
        self.num_replays += 1
        logits, token_ids = self._outputs[bucket]
        return DecodeOutput(logits=logits[:n], token_ids=token_ids[:n])

    def _forward(self, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.buffers
        metadata = b.metadata(bucket, self.block_size, self.max_context_len)
        hidden = self.model(b.input_ids[:bucket], b.positions[:bucket], self.kv_cache, metadata)  # [bucket, hidden]
        logits = self.model.compute_logits(hidden)  # [bucket, vocab]
        return logits, logits.argmax(dim=-1)

    def _pad_all(self) -> None:
        """Capture-time inputs: every row padding, so warm-up and capture write no KV."""
        b = self.buffers
        b.slot_mapping.fill_(PAD_SLOT)
        b.context_lens.zero_()
        b.input_ids.zero_()
        b.positions.zero_()
        b.block_tables.zero_()

