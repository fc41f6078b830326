"""LLMEngine end to end on CPU in fp32, against Hugging Face transformers as the reference.

Tiny random Llama (GQA) and GPT-2 models are built here and saved as Hugging Face directories with
the real GPT-2 tokenizer; the engine loads them like any model directory. Greedy outputs must be
token-identical to ``generate`` however the engine batches, chunks, caches or preempts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from pydoc_data.topics import topics
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from trident.engine.config import EngineConfig
from trident.engine.detokenizer import StreamDetokenizer
from trident.engine.engine import LLMEngine
from trident.engine.sampling_params import RequestOutputKind, SamplingParams
from trident.engine.tokenizer import gpt2_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MAX_POSITIONS = 256
EOS = 50256
# 18 prompts of mixed lengths, each with its own output length.
PROMPT_LENS = [1, 3, 5, 8, 9, 13, 17, 24, 31, 33, 40, 47, 55, 64, 70, 81, 90, 100]
MAX_TOKENS = [12, 20, 7, 24, 16, 1, 24, 9, 18, 24, 5, 14, 24, 11, 22, 3, 17, 24]


@dataclass
class TinyModel:
    arch: str
    path: Path
    hf: torch.nn.Module
    tokenizer: object
    reference: dict = field(default_factory=dict)     # (prompt, max_tokens) -> HF greedy tokens


def _hf_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=50257, bos_token_id=EOS, eos_token_id=EOS, initializer_range=0.1)
    if arch == "llama":
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
                             tie_word_embeddings=False, **common)
        return LlamaForCausalLM(config).eval()
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS, **common)
    return GPT2LMHeadModel(config).eval()



@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny(request, tmp_path_factory) -> TinyModel:
    arch = request.param
    path = tmp_path_factory.mktemp(f"tiny-{arch}")
    model, tokenizer = _hf_model(arch), gpt2_tokenizer()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return TinyModel(arch, path, model, tokenizer)


@pytest.fixture(scope="session")
def corpus(tiny) -> list[int]:
    text = " ".join(topics[k] for k in ("assert", "assignment", "atom-identifiers", "attribute-access"))
    return tiny.tokenizer.encode(text)


def make_prompts(corpus: list[int], lens=PROMPT_LENS) -> list[list[int]]:
    return [corpus[7 * i: 7 * i + n] for i, n in enumerate(lens)]


def make_engine(tiny: TinyModel, **overrides) -> LLMEngine:
    values = dict(model=str(tiny.path), device="cpu", dtype="float32", block_size=8,
                  max_model_len=MAX_POSITIONS, max_num_seqs=32, max_num_batched_tokens=512)
    values.update(overrides)
    return LLMEngine(EngineConfig(**values))


def hf_greedy(tiny: TinyModel, prompt: list[int], max_tokens: int) -> list[int]:
    """Hugging Face generate, one request at a time: the reference (memoised per model)."""
    key = (tuple(prompt), max_tokens)
    if key not in tiny.reference:
        input_ids = torch.tensor([prompt])
        with torch.inference_mode():
            out = tiny.hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                   max_new_tokens=max_tokens, eos_token_id=EOS, pad_token_id=EOS)
        tiny.reference[key] = out[0, len(prompt):].tolist()
    return tiny.reference[key]


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kwargs)


def drain(engine: LLMEngine, on_step=None) -> dict[str, list]:
    """Step until idle; every output per request, in order. ``on_step(engine, step)`` may add requests."""
    outputs: dict[str, list] = {}
    step = 0
    while engine.has_unfinished() or (on_step and step == 0):
        if on_step:
            on_step(engine, step)
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        step += 1
        assert step < 2000, "engine made no progress"
    return outputs


def assert_matches_hf(tiny, outputs, prompts, max_tokens):
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens)):
        final = outputs[str(i)][-1]
        assert final.finished
        assert final.output_token_ids == hf_greedy(tiny, prompt, n), f"request {i} ({len(prompt)} prompt tokens)"
        # Streamed pieces add up to the final text, which is the full decode of the outputs.
        assert "".join(o.delta_text for o in outputs[str(i)]) == final.text
        assert final.text == tiny.tokenizer.decode(final.output_token_ids, skip_special_tokens=True)


def submit(engine, prompts, max_tokens, ids=None):
    for i, (prompt, n) in zip(ids or range(len(prompts)), zip(prompts, max_tokens)):
        engine.add_request(str(i), prompt, greedy(n))


# -- exactness ---------------------------------------------------------------------------------------
def test_greedy_batch_matches_hf(tiny, corpus):
    prompts = make_prompts(corpus)
    engine = make_engine(tiny)
    submit(engine, prompts, MAX_TOKENS)
    outputs = drain(engine)
    assert_matches_hf(tiny, outputs, prompts, MAX_TOKENS)
    stats = engine.stats()
    assert stats.num_preemptions_total == 0 and stats.kv_cache_usage == 0.0
    assert stats.generation_tokens_total == sum(len(o[-1].output_token_ids) for o in outputs.values())
    assert stats.prompt_tokens_total == sum(PROMPT_LENS)


def test_greedy_matches_hf_under_preemption(tiny, corpus):
    prompts = make_prompts(corpus)
    engine = make_engine(tiny, max_tokens_in_paged_kv_cache=192)   # 24 blocks for 18 requests
    submit(engine, prompts, MAX_TOKENS)
    outputs = drain(engine)
    assert engine.stats().num_preemptions_total > 0
    assert_matches_hf(tiny, outputs, prompts, MAX_TOKENS)
    assert engine.scheduler.block_manager.num_free_blocks == engine.capacity.num_blocks


def test_greedy_matches_hf_with_prefix_cache_hits(tiny, corpus):
    shared = corpus[200:243]                                     # 43 tokens: 5 full blocks of 8
    prompts = [shared + corpus[300 + 5 * i: 300 + 5 * i + 1 + 2 * i] for i in range(16)]
    max_tokens = [4 + i % 9 for i in range(16)]
    engine = make_engine(tiny, max_num_batched_tokens=64)        # admissions spread over steps
    submit(engine, prompts, max_tokens)
    outputs = drain(engine)
    stats = engine.stats()
    # The first prompt is computed in step 1; the second is admitted beside it (chunked), before
    # there is anything to hit; every later one reuses the 5 shared blocks.
    assert stats.prefix_cache_hits >= 14 * 40
    assert sum(o[-1].num_cached_tokens == 40 for o in outputs.values()) >= 14
    assert_matches_hf(tiny, outputs, prompts, max_tokens)


def test_greedy_matches_hf_with_chunked_prefill(tiny, corpus):
    prompts = make_prompts(corpus)
    engine = make_engine(tiny, max_num_batched_tokens=16)
    submit(engine, prompts, MAX_TOKENS)
    chunked: set[str] = set()

    def watch(engine, step):
        chunked.update(seq.request_id for seq in engine.scheduler.running
                       if 0 < seq.num_computed_tokens < seq.num_prompt_tokens)

    outputs = drain(engine, on_step=watch)
    assert len(chunked) >= 5        # every prompt above 16 tokens, at least
    assert_matches_hf(tiny, outputs, prompts, MAX_TOKENS)


def test_greedy_matches_hf_when_requests_arrive_during_decode(tiny, corpus):
    prompts = make_prompts(corpus)
    engine = make_engine(tiny)
    waves = {0: range(0, 6), 3: range(6, 12), 7: range(12, 18)}
    decoding_at_arrival = []

    def arrive(engine, step):
        if step in waves:
            decoding_at_arrival.append(sum(seq.num_output_tokens > 0 for seq in engine.scheduler.running))
            for i in waves[step]:
                engine.add_request(str(i), prompts[i], greedy(MAX_TOKENS[i]))

    outputs = drain(engine, on_step=arrive)
    assert decoding_at_arrival[0] == 0 and min(decoding_at_arrival[1:]) >= 3
    assert_matches_hf(tiny, outputs, prompts, MAX_TOKENS)


def test_greedy_logprobs_match_hf(tiny, corpus):
    prompt = corpus[:20]
    engine = make_engine(tiny)
    (out,) = engine.generate([prompt], greedy(6, logprobs=True))
    input_ids = torch.tensor([prompt])
    with torch.inference_mode():
        ref = tiny.hf.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                               max_new_tokens=6, eos_token_id=EOS, pad_token_id=EOS,
                               output_logits=True, return_dict_in_generate=True)
    chosen = ref.sequences[0, len(prompt):]
    expected = [torch.log_softmax(step_logits[0].float(), -1)[t].item() for step_logits, t in zip(ref.logits, chosen)]
    assert out.output_token_ids == chosen.tolist()
    assert out.logprobs == pytest.approx(expected, abs=1e-4)
    assert out.cumulative_logprob == pytest.approx(sum(expected), abs=1e-3)


# -- sampling, stops, abort, API ---------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_across_batch_compositions(tiny, corpus):
    prompts = make_prompts(corpus)
    seeded = SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=1234, max_tokens=16, ignore_eos=True)
    engine = make_engine(tiny)
    (alone,) = engine.generate([prompts[7]], seeded)

    others = [SamplingParams(temperature=1.0, seed=s, max_tokens=8 + s) for s in range(6)]
    others += [SamplingParams(temperature=0.7, max_tokens=10), greedy(5)]
    batch_prompts = prompts[:4] + [prompts[7]] + prompts[8:12]
    batch_params = others[:4] + [seeded] + others[4:]
    crowded = make_engine(tiny, max_num_batched_tokens=32).generate(batch_prompts, batch_params)
    assert crowded[4].output_token_ids == alone.output_token_ids
    (other_seed,) = engine.generate([prompts[7]], SamplingParams(temperature=0.9, top_k=50, top_p=0.95,
                                                                  seed=4321, max_tokens=16, ignore_eos=True))
    assert other_seed.output_token_ids != alone.output_token_ids


def _boundary_stop_string(tokenizer, token_ids: list[int]) -> tuple[str, str]:
    """A stop string straddling two output tokens (2 chars of each), and the full text."""
    text = tokenizer.decode(token_ids)
    for i in range(len(token_ids) // 2, len(token_ids) - 1):
        left, right = tokenizer.decode(token_ids[i:i + 1]), tokenizer.decode(token_ids[i + 1:i + 2])
        if len(left) >= 2 and len(right) >= 2 and (left + right).isascii():
            boundary = len(tokenizer.decode(token_ids[:i + 1]))
            assert text[boundary - len(left):boundary + len(right)] == left + right
            return text[boundary - 2:boundary + 2], text
    pytest.skip("no two ASCII tokens of 2+ characters side by side in this output")


def test_stop_string_across_token_boundaries(tiny, corpus):
    prompt = corpus[40:60]
    engine = make_engine(tiny)
    (free,) = engine.generate([prompt], greedy(24, ignore_eos=True))
    stop, text = _boundary_stop_string(tiny.tokenizer, free.output_token_ids)
    expected = text[:text.index(stop)]

    engine.add_request("s", prompt, greedy(24, ignore_eos=True, stop=[stop]))
    outputs = drain(engine)["s"]
    final = outputs[-1]
    assert (final.finish_reason, final.stop_reason, final.text) == ("stop", stop, expected)
    assert "".join(o.delta_text for o in outputs) == expected
    assert free.output_token_ids[:len(final.output_token_ids)] == final.output_token_ids
    assert len(final.output_token_ids) < len(free.output_token_ids)

    (kept,) = engine.generate([prompt], greedy(24, ignore_eos=True, stop=[stop], include_stop_str_in_output=True))
    assert kept.text == expected + stop


def test_max_tokens_and_stop_token_ids_finish_requests(tiny, corpus):
    prompt = corpus[:10]
    engine = make_engine(tiny)
    (free,) = engine.generate([prompt], greedy(10, ignore_eos=True))
    assert (free.finish_reason, len(free.output_token_ids)) == ("length", 10)
    stop_id = free.output_token_ids[4]
    first = free.output_token_ids.index(stop_id)
    (stopped,) = engine.generate([prompt], greedy(10, ignore_eos=True, stop_token_ids=[stop_id]))
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_id
    assert stopped.output_token_ids == free.output_token_ids[:first + 1]


def test_abort_frees_blocks_at_once(tiny, corpus):
    prompts = make_prompts(corpus)
    engine = make_engine(tiny, max_num_seqs=4)
    bm = engine.scheduler.block_manager
    submit(engine, prompts[10:16], [24] * 6)
    for _ in range(3):
        engine.step()
    running = {seq.request_id: len(seq.block_table) for seq in engine.scheduler.running}
    assert len(running) == 4 and engine.scheduler.num_waiting == 2
    victim = next(iter(running))
    free_before = bm.num_free_blocks
    (final,) = engine.abort(victim)
    assert (final.finished, final.finish_reason, final.request_id) == (True, "abort", victim)
    assert bm.num_free_blocks == free_before + running[victim]
    assert engine.abort(victim) == []
    waiting = engine.scheduler.waiting[0].request_id
    assert engine.abort(waiting)[0].finish_reason == "abort"
    for request_id in map(str, range(6)):
        engine.abort(request_id)
    assert not engine.has_unfinished() and bm.num_free_blocks == engine.capacity.num_blocks
    assert engine.step() == []


def test_text_prompts_offline_generate_and_timings(tiny):
    engine = make_engine(tiny)
    prompts = ["Hello world", "The quick brown fox", "a"]
    outs = engine.generate(prompts, greedy(5))
    for prompt, out in zip(prompts, outs):
        assert out.prompt_token_ids == tiny.tokenizer.encode(prompt)
        assert out.output_token_ids == hf_greedy(tiny, out.prompt_token_ids, 5)
        t = out.timings
        assert t.arrival <= t.first_scheduled <= t.first_token <= t.finished
        assert t.queue_time >= 0 and t.e2e_latency >= t.time_to_first_token


def test_invalid_requests_are_rejected_with_clear_errors(tiny):
    engine = make_engine(tiny, max_model_len=64, max_tokens_in_paged_kv_cache=48)
    with pytest.raises(ValueError, match="max_model_len is 64"):
        engine.add_request("long", list(range(64)), greedy(1))
    with pytest.raises(ValueError, match=r"max_tokens <= 24"):
        engine.add_request("much", list(range(40)), greedy(30))
    with pytest.raises(ValueError, match="whole KV cache"):
        engine.add_request("pool", list(range(40)), greedy(10))
    with pytest.raises(ValueError, match="out of range"):
        engine.add_request("vocab", [50257], greedy(1))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", "", greedy(1))
    engine.add_request("ok", [1, 2, 3], greedy(2))
    with pytest.raises(ValueError, match="already in flight"):
        engine.add_request("ok", [1, 2, 3], greedy(2))
    assert not any(r in ("long", "much", "pool") for r in drain(engine))


# -- output kinds and the step pipeline -------------------------------------------------------------
def test_output_kinds_final_only_delta_and_cumulative_agree(tiny, corpus):
    prompts = make_prompts(corpus)[4:10]
    free = make_engine(tiny).generate(prompts, greedy(20, ignore_eos=True))
    stop, _ = _boundary_stop_string(tiny.tokenizer, free[0].output_token_ids)
    stop_id = free[1].output_token_ids[6]
    # A stop string (decoded token by token), a stop token id, plain (FINAL_ONLY: decoded once at the end).
    variants = [dict(stop=[stop]), dict(stop_token_ids=[stop_id]), dict()]
    finals = {}
    for kind in RequestOutputKind:
        engine = make_engine(tiny)
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, greedy(20, ignore_eos=True, output_kind=kind, **variants[i % 3]))
        finals[kind] = outputs = drain(engine)
        if kind is RequestOutputKind.FINAL_ONLY:
            assert all(len(outs) == 1 and outs[0].finished for outs in outputs.values())
    for i in map(str, range(len(prompts))):
        cumulative = finals[RequestOutputKind.CUMULATIVE][i][-1]
        (final_only,) = finals[RequestOutputKind.FINAL_ONLY][i]
        delta = finals[RequestOutputKind.DELTA][i]
        assert cumulative.output_token_ids == free[int(i)].output_token_ids[:len(cumulative.output_token_ids)]
        for out in (final_only, delta[-1]):
            assert (out.finish_reason, out.stop_reason) == (cumulative.finish_reason, cumulative.stop_reason)
        assert (final_only.output_token_ids, final_only.text) == (cumulative.output_token_ids, cumulative.text)
        assert [t for out in delta for t in out.output_token_ids] == cumulative.output_token_ids
        assert "".join(out.text for out in delta) == cumulative.text
    assert finals[RequestOutputKind.CUMULATIVE]["0"][-1].stop_reason == stop
    assert finals[RequestOutputKind.CUMULATIVE]["1"][-1].stop_reason == stop_id


def test_stream_interval_sends_fewer_larger_outputs_with_the_same_content(tiny, corpus):
    prompts = make_prompts(corpus)[:6]
    stop_id = make_engine(tiny).generate(prompts[1:2], greedy(20, ignore_eos=True))[0].output_token_ids[9]
    variants = [dict(ignore_eos=True), dict(ignore_eos=True, stop_token_ids=[stop_id])]
    runs = {}
    for interval in (1, 4):
        engine = make_engine(tiny, stream_interval=interval)
        for i, prompt in enumerate(prompts):
            kind = RequestOutputKind.CUMULATIVE if i == 5 else RequestOutputKind.DELTA
            engine.add_request(str(i), prompt, greedy(19, output_kind=kind, **variants[i % 2]))
        runs[interval] = drain(engine)
    for i in map(str, range(5)):
        every, chunked = runs[1][i], runs[4][i]
        assert [len(out.output_token_ids) for out in every] == [1] * len(every)
        sizes = [len(out.output_token_ids) for out in chunked]
        # the first token at once (time to first token), then 4 at a time, the rest with the last
        assert sizes[0] == 1 and all(size == 4 for size in sizes[1:-1]) and 1 <= sizes[-1] <= 4, sizes
        assert [t for out in chunked for t in out.output_token_ids] == [t for out in every for t in out.output_token_ids]
        assert "".join(out.text for out in chunked) == "".join(out.text for out in every)
        assert chunked[-1].finished and (chunked[-1].finish_reason, chunked[-1].stop_reason) == \
            (every[-1].finish_reason, every[-1].stop_reason)
    assert runs[4]["1"][-1].finish_reason == "stop"   # a stop token ends a stream between intervals
    cumulative = runs[4]["5"]
    assert [len(out.output_token_ids) for out in cumulative] == [1, 5, 9, 13, 17, 19]
    assert cumulative[-1].output_token_ids == runs[1]["5"][-1].output_token_ids
    with pytest.raises(ValueError, match="stream_interval must be >= 1"):
        EngineConfig(model="m", stream_interval=0)


def test_text_detokenized_outside_the_engine_equals_the_engines(tiny, corpus):
    """detokenize=False: the engine sends ids only, and StreamDetokenizer (what the Triton adapter
    runs on coalesced chunks) must rebuild the engine's own text, chunked any way."""
    prompts = make_prompts(corpus)[2:14]
    free = make_engine(tiny).generate(prompts, greedy(20, ignore_eos=True))
    variants = [dict(stop_token_ids=[free[0].output_token_ids[5]]),
                dict(stop_token_ids=[free[1].output_token_ids[7]], include_stop_str_in_output=True),
                dict(ignore_eos=True), dict(ignore_eos=True, skip_special_tokens=False)]
    params = [greedy(20, output_kind=RequestOutputKind.DELTA, **variants[i % 4]) for i in range(len(prompts))]
    texts = {}
    for detokenize in (True, False):
        engine = make_engine(tiny)
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            engine.add_request(str(i), prompt, dataclasses.replace(p, detokenize=detokenize))
        texts[detokenize] = drain(engine)
    for i, prompt in enumerate(prompts):
        reference = "".join(out.text for out in texts[True][str(i)])
        deltas = texts[False][str(i)]
        assert all(out.text == "" for out in deltas)
        ids = [t for out in deltas for t in out.output_token_ids]
        assert ids == [t for out in texts[True][str(i)] for t in out.output_token_ids]
        finish = deltas[-1].finish_reason
        for chunk in (1, 3, len(ids)):   # one response per token, coalesced, all at once
            detokenizer = StreamDetokenizer(tiny.tokenizer, prompt, params[i])
            pieces = [detokenizer.add(ids[k:k + chunk], finish if k + chunk >= len(ids) else None)
                      for k in range(0, len(ids), chunk)]
            assert "".join(pieces) == reference, (i, chunk)
    assert texts[False]["0"][-1].stop_reason == free[0].output_token_ids[5]
    with pytest.raises(ValueError, match="need detokenize=True"):
        SamplingParams(stop=["x"], detokenize=False)


