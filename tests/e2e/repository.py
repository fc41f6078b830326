"""The repository the e2e server serves: the real models of model_repository/ plus test-only models.

`bert_classifier` is a small BertForSequenceClassification checkpoint made here (random weights,
real MiniLM tokenizer) and built by the real build entry point (export -> INT8 -> gate), served by
the same backend code as `bert` with a literal config that declares `logits` and `label`.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLASSIFIER_LABELS = {0: "business", 1: "science", 2: "sports", 3: "world"}

CLASSIFIER_CONFIG = """
name: "bert_classifier"
backend: "python"
max_batch_size: 64
input [ { name: "text_input" data_type: TYPE_STRING dims: [ 1 ] } ]
output [
  { name: "logits" data_type: TYPE_FP32 dims: [ %d ] },
  { name: "label" data_type: TYPE_STRING dims: [ 1 ] }
]
dynamic_batching { max_queue_delay_microseconds: 2000 }
instance_group [ { count: 1, kind: KIND_CPU } ]
parameters { key: "precision" value: { string_value: "int8" } }
""" % len(CLASSIFIER_LABELS)


def make_classifier_checkpoint(directory: Path) -> Path:
    """A 2-layer BERT classifier with the real MiniLM vocabulary and tokenizer files."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from build.weights import minilm_dir

    source = minilm_dir()
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=512, num_labels=len(CLASSIFIER_LABELS),
                        id2label=CLASSIFIER_LABELS, label2id={v: k for k, v in CLASSIFIER_LABELS.items()})
    torch.manual_seed(0)
    BertForSequenceClassification(config).eval().save_pretrained(directory)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, directory / name)
    return directory


def build_classifier(repository: Path) -> Path:
    model_dir = repository / "bert_classifier"
    checkpoint = make_classifier_checkpoint(repository.parent / "classifier_checkpoint")
    shutil.copytree(ROOT / "model_repository" / "bert" / "1", model_dir / "1",
                    ignore=shutil.ignore_patterns("artifacts", "__pycache__"))
    subprocess.run([sys.executable, "-m", "build.bert", "--checkpoint", str(checkpoint),
                    "--out", str(model_dir / "1" / "artifacts")], cwd=ROOT, check=True)
    (model_dir / "config.pbtxt").write_text(CLASSIFIER_CONFIG)
    return model_dir


def build_fp32_bert(repository: Path, bert_dir: Path) -> Path:
    """`bert_fp32`: the default model's FP32 ONNX, chosen by the `precision` parameter alone."""
    model_dir = repository / "bert_fp32"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.py").symlink_to(bert_dir / "1" / "model.py")
    (model_dir / "1" / "artifacts").symlink_to(bert_dir / "1" / "artifacts")
    config = (bert_dir / "config.pbtxt").read_text().replace('name: "bert"', 'name: "bert_fp32"')
    config = config.replace('string_value: "int8"', 'string_value: "fp32"')
    (model_dir / "config.pbtxt").write_text(config)
    return model_dir


def assemble_repository(repository: Path) -> Path:
    repository.mkdir(parents=True)
    for model in sorted((ROOT / "model_repository").iterdir()):
        if (model / "config.pbtxt").is_file() and (model / "1" / "artifacts").is_dir():
            (repository / model.name).symlink_to(model)
    build_classifier(repository)
    if (repository / "bert").exists():
        build_fp32_bert(repository, ROOT / "model_repository" / "bert")
    if (repository / "gpt").exists():
        build_small_queue_gpt(repository, ROOT / "model_repository" / "gpt")
    return repository


SMALL_QUEUE_ENGINE = {"max_num_seqs": 1, "max_queue_size": 1}


def build_small_queue_gpt(repository: Path, gpt_dir: Path) -> Path:
    """`gpt_small_queue`: the real gpt model with one running and one waiting slot, so the
    queue-full path can be exercised without flooding the main model."""
    import json

    model_dir = repository / "gpt_small_queue"
    shutil.copytree(gpt_dir / "1", model_dir / "1", ignore=shutil.ignore_patterns("artifacts", "__pycache__"))
    engine = json.loads((gpt_dir / "1" / "engine.json").read_text())
    engine.update(SMALL_QUEUE_ENGINE, model=str((gpt_dir / "1" / engine["model"]).resolve()))
    (model_dir / "1" / "engine.json").write_text(json.dumps(engine, indent=2))
    config = (gpt_dir / "config.pbtxt").read_text().replace('name: "gpt"', 'name: "gpt_small_queue"')
    (model_dir / "config.pbtxt").write_text(config)
    return model_dir
