"""trident.bert.encoder.BertEncoder on tiny built models, against Hugging Face computed here."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.unit.conftest import BERT_TINY_LABELS
from trident.bert.artifacts import ArtifactsError, BertArtifacts
from trident.bert.encoder import BertEncoder
from trident.bert.options import EncoderOptions

TEXTS = ["A man is eating food.", "", "A man is eating a piece of bread.", "Short",
         "Ein Mann isst Brot. 東京は日本の首都です。 🚀", "The quick brown fox jumps over the lazy dog " * 30,
         "Triton serves many models at once."]


@pytest.fixture(scope="module")
def bert_hf(bert_tiny_built):
    from transformers import AutoTokenizer, BertModel

    return (AutoTokenizer.from_pretrained(bert_tiny_built.checkpoint),
            BertModel.from_pretrained(bert_tiny_built.checkpoint).eval())


def hf_embed(bert_hf, texts: list[str], max_length: int) -> np.ndarray:
    """sentence-transformers semantics: mean over the attention mask, then L2 normalisation."""
    tokenizer, model = bert_hf
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1).numpy()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_public_attributes(bert_tiny_built):
    encoder = BertEncoder.from_artifacts(bert_tiny_built.out)
    assert (encoder.task, encoder.hidden_size, encoder.id2label, encoder.max_length) == ("embedding", 32, {}, 64)


def test_fp32_embeddings_equal_hugging_face(bert_tiny_built, bert_hf):
    ours = BertEncoder.from_artifacts(bert_tiny_built.out, precision="fp32").encode(TEXTS)["embedding"]
    assert ours.dtype == np.float32 and ours.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(ours, hf_embed(bert_hf, TEXTS, 64), atol=1e-5)


def test_int8_embeddings_are_close_to_hugging_face_fp32(bert_tiny_built, bert_hf):
    ours = BertEncoder.from_artifacts(bert_tiny_built.out, precision="int8", num_threads=1).encode(TEXTS)["embedding"]
    np.testing.assert_allclose(np.linalg.norm(ours, axis=-1), 1.0, atol=1e-5)
    assert cosines(ours, hf_embed(bert_hf, TEXTS, 64)).min() >= 0.99


def test_length_sorting_restores_the_callers_order(bert_tiny_built):
    encoder = BertEncoder.from_artifacts(bert_tiny_built.out, precision="fp32")
    batched = encoder.encode(TEXTS)["embedding"]
    one_by_one = np.concatenate([encoder.encode([t])["embedding"] for t in TEXTS])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    reversed_batch = encoder.encode(TEXTS[::-1])["embedding"]
    np.testing.assert_allclose(reversed_batch[::-1], batched, atol=1e-5)


def test_micro_batch_limits_do_not_change_results(bert_tiny_built):
    default = BertEncoder.from_artifacts(bert_tiny_built.out, precision="fp32")
    artifacts = BertArtifacts.load(bert_tiny_built.out)
    tiny_batches = BertEncoder(artifacts, EncoderOptions(precision="fp32", max_num_seqs=2, max_num_batched_tokens=16))
    np.testing.assert_allclose(tiny_batches.encode(TEXTS)["embedding"], default.encode(TEXTS)["embedding"], atol=1e-5)


def test_long_text_is_truncated_to_max_length(bert_tiny_built, bert_hf):
    long_text = "The quick brown fox jumps over the lazy dog " * 30  # ~270 tokens
    prefix = "The quick brown fox jumps over the lazy dog " * 2   # its first 18 tokens
    encoder = BertEncoder.from_artifacts(bert_tiny_built.out, precision="fp32", max_length=20)
    assert encoder.max_length == 20
    ours = encoder.encode([long_text, prefix])["embedding"]
    np.testing.assert_allclose(ours[0], ours[1], atol=1e-5)  # [CLS] + 18 tokens + [SEP] either way
    np.testing.assert_allclose(ours, hf_embed(bert_hf, [long_text, prefix], 20), atol=1e-5)


def test_max_length_beyond_the_model_limit_is_rejected(bert_tiny_built):
    with pytest.raises(ValueError, match="exceeds the model's limit of 64 tokens"):
        BertEncoder.from_artifacts(bert_tiny_built.out, max_length=65)


def test_empty_strings_and_empty_batches(bert_tiny_built, bert_hf):
    encoder = BertEncoder.from_artifacts(bert_tiny_built.out, precision="fp32")
    ours = encoder.encode(["", ""])["embedding"]
    np.testing.assert_allclose(ours, hf_embed(bert_hf, ["", ""], 64), atol=1e-5)
    assert encoder.encode([])["embedding"].shape == (0, 32)


def test_classifier_returns_logits_and_labels(bert_tiny_classifier_built):
    from transformers import AutoTokenizer, BertForSequenceClassification

    checkpoint = bert_tiny_classifier_built.checkpoint
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = BertForSequenceClassification.from_pretrained(checkpoint).eval()
    with torch.inference_mode():
        reference = model(**tokenizer(TEXTS, padding=True, truncation=True, max_length=64,
                                      return_tensors="pt")).logits.numpy()
    fp32 = BertEncoder.from_artifacts(bert_tiny_classifier_built.out, precision="fp32")
    assert fp32.task == "classification" and fp32.id2label == BERT_TINY_LABELS
    np.testing.assert_allclose(fp32.encode(TEXTS)["logits"], reference, atol=1e-5)
    outputs = BertEncoder.from_artifacts(bert_tiny_classifier_built.out).encode(TEXTS)
    assert outputs["logits"].shape == (len(TEXTS), 3) and outputs["logits"].dtype == np.float32
    assert cosines(outputs["logits"], reference).min() >= 0.99
    assert outputs["label"].dtype == object
    assert list(outputs["label"]) == [BERT_TINY_LABELS[i] for i in outputs["logits"].argmax(-1)]


def test_missing_artifacts_and_options_fail_clearly(tmp_path):
    with pytest.raises(ArtifactsError, match="no manifest.json"):
        BertEncoder.from_artifacts(tmp_path)
    # Options are checked before any file is read.
    with pytest.raises(NotImplementedError, match="tensorrt"):
        BertEncoder.from_artifacts(tmp_path / "absent", runtime="tensorrt")
    with pytest.raises(ValueError, match="precision"):
        BertEncoder.from_artifacts(tmp_path / "absent", precision="int4")
