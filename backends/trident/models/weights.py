"""Reading a Hugging Face checkpoint's safetensors and copying tensors into our parameters by name."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The checkpoint's shards: from the index when there is one, else every *.safetensors file."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir} (pickled checkpoints are not loaded)")
    return files


def iter_safetensors(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs, one at a time, so peak host memory stays near one tensor."""
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


class WeightLoader:
    """Copies checkpoint tensors into a module's parameters, strictly.

    Every parameter (and every shard of a fused parameter) must be written exactly once; names the
    model does not know raise, apart from the suffixes it declares ignorable.
    """

    def __init__(self, module: nn.Module, ignored_suffixes: tuple[str, ...] = ()):
        self.params = dict(module.named_parameters())
        self.ignored_suffixes = ignored_suffixes
        self.num_shards = {name: 1 for name in self.params}
        self.written: dict[str, set[int]] = {name: set() for name in self.params}

    def copy(self, name: str, tensor: torch.Tensor, transpose: bool = False) -> None:
        if name.endswith(self.ignored_suffixes):
            return
        param = self._param(name)
        tensor = tensor.t() if transpose else tensor
        _check_shape(name, param.shape, tensor.shape)
        param.data.copy_(tensor)
        self._done(name, 0)

    def copy_shard(self, name: str, shard: int, sizes: list[int], tensor: torch.Tensor) -> None:
        """Write rows ``sum(sizes[:shard]) : +sizes[shard]`` of a fused parameter (dim 0 of weight and bias)."""
        param = self._param(name)
        self.num_shards[name] = len(sizes)
        start = sum(sizes[:shard])
        target = param.data.narrow(0, start, sizes[shard])
        _check_shape(f"{name}[shard {shard}]", target.shape, tensor.shape)
        target.copy_(tensor)
        self._done(name, shard)

    def finish(self) -> None:
        missing = sorted(name for name, shards in self.written.items() if len(shards) < self.num_shards[name])
        if missing:
            raise ValueError(f"checkpoint is missing weights for: {', '.join(missing)}")

    def _param(self, name: str) -> nn.Parameter:
        if name not in self.params:
            raise ValueError(f"checkpoint tensor {name!r} has no matching parameter")
        return self.params[name]

    def _done(self, name: str, shard: int) -> None:
        if shard in self.written[name]:
            raise ValueError(f"checkpoint writes {name!r} (shard {shard}) twice")
        self.written[name].add(shard)


def _check_shape(name: str, expected: torch.Size, got: torch.Size) -> None:
    if tuple(expected) != tuple(got):
        raise ValueError(f"shape mismatch for {name}: model {tuple(expected)}, checkpoint {tuple(got)}")
