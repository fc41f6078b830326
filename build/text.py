"""Real English text, offline: re-exported from ``trident.corpus``, where it lives because the GPU
runtime calibrates its INT8 at load from the same text (the runtime package does not ship build/)."""
from trident.corpus import (TextSplit, calibration_texts, fingerprint, held_out_texts, passages,  # noqa: F401
                            sentences, text_split)
