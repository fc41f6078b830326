"""Step 1: the FP32 ONNX export, with dynamic batch and sequence axes, checked against PyTorch."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from build.bert_checkpoint import BertCheckpoint

PARITY_ATOL = 1e-3  # FP32 ONNX Runtime vs PyTorch differ by kernel order only (~1e-6 seen)


class ExportMismatch(RuntimeError):
    """The exported graph does not reproduce the PyTorch model."""


class _Forward(torch.nn.Module):
    """The model with named tensor inputs and one tensor output, as the ONNX graph should look."""

    def __init__(self, model: torch.nn.Module, output_name: str) -> None:
        super().__init__()
        self.model = model
        self.output_name = output_name

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        return getattr(self.model(**inputs), self.output_name)


def export_onnx(model: torch.nn.Module, checkpoint: BertCheckpoint, sample: dict[str, np.ndarray],
                out_path: Path) -> None:
    """Export with the dynamo exporter; ``sample`` holds example int64 [batch, seq] inputs."""
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    kwargs = {name: torch.from_numpy(sample[name]) for name in checkpoint.input_names}
    with warnings.catch_warnings():
        # Both axes are shared by every input; the exporter notes each repeat of the same name.
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        torch.onnx.export(_Forward(model, checkpoint.output_name).eval(), (), kwargs=kwargs,
                          f=str(out_path), output_names=[checkpoint.output_name],
                          dynamic_shapes={name: {0: batch, 1: sequence} for name in kwargs},
                          dynamo=True, external_data=False, verbose=False)


def check_parity(model: torch.nn.Module, onnx_path: Path, batches: list[dict[str, np.ndarray]],
                 atol: float = PARITY_ATOL) -> float:
    """Max |ONNX - PyTorch| over real (unmasked) positions; raises ExportMismatch above ``atol``.

    Pass batches of different sizes and lengths: that is what proves the axes are dynamic.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    worst = 0.0
    for feeds in batches:
        ours = session.run(None, {name: feeds[name] for name in names})[0]
        with torch.inference_mode():
            output = model(**{name: torch.from_numpy(feeds[name]) for name in names})
        reference = (output.logits if ours.ndim == 2 else output.last_hidden_state).numpy()
        if ours.ndim == 3:  # [batch, seq, hidden]: padded positions are free to differ
            ours, reference = ours[feeds["attention_mask"] == 1], reference[feeds["attention_mask"] == 1]
        worst = max(worst, float(np.abs(ours - reference).max()))
    if worst > atol:
        raise ExportMismatch(f"{onnx_path}: ONNX differs from PyTorch by {worst:.2e} (> {atol:.0e})")
    return worst
