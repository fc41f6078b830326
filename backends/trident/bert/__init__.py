"""BERT-family encoders at serving time: tokenization, micro-batching, ONNX Runtime, pooling.

Pure numpy + onnxruntime + tokenizers (no torch), so the Triton Python backend loads it quickly.
The artifacts it reads are produced by ``python -m build.bert``; ``artifacts.py`` is the one place
their layout is defined. Entry point: ``trident.bert.encoder.BertEncoder``.
"""
