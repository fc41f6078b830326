"""Sampler: filters and penalties against Hugging Face's logits processors, distributions with
fixed seeds and enough draws, per-request seeds across batch compositions, draws keyed on position."""
from __future__ import annotations

import collections

import pytest
import torch
from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

from trident.engine.sampler import (Sampler, apply_frequency_presence_penalties, apply_repetition_penalty,
                                    apply_top_k_top_p_min_p, draw)
from trident.engine.sampling_params import SamplingParams
from trident.engine.sequence import Sequence

VOCAB = 64


def make_seq(seq_id: int = 0, prompt: list[int] | None = None, outputs: list[int] = (), **params) -> Sequence:
    seq = Sequence(seq_id, list(prompt or [1, 2, 3]), SamplingParams(**params))
    for token in outputs:
        seq.append_token(token)
    return seq


def random_logits(rows: int, seed: int, vocab: int = VOCAB, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def hf_warp(logits_row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """HF's warper chain in generate's order: temperature, top-k, top-p, min-p."""
    scores = logits_row[None].clone()
    warpers = [TemperatureLogitsWarper(p.temperature)]
    if p.top_k > 0:
        warpers.append(TopKLogitsWarper(p.top_k))
    if p.top_p < 1.0:
        warpers.append(TopPLogitsWarper(p.top_p))
    if p.min_p > 0.0:
        warpers.append(MinPLogitsWarper(p.min_p))
    for warper in warpers:
        scores = warper(None, scores)
    return scores[0]


FILTERS = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.5, top_k=20, top_p=0.9, min_p=0.05),
    dict(temperature=2.0, top_k=1),
    dict(temperature=1.0, top_p=0.05),
]


def test_filters_match_hf_warpers_row_by_row_in_one_batch():
    params = [SamplingParams(**f) for f in FILTERS]
    logits = random_logits(len(params), seed=0)
    temperature = torch.tensor([p.temperature for p in params])[:, None]
    ours = apply_top_k_top_p_min_p(logits / temperature, params)
    for row, original, p in zip(ours, logits, params):
        torch.testing.assert_close(row, hf_warp(original, p))


def test_samples_never_leave_the_filtered_set_and_cover_it():
    sampler = Sampler(seed=0)
    logits = random_logits(1, seed=1, scale=1.0)
    for f in FILTERS[1:]:
        allowed = torch.isfinite(hf_warp(logits[0], SamplingParams(**f))).nonzero().flatten().tolist()
        seqs = [make_seq(i, **f) for i in range(3000)]
        drawn = collections.Counter(r.token_id for r in sampler(logits.expand(3000, -1), seqs))
        assert set(drawn) == set(allowed), f