def test_stop_string_found_while_the_next_step_runs_drops_its_token(tiny, corpus):
    prompt = corpus[40:60]
    engine = make_engine(tiny)
    (free,) = engine.generate([prompt], greedy(24, ignore_eos=True))
    assert free.output_token_ids == hf_greedy(tiny, prompt, 24)
    stop, text = _boundary_stop_string(tiny.tokenizer, free.output_token_ids)
    engine.add_request("s", prompt, greedy(24, ignore_eos=True, stop=[stop]))
    engine.add_request("other", corpus[:9], greedy(24, ignore_eos=True))
    bm = engine.scheduler.block_manager
    while True:
        final = next((o for o in engine.step() if o.request_id == "s" and o.finished), None)
        if final is not None:
            break
    # The stop string was matched after the next step had been launched with "s" in it.
    assert any(seq.request_id == "s" for seq in engine._in_flight.sampled)
    num_tokens = len(final.output_token_ids)
    assert final.output_token_ids == free.output_token_ids[:num_tokens]
    assert (final.finish_reason, final.stop_reason, final.text) == ("stop", stop, text[:text.index(stop)])
    outputs = drain(engine)
    assert "s" not in outputs and outputs["other"][-1].output_token_ids == hf_greedy(tiny, corpus[:9], 24)
    assert len(final.output_token_ids) == num_tokens     # the dropped token never joined the output
    assert bm.num_free_blocks == engine.capacity.num_blocks


