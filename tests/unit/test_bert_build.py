"""build/bert.py and its steps on tiny random checkpoints (real MiniLM tokenizer), end to end."""
from __future__ import annotations

import hashlib
import json
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from build.bert_gate import GateFailed, candidate_outputs, enforce, evaluate_gate, reference_outputs
from tests.unit.conftest import BERT_TINY_LABELS, bert_run_build
from trident.bert.artifacts import ArtifactsError
from trident.bert.encoder import BertEncoder

SHAPES_TEXTS = [["One."], ["A man is eating food.", "", "word " * 200], ["x y z"] * 7]


def _manifest(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- export -------------------------------------------------------------------------------------
@pytest.mark.parametrize("texts", SHAPES_TEXTS, ids=["batch1", "mixed_lengths", "batch7"])
def test_fp32_onnx_matches_hugging_face_at_any_batch_and_length(bert_tiny_built, texts):
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(bert_tiny_built.checkpoint)
    model = BertModel.from_pretrained(bert_tiny_built.checkpoint).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="np")
    session = ort.InferenceSession(str(bert_tiny_built.out / "model.fp32.onnx"))
    ours = session.run(["last_hidden_state"], {i.name: batch[i.name] for i in session.get_inputs()})[0]
    with torch.inference_mode():
        reference = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state.numpy()
    real = batch["attention_mask"] == 1
    np.testing.assert_allclose(ours[real], reference[real], atol=1e-4)


def test_onnx_axes_are_dynamic(bert_tiny_built):
    graph = onnx.load(str(bert_tiny_built.out / "model.fp32.onnx")).graph
    for value in [*graph.input, *graph.output]:
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param and dims[1].dim_param, f"{value.name} has a fixed batch or sequence axis"
    assert {i.name for i in graph.input} == {"input_ids", "attention_mask", "token_type_ids"}


