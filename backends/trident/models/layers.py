"""Building blocks shared by the decoder models: norms, rotary embeddings, activations, paged attention.

On CUDA the norm (fused with the residual add), RoPE (fused with the KV-cache store) and the
activations each run as one Triton kernel (``trident.engine.kernels``) instead of several PyTorch
ops; on the CPU the plain PyTorch form below runs, and it is the kernels' numerical reference.
"""
from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trident.engine import kernels
from trident.engine.attention import AttentionMetadata, paged_attention, store_kv
from trident.models.quant import dequantize_kv, quantize_kv

# "0" keeps the plain PyTorch norms, RoPE and activations on CUDA too (to measure or bisect the kernels).
FUSED_KERNELS_ENV = "TRIDENT_FUSED_KERNELS"
# None: the fused Triton kernels wherever they run (CUDA, triton importable); True/False forces.
_use_fused: bool | None = None if os.environ.get(FUSED_KERNELS_ENV, "1") != "0" else False


@contextlib.contextmanager
def use_fused_kernels(enabled: bool | None) -> Iterator[None]:
    """Within the block, the norms, RoPE and activations use the fused kernels (True), the plain
    PyTorch form (False) or whichever fits the tensor (None, the default). True on CPU tensors
    needs the Triton interpreter (``TRITON_INTERPRET=1``). The setting is process-wide (benches and
    tests switch it; the engine leaves it alone), and a CUDA graph keeps the path it was captured with."""
    global _use_fused
    saved, _use_fused = _use_fused, enabled
    try:
        yield
    finally:
        _use_fused = saved


def _is_fused(x: torch.Tensor) -> bool:
    if _use_fused is None:
        return kernels.supports(x)
    return _use_fused and kernels.IS_AVAILABLE


