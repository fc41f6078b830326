"""Serve `bert` on the GPU: a model directory with runtime "torch" on CUDA, fp16 or INT8.

    python -m build.bert --torch-only                      # or a full build: both serve
    python -m build.bert_gpu --repository /srv/models --precision fp16
    python -m trident.server.launch --model-repository /srv/models -- --rate-limit=execution_count

The default `model_repository/bert` serves ONNX Runtime INT8 on the CPU, so a CPU-only machine
loads it; this writes `<repository>/<name>/` beside it for GPU machines: the same Python model
(`1/model.py`), the built artifacts (linked, or copied with ``--copy-artifacts``), and the config
below. Its output dims and names come from the artifacts' manifest (hidden size, or the labels of a
classifier), so a BERT-base build gets `embedding` [768] without editing anything.

Why these settings: the torch runtime packs tokens and replays one CUDA graph per (sequence count,
token count) bucket, so the dynamic batcher hands it whole batches (`preferred_batch_size` powers of
two, the graph buckets). It does not wait for them (`max_queue_delay_microseconds` 0): under load
requests pile up while every instance is busy and the next free one takes them all (H200, BERT-base
fp16: mean batch 66 and 13.4k seq/s at 0 µs, 67.8 and 13.2k at 100 µs), while a lone request would
wait out the whole delay (the no-work `floor` model: batch-1 p50 0.81 ms at 100 µs, 0.59 ms at 0).
Several instances let some tokenize (4.4 ms per 128 texts of 128 tokens on the H200 host, on all
its cores) while another's batch runs on the GPU: the Python backend runs one execute() per
instance at a time. At batch 1 more instances cost latency: Triton hands sequential requests to its
instances in turn, so each one wakes up cold (caches, clocks, a GPU context switch). Measured on
the H200 (loadtest/bench_bert.py, BERT-base fp16, 128-token texts, all instances equal):

    instances   seq/s (closed loop, 1-16 texts a request)   batch-1 gRPC p50 / p99
    4           13.2k                                       2.32 / 3.14 ms
    2           10.7k                                       2.15 / 3.00 ms
    1            7.2k                                       1.99 / 2.63 ms

So one instance is preferred: under tritonserver's `--rate-limit=execution_count` the rate limiter
gives work to the available instance with the fewest executions x priority, and the overflow
instances' priority (`OVERFLOW_PRIORITY`) keeps them idle while the preferred one is free.
Sequential requests then stay on one warm instance and bursts still spread over all of them (CPU
check, 4 ONNX Runtime instances: 292 of 300 sequential calls on one instance, p50 2.90 -> 1.67 ms,
a burst ran on all four; tests/e2e/test_bert_instance_routing.py). Without that option the
priorities are ignored and the instances take turns, as in the table.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from trident.bert.artifacts import CONFIG, WEIGHTS, ArtifactsError, BertArtifacts

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_PY = REPO_ROOT / "model_repository" / "bert" / "1" / "model.py"
DEFAULT_ARTIFACTS = REPO_ROOT / "model_repository" / "bert" / "1" / "artifacts"
TORCH_PRECISIONS = ("fp16", "int8", "bf16", "fp32")

CONFIG_PBTXT = """\
# {name}: {description}, runtime "torch" on CUDA, precision {precision} (written by build/bert_gpu.py).
name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}

input [
  {{
    name: "text_input"
    data_type: TYPE_STRING
    dims: [ 1 ]
  }}
]
output [
{outputs}
]

dynamic_batching {{
  preferred_batch_size: [ {preferred} ]
  max_queue_delay_microseconds: {max_queue_delay_us}
}}

instance_group [
{instance_groups}
]

