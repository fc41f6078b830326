"""The build's manifest.json: what was built from what, and the record that makes steps idempotent.

Each step stores the fingerprint of its inputs and the sha256 of its outputs. A step is current when
its stored inputs equal today's and every output still has its stored hash; current steps are
skipped. The runtime reads the same file through ``trident.bert.artifacts.BertArtifacts``.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from build.weights import sha256_file
from trident.bert.artifacts import MANIFEST

FORMAT_VERSION = 1


class Manifest:
    def __init__(self, directory: Path, data: dict) -> None:
        self.directory = directory
        self.data = data

    @classmethod
    def load(cls, directory: Path) -> "Manifest":
        path = directory / MANIFEST
        data = json.loads(path.read_text()) if path.is_file() else {}
        if data.get("format") != FORMAT_VERSION:
            data = {}  # unknown layout: rebuild everything rather than trust it
        return cls(directory, data)

    def step(self, name: str) -> dict:
        return self.data.get("steps", {}).get(name, {})

    def is_current(self, name: str, inputs: dict) -> bool:
        record = self.step(name)
        if not record or record.get("inputs") != inputs:
            return False
        return all((self.directory / file).is_file() and sha256_file(self.directory / file) == sha
                   for file, sha in record.get("outputs", {}).items())

    def record(self, name: str, inputs: dict, outputs: list[Path], result: dict | None = None) -> None:
        record = {"inputs": inputs, "outputs": {p.name: sha256_file(p) for p in outputs}}
        if result is not None:
            record["result"] = result
        self.data.setdefault("steps", {})[name] = record

    def save(self, **fields) -> Path:
        """Write the manifest with ``fields`` at top level and the current hash of every artifact."""
        artifacts = {p.name: sha256_file(p) for p in sorted(self.directory.iterdir())
                     if p.is_file() and p.name != MANIFEST}
        # Summary first, step records last: the file is read by people as well as by the runtime.
        self.data = {"format": FORMAT_VERSION, **fields, "artifacts": artifacts,
                     "created_at": datetime.now(timezone.utc).isoformat(), "steps": self.data.get("steps", {})}
        path = self.directory / MANIFEST
        path.write_text(json.dumps(self.data, indent=2, sort_keys=False) + "\n")
        return path
