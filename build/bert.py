"""Build a BERT-family checkpoint into served artifacts: tokenizer -> weights -> export -> INT8 -> gate.

    python -m build.bert [--checkpoint DIR] [--out DIR] [--force] [--torch-only]

Defaults: the packaged all-MiniLM-L6-v2 (sha256-checked) into model_repository/bert/1/artifacts/.
Each step skips itself when the manifest shows its inputs unchanged and its outputs intact
(``--force`` rebuilds). Exits non-zero when the INT8 model fails the accuracy gate; the manifest then
records the failed figures and the runtime refuses to serve that INT8 model.

The weights step copies the checkpoint's ``model.safetensors`` (and config.json, with the tokenizer)
into the artifacts: runtime "torch" (CUDA) builds its model from them, so a machine without the
source checkpoint can serve it. ``--torch-only`` stops there (no ONNX export, INT8 or gate: those
serve runtime "onnxruntime" only), and needs neither onnx nor onnxruntime installed.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from importlib import metadata

import torch
import transformers

from build import text
from build.bert_checkpoint import COPIED_FILES, BertCheckpoint, copy_tokenizer_files, copy_weights, \
    inspect_checkpoint, load_model, load_reference_tokenizer
from build.bert_gate import GateFailed, GateResult, candidate_outputs, enforce, evaluate_gate, reference_outputs
from build.bert_manifest import Manifest
from build.weights import MINILM_NAME, WeightsError, minilm_dir, sha256_file
from trident.bert.artifacts import MODEL_FILES, TOKENIZER, WEIGHTS
from trident.bert.tokenizer import TextTokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "model_repository" / "bert" / "1" / "artifacts"
NUM_PASSAGES, PASSAGE_WORDS = 16, 200  # long texts: calibrate and gate the truncation length too
QUANTIZE_RECIPE_VERSION = 2            # bump when bert_quantize's recipe changes


@dataclass(frozen=True)
class BuildOptions:
    checkpoint: Path | None = None      # None: the packaged all-MiniLM-L6-v2
    out: Path = DEFAULT_OUT
    force: bool = False
    name: str | None = None
    max_length: int | None = None       # None: the checkpoint's (sentence-transformers') length
    num_calibration: int = 256
    num_held_out: int = 256
    calibration_batch_size: int = 16
    min_mean_cosine: float = 0.99
    min_min_cosine: float = 0.97
    torch_only: bool = False            # tokenizer + weights only: what runtime "torch" reads


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    started = time.perf_counter()
    try:
        result = BertBuild(options).run()
    except GateFailed as e:
        print(f"[bert] {e}", file=sys.stderr)
        return 1
    except (WeightsError, FileNotFoundError, ValueError) as e:
        print(f"[bert] error: {e}", file=sys.stderr)
        return 2
    summary = "tokenizer and weights for runtime 'torch'" if result is None else result.summary()
    print(f"[bert] done in {time.perf_counter() - started:.1f} s: {summary}")
    return 0


class BertBuild:
    """The build steps over one checkpoint and one output directory."""

    def __init__(self, options: BuildOptions) -> None:
        self.options = options
        path = options.checkpoint or minilm_dir()
        name = options.name or (MINILM_NAME if options.checkpoint is None else None)
        self.checkpoint = inspect_checkpoint(path, name=name, max_length=options.max_length)
        self.out = Path(options.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.manifest = Manifest.load(self.out)
        self.source = {"weights_sha256": {f.name: sha256_file(f) for f in self.checkpoint.weight_files},
                       "config_sha256": sha256_file(self.checkpoint.path / "config.json")}
        self._model = None
        log("build", f"{self.checkpoint.name} ({self.checkpoint.task}, hidden {self.checkpoint.hidden_size}, "
                     f"max_length {self.checkpoint.max_length}) -> {self.out}")

    def run(self) -> GateResult | None:
        self.copy_tokenizer()
        self.copy_weights()
        if self.options.torch_only:
            return None
        self.export()
        self.quantize()
        return self.gate()

    @property
    def model(self) -> torch.nn.Module:
        if self._model is None:  # loaded only when a step actually needs PyTorch
            self._model = load_model(self.checkpoint)
        return self._model

    def copy_tokenizer(self) -> None:
        inputs = {"checkpoint_files": {name: sha256_file(self.checkpoint.path / name)
                                       for name in (*COPIED_FILES, TOKENIZER)
                                       if (self.checkpoint.path / name).is_file()}}
        if self._skip("tokenizer", inputs):
            return
        written = copy_tokenizer_files(self.checkpoint, self.out)
        self.manifest.record("tokenizer", inputs, written)
        self._save()
        log("tokenizer", f"copied {', '.join(p.name for p in written)}")

    def copy_weights(self) -> None:
        inputs = dict(self.source)
        if self._skip("weights", inputs):
            return
        path = copy_weights(self.checkpoint, self.out)
        self.manifest.record("weights", inputs, [path])
        self._save()
        log("weights", f"wrote {path.name} ({_mib(path)}) for runtime 'torch'")

    def export(self) -> None:
        from build.bert_export import check_parity, export_onnx

        inputs = self.source | {"torch": torch.__version__, "transformers": transformers.__version__}
        if self._skip("export", inputs):
            return
        started, path = time.perf_counter(), self.out / MODEL_FILES["fp32"]
        log("export", f"exporting {self.checkpoint.output_name} with dynamic [batch, sequence] axes ...")
        held_out = self.held_out_texts()
        export_onnx(self.model, self.checkpoint, self._feeds(held_out[:2]), path)
        worst = check_parity(self.model, path, [self._feeds(held_out[:1]), self._feeds(held_out[2:6]),
                                                self._feeds(held_out[-2:])])
        self.manifest.record("export", inputs, [path], {"parity_max_abs_diff": worst})
        self._save()
        log("export", f"wrote {path.name} ({_mib(path)}) in {time.perf_counter() - started:.1f} s; "
                      f"max |ONNX - PyTorch| = {worst:.1e} on 3 batches of different shapes")

    def quantize(self) -> None:
        import onnxruntime

        from build.bert_quantize import TextCalibrationReader, quantize_int8

        texts = self.calibration_texts()
        inputs = {"fp32_sha256": sha256_file(self.out / MODEL_FILES["fp32"]),
                  "tokenizer_sha256": sha256_file(self.out / TOKENIZER), "max_length": self.checkpoint.max_length,
                  "calibration_sha256": text.fingerprint(texts),
                  "calibration_batch_size": self.options.calibration_batch_size,
                  "recipe_version": QUANTIZE_RECIPE_VERSION, "onnxruntime": onnxruntime.__version__}
        if self._skip("quantize", inputs):
            return
        started, path = time.perf_counter(), self.out / MODEL_FILES["int8"]
        log("quantize", f"static INT8 (QDQ) calibration on {len(texts)} texts "
                        f"({self.options.num_calibration} sentences + {len(texts) - self.options.num_calibration} "
                        "passages) ...")
        reader = TextCalibrationReader(texts, self._tokenizer(), self.checkpoint.input_names,
                                       self.options.calibration_batch_size)
        report = quantize_int8(self.out / MODEL_FILES["fp32"], path, reader, len(texts))
        self.manifest.record("quantize", inputs, [path], asdict(report))
        self._save()
        log("quantize", f"wrote {path.name} ({_mib(path)}) in {time.perf_counter() - started:.1f} s; "
                        f"{report.num_quantized_matmuls} MatMuls in INT8, {len(report.excluded_nodes)} kept FP32 "
                        f"(FFN down projections), {_smoothed(report)}")

    def gate(self) -> GateResult:
        texts = self.held_out_texts()
        inputs = {"int8_sha256": sha256_file(self.out / MODEL_FILES["int8"]), **self.source,
                  "held_out_sha256": text.fingerprint(texts), "max_length": self.checkpoint.max_length,
                  "min_mean_cosine": self.options.min_mean_cosine, "min_min_cosine": self.options.min_min_cosine}
        if self._skip("gate", inputs):
            return enforce(_gate_result(self.manifest.step("gate")["result"]))
        started = time.perf_counter()
        log("gate", f"INT8 vs FP32 Hugging Face on {len(texts)} held-out texts ...")
        reference = reference_outputs(self.model, load_reference_tokenizer(self.checkpoint), texts,
                                      self.checkpoint.max_length, self.checkpoint.task)
        candidate = candidate_outputs(self.out, texts)
        result = evaluate_gate(reference, candidate, self.checkpoint.task,
                               self.options.min_mean_cosine, self.options.min_min_cosine)
        self.manifest.record("gate", inputs, [], result.to_dict())
        self._save()
        log("gate", f"{'passed' if result.passed else 'FAILED'} in {time.perf_counter() - started:.1f} s: "
                    f"{result.summary()}")
        return enforce(result)

    def calibration_texts(self) -> list[str]:
        return _with_passages(text.text_split().calibration, self.options.num_calibration)

    def held_out_texts(self) -> list[str]:
        return _with_passages(text.text_split().held_out, self.options.num_held_out)

    def _skip(self, step: str, inputs: dict) -> bool:
        if self.options.force or not self.manifest.is_current(step, inputs):
            return False
        log(step, "up to date (inputs and outputs match the manifest), skipped")
        return True

    def _tokenizer(self) -> TextTokenizer:
        return TextTokenizer.from_file(self.out / TOKENIZER, self.checkpoint.max_length)

    def _feeds(self, texts: list[str]) -> dict:
        tokenizer = self._tokenizer()
        return tokenizer.pad(tokenizer.encode(texts)).feeds(self.checkpoint.input_names)

    def _save(self) -> None:
        self.manifest.save(**manifest_fields(self.checkpoint, self.source, self.manifest))


def manifest_fields(checkpoint: BertCheckpoint, source: dict, manifest: Manifest) -> dict:
    """The manifest's top level: what the runtime reads (see trident.bert.artifacts) and provenance."""
    return {
        "name": checkpoint.name,
        "source": {"path": str(checkpoint.path), **source},
        "task": checkpoint.task,
        "hidden_size": checkpoint.hidden_size,
        "num_labels": len(checkpoint.id2label),
        "id2label": {str(k): v for k, v in checkpoint.id2label.items()},
        "max_length": checkpoint.max_length,
        "max_length_limit": checkpoint.max_length_limit,
        "input_names": list(checkpoint.input_names),
        "output_name": checkpoint.output_name,
        "pooling": "mean, L2-normalised" if checkpoint.task == "embedding" else None,
        "quantization": manifest.step("quantize").get("result"),
        "gate": manifest.step("gate").get("result", {"passed": False}),
        "weights": WEIGHTS if manifest.step("weights") else None,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "onnxruntime": _version("onnxruntime"), "python": sys.version.split()[0]},
    }


