"""Async scheduling (EngineConfig.async_scheduling): a step of greedy decodes launches the next one
before its tokens reach the host, the next step's input tokens gathered on the device. Whatever the
run-ahead does, the tokens must be Hugging Face's, the placeholders must never leave step(), and a
sequence that a token the host has not seen yet ends (a stop token) must lose its extra row."""
from __future__ import annotations

import random

import pytest

from tests.unit.test_engine import (EOS, MAX_TOKENS, PROMPT_LENS, drain, greedy, hf_greedy, make_engine,  # noqa: F401
                                    make_prompts, corpus, tiny)
from trident.engine.engine import PLACEHOLDER, _keep_places
from trident.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def no_placeholder_between_steps(engine) -> None:
    for seq in list(engine.scheduler.running) + list(engine.scheduler.waiting):
        assert PLACEHOLDER not in seq.token_ids, seq


def drain_checked(engine, on_step=None) -> dict[str, list]:
    """``drain`` that also checks, after every step, that no placeholder is left anywhere."""
    def check(engine, step):
        no_placeholder_between_steps(engine)
        if on_step:
            on_step(engine, step)
    outputs = drain(engine, check)
    for outs in outputs.values():
        assert all(PLACEHOLDER not in out.output_token_ids for out in outs)
    return outputs


def run_all(tiny, prompts, params, async_scheduling: bool):
    """All requests added at once, drained with the placeholder check: (engine, final output by id)."""
    engine = make_engine(tiny, async_scheduling=async_scheduling)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p)
    return engine, {rid: outs[-1] for rid, outs in drain_checked(engine).items()}


def test_decode_steps_launch_ahead_and_match_hf(tiny, corpus):
    prompts = make_prompts(corpus)
    engine = make_engine(tiny)
    for i, (prompt, n) in enumerate(zip(prompts, MAX_TOKENS)):
        engine.add_request(str(i), prompt, greedy(n))
    outputs = drain_checked(engine)
    for i, (prompt, n) in enumerate(zip(prompts, MAX_TOKENS)):
        assert outputs[str(i)][-1].output_token_ids == hf_greedy(tiny, prompt, n), i
    # Most steps after the prefill are decodes of the same sequences: they ran ahead.
    assert engine.num_launched_ahead >= max(MAX_TOKENS) // 2
    assert engine.stats().kv_cache_usage == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_keep_places_moves_only_the_rows_above_the_new_batch(seed):
    """``_keep_places``: a permutation of the rows that go on in which every one of them below the
    new batch size keeps its index, and the others fill the gaps."""
    rng = random.Random(seed)
    for _ in range(300):
        before = rng.randint(0, 40)
        kept = sorted(rng.sample(range(before), rng.randint(0, before)))
        order = _keep_places(kept)
        assert sorted(order) == kept
        assert all(order[row] == row for row in kept if row < len(kept))
    assert _keep_places([0, 2, 3, 5]) == [0, 5, 2, 3]


def test_a_continuation_keeps_each_staying_row_in_its_place(tiny, corpus):
    """When rows end, the rows above fill their places (``_keep_places``) instead of every later
    row shifting down: a sequence that stays keeps its row unless its row is past the new batch,
    so the staged block tables mostly stay as they are. The tokens stay Hugging Face's."""
    prompts = make_prompts(corpus)
    engine = make_engine(tiny)
    launches = []   # (seq ids by row, whether a continuation)
    inner = engine.runner.launch_greedy

    def launch_greedy(seqs, num_new_tokens, inputs_from=None):
        launches.append(([seq.seq_id for seq in seqs], inputs_from is not None))
        return inner(seqs, num_new_tokens, inputs_from)
    engine.runner.launch_greedy = launch_greedy
    for i, (prompt, n) in enumerate(zip(prompts, MAX_TOKENS)):
        engine.add_request(str(i), prompt, greedy(n))
    outputs = drain_checked(engine)
    for i, (prompt, n) in enumerate(zip(prompts, MAX_TOKENS)):
        assert outputs[str(i)][-1].output_token_ids == hf_greedy(tiny, prompt, n), i
    shrinking = 0
    for (before, _), (after, is_continuation) in zip(launches, launches[1:]):
        if not is_continuation or len(after) == len(before):
            continue
        shrinking += 1
        for row, seq_id in enumerate(before):
            if row < len(after) and seq_id in after:
                assert after[row] == seq_id, (before, after)
    assert shrinking > 0   # MAX_TOKENS differ: rows ended while others went on


