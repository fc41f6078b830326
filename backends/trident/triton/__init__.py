"""Triton Python-backend adapters. Only these modules import triton_python_backend_utils."""
