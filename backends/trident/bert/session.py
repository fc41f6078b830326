"""Model sessions: the one place a runtime is chosen and a forward pass runs.

A session maps a ``TokenBatch`` to the model's single output (``last_hidden_state`` [batch, seq,
hidden] or ``logits`` [batch, num_labels]). ONNX Runtime on CPU is the only implementation today;
a torch or TensorRT session would be another class with the same ``run``, picked in ``open_session``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from trident.bert.options import EncoderOptions
from trident.bert.tokenizer import TokenBatch


class OnnxRuntimeSession:
    def __init__(self, model_path: Path, options: EncoderOptions) -> None:
        session_options = ort.SessionOptions()
        session_options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if options.num_threads is not None:
            session_options.intra_op_num_threads = options.num_threads
        # Triton may run several model instances in one process; threads stay local to a session.
        session_options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(model_path), session_options,
                                             providers=["CPUExecutionProvider"])
        self.input_names = tuple(i.name for i in self._session.get_inputs())
        self.output_name = self._session.get_outputs()[0].name

    def run(self, batch: TokenBatch) -> np.ndarray:
        return self._session.run([self.output_name], batch.feeds(self.input_names))[0]


def open_session(model_path: Path, options: EncoderOptions) -> OnnxRuntimeSession:
    """The session for ``options.runtime`` / ``options.device`` (validated by EncoderOptions)."""
    return OnnxRuntimeSession(model_path, options)