def test_a_stop_token_the_host_has_not_seen_drops_the_extra_row(tiny, corpus):
    prompts = make_prompts(corpus)
    engine = make_engine(tiny)
    expected = {}
    for i, prompt in enumerate(prompts):
        reference = hf_greedy(tiny, prompt, 24)
        stop_at = 3 + i % 7   # a token in the middle of the output, which no length rule predicts
        stop_token = reference[stop_at]
        first = reference.index(stop_token)
        expected[str(i)] = (reference[:first + 1], "stop")
        engine.add_request(str(i), prompt, greedy(24, stop_token_ids=[stop_token]))
    outputs = drain_checked(engine)
    for rid, (tokens, reason) in expected.items():
        final = outputs[rid][-1]
        assert (final.output_token_ids, final.finish_reason) == (tokens, reason), rid
    assert engine.num_launched_ahead > 0
    bm = engine.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks   # the dropped rows' blocks came back too


def test_async_and_sync_agree_through_preemption_arrivals_aborts_and_sampling(tiny, corpus):
    """A small KV cache (preemption), requests arriving during decode, an abort, and sampled
    requests beside greedy ones: async and sync scheduling give the same tokens."""
    prompts = make_prompts(corpus)
    params = [greedy(n) if i % 3 else SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=n)
              for i, n in enumerate(MAX_TOKENS)]

    def run(async_scheduling: bool):
        engine = make_engine(tiny, max_tokens_in_paged_kv_cache=8 * 40, max_num_batched_tokens=64,
                             async_scheduling=async_scheduling)
        aborted = []

        def feed(engine, step):
            if step == 0:
                for i in range(8):
                    engine.add_request(str(i), prompts[i], params[i])
            elif step == 12:
                for i in range(8, len(prompts)):
                    engine.add_request(str(i), prompts[i], params[i])
            elif step == 20:
                aborted.extend(engine.abort("9"))   # its final output comes from abort(), not step()
        outputs = drain_checked(engine, feed)
        finals = {rid: (outs[-1].output_token_ids, outs[-1].finish_reason) for rid, outs in outputs.items()}
        (last,) = aborted
        finals["9"] = (last.output_token_ids, last.finish_reason)
        return engine, finals

    sync_engine, sync = run(False)
    async_engine, async_ = run(True)
    assert sync_engine.num_launched_ahead == 0 and async_engine.num_launched_ahead > 0
    assert async_engine.stats().num_preemptions_total > 0
    aborted_sync, aborted_async = sync.pop("9"), async_.pop("9")
    assert aborted_async[1] == "abort" and aborted_sync[1] == "abort"
    # An abort lands between steps: what the request got by then may differ by the step in flight.
    full = hf_greedy(tiny, prompts[9], MAX_TOKENS[9]) if params[9].temperature == 0 else None
    if full is not None:
        assert aborted_async[0] == full[:len(aborted_async[0])]
    assert async_ == sync


def test_sampled_decodes_launch_ahead_and_draw_what_sync_draws(tiny, corpus):
    """Temperature sampling (seeded and not, with top-k / top-p / min-p, log-probs asked) runs on the
    device after the forward, so its steps launch ahead like greedy ones: the same tokens and log-probs
    as synchronous scheduling (the noise is keyed on position, so wasted rows shift nothing),
    placeholders never seen."""
    prompts = make_prompts(corpus)
    params = [SamplingParams(temperature=0.9, top_k=40 if i % 2 else 0, top_p=0.9 if i % 3 else 1.0,
                             min_p=0.05 if i % 4 == 1 else 0.0, seed=100 + i if i % 5 else None, max_tokens=n,
                             logprobs=True)
              for i, n in enumerate(MAX_TOKENS)]

    def run(async_scheduling: bool):
        engine, finals = run_all(tiny, prompts, params, async_scheduling)
        return engine, {rid: (out.output_token_ids, out.logprobs) for rid, out in finals.items()}

    sync_engine, sync = run(False)
    async_engine, async_ = run(True)
    assert sync_engine.num_launched_ahead == 0
    assert async_engine.num_launched_ahead >= max(MAX_TOKENS) // 2
    assert {rid: tokens for rid, (tokens, _) in async_.items()} == {rid: tokens for rid, (tokens, _) in sync.items()}
    for rid, (tokens, logprobs) in async_.items():
        assert len(logprobs) == len(tokens) and logprobs == pytest.approx(sync[rid][1], abs=1e-5), rid


