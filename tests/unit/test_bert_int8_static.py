"""INT8 BERT on the CPU reference path: the static hand-offs of the attention and GELU outputs
(calibration against Hugging Face's own activations, accuracy against HF fp32) and ``run_many``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

from trident.bert.int8_linear import QuantizedRows
from trident.bert.torch_model import BertShape, PackedBert, attention, hf_state_dict
from trident.bert.torch_runtime import (TorchRuntime, TorchRuntimeOptions, input_absmax, pack, prepare,
                                        to_device)

LENGTHS = [1, 9, 30, 2, 17]


@pytest.fixture(scope="module")
def hf() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    return BertModel(config).eval()


def _packed(hf: BertModel) -> PackedBert:
    c = hf.config
    shape = BertShape(c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size,
                      c.max_position_embeddings, c.type_vocab_size, c.layer_norm_eps)
    model = PackedBert(shape)
    model.load_state_dict(hf_state_dict(hf.state_dict(), shape))
    return model.eval()


def _sequences(lengths, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 300, n).tolist(), [0] * n) for n in lengths]


def _hf_embeddings(hf: BertModel, sequences) -> np.ndarray:
    embeddings = []
    with torch.inference_mode():
        for ids, _ in sequences:  # one at a time: no padding to mask
            hidden = hf(input_ids=torch.tensor([ids])).last_hidden_state[0]  # [seq, hidden]
            embeddings.append(torch.nn.functional.normalize(hidden.mean(0), dim=-1).numpy())
    return np.stack(embeddings)


@pytest.mark.parametrize("ours,theirs", [("down", lambda layer: layer.output.dense),
                                         ("attn_out", lambda layer: layer.attention.output.dense)])
def test_calibration_sees_what_hf_feeds_the_same_linear(hf, ours, theirs):
    sequences = _sequences(LENGTHS)
    seen: list[list[torch.Tensor]] = [[] for _ in hf.encoder.layer]  # per layer, per sequence [in]
    hooks = [theirs(layer).register_forward_pre_hook(lambda _m, inputs, i=i: seen[i].append(inputs[0].abs().amax((0, 1))))
             for i, layer in enumerate(hf.encoder.layer)]
    try:
        with torch.inference_mode():
            for ids, _ in sequences:
                hf(input_ids=torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    observed = [torch.stack(maxima).amax(0) for maxima in seen]
    absmax = input_absmax(_packed(hf), sequences, (ours,))[ours]
    for mine, reference in zip(absmax, observed):
        torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)


def test_static_ffn_int8_hands_int8_rows_to_the_down_projection_and_stays_close_to_hf(hf):
    options = TorchRuntimeOptions(precision="int8", device="cpu", int8_ffn="static", int8_attn="dynamic")
    calibration = _sequences([32] * 8, seed=1)
    runtime = TorchRuntime(prepare(_packed(hf), options, calibration), options, max_seqlen=64)
    layer = runtime.model.layers[0]
    assert layer.up.out_inv_step is not None and layer.down.static_weight_scale is not None
    sequences = _sequences(LENGTHS, seed=2)
    rows, cu_seqlens = pack(sequences, sum(LENGTHS), len(LENGTHS))
    with torch.inference_mode():
        batch = to_device(rows, cu_seqlens, max(LENGTHS), torch.device("cpu"))
        x = runtime.model.embed_norm(runtime.model.word_embeddings(batch.input_ids)
                                     + runtime.model.position_embeddings(batch.position_ids)
                                     + runtime.model.token_type_embeddings(batch.token_type_ids))
        handed = layer.up(x, gelu=True)
    assert isinstance(handed, QuantizedRows) and handed.scale is None and handed.q.dtype == torch.int8
    assert handed.q.abs().max() <= 127 and handed.q.abs().max() > 64  # calibrated: the range is used
    cosines = (runtime.run(sequences) * _hf_embeddings(hf, sequences)).sum(-1)
    assert cosines.min() > 0.99


def test_static_attention_hands_int8_rows_to_the_out_projection_and_stays_close_to_hf(hf):
    options = TorchRuntimeOptions(precision="int8", device="cpu", int8_attn="static", int8_ffn="dynamic")
    runtime = TorchRuntime(prepare(_packed(hf), options, _sequences([32] * 8, seed=1)), options, max_seqlen=64)
    layers = runtime.model.layers
    assert all(layer.attn_out.input_inv_step is not None and layer.down.static_weight_scale is None for layer in layers)
    sequences = _sequences(LENGTHS, seed=2)
    rows, cu_seqlens = pack(sequences, sum(LENGTHS), len(LENGTHS))
    with torch.inference_mode():
        batch = to_device(rows, cu_seqlens, max(LENGTHS), torch.device("cpu"))
        qkv = layers[0].qkv(runtime.model.embed_norm(runtime.model.word_embeddings(batch.input_ids)
                                                      + runtime.model.position_embeddings(batch.position_ids)
                                                      + runtime.model.token_type_embeddings(batch.token_type_ids)))
        handed = attention(qkv.view(sum(LENGTHS), 3, 4, 16), batch, "auto", layers[0].attn_out)
    assert isinstance(handed, QuantizedRows) and handed.scale is None and handed.hidden is None
    assert handed.q.dtype == torch.int8 and 64 < handed.q.abs().max() <= 127  # calibrated: the range is used
    cosines = (runtime.run(sequences) * _hf_embeddings(hf, sequences)).sum(-1)
    assert cosines.min() > 0.99


def test_static_hand_offs_apply_to_the_fused_gemm_only(hf):
    # cuBLAS and the engine's GEMM have no epilogue to write int8 rows from: their hand-offs stay dynamic.
    options = TorchRuntimeOptions(precision="int8", device="cpu", int8_ffn="static", int8_attn="static",
                                  int8_gemm="cublas")
    assert options.static_inputs == {}
    model = prepare(_packed(hf), options)
    assert all(not hasattr(layer.up, "out_inv_step") and not hasattr(layer.attn_out, "input_inv_step")
               for layer in model.layers)
    for name in ("int8_ffn", "int8_attn"):
        with pytest.raises(ValueError, match=name):
            TorchRuntimeOptions(precision="int8", **{name: "per-group"})


def test_the_fp16_pair_epilogue_reaches_every_fused_linear_and_needs_the_tanh_gelu(hf):
    # int8_epilogue is a kernel choice (CUDA; tests/gpu/test_bert_cuda.py checks its numbers): here, that
    # prepare() hands it to all four linears of every layer, and that a GELU it cannot compute is refused.
    for epilogue, expected in (("fp32", False), ("f16x2", True)):
        options = TorchRuntimeOptions(precision="int8", device="cpu", int8_epilogue=epilogue)
        model = prepare(_packed(hf), options, _sequences(LENGTHS))  # calibrated on short sequences
        assert all(getattr(layer, name).half_epilogue is expected for layer in model.layers
                   for name in ("qkv", "attn_out", "up", "down"))
    with pytest.raises(ValueError, match="needs int8_gelu 'tanh'"):
        TorchRuntimeOptions(precision="int8", int8_epilogue="f16x2", int8_gelu="erf")
    with pytest.raises(ValueError, match="int8_epilogue must be one of"):
        TorchRuntimeOptions(precision="int8", int8_epilogue="bf16")


def test_run_many_returns_what_run_returns_per_batch(hf):
    options = TorchRuntimeOptions(precision="fp32", device="cpu")
    runtime = TorchRuntime(prepare(_packed(hf), options), options, max_seqlen=64)
    batches = [_sequences(LENGTHS, seed=s) for s in range(3)] + [_sequences([5], seed=9)]
    many = runtime.run_many(batches)
    assert len(many) == len(batches)
    for batch, result in zip(batches, many):
        np.testing.assert_array_equal(result, runtime.run(batch))
