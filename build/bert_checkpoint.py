"""A Hugging Face BERT-family checkpoint as the build sees it: task, sizes, inputs, files.

Everything here is read from the checkpoint's own files (config.json, tokenizer files,
sentence-transformers' sentence_bert_config.json), so the same build serves MiniLM, BERT-base or a
fine-tuned classifier without flags.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from trident.bert.artifacts import TOKENIZER, WEIGHTS

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
# Files the runtime or a user of the artifacts may want beside the ONNX models; copied when present.
COPIED_FILES = ("config.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                "vocab.json", "merges.txt", "sentencepiece.bpe.model", "sentence_bert_config.json")
UNBOUNDED_TOKENIZER_LENGTH = 1_000_000  # HF's "no limit" sentinel is ~1e30


@dataclass(frozen=True)
class BertCheckpoint:
    """The checkpoint's contract with the build. ``output_name`` is what the ONNX graph returns."""
    path: Path
    name: str
    task: str                         # "embedding" | "classification"
    hidden_size: int
    max_length: int                   # default truncation length (sentence-transformers' if set)
    max_length_limit: int             # position embeddings / tokenizer ceiling
    input_names: tuple[str, ...]
    id2label: dict[int, str] = field(default_factory=dict)
    weight_files: tuple[Path, ...] = ()

    @property
    def output_name(self) -> str:
        return "logits" if self.task == "classification" else "last_hidden_state"


def inspect_checkpoint(path: str | Path, name: str | None = None,
                       max_length: int | None = None) -> BertCheckpoint:
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face checkpoint (no config.json)")
    config = AutoConfig.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    limit = _length_limit(config, tokenizer)
    default_length = min(limit, _sentence_transformers_length(path) or limit)
    if max_length is not None and not 2 <= max_length <= limit:
        raise ValueError(f"--max-length must be in [2, {limit}] for {path}, got {max_length}")
    task = "classification" if _is_classifier(config) else "embedding"
    return BertCheckpoint(
        path=path,
        name=name or path.name,
        task=task,
        hidden_size=int(config.hidden_size),
        max_length=max_length or default_length,
        max_length_limit=limit,
        input_names=tuple(tokenizer.model_input_names),
        id2label={int(k): str(v) for k, v in config.id2label.items()} if task == "classification" else {},
        weight_files=_weight_files(path),
    )


def load_model(checkpoint: BertCheckpoint):
    """The FP32 PyTorch model in eval mode: the export source and the gate's reference."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if checkpoint.task == "classification" else AutoModel
    return cls.from_pretrained(checkpoint.path).eval()


def load_reference_tokenizer(checkpoint: BertCheckpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint.path)


def copy_tokenizer_files(checkpoint: BertCheckpoint, out: Path) -> list[Path]:
    """Tokenizer and config files into ``out``; a tokenizer.json is written if the checkpoint has none."""
    written = []
    for file_name in COPIED_FILES:
        if (checkpoint.path / file_name).is_file():
            written.append(Path(shutil.copyfile(checkpoint.path / file_name, out / file_name)))
        else:  # left over from a different checkpoint built into the same directory
            (out / file_name).unlink(missing_ok=True)
    if (checkpoint.path / TOKENIZER).is_file():
        written.append(Path(shutil.copyfile(checkpoint.path / TOKENIZER, out / TOKENIZER)))
    else:  # vocab.txt-only checkpoints: the fast tokenizer converts it, the runtime needs the JSON
        load_reference_tokenizer(checkpoint).backend_tokenizer.save(str(out / TOKENIZER))
        written.append(out / TOKENIZER)
    return written


def copy_weights(checkpoint: BertCheckpoint, out: Path) -> Path:
    """The checkpoint's weights as ``out/model.safetensors``, what runtime "torch" loads.

    A ``model.safetensors`` is copied byte for byte; a single ``pytorch_model.bin`` is converted
    (tensors made contiguous and unshared, as safetensors requires). Sharded checkpoints are refused:
    BERT-family encoders are small enough for one file.
    """
    source = checkpoint.path / WEIGHTS
    if source.is_file():
        return Path(shutil.copyfile(source, out / WEIGHTS))
    if [f.name for f in checkpoint.weight_files] != ["pytorch_model.bin"]:
        raise ValueError(f"{checkpoint.path}: runtime 'torch' needs one {WEIGHTS} or pytorch_model.bin, "
                         f"found {[f.name for f in checkpoint.weight_files]}")
    import torch
    from safetensors.torch import save_file

    state = torch.load(checkpoint.path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    save_file({k: v.contiguous().clone() for k, v in state.items()}, out / WEIGHTS, metadata={"format": "pt"})
    return out / WEIGHTS


def _is_classifier(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def _length_limit(config, tokenizer) -> int:
    limit = int(config.max_position_embeddings)
    if tokenizer.model_max_length < UNBOUNDED_TOKENIZER_LENGTH:
        limit = min(limit, int(tokenizer.model_max_length))
    return limit


def _sentence_transformers_length(path: Path) -> int | None:
    config = path / "sentence_bert_config.json"
    return json.loads(config.read_text()).get("max_seq_length") if config.is_file() else None


def _weight_files(path: Path) -> tuple[Path, ...]:
    files = sorted(f for pattern in WEIGHT_PATTERNS for f in path.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no weights (*.safetensors / pytorch_model*.bin) in {path}")
    return tuple(files)
