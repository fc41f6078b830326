"""build/bert_gpu.py's instance groups under Triton's rate limiter: sequential requests stay on the
preferred instance (a warm one: batch-1 latency), a burst still spreads over all of them.

The GPU config is served on the CPU here (ONNX Runtime, KIND_CPU; routing does not depend on the
device), and which stub process ran each execute() comes from the model's phase log.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from build.bert_gpu import GpuModelOptions, write_gpu_model
from tests.conftest import start_server
from trident.server import launch
from trident.phase_log import BERT_PHASES_ENV, read_records

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
NUM_INSTANCES = 3
TEXTS = ["A man is eating food.", "Triton serves many models at once on one GPU.", "The new movie is awesome!"]


def cpu_copy_of_gpu_model(repository: Path) -> None:
    options = GpuModelOptions(name="bert_routed", precision="int8", num_instances=NUM_INSTANCES)
    model_dir = write_gpu_model(repository, ROOT / "model_repository" / "bert" / "1" / "artifacts", options)
    config = (model_dir / "config.pbtxt").read_text().replace('"torch"', '"onnxruntime"').replace('"cuda"', '"cpu"')
    (model_dir / "config.pbtxt").write_text(config.replace("KIND_GPU, gpus: [ 0 ]", "KIND_CPU"))


def infer(url: str, texts: list[str]) -> None:
    data = np.array([[t.encode()] for t in texts], dtype=np.object_)
    tensor = grpcclient.InferInput("text_input", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    with grpcclient.InferenceServerClient(url) as client:
        assert client.infer("bert_routed", [tensor]).as_numpy("embedding").shape == (len(texts), 384)


def executes_per_instance(phases: Path, window: tuple[float, float]) -> list[int]:
    """execute() calls that started inside ``window``, per stub process that made any."""
    counts = [len(rows) for rows in read_records(phases, "bert_routed", window).values()]
    return sorted((n for n in counts if n), reverse=True)


def test_sequential_requests_stay_on_one_instance_and_bursts_use_all(tmp_path, monkeypatch):
    repository = tmp_path / "repository"
    cpu_copy_of_gpu_model(repository)
    monkeypatch.setenv(BERT_PHASES_ENV, str(tmp_path / "phases"))
    server = start_server(repository, tmp_path, extra=["--rate-limit=execution_count"])
    process, url = server.process, server.grpc_url
    try:
        infer(url, TEXTS)  # every instance has loaded; the first calls may go anywhere (ties)
        sequential = [time.time()]
        for i in range(40):
            infer(url, [TEXTS[i % len(TEXTS)]])
        sequential.append(time.time())
        with ThreadPoolExecutor(8) as pool:
            burst = [time.time()]
            list(pool.map(lambda i: infer(url, TEXTS * 5), range(48)))
            burst.append(time.time())
    finally:
        assert launch.stop(process) == 0  # the stubs write their last phase records at unload
    one_by_one = executes_per_instance(tmp_path / "phases", tuple(sequential))
    assert sum(one_by_one) == 40 and one_by_one[0] >= 36, f"executes per instance: {one_by_one}"
    at_once = executes_per_instance(tmp_path / "phases", tuple(burst))
    assert len(at_once) == NUM_INSTANCES, f"executes per instance in the burst: {at_once}"