parameters {{ key: "artifacts"  value: {{ string_value: "artifacts" }} }}
parameters {{ key: "runtime"    value: {{ string_value: "torch" }} }}
parameters {{ key: "precision"  value: {{ string_value: "{precision}" }} }}
parameters {{ key: "device"     value: {{ string_value: "cuda" }} }}
parameters {{ key: "max_length" value: {{ string_value: "{max_length}" }} }}
parameters {{ key: "max_num_seqs" value: {{ string_value: "{max_batch_size}" }} }}
"""
EMBEDDING_OUTPUT = """\
  {{
    # Mean pooling over the attention mask, L2-normalised (sentence-transformers semantics).
    name: "embedding"
    data_type: TYPE_FP32
    dims: [ {hidden_size} ]
  }}"""
# One instance that Triton's rate limiter prefers, the others taking work only while it is busy
# (module doc); without --rate-limit=execution_count the priorities are ignored.
INSTANCE_GROUP = "  {{ count: {count}, kind: KIND_GPU, gpus: [ {gpu} ], rate_limiter {{ priority: {priority} }} }}"
PREFERRED_PRIORITY = 1
OVERFLOW_PRIORITY = 1000  # an idle overflow instance is picked once per ~1000 executions of the preferred one
CLASSIFIER_OUTPUTS = """\
  {{ name: "logits" data_type: TYPE_FP32 dims: [ {num_labels} ] }},
  {{ name: "label" data_type: TYPE_STRING dims: [ 1 ] }}"""


@dataclass(frozen=True)
class GpuModelOptions:
    """How the GPU `bert` model is served; the defaults are the benchmarked configuration."""
    name: str = "bert"
    precision: str = "fp16"
    max_batch_size: int = 128
    max_queue_delay_us: int = 0
    num_instances: int = 4
    gpu: int = 0
    max_length: int | None = None   # None: the length the model was built for

    def __post_init__(self) -> None:
        if self.precision not in TORCH_PRECISIONS:
            raise ValueError(f"precision must be one of {TORCH_PRECISIONS}, got {self.precision!r}")
        if self.max_batch_size < 1 or self.num_instances < 1 or self.max_queue_delay_us < 0:
            raise ValueError("max_batch_size and num_instances must be >= 1, max_queue_delay_us >= 0")

    @property
    def preferred_batch_sizes(self) -> list[int]:
        """Powers of two from 16 up to max_batch_size (the runtime's sequence-count graph buckets)."""
        sizes = [size for size in (16, 32, 64, 128, 256, 512, 1024) if size < self.max_batch_size]
        return sizes[-2:] + [self.max_batch_size]


def config_pbtxt(artifacts: BertArtifacts, options: GpuModelOptions) -> str:
    """The literal config.pbtxt of the GPU model for these artifacts."""
    if artifacts.task == "embedding":
        outputs, description = EMBEDDING_OUTPUT.format(hidden_size=artifacts.hidden_size), "sentence embeddings"
    else:
        outputs, description = CLASSIFIER_OUTPUTS.format(num_labels=len(artifacts.id2label)), "classification"
    return CONFIG_PBTXT.format(
        name=options.name, description=description, precision=options.precision,
        max_batch_size=options.max_batch_size, outputs=outputs,
        preferred=", ".join(str(size) for size in options.preferred_batch_sizes),
        max_queue_delay_us=options.max_queue_delay_us, instance_groups=instance_groups(options),
        max_length="" if options.max_length is None else options.max_length)


def instance_groups(options: GpuModelOptions) -> str:
    """The preferred instance, then the overflow ones (if any), as instance_group entries."""
    groups = [INSTANCE_GROUP.format(count=1, gpu=options.gpu, priority=PREFERRED_PRIORITY)]
    if options.num_instances > 1:
        groups.append(INSTANCE_GROUP.format(count=options.num_instances - 1, gpu=options.gpu,
                                            priority=OVERFLOW_PRIORITY))
    return ",\n".join(groups)


def write_gpu_model(repository: Path, artifacts_dir: Path, options: GpuModelOptions,
                    copy_artifacts: bool = False) -> Path:
    """``<repository>/<name>/{config.pbtxt, 1/model.py, 1/artifacts}``; returns the model directory."""
    artifacts = BertArtifacts.load(artifacts_dir)
    for required in (WEIGHTS, CONFIG):
        if not (artifacts.directory / required).is_file():
            raise ArtifactsError(f"{artifacts.directory} has no {required}: rebuild with python -m build.bert "
                                 "(its weights step copies what runtime 'torch' reads)")
    model_dir = Path(repository) / options.name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(MODEL_PY, version_dir / "model.py")
    target = version_dir / "artifacts"
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.is_dir():
        shutil.rmtree(target)
    if copy_artifacts:
        shutil.copytree(artifacts.directory, target)
    else:
        target.symlink_to(artifacts.directory.resolve(), target_is_directory=True)
    (model_dir / "config.pbtxt").write_text(config_pbtxt(artifacts, options))
    return model_dir


def main(argv: list[str] | None = None) -> int:
    defaults = GpuModelOptions()
    parser = argparse.ArgumentParser(prog="python -m build.bert_gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True, help="model repository to write the model into")
    parser.add_argument("--artifacts", type=Path, default=DEFAULT_ARTIFACTS,
                        help="built artifacts (python -m build.bert) (default: %(default)s)")
    parser.add_argument("--name", default=defaults.name)
    parser.add_argument("--precision", default=defaults.precision, choices=TORCH_PRECISIONS)
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--max-queue-delay-us", type=int, default=defaults.max_queue_delay_us)
    parser.add_argument("--num-instances", type=int, default=defaults.num_instances)
    parser.add_argument("--gpu", type=int, default=defaults.gpu)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--copy-artifacts", action="store_true", help="copy instead of linking the artifacts")
    args = parser.parse_args(argv)
    try:
        options = GpuModelOptions(args.name, args.precision, args.max_batch_size, args.max_queue_delay_us,
                                  args.num_instances, args.gpu, args.max_length)
        model_dir = write_gpu_model(args.repository, args.artifacts, options, args.copy_artifacts)
    except (ArtifactsError, ValueError) as e:
        print(f"[bert_gpu] error: {e}", file=sys.stderr)
        return 2
    print(f"[bert_gpu] wrote {model_dir} (runtime torch, cuda:{options.gpu}, {options.precision}, "
          f"{options.num_instances} instances, max_batch_size {options.max_batch_size}); serve it with tritonserver "
          "--rate-limit=execution_count so that one instance takes sequential requests (module doc)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
