"""SmoothQuant for the LayerNorm-fed MatMuls: an exact FP32 rewrite that makes INT8 activations easy.

BERT's LayerNorm outputs carry a few channels far larger than the rest (MiniLM: max 28 vs median
1.8, the same channels in every layer). One per-tensor uint8 scale spends its range on them, and the
Q/K/V and FFN-up projections fed by those tensors lose the small channels. SmoothQuant (Xiao et al.,
2023) divides each input channel k by s_k and multiplies row k of the weight by s_k:
    x @ W == (x / s) @ (diag(s) W),   s_k = max|x_k| ** alpha / max|W_k| ** (1 - alpha)
moving the outliers into the weights, which are quantized per channel anyway.

ONNX Runtime ships this as ``quantize_static(..., extra_options={"SmoothQuant": True})``, but only
through Intel neural-compressor, which is not in our pinned set; this module is the same transform
for the one pattern we need. The LayerNorm output also feeds the residual branch, so ``1/s`` cannot
be folded into LayerNorm's gamma: an explicit Mul is inserted before the MatMuls ([tokens, hidden]
elementwise, negligible next to the MatMuls). Quantization itself stays ORT's (bert_quantize.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

LAYER_NORM_OPS = {"LayerNormalization", "SkipLayerNormalization"}
MIN_RANGE = 1e-5  # floor for channel maxima: an all-zero channel must not give a zero or infinite scale


@dataclass(frozen=True)
class SmoothReport:
    alpha: float
    num_activations: int     # LayerNorm outputs smoothed
    num_matmuls: int         # MatMuls whose weights absorbed the scales
    max_scale: float         # the largest s_k: how strong the outliers were


def smooth_layer_norm_matmuls(fp32_path: Path, out_path: Path, batches: list[dict[str, np.ndarray]],
                              alpha: float = 0.5) -> SmoothReport:
    """Write a smoothed copy of ``fp32_path``; ``batches`` are calibration feeds (with attention_mask)."""
    model = onnx.load(str(fp32_path))
    consumers = _layer_norm_fed_matmuls(model.graph)
    maxima = _activation_channel_maxima(fp32_path, list(consumers), batches)
    weights = {i.name: i for i in model.graph.initializer}
    max_scale = 0.0
    for activation, matmuls in consumers.items():
        scale = _smoothing_scale(maxima[activation], [numpy_helper.to_array(weights[m.input[1]]) for m in matmuls],
                                 alpha)
        for matmul in matmuls:
            weight = numpy_helper.to_array(weights[matmul.input[1]])            # [in_features, out_features]
            weights[matmul.input[1]].CopyFrom(numpy_helper.from_array(weight * scale[:, None], matmul.input[1]))
        _insert_division(model.graph, activation, matmuls, scale)
        max_scale = max(max_scale, float(scale.max()))
    onnx.save(model, str(out_path))
    return SmoothReport(alpha=alpha, num_activations=len(consumers),
                        num_matmuls=sum(len(m) for m in consumers.values()), max_scale=max_scale)


def _layer_norm_fed_matmuls(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """LayerNorm output tensor -> the MatMuls that read it with a constant 2-D weight."""
    producers = {output: node.op_type for node in graph.node for output in node.output}
    weights = {i.name for i in graph.initializer if len(i.dims) == 2}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.op_type == "MatMul" and producers.get(node.input[0]) in LAYER_NORM_OPS and node.input[1] in weights:
            consumers.setdefault(node.input[0], []).append(node)
    return consumers


def _activation_channel_maxima(fp32_path: Path, activations: list[str],
                               batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """max |x| per channel over real tokens (padding excluded) of each activation: [hidden] each."""
    import onnxruntime as ort

    model = onnx.load(str(fp32_path))
    for name in activations:  # expose the intermediate tensors as extra graph outputs
        model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    maxima = {name: np.zeros(0, dtype=np.float32) for name in activations}
    for feeds in batches:
        real = feeds["attention_mask"].astype(bool)                               # [batch, seq]
        for name, values in zip(activations, session.run(activations, {n: feeds[n] for n in names})):
            channel_max = np.abs(values[real]).max(axis=0)                         # [hidden]
            maxima[name] = channel_max if not maxima[name].size else np.maximum(maxima[name], channel_max)
    return maxima


def _smoothing_scale(activation_max: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """s_k = max|x_k|^alpha / max|W_k|^(1-alpha), W_k over every MatMul sharing the input: [in_features]."""
    weight_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)         # [in_features]
    scale = np.maximum(activation_max, MIN_RANGE) ** alpha / np.maximum(weight_max, MIN_RANGE) ** (1 - alpha)
    return scale.astype(np.float32)


def _insert_division(graph: onnx.GraphProto, activation: str, matmuls: list[onnx.NodeProto],
                     scale: np.ndarray) -> None:
    inverse, smoothed = f"{activation}_smooth_inverse_scale", f"{activation}_smoothed"
    graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inverse))
    position = min(list(graph.node).index(m) for m in matmuls)  # keep the node list topologically sorted
    graph.node.insert(position, helper.make_node("Mul", [activation, inverse], [smoothed],
                                                 name=f"{activation}_smooth"))
    for matmul in matmuls:
        matmul.input[0] = smoothed