def test_abort_while_a_step_is_in_flight(tiny, corpus):
    prompts = make_prompts(corpus)[8:11]
    engine = make_engine(tiny)
    bm = engine.scheduler.block_manager
    submit(engine, prompts, [16] * 3)
    for _ in range(3):
        engine.step()
    assert engine._in_flight is not None
    (victim,) = [seq for seq in engine.scheduler.running if seq.request_id == "1"]
    free_before, held = bm.num_free_blocks, len(victim.block_table)
    (final,) = engine.abort("1")
    assert (final.request_id, final.finished, final.finish_reason) == ("1", True, "abort")
    assert bm.num_free_blocks == free_before + held
    assert final.output_token_ids == hf_greedy(tiny, prompts[1], 16)[:len(final.output_token_ids)]
    outputs = drain(engine)
    assert "1" not in outputs
    for i in (0, 2):
        assert outputs[str(i)][-1].output_token_ids == hf_greedy(tiny, prompts[i], 16)
    assert bm.num_free_blocks == engine.capacity.num_blocks


def test_inter_token_latencies_one_per_token_after_the_first(tiny, corpus):
    engine = make_engine(tiny)
    prompts = make_prompts(corpus)[:6]
    outs = engine.generate(prompts, [greedy(n) for n in MAX_TOKENS[:6]])
    latencies = engine.drain_inter_token_latencies()
    assert len(latencies) == sum(len(o.output_token_ids) - 1 for o in outs)
    assert all(x >= 0 for x in latencies) and engine.drain_inter_token_latencies() == []


def test_a_dropped_engine_frees_its_kv_cache(tiny, corpus):
    """A process that drops an engine (a reloaded model, a test) gets its KV cache back. The engine
    freezes the heap that predates it (``gc.freeze``); what it builds itself stays out of the
    frozen set, so a reference cycle among its own objects would still be collected."""
    import gc
    import weakref

    engine = make_engine(tiny)
    submit(engine, make_prompts(corpus)[:2], [3, 3])
    drain(engine)
    cache = weakref.ref(engine.runner.kv_cache)
    del engine
    gc.collect()
    assert cache() is None