@dataclass(frozen=True)
class ModelShape:
    """What the runner needs to know to size and lay out the KV cache."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int


class RMSNorm(nn.Module):
    """Llama's RMSNorm, computed in fp32 like the reference so bf16 runs round the same way.

    ``norm(x)`` returns the normalised ``x``; ``norm(x, residual)`` first adds the residual (in the
    model dtype, as the plain residual stream does) and returns ``(norm(x + residual), x + residual)``
    (vLLM's fused add + RMSNorm: one kernel on CUDA).
    """

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if _is_fused(x):
            return kernels.rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half layout) looked up by absolute position.

    The cos/sin table is built lazily on the device of the first call: models are constructed on
    the meta device and only then materialised, so nothing tensor-valued is computed in __init__
    except the inverse frequencies (on the CPU).
    """

    def __init__(self, inv_freq: torch.Tensor, max_positions: int, attention_scaling: float = 1.0):
        super().__init__()
        self.inv_freq_cpu = inv_freq.detach().to("cpu", torch.float32)  # [head_dim / 2]
        self.max_positions = max_positions
        self.attention_scaling = attention_scaling
        self._cos_sin: torch.Tensor | None = None

    def forward(self, positions: torch.Tensor, query: torch.Tensor,
                key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query [num_tokens, num_heads, head_dim], key [num_tokens, num_kv_heads, head_dim]; on CUDA
        they are rotated in place (views of the fused QKV output stay views) and returned."""
        if _is_fused(query):
            kernels.apply_rotary(positions, query, key, self._table(positions.device))
            return query, key
        cos, sin = self._table(positions.device)[positions].unbind(1)  # [num_tokens, head_dim / 2] each
        cos, sin = cos[:, None, :].to(query.dtype), sin[:, None, :].to(query.dtype)
        return _rotate(query, cos, sin), _rotate(key, cos, sin)

    def can_store(self, query: torch.Tensor, kv_cache: torch.Tensor) -> bool:
        """Whether ``rotate_and_store`` serves this step: the fused kernels, a cache of the model dtype."""
        return kv_cache.dtype == query.dtype and _is_fused(query)

    def rotate_and_store(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """``forward`` (in place) and the paged-cache store of the rotated key and the value, in one
        kernel; kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim]. Only where ``can_store``."""
        kernels.apply_rotary_and_store_kv(positions, query, key, value, self._table(positions.device),
                                          kv_cache[0], kv_cache[1], slot_mapping)

    def _table(self, device: torch.device) -> torch.Tensor:
        if self._cos_sin is None or self._cos_sin.device != device:
            positions = torch.arange(self.max_positions, dtype=torch.float32, device=device)
            freqs = positions[:, None] * self.inv_freq_cpu.to(device)[None, :]  # [max_positions, head_dim / 2]
            self._cos_sin = torch.stack([freqs.cos(), freqs.sin()], dim=1) * self.attention_scaling
        return self._cos_sin  # [max_positions, 2, head_dim / 2]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # [num_tokens, heads, head_dim / 2] each
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim))


def rope_from_hf_config(hf_config, head_dim: int, max_positions: int) -> RotaryEmbedding:
    """RoPE from the config's ``rope_parameters`` (transformers >= 5 normalises the older
    ``rope_theta`` / ``rope_scaling`` fields into it).

    Scaled variants reuse transformers' own frequency functions so the numbers match the reference.
    ``dynamic`` equals the default below the pretraining length (our ``max_model_len`` cap), and
    ``longrope`` picks its short or long factors once, from the served ``max_positions``.
    """
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    if rope_type in ("default", "dynamic"):
        return RotaryEmbedding(default_inv_freq(head_dim, theta), max_positions)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope_type {rope_type!r}")
    kwargs = {"seq_len": max_positions} if rope_type == "longrope" else {}
    with torch.device("cpu"):  # models are built under the meta device; these numbers must be real
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"), **kwargs)
    return RotaryEmbedding(inv_freq, max_positions, float(attention_scaling))


def activation(name: str):
    """The elementwise activations our configs name (GELU-tanh under its several aliases)."""
    table = {
        "silu": F.silu, "swish": F.silu, "relu": F.relu,
        "gelu": F.gelu,
        "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "gelu_fast": _gelu_tanh,
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(table))}")
    return table[name]


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    if _is_fused(x):
        return kernels.gelu_tanh(x)
    return F.gelu(x, approximate="tanh")


class GatedActivation(nn.Module):
    """``act(gate) * up`` over the fused gate/up projection's output [num_tokens, 2 * intermediate]
    (gate first); SiLU runs as one kernel on CUDA (vLLM's ``SiluAndMul``)."""

    def __init__(self, name: str):
        super().__init__()
        self.act = activation(name)
        self.is_silu = self.act is F.silu

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.is_silu and _is_fused(gate_up):
            return kernels.silu_and_mul(gate_up)  # [num_tokens, intermediate]
        gate, up = gate_up.chunk(2, dim=-1)  # [num_tokens, intermediate] each
        return self.act(gate) * up


class PagedAttention(nn.Module):
    """Store this layer's new K/V in the paged cache, then attend over each sequence's context.

    With an int8 cache, keys/values are quantized with this layer's static per-head scales
    (``set_kv_scales``, calibrated by ``build/gpt_int8.py``) before they are stored, and the fresh
    prefill path attends the same dequantized values the cache will give back later, so a token's
    attention does not depend on whether its context came from this step or from the cache.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float | None = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
        # Not a buffer: the quantized checkpoint stores all layers' scales as one tensor.
        self.kv_scales: torch.Tensor | None = None  # [2, num_kv_heads] keys, values

    def set_kv_scales(self, scales: torch.Tensor | None) -> None:
        if scales is not None and tuple(scales.shape) != (2, self.num_kv_heads):
            raise ValueError(f"kv scales must be [2, {self.num_kv_heads}], got {tuple(scales.shape)}")
        self.kv_scales = scales

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                metadata: AttentionMetadata, is_stored: bool = False) -> torch.Tensor:
        """query [num_tokens, num_heads, head_dim]; key/value [num_tokens, num_kv_heads, head_dim];
        kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim]. Returns [num_tokens, num_heads * head_dim].
        ``is_stored``: key/value are already in a cache of the model dtype (``RotaryEmbedding.rotate_and_store``)."""
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        kv_scales = None
        if kv_cache.dtype == torch.int8:
            if self.kv_scales is None:
                raise ValueError("an int8 KV cache needs calibrated per-head scales (set_kv_scales)")
            kv_scales = self.kv_scales
            q_key, q_value = quantize_kv(key, kv_scales[0]), quantize_kv(value, kv_scales[1])  # int8, like key
            store_kv(q_key, q_value, k_cache, v_cache, metadata.slot_mapping)
            if not metadata.use_kernels:   # (the kernels read every key, fresh or not, from the cache)
                key, value = (dequantize_kv(q_key, kv_scales[0], query.dtype),
                              dequantize_kv(q_value, kv_scales[1], query.dtype))
        elif not is_stored:
            store_kv(key, value, k_cache, v_cache, metadata.slot_mapping)
        out = paged_attention(query, key, value, k_cache, v_cache, metadata, self.scale, kv_scales)
        return out.reshape(out.shape[0], self.num_heads * self.head_dim)
