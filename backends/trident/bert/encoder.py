"""BertEncoder: texts in, sentence embeddings or classification logits out.

    enc = BertEncoder.from_artifacts("model_repository/bert/1/artifacts", precision="int8")
    enc.encode(["A man is eating food.", ""])["embedding"]   # float32 [2, hidden], unit rows

Texts longer than ``max_length`` tokens (special tokens included) are truncated at the end, as
sentence-transformers does; empty strings are valid (they encode to just the special tokens).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Encoding

from trident.bert.artifacts import BertArtifacts
from trident.bert.batching import plan_micro_batches
from trident.bert.options import EncoderOptions
from trident.bert.pooling import l2_normalize, mean_pool
from trident.bert.tokenizer import TextTokenizer, TokenBatch, Tokens


class BertEncoder:
    """Encodes batches of texts with a built BERT-family model (see ``build/bert.py``).

    ``task`` is "embedding" or "classification". ``encode`` returns
    ``{"embedding": float32 [N, hidden_size]}`` (mean pooling over the attention mask, then L2
    normalisation) or ``{"logits": float32 [N, num_labels], "label": object [N] of str}``.
    Thread-safe: ONNX Runtime sessions may be run concurrently.
    """

    def __init__(self, artifacts: BertArtifacts, options: EncoderOptions) -> None:
        self.task = artifacts.task
        self.hidden_size = artifacts.hidden_size
        self.id2label = dict(artifacts.id2label)
        self.max_length = _resolve_max_length(options.max_length, artifacts)
        self.options = options
        self._labels = np.array([self.id2label[i] for i in range(len(self.id2label))], dtype=object)
        self._tokenizer = TextTokenizer.from_file(artifacts.tokenizer_path, self.max_length)
        # The torch runtime (CUDA) pools on the device and returns finished rows; ORT returns hidden states.
        self._runtime = None
        if options.runtime == "torch":
            from trident.bert.torch_runtime import open_torch_runtime  # torch stays out of the ORT path
            self._runtime = open_torch_runtime(artifacts, options, self.max_length)
        else:
            from trident.bert.session import open_session  # onnxruntime stays out of the torch path
            self._session = open_session(artifacts.model_path(options.precision), options)

    @classmethod
    def from_artifacts(cls, artifacts_dir: str | Path, precision: str = "int8", runtime: str = "onnxruntime",
                       device: str = "cpu", max_length: int | None = None,
                       num_threads: int | None = None, max_num_seqs: int | None = None,
                       max_num_batched_tokens: int | None = None) -> "BertEncoder":
        # Options first: a typo in runtime/precision/device is reported before any file is read.
        options = EncoderOptions(runtime=runtime, precision=precision, device=device,
                                 max_length=max_length, num_threads=num_threads, max_num_seqs=max_num_seqs,
                                 max_num_batched_tokens=max_num_batched_tokens)
        return cls(BertArtifacts.load(artifacts_dir), options)

    def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        return self.encode_tokens(self.tokenize(texts))

    def tokenize(self, texts: Sequence[str]) -> list[Encoding | Tokens]:
        """The first half of ``encode``: each text's ids and token types (``.ids``, ``.type_ids``),
        truncated to ``max_length``, unpadded."""
        return self._tokenizer.encode(list(texts))

    def encode_tokens(self, encodings: list[Encoding | Tokens]) -> dict[str, np.ndarray]:
        """The second half of ``encode``: the model on ``tokenize``'s output, in its order."""
        result = np.zeros((len(encodings), self._width()), dtype=np.float32)  # [N, hidden | num_labels]
        lengths = [len(e) for e in encodings]  # len() builds no list; each .ids builds a new one
        for indices in plan_micro_batches(lengths, *self.options.micro_batch_limits):
            if self._runtime is not None:
                result[indices] = self._runtime.run([(encodings[i].ids, encodings[i].type_ids) for i in indices])
                continue
            batch = self._tokenizer.pad([encodings[i] for i in indices])
            result[indices] = self._postprocess(batch, self._session.run(batch))
        if self.task == "embedding":
            return {"embedding": result}
        return {"logits": result, "label": self._labels[result.argmax(axis=-1)]}

    def _width(self) -> int:
        return self.hidden_size if self.task == "embedding" else len(self.id2label)

    def _postprocess(self, batch: TokenBatch, output: np.ndarray) -> np.ndarray:
        if self.task == "embedding":
            return l2_normalize(mean_pool(output, batch.attention_mask))  # [batch, hidden]
        return output.astype(np.float32)                                     # [batch, num_labels]


def _resolve_max_length(requested: int | None, artifacts: BertArtifacts) -> int:
    if requested is None:
        return artifacts.max_length
    if requested > artifacts.max_length_limit:
        raise ValueError(f"max_length {requested} exceeds the model's limit of "
                         f"{artifacts.max_length_limit} tokens")
    return requested
