"""BERT through the live Triton server, over gRPC and HTTP, against Hugging Face FP32 in-process."""
from __future__ import annotations

import functools
import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from tests.e2e.repository import CLASSIFIER_LABELS

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome, I loved every minute of it!",
    "Triton serves many models at once on one GPU.",
    "Ein Mann isst Brot. 東京は日本の首都です。 🚀",
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm windowsill.",
]
# Degenerate inputs are valid too: the empty string ([CLS] [SEP] only) and a text longer than the
# model's maximum (truncated to 256 tokens). INT8 is gated on natural text; on these it drifts more.
EDGE_CASES = ["", "word " * 600]


# -- Hugging Face reference ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_minilm():
    import torch
    from transformers import AutoModel, AutoTokenizer

    from build.weights import minilm_dir

    manifest = json.loads((ROOT / "model_repository/bert/1/artifacts/manifest.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    model = AutoModel.from_pretrained(minilm_dir()).eval()

    def embed(texts: list[str]) -> np.ndarray:
        batch = tokenizer(texts, padding=True, truncation=True, max_length=manifest["max_length"],
                          return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**batch).last_hidden_state  # [N, T, H]
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy()

    return embed


def text_tensor(texts: list[str]) -> np.ndarray:
    return np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)  # [N, 1]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# -- clients ------------------------------------------------------------------------------------
# Clients are closed after use: Triton waits for open connections when it shuts down.
def infer(server, texts, protocol="grpc", model="bert", outputs=("embedding",)):
    lib, url = (grpcclient, server.grpc_url) if protocol == "grpc" else (httpclient, server.http_url)
    data = text_tensor(texts)
    inp = lib.InferInput("text_input", list(data.shape), "BYTES")
    inp.set_data_from_numpy(data)
    with lib.InferenceServerClient(url) as client:
        result = client.infer(model, [inp], outputs=[lib.InferRequestedOutput(o) for o in outputs])
    return {o: result.as_numpy(o) for o in outputs}


infer_grpc = functools.partial(infer, protocol="grpc")
infer_http = functools.partial(infer, protocol="http")


# -- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("infer", [infer_grpc, infer_http], ids=["grpc", "http"])
def test_embeddings_match_hugging_face(triton_server, hf_minilm, infer):
    embedding = infer(triton_server, SENTENCES + EDGE_CASES)["embedding"]
    assert embedding.shape == (len(SENTENCES) + len(EDGE_CASES), 384) and embedding.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=-1), 1.0, atol=1e-4)
    cos = cosines(embedding, hf_minilm(SENTENCES + EDGE_CASES))
    assert_int8_close(cos[:len(SENTENCES)])
    assert cos[len(SENTENCES):].min() >= 0.94, f"edge cases drifted too far: {np.round(cos, 4)}"


def assert_int8_close(cos: np.ndarray) -> None:
    """The bar of the build's accuracy gate: mean cosine >= 0.99 and none below 0.97."""
    assert cos.mean() >= 0.99 and cos.min() >= 0.97, f"cosine vs HF FP32 per text: {np.round(cos, 4)}"


def test_texts_beyond_the_maximum_are_truncated(triton_server):
    """Everything past the first 256 tokens is ignored: 600 and 1000 repetitions embed the same."""
    a, b, short = infer_grpc(triton_server, ["word " * 600, "word " * 1000, "word " * 50])["embedding"]
    assert float(a @ b) > 0.9999
    assert float(a @ short) < 0.9999


def test_fp32_precision_matches_hugging_face_tightly(triton_server, hf_minilm):
    embedding = infer_grpc(triton_server, SENTENCES + EDGE_CASES, model="bert_fp32")["embedding"]
    cos = cosines(embedding, hf_minilm(SENTENCES + EDGE_CASES))
    assert cos.min() >= 0.9999, np.round(cos, 6)


def test_similarity_ranking_like_hugging_face(triton_server, hf_minilm):
    texts = SENTENCES[:4]
    ours = infer_grpc(triton_server, texts)["embedding"]
    ref = hf_minilm(texts)
    # The whole similarity matrix, not only the diagonal, agrees with the FP32 reference.
    np.testing.assert_allclose(ours @ ours.T, ref @ ref.T, atol=0.03)


def test_one_request_per_text_equals_batched_request(triton_server):
    batched = infer_grpc(triton_server, SENTENCES[:3])["embedding"]
    single = np.concatenate([infer_http(triton_server, [t])["embedding"] for t in SENTENCES[:3]])
    assert cosines(batched, single).min() > 0.999


