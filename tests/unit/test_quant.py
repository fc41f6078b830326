"""INT8 arithmetic, modules and models on CPU, against fp32 and Hugging Face transformers.

Bounds are derived from the quantization scheme (a rounding error is at most half a step), not
from our own outputs; whole models are compared with transformers running the same weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from trident.engine.attention import AttentionMetadata
from trident.engine.config import EngineConfig
from trident.engine.engine import LLM
from trident.engine.sampling_params import SamplingParams
from trident.models.loader import load_model
from trident.models.quant import (INT8_MAX, Int8Linear, Int8WeightOnlyLinear, dequantize_kv,
                                  dequantize_per_channel, quantize_kv, quantize_linears, quantize_per_channel,
                                  quantize_per_token, set_kv_cache_scales, smoothing_factors)
from trident.models.testing import save_tiny_gpt2, save_tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BLOCK_SIZE = 8



@dataclass
class Tiny:
    arch: str
    path: Path
    hf: nn.Module


@pytest.fixture(scope="session", params=["llama", "gpt2"])
def tiny(request, tmp_path_factory) -> Tiny:
    save = save_tiny_llama if request.param == "llama" else save_tiny_gpt2
    path = save(tmp_path_factory.mktemp(f"quant-{request.param}"))
    return Tiny(request.param, path, AutoModelForCausalLM.from_pretrained(path).eval())


def prompt_ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50257, (n,), generator=torch.Generator().manual_seed(seed))


# -- arithmetic ------------------------------------------------------------------------------------

def test_per_channel_round_trip_is_within_half_a_step():
    w = torch.randn(96, 80, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 96)[:, None]
    q, scale = quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.shape == (96,)
    assert q.abs().max() <= INT8_MAX
    # Each row's largest magnitude maps to +-127 exactly, and nothing is off by more than half a step.
    assert torch.equal(q.abs().amax(dim=1), torch.full((96,), INT8_MAX, dtype=torch.int8))
    error = (dequantize_per_channel(q, scale) - w).abs()
    assert (error <= scale[:, None] / 2 + 1e-7).all()


def test_zero_rows_and_tokens_do_not_divide_by_zero():
    q, scale = quantize_per_channel(torch.zeros(4, 16))
    assert torch.equal(q, torch.zeros(4, 16, dtype=torch.int8)) and torch.isfinite(scale).all()
    qx, x_scale = quantize_per_token(torch.zeros(3, 16))
    assert torch.equal(qx, torch.zeros(3, 16, dtype=torch.int8)) and torch.isfinite(x_scale).all()


def test_per_token_round_trip_is_within_half_a_step():
    x = torch.randn(33, 64) * torch.logspace(-2, 2, 33)[:, None]
    qx, scale = quantize_per_token(x)
    assert ((qx.float() * scale - x).abs() <= scale / 2 + 1e-6).all()


def test_kv_round_trip_is_within_half_a_step_and_clamps_outliers():
    x = torch.randn(20, 3, 16)
    scale = x.abs().amax(dim=(0, 2)) / INT8_MAX  # [kv_heads]
    back = dequantize_kv(quantize_kv(x, scale), scale, torch.float32)
    assert ((back - x).abs() <= scale[:, None] / 2 + 1e-6).all()
    # Values beyond the calibrated range saturate instead of wrapping around.
    assert torch.equal(quantize_kv(x * 10, scale).abs().amax(), torch.tensor(INT8_MAX, dtype=torch.int8))


def test_smoothquant_preserves_the_function_before_rounding():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 48, generator=g, dtype=torch.float64)
    x[:, 5] *= 60  # an outlier channel, as LLM activations have
    w = torch.randn(32, 48, generator=g, dtype=torch.float64)
    s = smoothing_factors(x.abs().amax(dim=0), w, alpha=0.5).double()
    torch.testing.assert_close((x / s) @ (w * s).T, x @ w.T, rtol=1e-12, atol=1e-10)
    # alpha 0.5 balances the two ranges channel by channel: max|X_j / s_j| == max|W_j * s_j|.
    torch.testing.assert_close((x / s).abs().amax(dim=0), (w * s).abs().amax(dim=0), rtol=1e-6, atol=1e-9)


# -- modules ---------------------------------------------------------------------------------------

def test_weight_only_linear_is_within_the_rounding_bound_of_fp32():
    torch.manual_seed(0)
    linear = nn.Linear(96, 160)
    x = torch.randn(5, 7, 96)
    q = Int8WeightOnlyLinear.from_linear(linear)
    out, ref = q(x), linear(x)
    assert out.shape == ref.shape == (5, 7, 160)
    # |x @ (W_q - W).T| <= |x| @ (scale / 2): half a step per weight, summed along the input.
    bound = x.abs().sum(dim=-1, keepdim=True) * q.weight_scale / 2
    assert ((out - ref).abs() <= bound + 1e-5).all()
    # And it is exactly the matmul with the dequantized weight.
    dequant = dequantize_per_channel(q.weight, q.weight_scale)
    torch.testing.assert_close(out, x @ dequant.T + linear.bias, rtol=1e-5, atol=1e-5)


def test_w8a8_linear_equals_the_integer_gemm_and_is_close_to_fp32():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(3, 64)
    q = Int8Linear.from_linear(linear)
    qx, x_scale = quantize_per_token(x)
    exact = (qx.double() @ q.weight.double().T) * x_scale.double() * q.weight_scale.double() + linear.bias.double()
    torch.testing.assert_close(q(x).double(), exact, rtol=1e-5, atol=1e-5)
    assert (q(x) - linear(x)).abs().max() < 0.03 * linear(x).abs().max()


def test_smoothing_rescues_w8a8_from_activation_outliers():
    torch.manual_seed(0)
    linear = nn.Linear(256, 128, bias=False)
    x = torch.randn(64, 256)
    x[:, :4] *= 100  # a few huge channels crush every other channel's per-token step
    ref = linear(x)
    plain = Int8Linear.from_linear(linear)
    smoothed = Int8Linear.from_linear(linear, smoothing_factors(x.abs().amax(dim=0), linear.weight, 0.5))
    error_plain = (plain(x) - ref).norm() / ref.norm()
    error_smoothed = (smoothed(x) - ref).norm() / ref.norm()
    assert error_smoothed < error_plain / 2, (error_plain, error_smoothed)


# -- whole models ----------------------------------------------------------------------------------

def run_prefill(model: nn.Module, ids: torch.Tensor, kv_dtype: torch.dtype = torch.float32):
    """Logits of a single fresh prefill, and the cache it wrote."""
    n = ids.shape[0]
    shape = model.shape
    num_blocks = -(-n // BLOCK_SIZE) + 1
    kv_cache = torch.zeros(2, shape.num_layers, num_blocks, BLOCK_SIZE, shape.num_kv_heads, shape.head_dim, dtype=kv_dtype)
    metadata = AttentionMetadata.build(torch.arange(n), torch.arange(num_blocks)[None], [n], [n], BLOCK_SIZE,
                                       use_kernels=False)
    with torch.inference_mode():
        logits = model.compute_logits(model(ids, torch.arange(n), kv_cache, metadata))  # [n, vocab]
    return logits, kv_cache


def run_decode(model: nn.Module, token: int, position: int, kv_cache: torch.Tensor) -> torch.Tensor:
    """Logits of one decode step over an existing cache (one sequence, blocks 0..)."""
    num_blocks = kv_cache.shape[2]
    metadata = AttentionMetadata.build(torch.tensor([position]), torch.arange(num_blocks)[None], [1], [position + 1],
                                       BLOCK_SIZE, use_kernels=False)
    with torch.inference_mode():
        return model.compute_logits(model(torch.tensor([token]), torch.tensor([position]), kv_cache, metadata))[0]


def hf_logits(hf: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return hf(ids[None]).logits[0]  # [n, vocab]


def test_w8a16_logits_match_transformers_running_the_dequantized_weights(tiny):
    ids = prompt_ids(40)
    ours = load_model(tiny.path, torch.device("cpu"), torch.float32, quantization="int8_weight_only")
    assert isinstance(ours.get_submodule(_first_projection(tiny.arch)), Int8WeightOnlyLinear)
    reference = _hf_with_dequantized_weights(tiny)
    logits, _ = run_prefill(ours, ids)
    torch.testing.assert_close(logits, hf_logits(reference, ids), rtol=1e-4, atol=1e-4)
    # ...and the int8 weights barely move the fp32 function.
    fp32 = hf_logits(tiny.hf, ids)
    assert (logits - fp32).abs().max() < 0.05 * fp32.abs().max()
    assert (logits.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.9


def test_w8a8_logits_stay_close_to_fp32(tiny):
    ids = prompt_ids(40, seed=1)
    model = load_model(tiny.path, torch.device("cpu"), torch.float32)
    quantize_linears(model, "w8a8")
    logits, _ = run_prefill(model, ids)
    fp32 = hf_logits(tiny.hf, ids)
    assert (logits - fp32).abs().max() < 0.1 * fp32.abs().max()
    assert (logits.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.85


def test_int8_kv_cache_decode_reads_back_what_prefill_attended(tiny):
    """With an int8 cache, a decode step (reading the cache) gives the logits a prefill of the same
    tokens gives (attending the quantize-dequantized new keys/values), and both stay near fp32."""
    ids = prompt_ids(30, seed=2)
    model = load_model(tiny.path, torch.device("cpu"), torch.float32)
    _, fp_cache = run_prefill(model, ids)
    absmax = torch.stack([fp_cache[:, i].abs().amax(dim=(1, 2, 4)) for i in range(model.shape.num_layers)])
    set_kv_cache_scales(model, absmax / INT8_MAX)  # [num_layers, 2, kv_heads]
    full, _ = run_prefill(model, ids, torch.int8)
    _, cache = run_prefill(model, ids[:-1], torch.int8)
    assert cache.dtype == torch.int8 and cache.abs().max() > 0
    decoded = run_decode(model, int(ids[-1]), len(ids) - 1, cache)
    torch.testing.assert_close(decoded, full[-1], rtol=1e-4, atol=1e-4)
    fp32 = hf_logits(tiny.hf, ids)
    assert (full - fp32).abs().max() < 0.05 * fp32.abs().max()


def test_engine_greedy_with_int8_weight_only_matches_transformers_on_the_same_weights(tiny):
    prompts = [prompt_ids(n, seed=n).tolist() for n in (3, 11, 26)]
    llm = LLM(str(tiny.path), device="cpu", dtype="float32", block_size=BLOCK_SIZE, max_model_len=128,
              quantization="int8_weight_only")
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    reference = _hf_with_dequantized_weights(tiny)
    for prompt, out in zip(prompts, outputs):
        with torch.inference_mode():
            expected = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                          do_sample=False, max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
        assert out.output_token_ids == expected[0, len(prompt):].tolist()


def test_config_validates_the_int8_names():
    assert EngineConfig(model="m", quantization="w8a8", kv_cache_dtype="int8").kv_cache_dtype == "int8"
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(model="m", quantization="int4")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(model="m", kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="unknown engine config key"):
        EngineConfig.from_dict({"model": "m", "quantisation": "w8a8"})


def test_plain_checkpoints_refuse_what_needs_calibration(tiny):
    with pytest.raises(ValueError, match="SmoothQuant"):
        load_model(tiny.path, torch.device("cpu"), torch.float32, quantization="w8a8")
    with pytest.raises(ValueError, match="calibrated KV scales"):
        load_model(tiny.path, torch.device("cpu"), torch.float32, kv_cache_dtype="int8")


def _first_projection(arch: str) -> str:
    return "layers.0.self_attn.qkv_proj" if arch == "llama" else "h.0.attn.c_attn"


def _hf_with_dequantized_weights(tiny: Tiny) -> nn.Module:
    """transformers' model with every decoder projection replaced by its int8 round trip.

    Per-output-channel scales are per row, so quantizing q/k/v (gate/up) separately here equals
    quantizing our fused projections. GPT-2's Conv1D stores [in, out]: its channels are columns.
    """
    model = AutoModelForCausalLM.from_pretrained(tiny.path).eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("lm_head") or not hasattr(module, "weight") or module.weight.dim() != 2:
                continue
            if "embed" in name or name.endswith(("wte", "wpe")):
                continue
            is_conv1d = type(module).__name__ == "Conv1D"
            w = module.weight.data.T if is_conv1d else module.weight.data  # [out, in]
            w_round_trip = dequantize_per_channel(*quantize_per_channel(w))
            module.weight.data.copy_(w_round_trip.T if is_conv1d else w_round_trip)
    return model
