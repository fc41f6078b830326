"""Fixtures for the unit tests: `one_torch_thread`, and the BERT build/runtime fixtures (``bert_``).

Tiny random BERT checkpoints with the REAL MiniLM tokenizer/vocabulary are built once per session
and pushed through the real build entry point, so every runtime test reads genuine artifacts.
"""
from __future__ import annotations

import contextlib
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: fanning matmuls out over threads costs more than it saves, and CI cores are
    shared. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


BERT_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
BERT_TINY_LABELS = {0: "negative", 1: "neutral", 2: "positive"}
# Fewer texts than the default build: enough to calibrate and gate a 2-layer model, and quick.
BERT_TINY_BUILD_ARGS = ["--num-calibration", "48", "--num-held-out", "48"]


@dataclass(frozen=True)
class BertBuilt:
    checkpoint: Path
    out: Path
    exit_code: int
    log: str


def bert_tiny_config(**overrides):
    from transformers import BertConfig

    values = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64)
    return BertConfig(**(values | overrides))


def bert_save_checkpoint(model, directory: Path) -> Path:
    from build.weights import minilm_dir

    model.eval().save_pretrained(directory)
    for name in BERT_TOKENIZER_FILES:
        shutil.copyfile(minilm_dir(verify=False) / name, directory / name)
    return directory


def bert_run_build(checkpoint: Path, out: Path, *extra: str) -> BertBuilt:
    from build.bert import main

    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = main(["--checkpoint", str(checkpoint), "--out", str(out), *BERT_TINY_BUILD_ARGS, *extra])
    return BertBuilt(checkpoint, out, code, log.getvalue())


@pytest.fixture(scope="session")
def bert_tiny_checkpoint(tmp_path_factory) -> Path:
    import torch
    from transformers import BertModel

    torch.manual_seed(0)
    return bert_save_checkpoint(BertModel(bert_tiny_config()), tmp_path_factory.mktemp("bert_tiny"))


@pytest.fixture(scope="session")
def bert_tiny_classifier_checkpoint(tmp_path_factory) -> Path:
    import torch
    from transformers import BertForSequenceClassification

    torch.manual_seed(1)
    config = bert_tiny_config(num_labels=len(BERT_TINY_LABELS), id2label=BERT_TINY_LABELS,
                              label2id={v: k for k, v in BERT_TINY_LABELS.items()})
    return bert_save_checkpoint(BertForSequenceClassification(config), tmp_path_factory.mktemp("bert_tiny_cls"))


@pytest.fixture(scope="session")
def bert_tiny_built(bert_tiny_checkpoint, tmp_path_factory) -> BertBuilt:
    """The tiny embedding model through ``python -m build.bert`` (read-only for tests: copy to modify)."""
    built = bert_run_build(bert_tiny_checkpoint, tmp_path_factory.mktemp("bert_tiny_artifacts"))
    assert built.exit_code == 0, built.log
    return built


@pytest.fixture(scope="session")
def bert_tiny_classifier_built(bert_tiny_classifier_checkpoint, tmp_path_factory) -> BertBuilt:
    built = bert_run_build(bert_tiny_classifier_checkpoint, tmp_path_factory.mktemp("bert_tiny_cls_artifacts"))
    assert built.exit_code == 0, built.log
    return built


@pytest.fixture
def bert_tiny_built_copy(bert_tiny_built, tmp_path) -> BertBuilt:
    """A private copy of the tiny build, for tests that rebuild, corrupt or fail it."""
    out = Path(shutil.copytree(bert_tiny_built.out, tmp_path / "artifacts"))
    return BertBuilt(bert_tiny_built.checkpoint, out, bert_tiny_built.exit_code, bert_tiny_built.log)