def test_concurrent_requests_are_batched_by_triton(triton_server, hf_minilm):
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    before = _batch_sizes(client, "bert")  # closed at the end of the test
    texts = [f"Request number {i} asks about {['cats', 'GPUs', 'rivers', 'tea'][i % 4]}." for i in range(96)]
    with ThreadPoolExecutor(max_workers=96) as pool:
        results = list(pool.map(lambda t: infer_grpc(triton_server, [t])["embedding"][0], texts))
    assert_int8_close(cosines(np.stack(results), hf_minilm(texts)))
    after = _batch_sizes(client, "bert")
    executed = {size: after[size] - before.get(size, 0) for size in after}
    larger = {size: n for size, n in executed.items() if size > 1 and n > 0}
    assert larger, f"no batch larger than 1 executed; batch_stats deltas: {executed}"
    assert sum(size * n for size, n in executed.items()) == len(texts)
    client.close()


def _batch_sizes(client, model) -> dict[int, int]:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"].get("count", 0)) for b in stats.get("batch_stats", [])}


def test_bad_requests_fail_alone(triton_server):
    """Each bad request gets its own clear error while good ones sent at the same time succeed."""

    def good():
        inp = httpclient.InferInput("text_input", [1, 1], "BYTES")
        inp.set_data_from_numpy(text_tensor(["a perfectly fine sentence"]))
        return inp

    def non_utf8():
        inp = httpclient.InferInput("text_input", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[b"\xff\xfe broken \xc3"]], dtype=np.object_))
        return inp

    def wrong_dtype():
        inp = httpclient.InferInput("text_input", [1, 1], np_to_triton_dtype(np.int32))
        inp.set_data_from_numpy(np.array([[7]], dtype=np.int32))
        return inp

    def wrong_name():
        inp = httpclient.InferInput("text", [1, 1], "BYTES")
        inp.set_data_from_numpy(text_tensor(["x"]))
        return inp

    def send(case):
        name, make = case
        with httpclient.InferenceServerClient(triton_server.http_url) as client:
            try:
                inputs = make()
                return name, client.infer("bert", [inputs] if inputs else []).as_numpy("embedding")
            except InferenceServerException as error:
                return name, error

    def missing():
        return None

    expected = {"non_utf8": "not valid UTF-8", "wrong_dtype": "data-type", "missing": "expected 1 inputs",
                "wrong_name": "unexpected inference input 'text'"}
    cases = [("good", good)] * 8 + [("non_utf8", non_utf8), ("wrong_dtype", wrong_dtype), ("missing", missing),
                                    ("wrong_name", wrong_name)] * 2 + [("good", good)] * 8
    with ThreadPoolExecutor(max_workers=len(cases)) as pool:
        results = list(pool.map(send, cases))
    for name, result in results:
        if name == "good":
            assert isinstance(result, np.ndarray) and result.shape == (1, 384), result
        else:
            assert isinstance(result, InferenceServerException), f"{name} was accepted"
            assert expected[name] in str(result), f"{name}: {result}"
    with httpclient.InferenceServerClient(triton_server.http_url) as client:
        assert client.is_server_ready() and client.is_model_ready("bert")


def test_classifier_checkpoint_serves_logits_and_labels(triton_server):
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    checkpoint = triton_server.repository.parent / "classifier_checkpoint"
    texts = SENTENCES[:4]
    result = infer_grpc(triton_server, texts, model="bert_classifier", outputs=("logits", "label"))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = BertForSequenceClassification.from_pretrained(checkpoint).eval()
    with torch.inference_mode():
        reference = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.numpy()
    assert result["logits"].shape == (len(texts), len(CLASSIFIER_LABELS))
    assert cosines(result["logits"], reference).min() >= 0.99
    labels = [v.decode() for v in result["label"].reshape(-1)]
    assert labels == [CLASSIFIER_LABELS[int(i)] for i in result["logits"].argmax(-1)]


def test_prometheus_metrics_count_bert_requests(triton_server):
    infer_http(triton_server, ["metrics please"])
    text = urllib.request.urlopen(triton_server.metrics_url, timeout=5).read().decode()
    lines = [l for l in text.splitlines() if l.startswith('nv_inference_request_success{model="bert"')]
    assert lines and float(lines[0].rsplit(" ", 1)[1]) >= 1
