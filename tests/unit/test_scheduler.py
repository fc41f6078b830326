"""Scheduler: token budgets, chunked prefill, preemption order, admission policies, queue, abort."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trident.engine.scheduler import QueueFullError
from trident.engine.sequence import SequenceStatus

from .engine_fixtures import make_scheduler, make_seq, run_step, scheduled


def run_to_completion(scheduler, max_steps=200):
    outs = []
    while scheduler.has_unfinished():
        outs.append(run_step(scheduler))
        assert len(outs) < max_steps, "scheduler made no progress"
    return outs


def test_budget_is_shared_and_long_prompts_are_chunked():
    sched = make_scheduler(max_num_batched_tokens=16)
    a, b, c = make_seq(10), make_seq(10), make_seq(10)
    for seq in (a, b, c):
        sched.add(seq)
    out = run_step(sched)
    assert scheduled(out) == [(a.seq_id, 10), (b.seq_id, 6)]
    assert out.is_sampled == [True, False]
    assert out.num_batched_tokens == 16
    assert (b.num_computed_tokens, b.num_output_tokens) == (6, 0)
    # Decodes first, then the rest of the chunked prompt, then a newcomer in what is left.
    out = run_step(sched)
    assert scheduled(out) == [(a.seq_id, 1), (b.seq_id, 4), (c.seq_id, 10)]
    assert out.is_sampled == [True, True, True]


def test_a_long_prompt_is_prefilled_over_several_steps():
    sched = make_scheduler(block_size=4, max_num_batched_tokens=16)
    seq = make_seq(40)
    sched.add(seq)
    outs = [run_step(sched) for _ in range(3)]
    assert [scheduled(o) for o in outs] == [[(seq.seq_id, 16)], [(seq.seq_id, 16)], [(seq.seq_id, 8)]]
    assert [o.is_sampled for o in outs] == [[False], [False], [True]]
    assert len(seq.block_table) == 10 and seq.num_output_tokens == 1


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    sched = make_scheduler(max_num_batched_tokens=16, max_model_len=16, enable_chunked_prefill=False)
    a, b, c = make_seq(10), make_seq(10), make_seq(10)
    for seq in (a, b, c):
        sched.add(seq)
    assert scheduled(run_step(sched)) == [(a.seq_id, 10)]
    assert scheduled(run_step(sched)) == [(a.seq_id, 1), (b.seq_id, 10)]
    assert sched.num_waiting == 1


def test_without_chunked_prefill_the_budget_must_hold_max_model_len():
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= max_model_len"):
        make_scheduler(max_num_batched_tokens=16, max_model_len=32, enable_chunked_prefill=False)


def test_max_num_seqs_caps_the_running_set():
    sched = make_scheduler(max_num_seqs=2)
    a, b, c = make_seq(2), make_seq(2), make_seq(2)
    for seq in (a, b, c):
        sched.add(seq)
    assert scheduled(run_step(sched)) == [(a.seq_id, 2), (b.seq_id, 2)]
    assert (sched.num_running, sched.num_waiting) == (2, 1)
    assert a.timings.first_scheduled is not None and c.timings.first_scheduled is None


def test_preemption_by_recompute_then_resume_from_the_prefix_cache():
    sched = make_scheduler(num_blocks=4, block_size=4)
    bm = sched.block_manager
    a, b = make_seq(7, max_tokens=5), make_seq(7, max_tokens=5)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    assert (a.block_table, b.block_table) == ([0, 1], [2, 3])
    run_step(sched)                       # position 7 still fits in each second block
    assert a.num_tokens == b.num_tokens == 9

    out = run_step(sched)                 # a needs a third block: the newest (b) is preempted
    assert out.preempted == [b] and scheduled(out) == [(a.seq_id, 1)]
    assert (b.status, b.num_computed_tokens, b.block_table) == (SequenceStatus.WAITING, 0, [])
    assert b.num_output_tokens == 2 and b.num_preemptions == 1
    assert list(sched.waiting) == [b] and sched.num_preemptions_total == 1
    assert a.block_table == [0, 1, 3]     # b's tail block, evicted from the cache
    assert bm.free_block_ids() == [2]     # b's first block, still cached

    out = run_step(sched)                 # b cannot come back yet: it needs 2 fresh blocks
    assert scheduled(out) == [(a.seq_id, 1)] and out.preempted == []
    out = run_step(sched)
    assert a.is_finished and bm.free_block_ids() == [3, 2, 1, 0]

    out = run_step(sched)                 # b recomputes prompt + outputs, minus its cached block
    assert scheduled(out) == [(b.seq_id, 9 - 4)] and out.is_sampled == [True]
    assert b.num_cached_tokens == 4 and b.block_table == [2, 3, 1]
    assert b.num_output_tokens == 3
    run_to_completion(sched)
    assert b.num_output_tokens == 5 and bm.num_free_blocks == 4


def test_preemption_takes_the_newest_first_and_the_oldest_victim_resumes_first():
    sched = make_scheduler(num_blocks=3, block_size=4)
    a, b, c = make_seq(4), make_seq(4), make_seq(4)
    for seq in (a, b, c):
        sched.add(seq)
    run_step(sched)
    out = run_step(sched)    # everyone needs a second block; only a can get one
    assert out.preempted == [c, b]
    assert scheduled(out) == [(a.seq_id, 1)]
    assert list(sched.waiting) == [b, c]
    assert sched.num_preemptions_total == 2


def test_guaranteed_no_evict_reserves_max_tokens_and_never_preempts():
    sched = make_scheduler(num_blocks=8, block_size=4, batch_scheduler_policy="guaranteed_no_evict")
    a, b, c = (make_seq(4, max_tokens=12) for _ in range(3))   # 16 tokens = 4 blocks each
    for seq in (a, b, c):
        sched.add(seq)
    out = run_step(sched)
    assert scheduled(out) == [(a.seq_id, 4), (b.seq_id, 4)]
    assert sched.block_manager.num_free_blocks == 6     # reserved, not taken
    outs = run_to_completion(sched)
    first_c = next(i for i, o in enumerate(outs) if c in o.seqs)
    assert all(c not in o.seqs for o in outs[:first_c])
    assert a.timings.finished <= c.timings.first_scheduled and b.timings.finished <= c.timings.first_scheduled
    assert sched.num_preemptions_total == 0
    assert [s.num_output_tokens for s in (a, b, c)] == [12, 12, 12]


def test_max_utilization_admits_more_and_preempts_on_the_same_load():
    sched = make_scheduler(num_blocks=8, block_size=4, batch_scheduler_policy="max_utilization")
    seqs = [make_seq(4, max_tokens=12) for _ in range(3)]
    for seq in seqs:
        sched.add(seq)
    assert len(run_step(sched).seqs) == 3
    run_to_completion(sched)
    assert sched.num_preemptions_total > 0
    assert [s.num_output_tokens for s in seqs] == [12, 12, 12]
    assert sched.block_manager.num_free_blocks == 8


def test_queue_is_bounded_by_max_queue_size():
    sched = make_scheduler(max_queue_size=2)
    sched.add(make_seq(3))
    sched.add(make_seq(3))
    with pytest.raises(QueueFullError, match="max_queue_size=2"):
        sched.add(make_seq(3))
    run_step(sched)         # both admitted: the queue has room again
    sched.add(make_seq(3))
    assert sched.num_waiting == 1


def test_abort_frees_blocks_at_once():
    sched = make_scheduler(num_blocks=8, block_size=4)
    running, waiting = make_seq(10), make_seq(3)
    sched.add(running)
    run_step(sched)
    sched.add(waiting)
    assert sched.block_manager.num_free_blocks == 5
    assert sched.abort(running.seq_id) is running
    assert sched.block_manager.num_free_blocks == 8 and running.block_table == []
    assert (running.finish_reason, sched.num_running) == ("abort", 0)
    assert sched.abort(waiting.seq_id) is waiting and sched.num_waiting == 0
    assert sched.abort(waiting.seq_id) is None
    assert not sched.has_unfinished()


def test_abort_between_schedule_and_update():
    sched = make_scheduler(num_blocks=8)
    seq = make_seq(6)
    sched.add(seq)
    out = sched.schedule()
    sched.abort(seq.seq_id)
    sched.update(out)
    assert sched.block_manager.num_free_blocks == 8 and seq.num_computed_tokens == 0


def test_prefix_hit_skips_cached_tokens():
    sched = make_scheduler(block_size=4)
    a = make_seq(list(range(12)))
    sched.add(a)
    run_step(sched)
    b = make_seq(list(range(8)) + [50, 51, 52, 53])
    sched.add(b)
    out = run_step(sched)
    assert scheduled(out) == [(a.seq_id, 1), (b.seq_id, 4)]
    assert b.num_cached_tokens == 8 and b.block_table[:2] == a.block_table[:2]
    bm = sched.block_manager
    assert (bm.prefix_queries, bm.prefix_hits) == (12 + 12, 8)


def test_fully_cached_prompt_recomputes_its_last_block():
    sched = make_scheduler(block_size=4)
    a = make_seq(list(range(8)), max_tokens=1)
    sched.add(a)
    run_step(sched)
    assert a.is_finished and a.block_table == []
    bm = sched.block_manager
    assert bm.num_cached_blocks == 2
    twin = make_seq(list(range(8)))
    sched.add(twin)
    out = run_step(sched)
    assert scheduled(out) == [(twin.seq_id, 4)] and out.is_sampled == [True]
    assert twin.block_table == [0, 2]                    # a's cached block 1 is left untouched
    assert bm.blocks[1].block_hash is not None and bm.blocks[1].ref_count == 0


def test_finished_sequences_leave_and_free_their_blocks():
    sched = make_scheduler(num_blocks=16, block_size=4)
    seqs = [make_seq(5, max_tokens=n) for n in (1, 3)]
    for seq in seqs:
        sched.add(seq)
    run_step(sched)
    assert seqs[0].is_finished and sched.running == [seqs[1]]
    run_to_completion(sched)
    assert sched.block_manager.num_free_blocks == 16 and sched.block_manager.usage == 0.0


def test_the_core_imports_no_torch():
    code = ("import sys, trident.engine, trident.engine.scheduler, trident.engine.block_manager; "
            "assert 'torch' not in sys.modules, 'the engine core imported torch'")
    backends = str(Path(__file__).resolve().parents[2] / "backends")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": backends})
