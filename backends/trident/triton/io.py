"""Request decoding shared by the Triton adapters: pure functions, tested without Triton."""
from __future__ import annotations

import numpy as np


class RequestError(ValueError):
    """A problem with one request; it becomes that request's error response, nothing more."""


def decode_texts(array: np.ndarray | None, name: str = "text_input") -> list[str]:
    """A BYTES tensor of any shape -> its strings, in row-major order. Rejects non-UTF-8 bytes."""
    if array is None:
        raise RequestError(f"missing required input '{name}'")
    if array.dtype != np.object_:
        raise RequestError(f"input '{name}' must be BYTES/STRING, got {array.dtype}")
    texts = []
    for index, item in enumerate(array.reshape(-1)):
        if isinstance(item, str):
            texts.append(item)
            continue
        try:
            texts.append(bytes(item).decode("utf-8"))
        except UnicodeDecodeError as e:
            raise RequestError(f"input '{name}' element {index} is not valid UTF-8: {e.reason} "
                               f"at byte {e.start}") from None
    return texts


def batch_rows(array: np.ndarray) -> int:
    """Number of batch rows of a [N, 1] text tensor (Triton batching is on: dim 0 is the batch)."""
    return int(array.shape[0]) if array.ndim else 1


def string_array(values: list[str], shape: tuple[int, ...]) -> np.ndarray:
    return np.array([v.encode("utf-8") for v in values], dtype=np.object_).reshape(shape)
