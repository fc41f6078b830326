"""GPT-2: learned absolute positions, pre-LayerNorm, GELU (tanh), multi-head attention.

Hugging Face stores GPT-2's projections as ``Conv1D`` (weight ``[in, out]``); they are transposed
into ``nn.Linear`` layout at load time, so the forward is ordinary ``x @ W.T + b``.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trident.engine.attention import AttentionMetadata
from trident.models.layers import ModelShape, PagedAttention, activation
from trident.models.weights import WeightLoader


@dataclass(frozen=True)
class GPT2Args:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    max_position_embeddings: int
    layer_norm_eps: float
    activation: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_hf(cls, c) -> "GPT2Args":
        return cls(
            vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=c.n_inner or 4 * c.n_embd,
            num_layers=c.n_layer, num_heads=c.n_head, max_position_embeddings=c.n_positions,
            layer_norm_eps=c.layer_norm_epsilon, activation=c.activation_function,
            scale_attn_weights=c.scale_attn_weights,
            scale_attn_by_inverse_layer_idx=c.scale_attn_by_inverse_layer_idx,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
        )


class GPT2Attention(nn.Module):
    def __init__(self, args: GPT2Args, layer_idx: int):
        super().__init__()
        self.head_dim = args.head_dim
        self.c_attn = nn.Linear(args.hidden_size, 3 * args.hidden_size)
        self.c_proj = nn.Linear(args.hidden_size, args.hidden_size)
        scale = self.head_dim ** -0.5 if args.scale_attn_weights else 1.0
        if args.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.attn = PagedAttention(args.num_heads, args.num_heads, self.head_dim, scale)

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.c_attn(x).view(num_tokens, 3, -1, self.head_dim)  # [num_tokens, 3, num_heads, head_dim]
        q, k, v = qkv.unbind(1)
        return self.c_proj(self.attn(q, k, v, kv_cache, metadata))


class GPT2MLP(nn.Module):
    def __init__(self, args: GPT2Args):
        super().__init__()
        self.c_fc = nn.Linear(args.hidden_size, args.intermediate_size)
        self.c_proj = nn.Linear(args.intermediate_size, args.hidden_size)
        self.act = activation(args.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, args: GPT2Args, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.attn = GPT2Attention(args, layer_idx)
        self.ln_2 = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.mlp = GPT2MLP(args)

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache, metadata)
        return x + self.mlp(self.ln_2(x))


class GPT2LMHeadModel(nn.Module):
    """Packed-token GPT-2. ``forward`` returns hidden states; ``compute_logits`` applies the LM head."""

    CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    # Causal-mask buffers that older checkpoints serialised next to the weights.
    IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")

    def __init__(self, args: GPT2Args, hf_config=None, max_positions: int | None = None):
        super().__init__()
        self.args = args
        self.wte = nn.Embedding(args.vocab_size, args.hidden_size)
        self.wpe = nn.Embedding(args.max_position_embeddings, args.hidden_size)
        self.h = nn.ModuleList(GPT2Block(args, i) for i in range(args.num_layers))
        self.ln_f = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @classmethod
    def from_hf_config(cls, hf_config, max_positions: int | None = None) -> "GPT2LMHeadModel":
        return cls(GPT2Args.from_hf(hf_config), hf_config, max_positions)

    @property
    def shape(self) -> ModelShape:
        a = self.args
        return ModelShape(a.num_layers, a.num_heads, a.head_dim, a.vocab_size, a.max_position_embeddings)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids/positions [num_tokens]; kv_cache [2, num_layers, num_blocks, block_size, heads, head_dim].
        Returns the final hidden states [num_tokens, hidden_size]."""
        x = self.wte(input_ids) + self.wpe(positions)  # [num_tokens, hidden_size]
        for i, block in enumerate(self.h):
            x = block(x, kv_cache[:, i], metadata)
        return self.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.wte.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)  # [num_rows, vocab_size]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        loader = WeightLoader(self, ignored_suffixes=self.IGNORED_SUFFIXES)
        for name, tensor in weights:
            # The original OpenAI-converted checkpoints have no "transformer." prefix.
            name = name.removeprefix("transformer.")
            if name == "lm_head.weight" and self.lm_head is None:
                continue
            loader.copy(name, tensor, transpose=name.endswith(self.CONV1D))
        loader.finish()
