"""trident.bert runtime parts without a model: pooling, micro-batching, tokenization, options."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from build.weights import minilm_dir
from trident.bert.batching import plan_micro_batches
from trident.bert.options import EncoderOptions
from trident.bert.pooling import l2_normalize, mean_pool
from trident.bert.tokenizer import TextTokenizer

TEXTS = ["A man is eating food.", "", "Short.", "Ein Mann isst Brot. 東京は日本の首都です。 🚀",
         "The quick brown fox jumps over the lazy dog " * 40]


# -- pooling ------------------------------------------------------------------------------------
def test_mean_pool_and_normalize_match_sentence_transformers_in_torch():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(4, 7, 16)).astype(np.float32)
    mask = np.array([[1] * 7, [1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0], [1] * 5 + [0, 0]])
    # sentence-transformers' Pooling (mean) then Normalize, written out in torch.
    h, m = torch.from_numpy(hidden), torch.from_numpy(mask).unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1).numpy()
    np.testing.assert_allclose(l2_normalize(mean_pool(hidden, mask)), expected, rtol=1e-5, atol=1e-6)


def test_padding_does_not_change_the_pooled_vector():
    rng = np.random.default_rng(1)
    hidden = rng.normal(size=(1, 3, 8)).astype(np.float32)
    padded = np.concatenate([hidden, rng.normal(size=(1, 5, 8)).astype(np.float32) * 100], axis=1)
    np.testing.assert_allclose(mean_pool(hidden, np.ones((1, 3))),
                               mean_pool(padded, np.array([[1, 1, 1, 0, 0, 0, 0, 0]])), rtol=1e-6)


def test_all_masked_row_pools_to_zeros_not_nan():
    out = l2_normalize(mean_pool(np.ones((1, 2, 4), np.float32), np.zeros((1, 2))))
    assert np.all(out == 0)


# -- micro-batches ------------------------------------------------------------------------------
@pytest.mark.parametrize("max_num_seqs,max_tokens", [(1, 10**6), (3, 10**6), (64, 40), (4, 1)])
def test_micro_batches_cover_every_text_once_within_limits(max_num_seqs, max_tokens):
    lengths = list(np.random.default_rng(2).integers(1, 30, size=50))
    batches = plan_micro_batches(lengths, max_num_seqs, max_tokens)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)  # shortest first, so little padding
    for batch in batches:
        assert len(batch) <= max_num_seqs
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= max_tokens


def test_micro_batches_of_nothing():
    assert plan_micro_batches([], 8, 100) == []


# -- tokenizer ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir(verify=False))


def test_tokenizer_matches_hugging_face_with_truncation(bert_hf_tokenizer):
    ours = TextTokenizer.from_file(minilm_dir(verify=False) / "tokenizer.json", max_length=32)
    encodings = ours.encode(TEXTS)
    reference = bert_hf_tokenizer(TEXTS, truncation=True, max_length=32)
    assert [e.ids for e in encodings] == reference["input_ids"]
    assert len(encodings[-1].ids) == 32 and encodings[-1].ids[-1] == bert_hf_tokenizer.sep_token_id
    assert encodings[1].ids == [bert_hf_tokenizer.cls_token_id, bert_hf_tokenizer.sep_token_id]


def test_pad_to_the_longest_of_the_micro_batch_ignoring_fixed_padding_in_the_file(bert_hf_tokenizer):
    # MiniLM's tokenizer.json asks for fixed 128-token padding; micro-batches pad to their longest.
    ours = TextTokenizer.from_file(minilm_dir(verify=False) / "tokenizer.json", max_length=256)
    batch = ours.pad(ours.encode(TEXTS[:3]))
    reference = bert_hf_tokenizer(TEXTS[:3], padding=True, return_tensors="np")
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(getattr(batch, name), reference[name])
        assert getattr(batch, name).dtype == np.int64


def test_tokenizer_rejects_non_strings():
    ours = TextTokenizer.from_file(minilm_dir(verify=False) / "tokenizer.json", max_length=16)
    with pytest.raises(TypeError, match=r"texts\[1\] must be str, got bytes"):
        ours.encode(["fine", b"bytes"])


# -- options ------------------------------------------------------------------------------------
def test_tensorrt_is_planned_but_not_implemented_yet():
    with pytest.raises(NotImplementedError, match="planned but not implemented"):
        EncoderOptions(runtime="tensorrt")


@pytest.mark.parametrize("runtime,device", [("torch", "cpu"), ("onnxruntime", "cuda"), ("onnxruntime", "cuda:1")])
def test_runtimes_run_on_their_own_device_only(runtime, device):
    with pytest.raises(NotImplementedError, match="supported: onnxruntime on cpu, torch on cuda"):
        EncoderOptions(runtime=runtime, device=device)


@pytest.mark.parametrize("precision", ["fp16", "int8", "fp32"])
def test_torch_on_cuda_takes_gpu_precisions(precision):
    assert EncoderOptions(runtime="torch", device="cuda:0", precision=precision).precision == precision


@pytest.mark.parametrize("kwargs,message", [
    ({"runtime": "onnx"}, "unknown runtime 'onnx'"), ({"device": "tpu"}, "unknown device 'tpu'"),
    ({"precision": "fp16"}, "precision must be one of"), ({"num_threads": 0}, "num_threads"),
    ({"max_length": 1}, "max_length must be >= 2"), ({"max_num_seqs": 0}, "max_num_seqs"),
])
def test_invalid_options_are_rejected_with_the_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EncoderOptions(**kwargs)


def test_fast_batch_encoding_gives_the_ids_of_the_offset_tracking_one():
    from tokenizers import Tokenizer

    path = minilm_dir(verify=False) / "tokenizer.json"
    texts = ["A man is eating food.", "", "Ein Mann isst Brot. 東京は日本の首都です。 🚀", "word " * 300]
    reference = Tokenizer.from_file(str(path))
    reference.no_padding()
    reference.enable_truncation(max_length=64)
    ours = TextTokenizer.from_file(path, 64).encode(texts)
    for mine, theirs in zip(ours, reference.encode_batch(texts), strict=True):
        assert (mine.ids, mine.type_ids) == (theirs.ids, theirs.type_ids)
