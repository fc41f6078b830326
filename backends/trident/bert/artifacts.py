"""The built artifacts directory: file names and the manifest contract between build and runtime.

``build/bert.py`` writes this layout; ``BertArtifacts.load`` is the only reader. Keeping both sides on
these constants means a renamed file cannot silently split them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
MODEL_FILES = {"fp32": "model.fp32.onnx", "int8": "model.int8.onnx"}
# The checkpoint's weights and config.json, for runtime "torch" (it builds its model from them).
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TASKS = ("embedding", "classification")


class ArtifactsError(RuntimeError):
    """The artifacts directory is missing, incomplete, or was not accepted by the build."""


@dataclass(frozen=True)
class BertArtifacts:
    """What the runtime needs to know about a built model (a view of ``manifest.json``).

    ``max_length`` is the sequence length the model was built and gated for (for sentence-transformers
    checkpoints their ``max_seq_length``); ``max_length_limit`` is the hard ceiling a user may
    raise it to (the position embeddings, or the tokenizer's ``model_max_length`` if smaller).
    ``gate_passed`` is False when the INT8 model failed the accuracy gate.
    """
    directory: Path
    task: str
    hidden_size: int
    max_length: int
    max_length_limit: int
    input_names: tuple[str, ...]
    id2label: dict[int, str] = field(default_factory=dict)
    gate_passed: bool = False

    @classmethod
    def load(cls, directory: str | Path) -> "BertArtifacts":
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise ArtifactsError(f"no {MANIFEST} in {directory}: build the model first "
                                 "(python -m build.bert --out <dir>)")
        manifest = json.loads(path.read_text())
        if manifest.get("task") not in TASKS:
            raise ArtifactsError(f"{path}: task must be one of {TASKS}, got {manifest.get('task')!r}")
        return cls(
            directory=directory,
            task=manifest["task"],
            hidden_size=int(manifest["hidden_size"]),
            max_length=int(manifest["max_length"]),
            max_length_limit=int(manifest["max_length_limit"]),
            input_names=tuple(manifest["input_names"]),
            id2label={int(k): v for k, v in manifest.get("id2label", {}).items()},
            gate_passed=bool(manifest.get("gate", {}).get("passed", False)),
        )

    @property
    def tokenizer_path(self) -> Path:
        return self.directory / TOKENIZER

    def model_path(self, precision: str) -> Path:
        """The ONNX file for ``precision``; INT8 only once it has passed the build's accuracy gate."""
        path = self.directory / MODEL_FILES[precision]
        if precision == "int8" and not self.gate_passed:
            raise ArtifactsError(f"{self.directory}: the INT8 model has not passed the accuracy gate "
                                 "(see manifest.json 'gate'); rebuild or serve precision 'fp32'")
        if not path.is_file():
            raise ArtifactsError(f"{path} is missing: rebuild with python -m build.bert --force")
        return path
