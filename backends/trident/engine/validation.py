"""Validation helpers shared by the engine's config objects (pure Python)."""
from __future__ import annotations

from dataclasses import fields


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def reject_unknown_keys(cls, values: dict, what: str) -> None:
    """Name every key of `values` that is not a field of dataclass `cls` (typos fail loudly)."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    require(not unknown, f"unknown {what}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
