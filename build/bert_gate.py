"""Step 3: the accuracy gate. INT8 as served (our runtime) vs the FP32 Hugging Face model.

Embedding checkpoints compare sentence embeddings (mean pooling over the attention mask, then L2
normalisation: sentence-transformers semantics); classification checkpoints compare logit vectors
and also report top-1 agreement. The texts must be held out from calibration.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from trident.bert.artifacts import BertArtifacts
from trident.bert.encoder import BertEncoder
from trident.bert.options import EncoderOptions

MIN_MEAN_COSINE = 0.99
MIN_MIN_COSINE = 0.97
REFERENCE_BATCH_SIZE = 32


@dataclass(frozen=True)
class GateResult:
    metric: str
    num_texts: int
    mean_cosine: float
    min_cosine: float
    min_mean_cosine: float
    min_min_cosine: float
    top1_agreement: float | None = None

    @property
    def passed(self) -> bool:
        return self.mean_cosine >= self.min_mean_cosine and self.min_cosine >= self.min_min_cosine

    def summary(self) -> str:
        text = (f"{self.metric} on {self.num_texts} held-out texts: mean {self.mean_cosine:.4f} "
                f"(need >= {self.min_mean_cosine}), min {self.min_cosine:.4f} (need >= {self.min_min_cosine})")
        if self.top1_agreement is not None:
            text += f", top-1 agreement {self.top1_agreement:.1%}"
        return text

    def to_dict(self) -> dict:
        return asdict(self) | {"passed": self.passed}


class GateFailed(RuntimeError):
    def __init__(self, result: GateResult) -> None:
        super().__init__(f"accuracy gate FAILED: {result.summary()}")
        self.result = result


def reference_outputs(model: torch.nn.Module, tokenizer, texts: list[str], max_length: int,
                      task: str) -> np.ndarray:
    """FP32 PyTorch outputs: [N, hidden] unit embeddings or [N, num_labels] logits."""
    rows = []
    for start in range(0, len(texts), REFERENCE_BATCH_SIZE):
        batch = tokenizer(texts[start:start + REFERENCE_BATCH_SIZE], padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        with torch.inference_mode():
            output = model(**batch)
        if task == "classification":
            rows.append(output.logits.float().numpy())
            continue
        mask = batch["attention_mask"].unsqueeze(-1).float()                        # [batch, seq, 1]
        pooled = (output.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [batch, hidden]
        rows.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
    return np.concatenate(rows)


def candidate_outputs(artifacts_dir: Path, texts: list[str], precision: str = "int8") -> np.ndarray:
    """The candidate model's outputs through the serving runtime, before the gate has accepted it."""
    artifacts = replace(BertArtifacts.load(artifacts_dir), gate_passed=True)  # the model under test
    encoder = BertEncoder(artifacts, EncoderOptions(precision=precision))
    outputs = encoder.encode(texts)
    return outputs["embedding"] if encoder.task == "embedding" else outputs["logits"]


def evaluate_gate(reference: np.ndarray, candidate: np.ndarray, task: str,
                  min_mean_cosine: float = MIN_MEAN_COSINE, min_min_cosine: float = MIN_MIN_COSINE) -> GateResult:
    cosines = _cosines(reference, candidate)
    top1 = float((reference.argmax(-1) == candidate.argmax(-1)).mean()) if task == "classification" else None
    return GateResult(metric="logit cosine" if task == "classification" else "embedding cosine",
                      num_texts=len(cosines), mean_cosine=float(cosines.mean()), min_cosine=float(cosines.min()),
                      min_mean_cosine=min_mean_cosine, min_min_cosine=min_min_cosine, top1_agreement=top1)


def enforce(result: GateResult) -> GateResult:
    if not result.passed:
        raise GateFailed(result)
    return result


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-12)  # [N]
    return (a * b).sum(-1) / norms
