"""Continuous (in-flight) batching: which sequences run this step, and how many new tokens each.

There are no prefill/decode phases (vLLM v1): every sequence has ``num_computed_tokens`` catching up
with ``num_tokens`` under one token budget per step. Decode is "1 new token", prefill is "the rest of
the prompt", chunked prefill is "as much of the prompt as the budget allows", and a prefix-cache hit
or a recompute after preemption are the same operation starting from a different point.

Running sequences are served first, in admission order; since a sequence only ever gets a partial
chunk when the budget runs out, partial prefills sit at the tail of ``running`` and decodes come
first. Waiting sequences are admitted afterwards, FCFS, unless someone was preempted this step.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .block_manager import BlockManager, PrefixHit
from .config import EngineConfig
from .sequence import Sequence, SequenceStatus


class QueueFullError(RuntimeError):
    """The waiting queue is at ``max_queue_size``: the caller should retry later (HTTP 503)."""


@dataclass
class SchedulerOutput:
    """One step's work.

    ``seqs[i]`` computes ``token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens[i]]``;
    its block table already covers those positions. ``is_sampled[i]`` is true when that reaches the
    end of the sequence, i.e. the forward's last logits for it are sampled.
    """
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    is_sampled: list[bool] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)
        self.is_sampled.append(seq.num_computed_tokens + num_new_tokens == seq.num_tokens)


class Scheduler:
    """Admits, schedules, preempts and retires sequences over one ``BlockManager``.

    Policies (``batch_scheduler_policy``):
    - ``max_utilization``: admit whatever fits now; when a running sequence needs a block and none
      is free, preempt the newest running sequence (free its blocks, recompute it later).
    - ``guaranteed_no_evict``: admit only if blocks for the whole request (prompt + max_tokens) are
      free beyond what running sequences have reserved; never preempts.
    """

    def __init__(self, config: EngineConfig, num_blocks: int, max_model_len: int):
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < max_model_len:
            raise ValueError("without chunked prefill, max_num_batched_tokens must be >= max_model_len "
                             f"({config.max_num_batched_tokens} < {max_model_len})")
        self.config = config
        self.max_model_len = max_model_len
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions_total = 0
        self._seqs: dict[int, Sequence] = {}     # every unfinished sequence, by id

    # -- queue -------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; raises ``QueueFullError`` when ``max_queue_size`` are waiting."""
        limit = self.config.max_queue_size
        if limit and len(self.waiting) >= limit:
            raise QueueFullError(f"request queue is full ({limit} waiting, max_queue_size={limit}); "
                                 "retry later")
        if seq.seq_id in self._seqs:
            raise ValueError(f"sequence id {seq.seq_id} is already in the scheduler")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._seqs[seq.seq_id] = seq

    def abort(self, seq_id: int) -> Sequence | None:
        """Finish a sequence with reason "abort" and return its blocks to the pool at once."""
        return self.finish(seq_id, "abort")

    def finish(self, seq_id: int, reason: str, stop_reason: str | int | None = None) -> Sequence | None:
        """Finish a sequence outside ``update`` (an abort, or a stop string found after the next
        step was launched) and return its blocks at once. A step still in flight may write its
        last KV slot: that write is ordered before any later step that reuses the block, and
        ``update`` skips the sequence."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return None
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.remove(seq)
        self.block_manager.free(seq)
        seq.finish(reason, stop_reason)
        return seq

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    def get(self, seq_id: int) -> Sequence | None:
        return self._seqs.get(seq_id)

    # -- one step ----------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted:   # freed blocks go to the preempted first, not to newcomers
            self._schedule_waiting(out, budget)
        return out

    def update(self, out: SchedulerOutput) -> None:
        """After the forward: advance ``num_computed_tokens``, cache full blocks, retire finished.

        The engine appends sampled tokens and marks finished sequences (``seq.finish``) before this.
        """
        self.advance(out)
        self.retire(out)

    def advance(self, out: SchedulerOutput) -> None:
        """Count the step's tokens as computed and cache the blocks that became full. Under async
        scheduling this runs before the step's sampled tokens are known (``schedule_continuation``)."""
        live = self._seqs
        block_manager = self.block_manager
        caching, block_size = block_manager.enable_prefix_caching, block_manager.block_size
        for seq, num_new_tokens in zip(out.seqs, out.num_new_tokens):
            if seq.seq_id not in live:
                continue    # aborted (or stopped) after it was scheduled: its blocks are already free
            num_computed_before = seq.num_computed_tokens
            seq.num_computed_tokens = num_computed = num_computed_before + num_new_tokens
            # Only a step that fills a block has one to cache (one decode step in block_size).
            if caching and num_computed // block_size != num_computed_before // block_size:
                block_manager.cache_blocks(seq, num_computed_before)

    def retire(self, out: SchedulerOutput) -> None:
        """Free the step's sequences that its tokens finished (the engine marked them)."""
        live, finished_status = self._seqs, SequenceStatus.FINISHED
        finished = [seq for seq in out.seqs if seq.status is finished_status and seq.seq_id in live]
        if finished:
            self.running = [seq for seq in self.running if seq.status is not finished_status]
            for seq in finished:
                self.block_manager.free(seq)
                del live[seq.seq_id]

    def schedule_continuation(self, seqs: list[Sequence], new_block_seqs: list[Sequence]) -> SchedulerOutput:
        """Async scheduling: the next step of ``seqs``, every one a running decode whose last token
        (appended as a placeholder; ``advance`` already ran for the step that samples it) is still on
        the device. One new token each, no preemption (``admit`` may add waiting sequences after).
        ``new_block_seqs``: those of ``seqs`` whose next token starts a new block; the caller checked
        that they fit in the free blocks."""
        allocate = self.block_manager.allocate
        for seq in new_block_seqs:
            allocate(seq, 1)
        n = len(seqs)
        return SchedulerOutput(seqs=list(seqs), num_new_tokens=[1] * n, is_sampled=[True] * n)

    def admit(self, out: SchedulerOutput) -> None:
        """Async scheduling: admit waiting sequences into a continuation (``schedule_continuation``)
        with the token budget it leaves, FCFS and only into free blocks: no preemption, as
        ``schedule`` admits after its running sequences."""
        if self.waiting:
            self._schedule_waiting(out, self.config.max_num_batched_tokens - out.num_batched_tokens)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        # Runs for every running sequence every step: attribute reads only on the common path (a
        # decode whose block table already covers its next position).
        block_size = self.block_manager.block_size
        running = self.running
        seqs, counts, is_sampled = out.seqs, out.num_new_tokens, out.is_sampled
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            num_tokens, num_computed = len(seq.token_ids), seq.num_computed_tokens
            num_new_tokens = min(num_tokens - num_computed, budget)
            end = num_computed + num_new_tokens
            if end > len(seq.block_table) * block_size and not self._allocate_or_preempt(seq, num_new_tokens, out):
                break   # `seq` was the newest and preempted itself
            seqs.append(seq)
            counts.append(num_new_tokens)
            is_sampled.append(end == num_tokens)
            budget -= num_new_tokens
            i += 1
        return budget

    def _allocate_or_preempt(self, seq: Sequence, num_new_tokens: int, out: SchedulerOutput) -> bool:
        while not self.block_manager.can_allocate(seq, num_new_tokens):
            if self.config.batch_scheduler_policy == "guaranteed_no_evict":
                raise RuntimeError(f"{seq} exceeded its block reservation")
            victim = self.running.pop()     # newest first: it has the least work to redo
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        self.block_manager.allocate(seq, num_new_tokens)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(seq)    # resumes before anything that arrived after it

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            prefix = self.block_manager.lookup_prefix(seq)
            num_new_tokens = seq.num_tokens - prefix.num_tokens
            if num_new_tokens > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new_tokens = budget
            if not self._can_admit(seq, num_new_tokens, prefix):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq, num_new_tokens, prefix)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._add(out, seq, num_new_tokens)
            budget -= num_new_tokens

    def _can_admit(self, seq: Sequence, num_new_tokens: int, prefix: PrefixHit) -> bool:
        if self.config.batch_scheduler_policy == "guaranteed_no_evict":
            num_whole_request = self.max_total_tokens(seq) - prefix.num_tokens
            return self.block_manager.can_allocate(seq, num_whole_request, prefix,
                                                   num_reserved=self._num_reserved_blocks())
        return self.block_manager.can_allocate(seq, num_new_tokens, prefix)

    def _num_reserved_blocks(self) -> int:
        """Blocks promised to running sequences under guaranteed_no_evict but not yet taken."""
        blocks_for = self.block_manager.blocks_for
        return sum(max(0, blocks_for(self.max_total_tokens(seq)) - len(seq.block_table))
                   for seq in self.running)

    def max_total_tokens(self, seq: Sequence) -> int:
        """The most tokens ``seq`` can ever hold (its KV need when it runs to ``max_tokens``)."""
        return min(seq.num_prompt_tokens + seq.sampling_params.max_tokens, self.max_model_len)

    @staticmethod
    def _add(out: SchedulerOutput, seq: Sequence, num_new_tokens: int) -> None:
        if seq.timings.first_scheduled is None:
            seq.timings.first_scheduled = time.monotonic()
        out.add(seq, num_new_tokens)
