"""build/bert_gpu.py: the GPU `bert` model directory, checked with Triton's own config schema."""
from __future__ import annotations

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from build.bert_gpu import MODEL_PY, GpuModelOptions, main, write_gpu_model
from tests.unit.conftest import BERT_TINY_LABELS
from trident.bert.artifacts import ArtifactsError


def parse_config(model_dir) -> model_config_pb2.ModelConfig:
    """Triton's ModelConfig message: an unknown field or a type error fails the parse, as in Triton."""
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def parameters(config: model_config_pb2.ModelConfig) -> dict[str, str]:
    return {key: value.string_value for key, value in config.parameters.items()}


def test_embedding_model_serves_torch_on_the_gpu_with_batches_sized_for_it(bert_tiny_built, tmp_path):
    model_dir = write_gpu_model(tmp_path / "repo", bert_tiny_built.out, GpuModelOptions(precision="int8"))
    config = parse_config(model_dir)
    assert config.name == "bert" and config.backend == "python" and config.max_batch_size == 128
    assert [(o.name, list(o.dims)) for o in config.output] == [("embedding", [32])]  # hidden size of the build
    assert list(config.dynamic_batching.preferred_batch_size) == [32, 64, 128]
    assert config.dynamic_batching.max_queue_delay_microseconds == 0  # a lone request never waits
    # one preferred instance (priority 1) and three that the rate limiter picks only while it is busy
    groups = [(g.kind, g.count, list(g.gpus), g.rate_limiter.priority) for g in config.instance_group]
    gpu = model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert groups == [(gpu, 1, [0], 1), (gpu, 3, [0], 1000)]
    assert parameters(config) == {"artifacts": "artifacts", "runtime": "torch", "precision": "int8",
                                  "device": "cuda", "max_length": "", "max_num_seqs": "128"}
    assert (model_dir / "1" / "model.py").read_text() == MODEL_PY.read_text()
    assert (model_dir / "1" / "artifacts" / "model.safetensors").read_bytes() == \
        (bert_tiny_built.out / "model.safetensors").read_bytes()


def test_classifier_declares_logits_and_labels(bert_tiny_classifier_built, tmp_path):
    options = GpuModelOptions(name="cls", max_batch_size=256, num_instances=1, max_length=48)
    config = parse_config(write_gpu_model(tmp_path, bert_tiny_classifier_built.out, options, copy_artifacts=True))
    assert [(g.count, g.rate_limiter.priority) for g in config.instance_group] == [(1, 1)]
    assert [(o.name, list(o.dims)) for o in config.output] == [("logits", [len(BERT_TINY_LABELS)]), ("label", [1])]
    assert list(config.dynamic_batching.preferred_batch_size) == [64, 128, 256]
    assert parameters(config)["max_length"] == "48" and parameters(config)["precision"] == "fp16"
    assert not (tmp_path / "cls" / "1" / "artifacts").is_symlink()


def test_rewriting_replaces_the_model_in_place(bert_tiny_built, tmp_path):
    write_gpu_model(tmp_path, bert_tiny_built.out, GpuModelOptions(precision="fp16"))
    model_dir = write_gpu_model(tmp_path, bert_tiny_built.out, GpuModelOptions(precision="int8"))
    assert parameters(parse_config(model_dir))["precision"] == "int8"


def test_artifacts_without_weights_are_refused(bert_tiny_built, tmp_path):
    import shutil

    artifacts = shutil.copytree(bert_tiny_built.out, tmp_path / "artifacts")
    (artifacts / "model.safetensors").unlink()
    with pytest.raises(ArtifactsError, match="no model.safetensors"):
        write_gpu_model(tmp_path / "repo", artifacts, GpuModelOptions())
    assert main(["--repository", str(tmp_path / "repo"), "--artifacts", str(artifacts)]) == 2


@pytest.mark.parametrize("kwargs", [{"precision": "int4"}, {"max_batch_size": 0}, {"num_instances": 0}])
def test_invalid_options_are_rejected(kwargs):
    with pytest.raises(ValueError):
        GpuModelOptions(**kwargs)
