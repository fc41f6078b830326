"""Triton entry point for `gpt`: the code lives in backends/trident (see trident/triton/gpt_model.py)."""
import sys
from pathlib import Path

try:
    import trident  # noqa: F401  (installed in the image / the venv)
except ImportError:  # running from a checkout: model_repository/<model>/1/model.py -> backends/
    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "backends"))

from trident.triton.gpt_model import TritonPythonModel  # noqa: E402,F401