# -- quantize -----------------------------------------------------------------------------------
def test_int8_model_is_qdq_with_per_channel_weight_scales(bert_tiny_built):
    graph = onnx.load(str(bert_tiny_built.out / "model.int8.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") > 0 and ops.count("DequantizeLinear") > 0
    initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    weight_dqs = [n for n in graph.node if n.op_type == "DequantizeLinear"
                  and initializers.get(n.input[0], np.zeros(0)).ndim == 2]
    assert weight_dqs, "no quantized weights"
    for node in weight_dqs:
        weight, scale = initializers[node.input[0]], initializers[node.input[1]]
        axis = next(a.i for a in node.attribute if a.name == "axis")
        assert weight.dtype == np.int8
        assert scale.shape == (weight.shape[axis],) and len(np.unique(scale)) > 1  # one scale per channel


def test_ffn_down_projections_stay_fp32_and_the_rest_is_int8(bert_tiny_built):
    graph = onnx.load(str(bert_tiny_built.out / "model.int8.onnx")).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    float_fed = [n for n in matmuls if producers.get(n.input[0]) != "DequantizeLinear"]
    assert {producers[n.input[0]] for n in float_fed} == {"Gelu"}
    assert len(float_fed) == 2  # one per layer
    report = _manifest(bert_tiny_built.out)["quantization"]
    assert report["num_quantized_matmuls"] == len(matmuls) - len(float_fed)


def test_smoothing_is_an_exact_fp32_rewrite_of_the_layer_norm_fed_matmuls(bert_tiny_built, tmp_path):
    from build.bert_smooth import smooth_layer_norm_matmuls
    from trident.bert.tokenizer import TextTokenizer

    tokenizer = TextTokenizer.from_file(bert_tiny_built.out / "tokenizer.json", 64)
    feeds = [tokenizer.pad(tokenizer.encode(texts)).feeds(("input_ids", "attention_mask", "token_type_ids"))
             for texts in SHAPES_TEXTS]
    smoothed = tmp_path / "smoothed.onnx"
    report = smooth_layer_norm_matmuls(bert_tiny_built.out / "model.fp32.onnx", smoothed, feeds, alpha=0.5)
    assert (report.num_activations, report.num_matmuls) == (4, 8)  # per layer: Q/K/V input, FFN-up input
    original = ort.InferenceSession(str(bert_tiny_built.out / "model.fp32.onnx"))
    rewritten = ort.InferenceSession(str(smoothed))
    for feed in feeds:
        np.testing.assert_allclose(rewritten.run(None, feed)[0], original.run(None, feed)[0], atol=1e-4)
    graph = onnx.load(str(smoothed)).graph
    producers = {o: n for n in graph.node for o in n.output}
    smoothed_inputs = [producers[n.input[0]] for n in graph.node
                       if n.op_type == "MatMul" and n.input[0].endswith("_smoothed")]
    assert len(smoothed_inputs) == 8
    assert {producers[mul.input[0]].op_type for mul in smoothed_inputs} == {"LayerNormalization"}


# -- gate ---------------------------------------------------------------------------------------
def test_gate_passes_on_a_good_model_and_records_its_figures(bert_tiny_built):
    gate = _manifest(bert_tiny_built.out)["gate"]
    assert gate["passed"] and gate["mean_cosine"] >= 0.99 and gate["min_cosine"] >= 0.97
    assert gate["num_texts"] > 48  # the held-out sentences plus long passages
    assert "gate: passed" in bert_tiny_built.log


def test_unreachable_gate_fails_the_build_and_int8_is_not_served(bert_tiny_built_copy):
    built = bert_run_build(bert_tiny_built_copy.checkpoint, bert_tiny_built_copy.out, "--min-mean-cosine", "1.01")
    assert built.exit_code == 1
    assert "accuracy gate FAILED" in built.log and "need >= 1.01" in built.log
    gate = _manifest(built.out)["gate"]
    assert gate["passed"] is False and gate["min_mean_cosine"] == 1.01
    with pytest.raises(ArtifactsError, match="has not passed the accuracy gate"):
        BertEncoder.from_artifacts(built.out, precision="int8")
    assert BertEncoder.from_artifacts(built.out, precision="fp32").encode(["still fine"])["embedding"].shape == (1, 32)


def test_corrupted_int8_model_fails_the_gate(bert_tiny_built_copy):
    from transformers import AutoTokenizer, BertModel

    path = bert_tiny_built_copy.out / "model.int8.onnx"
    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    for tensor in model.graph.initializer:  # scramble every per-channel weight scale
        values = numpy_helper.to_array(tensor)
        if tensor.name.endswith("_scale") and values.ndim == 1:
            tensor.CopyFrom(numpy_helper.from_array(values * rng.uniform(0.1, 10, values.shape).astype(values.dtype),
                                                    tensor.name))
    onnx.save(model, str(path))
    texts = ["A man is eating food.", "Triton serves models.", "The weather is nice today."]
    checkpoint = bert_tiny_built_copy.checkpoint
    reference = reference_outputs(BertModel.from_pretrained(checkpoint).eval(),
                                  AutoTokenizer.from_pretrained(checkpoint), texts, 64, "embedding")
    result = evaluate_gate(reference, candidate_outputs(bert_tiny_built_copy.out, texts), "embedding")
    with pytest.raises(GateFailed, match="accuracy gate FAILED") as failure:
        enforce(result)
    assert failure.value.result.mean_cosine < 0.99


# -- idempotency and manifest -------------------------------------------------------------------
def test_second_run_skips_every_step_and_changes_nothing(bert_tiny_built_copy):
    before = {p.name: p.read_bytes() for p in bert_tiny_built_copy.out.iterdir()}
    again = bert_run_build(bert_tiny_built_copy.checkpoint, bert_tiny_built_copy.out)
    assert again.exit_code == 0
    for step in ("tokenizer", "weights", "export", "quantize", "gate"):
        assert f"[bert] {step}: up to date" in again.log
    assert {p.name: p.read_bytes() for p in again.out.iterdir()} == before


def test_a_missing_output_rebuilds_only_the_steps_that_depend_on_it(bert_tiny_built_copy):
    int8 = bert_tiny_built_copy.out / "model.int8.onnx"
    original = int8.read_bytes()
    int8.unlink()
    again = bert_run_build(bert_tiny_built_copy.checkpoint, bert_tiny_built_copy.out)
    assert again.exit_code == 0, again.log
    assert "[bert] export: up to date" in again.log
    assert "[bert] quantize: wrote model.int8.onnx" in again.log
    # Calibration is deterministic: the same bytes come back, so the recorded gate still applies.
    assert int8.read_bytes() == original and "[bert] gate: up to date" in again.log


def test_manifest_records_source_hashes_artifacts_and_versions(bert_tiny_built):
    import onnxruntime
    import transformers

    manifest = _manifest(bert_tiny_built.out)
    checkpoint = bert_tiny_built.checkpoint
    assert manifest["source"]["path"] == str(checkpoint)
    assert manifest["source"]["weights_sha256"] == {"model.safetensors": _sha256(checkpoint / "model.safetensors")}
    assert manifest["task"] == "embedding" and manifest["hidden_size"] == 32 and manifest["id2label"] == {}
    assert manifest["max_length"] == 64  # the tiny config's position embeddings cap the tokenizer's 512
    for name in ("model.fp32.onnx", "model.int8.onnx", "tokenizer.json", "config.json"):
        assert manifest["artifacts"][name] == _sha256(bert_tiny_built.out / name)
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["onnxruntime"] == onnxruntime.__version__
    assert manifest["versions"]["transformers"] == transformers.__version__
    assert datetime.fromisoformat(manifest["created_at"]).tzinfo is not None
    assert manifest["quantization"]["num_calibration_texts"] > 48


# -- weights for runtime "torch" --------------------------------------------------------------------
def test_weights_are_copied_and_recorded_with_their_sha256(bert_tiny_built):
    from safetensors.torch import load_file

    out, checkpoint = bert_tiny_built.out, bert_tiny_built.checkpoint
    manifest = _manifest(out)
    sha = _sha256(checkpoint / "model.safetensors")
    assert _sha256(out / "model.safetensors") == sha
    assert manifest["weights"] == "model.safetensors" and manifest["artifacts"]["model.safetensors"] == sha
    assert manifest["steps"]["weights"]["outputs"] == {"model.safetensors": sha}
    assert "[bert] weights: wrote model.safetensors" in bert_tiny_built.log
    # What the torch runtime loads: the HF model's own tensors, under the HF names.
    from transformers import BertModel

    reference = BertModel.from_pretrained(checkpoint).state_dict()
    copied = load_file(out / "model.safetensors")
    assert {k.removeprefix("bert.") for k in copied} >= {k for k in reference if "position_ids" not in k}


def test_torch_only_build_has_what_the_torch_runtime_reads_and_no_onnx(bert_tiny_checkpoint, tmp_path):
    from trident.bert.artifacts import BertArtifacts
    from trident.bert.torch_model import load_packed_bert

    built = bert_run_build(bert_tiny_checkpoint, tmp_path / "out", "--torch-only")
    assert built.exit_code == 0, built.log
    assert sorted(p.name for p in built.out.glob("*.onnx")) == []
    artifacts = BertArtifacts.load(built.out)
    assert artifacts.hidden_size == 32 and not artifacts.gate_passed  # no INT8 ONNX to serve
    with pytest.raises(ArtifactsError, match="accuracy gate"):
        artifacts.model_path("int8")
    model = load_packed_bert(built.out)  # config.json + model.safetensors from the artifacts alone
    assert model.shape.hidden_size == 32
    again = bert_run_build(bert_tiny_checkpoint, built.out, "--torch-only")
    assert "[bert] weights: up to date" in again.log and "export" not in again.log


def test_pytorch_bin_checkpoint_is_converted_to_the_same_tensors(bert_tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file
    from transformers import BertModel

    from build.bert_checkpoint import copy_weights, inspect_checkpoint

    checkpoint = Path(shutil.copytree(bert_tiny_checkpoint, tmp_path / "bin"))
    (checkpoint / "model.safetensors").unlink()
    model = BertModel.from_pretrained(bert_tiny_checkpoint)
    torch.save(model.state_dict(), checkpoint / "pytorch_model.bin")
    (tmp_path / "out").mkdir()
    path = copy_weights(inspect_checkpoint(checkpoint), tmp_path / "out")
    converted = load_file(path)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(converted[name], tensor, rtol=0, atol=0)


def test_classifier_manifest_has_labels_and_gates_on_logits(bert_tiny_classifier_built):
    manifest = _manifest(bert_tiny_classifier_built.out)
    assert manifest["task"] == "classification" and manifest["output_name"] == "logits"
    assert manifest["id2label"] == {str(k): v for k, v in BERT_TINY_LABELS.items()}
    gate = manifest["gate"]
    assert gate["metric"] == "logit cosine" and gate["passed"] and 0.0 <= gate["top1_agreement"] <= 1.0
    assert "top-1 agreement" in bert_tiny_classifier_built.log


def test_bad_checkpoint_is_a_clear_error(tmp_path):
    built = bert_run_build(tmp_path, tmp_path / "out")
    assert built.exit_code == 2 and "not a Hugging Face checkpoint" in built.log