def test_sampling_frequencies_follow_the_processed_distribution():
    """20,000 draws of a 6-token distribution: each frequency within 4 standard errors."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    params = dict(temperature=0.7, top_p=0.95)
    expected = hf_warp(logits[0], SamplingParams(**params)).softmax(-1)
    n = 20_000
    results = Sampler(seed=1)(logits.expand(n, -1), [make_seq(i, **params) for i in range(n)])
    counts = torch.bincount(torch.tensor([r.token_id for r in results]), minlength=6).double()
    standard_error = (expected * (1 - expected) / n).sqrt()
    assert ((counts / n - expected).abs() <= 4 * standard_error + 1e-12).all(), (counts / n, expected)
    assert counts[expected == 0].sum() == 0


def test_repetition_penalty_matches_hf_over_prompt_and_output():
    logits = random_logits(2, seed=2)
    token_ids = [[1, 5, 5, 9, 30], [2, 3, 63]]
    penalties = [1.3, 0.7]
    ours = apply_repetition_penalty(logits, token_ids, penalties)
    for row, ids, penalty, original in zip(ours, token_ids, penalties, logits):
        reference = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ids]), original[None].clone())[0]
        torch.testing.assert_close(row, reference, atol=0, rtol=0)


def test_sampler_penalises_prompt_and_output_tokens_for_repetition():
    logits = random_logits(1, seed=3)
    seq = make_seq(prompt=[4, 8], outputs=[15], temperature=0.0, repetition_penalty=1.5, logprobs=True)
    reference = RepetitionPenaltyLogitsProcessor(1.5)(torch.tensor([[4, 8, 15]]), logits.clone())[0]
    (result,) = Sampler()(logits, [seq])
    assert result.token_id == int(reference.argmax())
    assert result.logprob == pytest.approx(float(reference.log_softmax(-1)[result.token_id]), abs=1e-6)


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = random_logits(1, seed=4)
    prompt, outputs = [7, 7, 8], [3, 3, 3, 7, 10]
    ours = apply_frequency_presence_penalties(logits, [outputs], frequency=[0.5], presence=[0.25])[0]
    expected = logits[0].clone()
    for token, count in collections.Counter(outputs).items():
        expected[token] -= 0.5 * count + 0.25
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    seq = make_seq(prompt=prompt, outputs=outputs, temperature=0.0, frequency_penalty=0.5, presence_penalty=0.25,
                   logprobs=True)
    (result,) = Sampler()(logits, [seq])
    assert result.token_id == int(expected.argmax())
    assert result.logprob == pytest.approx(float(expected.log_softmax(-1)[result.token_id]), abs=1e-6)


def test_greedy_is_argmax_with_raw_logprobs():
    logits = random_logits(4, seed=5)
    seqs = [make_seq(i, temperature=0.0, logprobs=i % 2 == 0) for i in range(4)]
    results = Sampler()(logits, seqs)
    assert [r.token_id for r in results] == logits.argmax(-1).tolist()
    for r, row, seq in zip(results, logits, seqs):
        if seq.sampling_params.logprobs:
            assert r.logprob == pytest.approx(float(row.log_softmax(-1)[r.token_id]), abs=1e-6)
        else:
            assert r.logprob is None


def test_greedy_rows_beside_sampled_ones_keep_raw_logprobs():
    # A batch with a sampled row takes the sampling path; a greedy row there still reports the
    # log-prob of the raw distribution, its top-k notwithstanding.
    logits = random_logits(2, seed=9)
    seqs = [make_seq(0, temperature=0.0, top_k=3, logprobs=True), make_seq(1, temperature=0.8, seed=1, logprobs=True)]
    greedy, _ = Sampler()(logits, seqs)
    assert greedy.token_id == int(logits[0].argmax())
    assert greedy.logprob == pytest.approx(float(logits[0].log_softmax(-1).max()), abs=1e-6)


def test_logprobs_of_sampled_rows_come_from_the_processed_distribution():
    logits = random_logits(1, seed=6)
    params = dict(temperature=0.5, top_k=3, logprobs=True)
    processed = hf_warp(logits[0], SamplingParams(**params)).log_softmax(-1)
    results = Sampler(seed=2)(logits.expand(50, -1), [make_seq(i, **params) for i in range(50)])
    for r in results:
        assert r.logprob == pytest.approx(float(processed[r.token_id]), abs=1e-5)


def run_steps(sampler: Sampler, seqs: list[Sequence], logits_per_step: list[torch.Tensor]) -> list[list[int]]:
    for logits in logits_per_step:
        for seq, result in zip(seqs, sampler(logits, seqs)):
            seq.append_token(result.token_id)
    return [seq.output_token_ids for seq in seqs]


def test_seeded_requests_repeat_whatever_else_is_in_the_batch():
    steps = 12
    target_logits = [random_logits(1, seed=100 + s, scale=1.0) for s in range(steps)]
    alone = run_steps(Sampler(seed=0), [make_seq(0, seed=7)], target_logits)[0]

    def batched(position: int, engine_seed: int, seq_id: int) -> list[int]:
        others = [make_seq(10 + i, seed=(None if i % 2 else i), temperature=0.0 if i == 3 else 1.0) for i in range(5)]
        seqs = others[:position] + [make_seq(seq_id, seed=7)] + others[position:]
        logits = [torch.cat([random_logits(position, seed=s), t, random_logits(5 - position, seed=50 + s)])
                  for s, t in enumerate(target_logits)]
        return run_steps(Sampler(seed=engine_seed), seqs, logits)[position]

    assert batched(0, engine_seed=1, seq_id=3) == alone
    assert batched(4, engine_seed=2, seq_id=99) == alone
    assert run_steps(Sampler(), [make_seq(0, seed=8)], target_logits)[0] != alone


def test_unseeded_rows_follow_the_engine_seed():
    logits = [random_logits(3, seed=200 + s, scale=1.0) for s in range(8)]
    outputs = [run_steps(Sampler(seed=seed), [make_seq(i) for i in range(3)], logits) for seed in (5, 5, 6)]
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]


def test_a_draw_depends_on_seed_and_position_only():
    # No state between calls: at one position a sequence draws the same token however often it is asked
    # (a step launched ahead of its predecessor's tokens, a recompute after preemption); the next
    # position draws anew. Unseeded rows key on the engine seed and their sequence id.
    logits = random_logits(1, seed=7, scale=0.5)
    seq = make_seq(0, seed=11)
    assert len({Sampler(seed=s)(logits, [seq])[0].token_id for s in range(5)}) == 1
    drawn = []
    for _ in range(20):
        drawn.append(Sampler()(logits, [seq])[0].token_id)
        seq.append_token(drawn[-1])
    assert len(set(drawn)) > 5   # 20 draws from ~64 near-equal tokens
    unseeded = [[Sampler(seed=3)(logits, [make_seq(seq_id)])[0].token_id for _ in range(2)] for seq_id in range(12)]
    assert all(a == b for a, b in unseeded) and len({a for a, _ in unseeded}) > 3


def test_draw_falls_back_to_the_argmax_when_out_of_rounds():
    logits = random_logits(64, seed=8, scale=1.0)
    params = torch.tensor([[1.0, 0.3, 0.0]] * 64)   # a nucleus of a few tokens: most first draws fail
    keys = torch.tensor([[1, 0, 0, position] for position in range(64)])
    assert draw(logits, params, keys, max_rounds=0).tolist() == logits.argmax(-1).tolist()
    some = draw(logits, params, keys)
    allowed = [torch.isfinite(hf_warp(row, SamplingParams(top_p=0.3))) for row in logits]
    assert all(allowed[i][t] for i, t in enumerate(some.tolist()))
    assert (some != logits.argmax(-1)).any()   # the nucleus is not always the argmax alone


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached():
    logits = torch.zeros(1, VOCAB)
    logits[0, [0, 1, 2]] = torch.tensor([9.0, 8.0, 7.0])  # EOS 0 is best, stop id 1 second
    sampler = Sampler(eos_token_ids=[0])
    early = make_seq(0, temperature=0.0, min_tokens=2, max_tokens=4, stop_token_ids=[1], outputs=[5])
    done = make_seq(1, temperature=0.0, min_tokens=1, max_tokens=4, stop_token_ids=[1], outputs=[5])
    ignoring = make_seq(2, temperature=0.0, min_tokens=2, max_tokens=4, ignore_eos=True, outputs=[5])
    results = sampler(logits.expand(3, -1), [early, done, ignoring])
    assert [r.token_id for r in results] == [2, 0, 0]
