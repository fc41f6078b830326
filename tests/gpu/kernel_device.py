"""Where the kernel tests run: CUDA, or the CPU under the Triton interpreter (``TRITON_INTERPRET=1``)."""
from __future__ import annotations

import pytest
import torch

from trident.engine import kernels


def kernel_device() -> torch.device | None:
    if not kernels.IS_AVAILABLE:
        return None
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu") if kernels.IS_INTERPRETED else None


DEVICE = kernel_device()
IS_CUDA = DEVICE is not None and DEVICE.type == "cuda"
# The module-level marks of a kernel test file.
KERNEL_TEST_MARKS = [pytest.mark.gpu,
                     pytest.mark.skipif(DEVICE is None, reason="needs CUDA and triton (or TRITON_INTERPRET=1)")]