def parse_args(argv: list[str] | None) -> BuildOptions:
    defaults = BuildOptions()
    parser = argparse.ArgumentParser(prog="python -m build.bert", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="Hugging Face BERT-family directory "
                        "(default: the packaged all-MiniLM-L6-v2)")
    parser.add_argument("--out", type=Path, default=defaults.out, help="artifacts directory (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="rebuild every step")
    parser.add_argument("--name", help="model name recorded in the manifest")
    parser.add_argument("--max-length", type=int, help="truncation length in tokens (default: the checkpoint's)")
    parser.add_argument("--num-calibration", type=int, default=defaults.num_calibration,
                        help="calibration sentences (plus %d long passages)" % NUM_PASSAGES)
    parser.add_argument("--num-held-out", type=int, default=defaults.num_held_out,
                        help="held-out sentences for the gate (plus %d long passages)" % NUM_PASSAGES)
    parser.add_argument("--calibration-batch-size", type=int, default=defaults.calibration_batch_size)
    parser.add_argument("--min-mean-cosine", type=float, default=defaults.min_mean_cosine)
    parser.add_argument("--min-min-cosine", type=float, default=defaults.min_min_cosine)
    parser.add_argument("--torch-only", action="store_true",
                        help="only what runtime 'torch' reads (tokenizer, config, weights): no ONNX, INT8, gate")
    args = parser.parse_args(argv)
    return BuildOptions(**{k.replace("-", "_"): v for k, v in vars(args).items()})


def log(step: str, message: str) -> None:
    print(f"[bert] {step}: {message}", flush=True)


def _with_passages(split: tuple[str, ...], num_sentences: int) -> list[str]:
    if num_sentences > len(split):
        raise ValueError(f"asked for {num_sentences} sentences, this split has {len(split)}")
    sentences = list(split[:num_sentences])
    return sentences + text.passages(list(split[num_sentences:]), PASSAGE_WORDS)[:NUM_PASSAGES]


def _gate_result(record: dict) -> GateResult:
    return GateResult(**{k: v for k, v in record.items() if k != "passed"})


def _smoothed(report) -> str:
    smoothing = report.recipe["smoothing"]
    if not smoothing:
        return "no smoothing"
    return (f"{smoothing['num_matmuls']} LayerNorm-fed MatMuls smoothed (alpha {smoothing['alpha']}, "
            f"max scale {smoothing['max_scale']:.1f})")


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:  # --torch-only builds run without onnxruntime
        return None


def _mib(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"


if __name__ == "__main__":
    sys.exit(main())
