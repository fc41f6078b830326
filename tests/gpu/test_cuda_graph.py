"""Decode steps under CUDA graphs against eager steps and the CPU engine, on a tiny random Llama at fp32.

The checkpoint carries a byte-level tokenizer built here (the GPU machine has no tokenizer
package); prompts are token ids, so the tokenizer only feeds the detokenizer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
from pathlib import Path

import pytest
import torch

from trident.engine import kernels
from trident.engine.config import EngineConfig
from trident.engine.cuda_graph import decode_buckets
from trident.engine.engine import LLMEngine
from trident.engine.model_runner import ModelRunner
from trident.engine.sampling_params import SamplingParams
from trident.engine.sequence import Sequence
from trident.models.testing import save_byte_tokenizer, save_tiny_llama

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and kernels.IS_AVAILABLE),
                                reason="needs CUDA and triton")
VOCAB = 512
PROMPT_LENS = [1, 5, 16, 17, 33, 60, 90]
MAX_TOKENS = [20, 7, 30, 12, 25, 3, 18]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama-graphs")
    # Group of 3 query heads per KV head, head_dim 32: shapes the kernels pad and mask.
    save_tiny_llama(path, with_tokenizer=False, vocab_size=VOCAB, hidden_size=192, num_attention_heads=6,
                    num_key_value_heads=2, bos_token_id=0, eos_token_id=0)
    save_byte_tokenizer(path)
    return path


def _config(model_dir: Path, device: str) -> EngineConfig:
    return EngineConfig(model=str(model_dir), device=device, dtype="float32", block_size=16, max_model_len=256,
                        max_num_seqs=6, max_num_batched_tokens=64, max_tokens_in_paged_kv_cache=4096)


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in PROMPT_LENS]


def test_buckets_cover_every_batch_size_up_to_max_num_seqs():
    for max_num_seqs in (1, 3, 8, 9, 16, 20, 256):
        buckets = decode_buckets(max_num_seqs)
        assert buckets == sorted(set(buckets)) and buckets[-1] == max_num_seqs
        assert all(any(b >= n for b in buckets) for n in range(1, max_num_seqs + 1))
    assert decode_buckets(256)[:6] == [1, 2, 4, 8, 16, 32]


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("num_seqs", [1, 3, 5, 6])
def test_graph_logits_match_eager_logits(model_dir, num_seqs):
    """Same decode step, replayed (with padding rows when num_seqs is not a bucket) and eager."""
    runner = ModelRunner(_config(model_dir, "cuda"))
    assert runner.graphs is not None
    seqs = [Sequence(i, prompt, SamplingParams()) for i, prompt in enumerate(_prompts()[:num_seqs])]
    for i, seq in enumerate(seqs):   # prefill eagerly, then append one token to decode
        seq.block_table = list(range(i * 8, i * 8 + 8))   # 8 blocks x 16 = room for 128 tokens
        runner.execute([seq], [seq.num_tokens])
        seq.num_computed_tokens = seq.num_tokens
        seq.append_token(7 + i)
    ones = [1] * num_seqs

    replays = runner.graphs.num_replays
    graph_logits = runner.execute(seqs, ones)
    assert runner.graphs.num_replays == replays + 1
    runner.use_cuda_graphs = False
    eager_logits = runner.execute(seqs, ones)

    assert graph_logits.shape == (num_seqs, VOCAB)
    torch.testing.assert_close(graph_logits, eager_logits, rtol=1e-5, atol=1e-5)
    runner.use_cuda_graphs = True
    assert runner.launch_greedy(seqs, ones).result() == eager_logits.argmax(dim=-1).tolist()


@needs_cuda
@pytest.mark.gpu
def test_greedy_tokens_equal_across_graphs_eager_and_cpu(model_dir):
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]

    def greedy(engine: LLMEngine) -> list[list[int]]:
        return [out.output_token_ids for out in engine.generate(_prompts(), params)]

    graphed = LLMEngine(_config(model_dir, "cuda"))
    eager = LLMEngine(_config(model_dir, "cuda"))
    eager.runner.use_cuda_graphs = False

    graph_tokens = greedy(graphed)

    assert graphed.runner.graphs.num_replays > 0
    assert graph_tokens == greedy(eager)
    assert eager.runner.graphs.num_replays == 0
    assert graph_tokens == greedy(LLMEngine(_config(model_dir, "cpu")))
    assert [len(t) for t in graph_tokens] == MAX_TOKENS


@needs_cuda
def test_sampled_tokens_equal_across_the_cuda_kernel_and_the_cpu_draw(model_dir):
    """The sampling kernel (CUDA, graphs) and sampler.draw (CPU) hash the same noise: at fp32 the same
    seeded and unseeded requests, with top-k / top-p / min-p, sample the same tokens on both."""
    params = [SamplingParams(temperature=0.9, top_p=0.8 if i % 2 else 1.0, top_k=40 if i % 3 == 1 else 0,
                             min_p=0.05 if i % 3 == 2 else 0.0, seed=None if i % 4 == 0 else 11 + i, max_tokens=n,
                             ignore_eos=True) for i, n in enumerate(MAX_TOKENS)]

    def sampled(engine: LLMEngine) -> list[list[int]]:
        return [out.output_token_ids for out in engine.generate(_prompts(), params)]

    graphed = LLMEngine(_config(model_dir, "cuda"))
    tokens = sampled(graphed)
    assert graphed.runner.graphs.num_replays > 0
    assert tokens == sampled(LLMEngine(_config(model_dir, "cpu")))
    assert tokens != [out.output_token_ids for out in LLMEngine(_config(model_dir, "cpu")).generate(
        _prompts(), [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS])]


@needs_cuda
def test_sampled_steps_launch_ahead_under_graphs_and_draw_what_sync_draws(model_dir):
    """Seeded temperature sampling on the device after graph replays (a frequency penalty on some
    rows, which counts the in-flight token from the device): launched ahead (async) or not, the
    same tokens and log-probs; the pinned log-prob copies arrive with the tokens."""
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=50 if i % 2 else 0, seed=7 + i, max_tokens=n,
                             ignore_eos=True, logprobs=True, frequency_penalty=0.5 if i % 3 == 0 else 0.0)
              for i, n in enumerate(MAX_TOKENS)]

    def run(async_scheduling: bool):
        engine = LLMEngine(dataclasses.replace(_config(model_dir, "cuda"), async_scheduling=async_scheduling))
        outs = engine.generate(_prompts(), params)
        return engine, [(o.output_token_ids, o.logprobs) for o in outs]

    async_engine, async_ = run(True)
    sync_engine, sync = run(False)
    assert async_engine.num_launched_ahead > 0 and sync_engine.num_launched_ahead == 0
    assert async_engine.runner.graphs.num_replays > 0
    assert [tokens for tokens, _ in async_] == [tokens for tokens, _ in sync]
    for (tokens, logprobs), (_, sync_logprobs) in zip(async_, sync):
        assert len(logprobs) == len(tokens) and logprobs == pytest.approx(sync_logprobs, abs=1e-4)


@pytest.fixture(scope="module")
def int8_kv_dir(model_dir, tmp_path_factory) -> Path:
    """The tiny model built with int8 weights (W8A16) and calibrated per-head int8 KV scales."""
    from build import gpt_int8

    out = tmp_path_factory.mktemp("built") / "w8a16-kv8"
    with contextlib.redirect_stdout(io.StringIO()):
        code = gpt_int8.main(["--model", str(model_dir), "--out", str(out), "--mode", "w8a16", "--kv-cache-dtype",
                              "int8", "--num-tokens", "384", "--window", "128", "--stride", "64",
                              "--calibration-texts", "16", "--max-ppl-increase", "1.0"])
    assert code == 0
    return out


@needs_cuda
def test_int8_kv_cache_runs_the_kernels_under_graphs_and_matches_cpu(int8_kv_dir):
    """An int8 KV cache on CUDA takes the Triton kernels (tiles read as int8, per-head scales
    folded) and the decode graphs; its greedy tokens are the CPU plain path's on the same artifacts
    (fp32 sums in another order may flip a rare late token)."""
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    config = dict(quantization="int8_weight_only", kv_cache_dtype="int8")
    gpu = LLMEngine(dataclasses.replace(_config(int8_kv_dir, "cuda"), **config))
    assert gpu.runner.use_attention_kernels and gpu.runner.kv_cache.dtype == torch.int8
    gpu_tokens = [out.output_token_ids for out in gpu.generate(_prompts(), params)]
    cpu = LLMEngine(dataclasses.replace(_config(int8_kv_dir, "cpu"), **config))
    cpu_tokens = [out.output_token_ids for out in cpu.generate(_prompts(), params)]
    assert gpu.runner.graphs.num_replays > 0
    same = sum(a == b for g, c in zip(gpu_tokens, cpu_tokens) for a, b in zip(g, c))
    assert same >= 0.9 * sum(MAX_TOKENS)
    assert [t[:3] for t in gpu_tokens] == [t[:3] for t in cpu_tokens]


@needs_cuda
def test_arrivals_admitted_ahead_on_cuda_give_the_sync_tokens(model_dir):
    """One request arriving per step while others decode: async scheduling admits them into the
    step it launches ahead (an eager mixed step whose decode rows gather their inputs on the GPU,
    between graph replays); greedy tokens equal the synchronous run's."""
    prompts = _prompts()
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]

    def run(async_scheduling: bool) -> dict[str, list[int]]:
        engine = LLMEngine(dataclasses.replace(_config(model_dir, "cuda"), async_scheduling=async_scheduling))
        outputs, step = {}, 0
        while step < len(prompts) or engine.has_unfinished():
            if step < len(prompts):
                engine.add_request(str(step), prompts[step], params[step])
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = out.output_token_ids
            step += 1
        if async_scheduling:
            assert engine.num_launched_ahead > 0 and engine.runner.graphs.num_replays > 0
        return outputs

    assert run(True) == run(False)