def test_min_tokens_is_masked_in_steps_launched_ahead(tiny, corpus):
    """min_tokens masks a row's stop tokens on the device, counting the placeholder as the output it
    stands for: sampled steps with it launch ahead, stop no earlier than min_tokens, and give the
    synchronous run's tokens and finish reasons."""
    prompts = make_prompts(corpus)
    stops = [hf_greedy(tiny, prompt, 4)[1:4] for prompt in prompts]   # tokens the model likes early on
    params = [SamplingParams(temperature=0.05, seed=50 + i, max_tokens=24, min_tokens=6, stop_token_ids=stop)
              for i, stop in enumerate(stops)]

    def run(async_scheduling: bool):
        engine, finals = run_all(tiny, prompts, params, async_scheduling)
        return engine, {rid: (out.output_token_ids, out.finish_reason) for rid, out in finals.items()}

    async_engine, async_ = run(True)
    assert async_engine.num_launched_ahead > 0
    assert async_ == run(False)[1]
    for rid, (tokens, _) in async_.items():   # masked: none of the first min_tokens is a stop token
        assert len(tokens) >= 6 and not set(tokens[:6]) & set(stops[int(rid)]), (rid, tokens)
    assert any(reason == "stop" for _, reason in async_.values())   # the stop tokens did come, after min_tokens


def test_penalties_count_the_in_flight_token_from_the_device(tiny, corpus):
    """Repetition, frequency and presence penalties read every token so far; in a step launched
    ahead the last one is still a placeholder on the host, so the sampler adds its device value:
    steps launch ahead and give the synchronous run's tokens (greedy with a repetition penalty,
    seeded sampling with frequency / presence penalties)."""
    prompts = make_prompts(corpus)[:6]
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.5, max_tokens=16) if i % 2 else
              SamplingParams(temperature=0.8, seed=i, frequency_penalty=0.9, presence_penalty=0.6, max_tokens=16)
              for i in range(len(prompts))]

    def run(async_scheduling: bool):
        engine, finals = run_all(tiny, prompts, params, async_scheduling)
        return engine, {rid: out.output_token_ids for rid, out in finals.items()}

    async_engine, async_ = run(True)
    assert async_engine.num_launched_ahead > 0
    assert async_ == run(False)[1]


def test_arrivals_are_admitted_into_steps_launched_ahead(tiny, corpus):
    """Requests arriving one per step while others decode (online serving) are admitted into the
    step launched ahead, behind the decodes (their prefill in the same forward, decode rows' inputs
    still gathered on the device); the tokens stay the synchronous run's, greedy and seeded."""
    prompts = make_prompts(corpus)
    params = [greedy(n) if i % 2 else SamplingParams(temperature=0.7, seed=i, max_tokens=n, repetition_penalty=1.2)
              for i, n in enumerate(MAX_TOKENS)]

    def run(async_scheduling: bool):
        engine = make_engine(tiny, async_scheduling=async_scheduling, max_num_batched_tokens=96)
        admitted_ahead = []
        inner = engine.scheduler.admit

        def admit(out):
            before = len(out.seqs)
            inner(out)
            admitted_ahead.append(len(out.seqs) - before)
        engine.scheduler.admit = admit

        def feed(engine, step):
            if step < len(prompts):   # one arrival per step
                engine.add_request(str(step), prompts[step], params[step])
        outputs = drain_checked(engine, feed)
        return sum(admitted_ahead), {rid: outs[-1].output_token_ids for rid, outs in outputs.items()}

    admitted_async, async_ = run(True)
    admitted_sync, sync = run(False)
    assert admitted_async > 0 and admitted_sync == 0
    assert async_ == sync
    for i, (prompt, n) in enumerate(zip(prompts, MAX_TOKENS)):
        if i % 2:
            assert async_[str(i)] == hf_greedy(tiny, prompt, n), i
