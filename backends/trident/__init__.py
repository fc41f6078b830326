"""trident: BERT and GPT serving on NVIDIA Triton Inference Server."""
