"""Tiny random Hugging Face checkpoints for tests: real transformers models, saved as safetensors
with the real GPT-2 tokenizer, so our models can be checked against the reference implementation.

Weights are drawn with a larger ``initializer_range`` than the library default: near-uniform
logits would make greedy argmax ties likely, and ties make token-exact comparisons meaningless.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from trident.engine.tokenizer import gpt2_tokenizer

GPT2_VOCAB_SIZE = 50257
GPT2_EOS_TOKEN_ID = 50256


def save_tiny_llama(path: str | Path, seed: int = 0, with_tokenizer: bool = True, **overrides) -> Path:
    """A 2-layer grouped-query Llama (4 heads, 2 KV heads, head_dim 16) saved at ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    values = dict(vocab_size=GPT2_VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, initializer_range=0.1, tie_word_embeddings=False,
                  bos_token_id=GPT2_EOS_TOKEN_ID, eos_token_id=GPT2_EOS_TOKEN_ID)
    values.update(overrides)
    return _save(LlamaForCausalLM, LlamaConfig(**values), Path(path), seed, with_tokenizer)


def save_tiny_gpt2(path: str | Path, seed: int = 0, with_tokenizer: bool = True, **overrides) -> Path:
    """A 2-layer GPT-2 (4 heads, hidden 64, 256 positions) saved at ``path``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    values = dict(vocab_size=GPT2_VOCAB_SIZE, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                  initializer_range=0.1, bos_token_id=GPT2_EOS_TOKEN_ID, eos_token_id=GPT2_EOS_TOKEN_ID)
    values.update(overrides)
    return _save(GPT2LMHeadModel, GPT2Config(**values), Path(path), seed, with_tokenizer)


def _save(model_cls, config, path: Path, seed: int, with_tokenizer: bool) -> Path:
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    _randomise_norms(model)
    model.save_pretrained(path, safe_serialization=True)
    if with_tokenizer:
        _gpt2_tokenizer().save_pretrained(path)
    return path


def _randomise_norms(model: torch.nn.Module) -> None:
    """Norm weights start at exactly 1 and biases at 0; perturb them so a wrongly mapped norm or
    bias cannot go unnoticed in a logits comparison."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                param.add_(torch.randn_like(param) * 0.1)


@functools.lru_cache(maxsize=1)
def _gpt2_tokenizer():
    return gpt2_tokenizer()  # building the BPE takes about a second; tests save it many times


def save_byte_tokenizer(path: str | Path) -> None:
    """A byte-level BPE tokenizer with no merges (ids 0-255 are the bytes; larger ids decode to
    nothing), for random-weight checkpoints whose vocabulary has no real tokenizer behind it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(str(path))
