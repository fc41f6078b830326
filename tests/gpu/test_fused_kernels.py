"""The fused norm, RoPE and activation kernels against the plain PyTorch layers they replace.

The reference is each layer's own PyTorch form (``use_fused_kernels(False)``), the code the CPU
runs and the CPU tests compare with Hugging Face. Runs on CUDA; also on CPU under the Triton
interpreter (``TRITON_INTERPRET=1``), where bf16 runs only in the kernels that multiply
elementwise (the interpreter's bf16 is numpy fp32 rounded the same way); skipped otherwise.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.gpu.kernel_device import DEVICE, IS_CUDA, KERNEL_TEST_MARKS
from trident.engine import kernels
from trident.engine.attention import AttentionMetadata
from trident.models.layers import GatedActivation, RMSNorm, RotaryEmbedding, default_inv_freq, use_fused_kernels
from trident.models.loader import load_model
from trident.models.testing import save_tiny_llama


pytestmark = KERNEL_TEST_MARKS

BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not IS_CUDA, reason="the Triton interpreter truncates to bf16 instead of rounding"))
DTYPES = [torch.float32, torch.float16, BF16]
NUM_TOKENS = [1, 37]
# One unit in the last place of each dtype, relative: where a reduction order may flip a rounding.
ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


def _strided_rows(num_tokens: int, width: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """[num_tokens, width] whose rows are 7 elements apart from each other's ends: not contiguous."""
    return _randn(num_tokens, width + 7, dtype=dtype, seed=seed)[:, 3:3 + width]


def _plain(module: torch.nn.Module, *args):
    with use_fused_kernels(False):
        return module(*args)


def _assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: float) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), rtol=ulps * ULP[actual.dtype], atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden_size", [576, 100])
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_plain_layer(dtype, hidden_size, num_tokens, with_residual):
    norm = RMSNorm(hidden_size, eps=1e-5).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(_randn(hidden_size, dtype=dtype, seed=1))
    x = _strided_rows(num_tokens, hidden_size, dtype, seed=2)
    residual = _strided_rows(num_tokens, hidden_size, dtype, seed=3) if with_residual else None
    x_before = x.clone()
    args = (x,) if residual is None else (x, residual)

    expected = _plain(norm, *args)
    actual = kernels.rms_norm(x, norm.weight, norm.eps, residual)

    if with_residual:
        (actual, actual_residual), (expected, expected_residual) = actual, expected
        # The add rounds once to the model dtype in both: bit for bit.
        assert torch.equal(actual_residual, expected_residual)
    # Only the row sum's order differs: the fp32 scale is within an ulp or two, so the output is
    # too; at bf16/fp16 that can flip the rounding of the normalised row, and then of its product
    # with the weight: two rounding steps at most.
    _assert_within_ulps(actual, expected, ulps=4 if dtype == torch.float32 else 2)
    assert torch.equal(x, x_before)


def test_rms_norm_with_fp32_weight_promotes_like_the_layer():
    norm = RMSNorm(64, eps=1e-6).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(_randn(64, dtype=torch.float32, seed=4))
    x = _randn(5, 64, dtype=torch.float16, seed=5)
    expected = _plain(norm, x)
    actual = kernels.rms_norm(x, norm.weight, norm.eps)
    assert actual.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(actual, expected, rtol=4 * ULP[torch.float32], atol=1e-6)


