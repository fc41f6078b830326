"""The GPT generation engine: continuous batching over a paged KV cache.

Importable without Triton. The core (config, sequence, block_manager, scheduler) is pure Python;
model_runner is the only module that touches tensors on a device.
"""
