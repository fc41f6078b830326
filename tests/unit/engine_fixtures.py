"""Factories for the pure-Python engine core tests (no torch, no model)."""
from __future__ import annotations

import itertools

from trident.engine.block_manager import BlockManager
from trident.engine.config import EngineConfig
from trident.engine.sampling_params import SamplingParams
from trident.engine.scheduler import Scheduler, SchedulerOutput
from trident.engine.sequence import Sequence

_ids = itertools.count(1000)


def make_seq(prompt: int | list[int], max_tokens: int = 16, seq_id: int | None = None) -> Sequence:
    """A sequence with `prompt` tokens (a list, or a length: distinct ids per sequence)."""
    seq_id = next(_ids) if seq_id is None else seq_id
    token_ids = prompt if isinstance(prompt, list) else [seq_id * 1000 + i for i in range(prompt)]
    return Sequence(seq_id, token_ids, SamplingParams(max_tokens=max_tokens))


def make_block_manager(num_blocks: int = 8, block_size: int = 4, **kwargs) -> BlockManager:
    return BlockManager(num_blocks, block_size, **kwargs)


def make_scheduler(num_blocks: int = 64, block_size: int = 4, max_model_len: int = 256,
                   **config) -> Scheduler:
    config.setdefault("max_num_batched_tokens", 256)
    return Scheduler(EngineConfig(model="unused", block_size=block_size, **config), num_blocks,
                     max_model_len)


def compute(bm: BlockManager, seq: Sequence, num_new_tokens: int) -> None:
    """What the scheduler does after a forward: the new tokens now have KV."""
    before = seq.num_computed_tokens
    seq.num_computed_tokens += num_new_tokens
    bm.cache_blocks(seq, before)


def run_step(scheduler: Scheduler) -> SchedulerOutput:
    """One engine step without a model: sampled sequences get a token; max_tokens finishes them."""
    out = scheduler.schedule()
    for seq, is_sampled in zip(out.seqs, out.is_sampled):
        if is_sampled:
            seq.append_token(7)
            if seq.num_output_tokens >= seq.sampling_params.max_tokens:
                seq.finish("length")
    scheduler.update(out)
    return out


def scheduled(out: SchedulerOutput) -> list[tuple[int, int]]:
    """(seq_id, num_new_tokens) pairs, for exact asserts."""
    return [(seq.seq_id, n) for seq, n in zip(out.seqs, out.num_new_tokens)]