# (num_heads, num_kv_heads, head_dim): SmolLM2's grouped heads; multi-head; a head_dim whose half
# is not a power of two.
HEAD_LAYOUTS = [(9, 3, 64), (4, 4, 32), (6, 2, 80)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", HEAD_LAYOUTS)
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_rotary_in_place_on_qkv_views_matches_plain_layer(dtype, layout, num_tokens):
    num_heads, num_kv_heads, head_dim = layout
    max_positions = 300
    # A scaled table (as YaRN/longrope give): the kernel must read it as stored.
    rotary = RotaryEmbedding(default_inv_freq(head_dim, 10000.0), max_positions, attention_scaling=1.1)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = _randn(num_tokens, q_size + 2 * kv_size, dtype=dtype, seed=6)
    positions = torch.randint(0, max_positions, (num_tokens,), generator=torch.Generator().manual_seed(7)).to(DEVICE)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(num_tokens, num_heads, head_dim)  # [num_tokens, num_heads, head_dim], rows strided
    k = k.view(num_tokens, num_kv_heads, head_dim)  # [num_tokens, num_kv_heads, head_dim]
    v_before = v.clone()
    expected_q, expected_k = _plain(rotary, positions, q.clone(), k.clone())

    kernels.apply_rotary(positions, q, k, rotary._table(DEVICE))

    # Every product and sum is rounded where the PyTorch ops round: bit for bit.
    assert torch.equal(q, expected_q)
    assert torch.equal(k, expected_k)
    assert torch.equal(v, v_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", HEAD_LAYOUTS[:2])
def test_rotary_and_kv_store_in_one_launch_match_rotary_then_store(dtype, layout):
    num_heads, num_kv_heads, head_dim = layout
    num_tokens, num_blocks, block_size = 37, 8, 16
    rotary = RotaryEmbedding(default_inv_freq(head_dim, 10000.0), 300)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = _randn(num_tokens, q_size + 2 * kv_size, dtype=dtype, seed=10)
    q, k, v = (t.view(num_tokens, -1, head_dim) for t in qkv.split([q_size, kv_size, kv_size], dim=-1))
    positions = torch.randint(0, 300, (num_tokens,), generator=torch.Generator().manual_seed(11)).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=torch.Generator().manual_seed(12))[:num_tokens]
    slots[[0, 20]] = -1  # CUDA-graph padding rows: nothing stored
    slots = slots.to(DEVICE)
    kv_cache = _randn(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, seed=13)
    expected_q, expected_k = _plain(rotary, positions, q.clone(), k.clone())
    expected_cache = kv_cache.clone()
    stored = slots >= 0
    for i, t in enumerate((expected_k, v)):
        expected_cache[i].view(-1, num_kv_heads, head_dim)[slots[stored]] = t[stored]

    with use_fused_kernels(True):
        assert rotary.can_store(q, kv_cache)
        rotary.rotate_and_store(positions, q, k, v, kv_cache, slots)

    assert torch.equal(q, expected_q) and torch.equal(k, expected_k)
    assert torch.equal(kv_cache, expected_cache)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("intermediate_size", [1536, 100])
@pytest.mark.parametrize("num_tokens", NUM_TOKENS)
def test_silu_and_mul_matches_plain_layer(dtype, intermediate_size, num_tokens):
    gate_up = _randn(num_tokens, 2 * intermediate_size, dtype=dtype, seed=8) * 4
    expected = _plain(GatedActivation("silu"), gate_up)
    actual = kernels.silu_and_mul(gate_up)
    # On CUDA, libdevice expf is torch's expf; the interpreter's numpy exp may differ by an ulp,
    # which can flip the rounding of silu(gate) and then of its product with up.
    _assert_within_ulps(actual, expected, ulps=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_cols", [3072, 100])
def test_gelu_tanh_matches_torch(dtype, num_cols):
    x = _randn(37, num_cols, dtype=dtype, seed=9) * 3
    expected = F.gelu(x, approximate="tanh")
    actual = kernels.gelu_tanh(x)
    # torch's compiler contracts the cubic into fused multiply-adds its own way: a few fp32 ulp.
    _assert_within_ulps(actual, expected, ulps=16 if dtype == torch.float32 else 1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    # Grouped heads (3 per KV head), head_dim 32, hidden 192, intermediate 200: not tile-friendly.
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-fused"), with_tokenizer=False, vocab_size=512,
                           hidden_size=192, num_attention_heads=6, num_key_value_heads=2, intermediate_size=200)


MODEL_DTYPES = [torch.float32, BF16]
BLOCK_SIZE = 16


def _packed_step(model, dtype: torch.dtype):
    """A step packing a fresh 21-token prompt with a 23-token chunk after 17 cached tokens, over
    shuffled blocks; the cached prefix is written once, by the plain forward."""
    shape = model.shape
    kv_cache = torch.zeros(2, shape.num_layers, 16, BLOCK_SIZE, shape.num_kv_heads, shape.head_dim,
                           dtype=dtype, device=DEVICE)
    blocks = random.Random(0).sample(range(16), 5)
    tables = torch.tensor([blocks[:2] + [0], blocks[2:]], dtype=torch.int32, device=DEVICE)  # [2, 3]

    def step(rows: list[tuple[int, int, int]]):  # (sequence, first position, number of tokens)
        positions = [p for _, start, n in rows for p in range(start, start + n)]
        slots = [int(tables[s, p // BLOCK_SIZE]) * BLOCK_SIZE + p % BLOCK_SIZE
                 for s, start, n in rows for p in range(start, start + n)]
        metadata = AttentionMetadata.build(torch.tensor(slots, device=DEVICE), tables[[s for s, _, _ in rows]],
                                           [n for _, _, n in rows], [start + n for _, start, n in rows], BLOCK_SIZE)
        input_ids = torch.randint(0, 512, (len(positions),), generator=torch.Generator().manual_seed(len(rows)))
        return input_ids.to(DEVICE), torch.tensor(positions, device=DEVICE), metadata

    with torch.inference_mode(), use_fused_kernels(False):
        model(*_insert_cache(step([(1, 0, 17)]), kv_cache))
    return _insert_cache(step([(0, 0, 21), (1, 17, 23)]), kv_cache)


def _insert_cache(inputs, kv_cache):
    input_ids, positions, metadata = inputs
    return input_ids, positions, kv_cache, metadata


@pytest.mark.parametrize("dtype", MODEL_DTYPES)
def test_llama_forward_with_kernels_matches_plain_forward(model_dir, dtype):
    """Every layer, the final norm and the LM head, with the kernels and without."""
    model = load_model(model_dir, DEVICE, dtype)
    inputs = _packed_step(model, dtype)

    def forward(fused: bool) -> torch.Tensor:
        with torch.inference_mode(), use_fused_kernels(fused):
            return model.compute_logits(model(*inputs)).float()  # [num_tokens, vocab]

    # Fused first: the step's new slots are still empty, so a key/value the fused path failed to
    # store would show.
    fused, plain = forward(True), forward(False)
    assert fused.shape == plain.shape == (44, 512)
    if dtype == torch.float32:
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    else:
        # bf16: a norm output one rounding step apart propagates; the logits stay close and the
        # greedy choices (nearly) all agree.
        torch.testing.assert_close(fused, plain, rtol=0.05, atol=0.05 * plain.abs().max().item())
        agree = (fused.argmax(-1) == plain.argmax(-1)).float().mean().item()
        assert agree >= 0.9, agree
