"""Decoder models in plain PyTorch (Llama-style, GPT-2) that read packed tokens over a paged KV cache."""
