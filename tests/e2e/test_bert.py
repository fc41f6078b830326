"""BERT through the live Triton server, over gRPC and HTTP, against Hugging Face FP32 in-process."""
from __future__ import annotations

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
    "",
    "Ein Mann isst Brot. 東京は日本の首都です。 🚀",
    "word " * 600,  # longer than the model's maximum: truncated
]


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
def infer_grpc(server, texts, model="bert", outputs=("embedding",)):
    client = grpcclient.InferenceServerClient(server.grpc_url)
    data = text_tensor(texts)
    inp = grpcclient.InferInput("text_input", list(data.shape), "BYTES")
    inp.set_data_from_numpy(data)
    result = client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput(o) for o in outputs])
    return {o: result.as_numpy(o) for o in outputs}


def infer_http(server, texts, model="bert", outputs=("embedding",)):
    client = httpclient.InferenceServerClient(server.http_url)
    data = text_tensor(texts)
    inp = httpclient.InferInput("text_input", list(data.shape), "BYTES")
    inp.set_data_from_numpy(data)
    result = client.infer(model, [inp], outputs=[httpclient.InferRequestedOutput(o) for o in outputs])
    return {o: result.as_numpy(o) for o in outputs}


# -- tests --------------------------------------------------------------------------------------
@pytest.mark.parametrize("infer", [infer_grpc, infer_http], ids=["grpc", "http"])
def test_embeddings_match_hugging_face(triton_server, hf_minilm, infer):
    embedding = infer(triton_server, SENTENCES)["embedding"]
    assert embedding.shape == (len(SENTENCES), 384) and embedding.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embedding, axis=-1), 1.0, atol=1e-4)
    cos = cosines(embedding, hf_minilm(SENTENCES))
    assert cos.min() >= 0.99, f"cosine vs HF FP32 per sentence: {np.round(cos, 4)}"


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
    before = _batch_sizes(client, "bert")
    texts = [f"Request number {i} asks about {['cats', 'GPUs', 'rivers', 'tea'][i % 4]}." for i in range(96)]
    with ThreadPoolExecutor(max_workers=96) as pool:
        results = list(pool.map(lambda t: infer_grpc(triton_server, [t])["embedding"][0], texts))
    assert cosines(np.stack(results), hf_minilm(texts)).min() >= 0.99
    after = _batch_sizes(client, "bert")
    executed = {size: after[size] - before.get(size, 0) for size in after}
    larger = {size: n for size, n in executed.items() if size > 1 and n > 0}
    assert larger, f"no batch larger than 1 executed; batch_stats deltas: {executed}"
    assert sum(size * n for size, n in executed.items()) == len(texts)


def _batch_sizes(client, model) -> dict[int, int]:
    stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    return {int(b["batch_size"]): int(b["compute_infer"].get("count", 0)) for b in stats.get("batch_stats", [])}


def test_bad_requests_fail_alone(triton_server):
    """Each bad request gets its own clear error while good ones sent at the same time succeed."""
    client = httpclient.InferenceServerClient(triton_server.http_url, concurrency=16)

    def send(inputs):
        return client.async_infer("bert", inputs)

    def good():
        inp = httpclient.InferInput("text_input", [1, 1], "BYTES")
        inp.set_data_from_numpy(text_tensor(["a perfectly fine sentence"]))
        return [inp]

    def non_utf8():
        inp = httpclient.InferInput("text_input", [1, 1], "BYTES")
        inp.set_data_from_numpy(np.array([[b"\xff\xfe broken \xc3"]], dtype=np.object_))
        return [inp]

    def wrong_dtype():
        inp = httpclient.InferInput("text_input", [1, 1], np_to_triton_dtype(np.int32))
        inp.set_data_from_numpy(np.array([[7]], dtype=np.int32))
        return [inp]

    def wrong_name():
        inp = httpclient.InferInput("text", [1, 1], "BYTES")
        inp.set_data_from_numpy(text_tensor(["x"]))
        return [inp]

    cases = {"non_utf8": non_utf8, "wrong_dtype": wrong_dtype, "missing": wrong_name}
    expected = {"non_utf8": "not valid UTF-8", "wrong_dtype": "data-type", "missing": "text_input"}
    pending = [("good", send(good())) for _ in range(8)]
    pending += [(name, send(make())) for name, make in cases.items() for _ in range(2)]
    pending += [("good", send(good())) for _ in range(8)]
    for name, request in pending:
        if name == "good":
            assert request.get_result().as_numpy("embedding").shape == (1, 384)
            continue
        with pytest.raises(InferenceServerException) as error:
            request.get_result()
        assert expected[name] in str(error.value), f"{name}: {error.value}"
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
