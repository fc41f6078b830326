"""Llama-style decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention, tied or untied embeddings.

Reads packed tokens of many sequences at once; the LM head runs only on the rows to be sampled.
Q/K/V and gate/up projections are fused into one matmul each (fewer, larger GEMMs matter on CPU);
``load_weights`` maps the Hugging Face names onto the fused shards. Each layer hands its output
and the residual stream to the next layer's norm, which adds them (vLLM's layout): on CUDA a layer
is then 4 GEMMs, the attention and 4 elementwise kernels (add+RMSNorm twice, RoPE+KV store, SiLU·mul).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trident.engine.attention import AttentionMetadata
from trident.models.layers import GatedActivation, ModelShape, PagedAttention, RMSNorm, rope_from_hf_config
from trident.models.weights import WeightLoader


@dataclass(frozen=True)
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    hidden_act: str = "silu"
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False

    @classmethod
    def from_hf(cls, c) -> "LlamaArgs":
        num_heads = c.num_attention_heads
        return cls(
            vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
            num_layers=c.num_hidden_layers, num_heads=num_heads,
            num_kv_heads=getattr(c, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // num_heads,
            rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
            hidden_act=c.hidden_act, attention_bias=getattr(c, "attention_bias", False),
            mlp_bias=getattr(c, "mlp_bias", False),
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        )


class LlamaAttention(nn.Module):
    def __init__(self, args: LlamaArgs, rotary: nn.Module):
        super().__init__()
        self.q_size = args.num_heads * args.head_dim
        self.kv_size = args.num_kv_heads * args.head_dim
        self.head_dim = args.head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.q_size, args.hidden_size, bias=args.attention_bias)
        self.rotary = rotary
        self.attn = PagedAttention(args.num_heads, args.num_kv_heads, args.head_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        num_tokens = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, -1, self.head_dim)  # [num_tokens, num_heads, head_dim]
        k = k.view(num_tokens, -1, self.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        v = v.view(num_tokens, -1, self.head_dim)  # [num_tokens, num_kv_heads, head_dim]
        is_stored = self.rotary.can_store(q, kv_cache)
        if is_stored:  # one kernel rotates q and k and writes k and v into the cache
            self.rotary.rotate_and_store(positions, q, k, v, kv_cache, metadata.slot_mapping)
        else:
            q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v, kv_cache, metadata, is_stored))


class LlamaMLP(nn.Module):
    def __init__(self, args: LlamaArgs):
        super().__init__()
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=args.mlp_bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=args.mlp_bias)
        self.act_and_mul = GatedActivation(args.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))  # [num_tokens, hidden]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, rotary: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = LlamaAttention(args, rotary)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = LlamaMLP(args)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                kv_cache: torch.Tensor, metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it); the next norm adds them,
        so each residual add rides in a norm kernel. ``residual`` is None for the first layer."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, kv_cache, metadata)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaForCausalLM(nn.Module):
    """Packed-token Llama. ``forward`` returns hidden states; ``compute_logits`` applies the LM head."""

    # Hugging Face projection name -> (our fused parameter, shard index)
    STACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
               "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
    IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

    def __init__(self, args: LlamaArgs, hf_config=None, max_positions: int | None = None):
        super().__init__()
        self.args = args
        max_positions = max_positions or args.max_position_embeddings
        rotary = rope_from_hf_config(hf_config, args.head_dim, max_positions)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(args, rotary) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @classmethod
    def from_hf_config(cls, hf_config, max_positions: int | None = None) -> "LlamaForCausalLM":
        return cls(LlamaArgs.from_hf(hf_config), hf_config, max_positions)

    @property
    def shape(self) -> ModelShape:
        a = self.args
        return ModelShape(a.num_layers, a.num_kv_heads, a.head_dim, a.vocab_size, a.max_position_embeddings)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids/positions [num_tokens]; kv_cache [2, num_layers, num_blocks, block_size, kv_heads, head_dim].
        Returns the final hidden states [num_tokens, hidden_size]."""
        x, residual = self.embed_tokens(input_ids), None  # [num_tokens, hidden_size]
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, positions, kv_cache[:, i], metadata)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight)  # [num_rows, vocab_size]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        loader = WeightLoader(self, ignored_suffixes=self.IGNORED_SUFFIXES)
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # some tied checkpoints store the head anyway
            target = self._stacked_target(name)
            if target is None:
                loader.copy(name, tensor)
            else:
                loader.copy_shard(*target, tensor)
        loader.finish()

    def _stacked_target(self, name: str) -> tuple[str, int, list[int]] | None:
        for hf_name, (ours, shard) in self.STACKED.items():
            if f".{hf_name}." in name:
                a = self.args
                sizes = ([a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim, a.num_kv_heads * a.head_dim]
                         if ours == "qkv_proj" else [a.intermediate_size, a.intermediate_size])
                return name.replace(hf_name, ours), shard, sizes
        return None
