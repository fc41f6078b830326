"""The real default build (all-MiniLM-L6-v2 -> INT8) served by BertEncoder, against HF FP32."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

PAIR = ["A man is eating food.", "A man is eating a piece of bread."]


@pytest.fixture(scope="module")
def bert_minilm_artifacts():
    """The default artifacts, built through the real entry point (a no-op when already current)."""
    from build.bert import DEFAULT_OUT, main

    assert main([]) == 0
    return DEFAULT_OUT


def test_int8_minilm_similarity_matches_hugging_face(bert_minilm_artifacts):
    from transformers import AutoModel, AutoTokenizer

    from build.weights import minilm_dir
    from trident.bert.encoder import BertEncoder

    tokenizer, model = AutoTokenizer.from_pretrained(minilm_dir()), AutoModel.from_pretrained(minilm_dir()).eval()
    batch = tokenizer(PAIR, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    reference = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1).numpy()
    reference_similarity = float(reference[0] @ reference[1])
    assert abs(reference_similarity - 0.7553) < 1e-3  # the model card's figure: the reference itself is sound

    encoder = BertEncoder.from_artifacts(bert_minilm_artifacts, precision="int8")
    assert (encoder.task, encoder.hidden_size, encoder.max_length) == ("embedding", 384, 256)
    ours = encoder.encode(PAIR)["embedding"]
    assert float(ours[0] @ ours[1]) == pytest.approx(reference_similarity, abs=0.02)
    assert (ours * reference).sum(-1).min() >= 0.99
