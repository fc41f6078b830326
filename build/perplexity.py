"""Perplexity of one of our decoder models on held-out text, with sliding windows (CPU is fine).

The model runs through its own paged-attention forward with a scratch KV cache, so an int8 KV
cache (and whatever quantized linears the model holds) is measured exactly as the engine runs it.
Windows of ``window`` tokens advance by ``stride``; each token is scored once, by the first window
that reaches it, with up to ``window - stride`` tokens of context before it (the Hugging Face
recipe for fixed-length models).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from build.text import held_out_texts
from trident.engine.attention import AttentionMetadata

BLOCK_SIZE = 16


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    num_scored_tokens: int
    mean_nll: float


def held_out_token_ids(tokenizer, num_tokens: int) -> list[int]:
    """The first ``num_tokens`` tokens of the held-out prose, joined into one running text."""
    num_texts = 64
    while True:
        texts = held_out_texts(num_texts)
        ids = tokenizer(" ".join(texts), add_special_tokens=False)["input_ids"]
        if len(ids) >= num_tokens:
            return ids[:num_tokens]
        num_texts *= 2  # held_out_texts raises once the corpus runs out


@torch.inference_mode()
def perplexity(model: nn.Module, token_ids: list[int], window: int = 1024, stride: int = 512,
               kv_cache_dtype: torch.dtype | None = None) -> Perplexity:
    """exp(mean next-token NLL) over ``token_ids[1:]``; ``kv_cache_dtype`` torch.int8 for an int8 cache."""
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    ids = torch.tensor(token_ids, dtype=torch.long)
    kv_cache = _scratch_cache(model, window, kv_cache_dtype)
    nll_sum, num_scored, scored_until = 0.0, 0, 1  # token 0 has no prediction
    for begin in range(0, len(token_ids), stride):
        end = min(begin + window, len(token_ids))
        targets = torch.arange(max(scored_until, begin + 1), end)  # [num_new] absolute positions
        nll_sum += _window_nll(model, ids[begin:end], targets - begin, ids[targets], kv_cache)
        num_scored += len(targets)
        scored_until = end
        if end == len(token_ids):
            break
    mean_nll = nll_sum / num_scored
    return Perplexity(perplexity=math.exp(mean_nll), num_scored_tokens=num_scored, mean_nll=mean_nll)


def _window_nll(model: nn.Module, window_ids: torch.Tensor, target_rows: torch.Tensor, targets: torch.Tensor,
                kv_cache: torch.Tensor) -> float:
    n = window_ids.shape[0]
    num_blocks = -(-n // BLOCK_SIZE)
    device = next(model.parameters()).device
    # Plain path: the Triton kernels do not read an int8 cache, and this is the reference anyway.
    metadata = AttentionMetadata.build(torch.arange(n, device=device), torch.arange(num_blocks, device=device)[None],
                                       [n], [n], BLOCK_SIZE, use_kernels=False)
    hidden = model(window_ids.to(device), torch.arange(n, device=device), kv_cache, metadata)  # [n, hidden]
    logits = model.compute_logits(hidden[target_rows.to(device) - 1]).float()  # [num_targets, vocab]
    return torch.nn.functional.cross_entropy(logits, targets.to(device), reduction="sum").item()


def _scratch_cache(model: nn.Module, window: int, dtype: torch.dtype | None) -> torch.Tensor:
    shape = model.shape
    param = next(model.parameters())
    num_blocks = -(-window // BLOCK_SIZE)
    return torch.zeros(2, shape.num_layers, num_blocks, BLOCK_SIZE, shape.num_kv_heads, shape.head_dim,
                       dtype=dtype or param.dtype, device=param.device)  # the runner's layout
