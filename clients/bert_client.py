#!/usr/bin/env python3
"""Embed sentences with the `bert` model over gRPC and HTTP and print their cosine similarity table.

    python clients/bert_client.py                       # against `make serve` on localhost
    python clients/bert_client.py --protocol http --url localhost:8000 "first text" "second text"
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

DEFAULT_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "A man is riding a horse.",
    "The girl is carrying a baby.",
    "Triton serves the model repository.",
]


def embed(texts: list[str], protocol: str, url: str, model: str = "bert") -> np.ndarray:
    """One request carrying all texts as a [N, 1] BYTES tensor; returns [N, hidden] float32."""
    if protocol == "grpc":
        import tritonclient.grpc as client_lib
    else:
        import tritonclient.http as client_lib
    client = client_lib.InferenceServerClient(url)
    data = np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)  # [N, 1]
    text_input = client_lib.InferInput("text_input", list(data.shape), "BYTES")
    text_input.set_data_from_numpy(data)
    result = client.infer(model, [text_input], outputs=[client_lib.InferRequestedOutput("embedding")])
    return result.as_numpy("embedding")


def similarity_table(texts: list[str], embeddings: np.ndarray) -> str:
    similarity = embeddings @ embeddings.T  # [N, N]: embeddings are L2-normalised
    width = 38
    short = [t if len(t) <= width else t[: width - 1] + "…" for t in texts]
    header = " " * (width + 2) + "".join(f"{i:>7}" for i in range(len(texts)))
    rows = [f"{i}: {s:<{width}}" + "".join(f"{v:7.3f}" for v in row)
            for i, (s, row) in enumerate(zip(short, similarity))]
    return "\n".join([header, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sentences", nargs="*", default=DEFAULT_SENTENCES)
    parser.add_argument("--protocol", choices=["grpc", "http", "both"], default="both")
    parser.add_argument("--grpc-url", default="localhost:8001")
    parser.add_argument("--http-url", default="localhost:8000")
    parser.add_argument("--model", default="bert")
    args = parser.parse_args(argv)

    protocols = ["grpc", "http"] if args.protocol == "both" else [args.protocol]
    results = {}
    for protocol in protocols:
        url = args.grpc_url if protocol == "grpc" else args.http_url
        results[protocol] = embed(args.sentences, protocol, url, args.model)
        print(f"{protocol}: {len(args.sentences)} embeddings of dim {results[protocol].shape[1]} from {url}")
    print()
    print(similarity_table(args.sentences, results[protocols[0]]))
    if len(results) == 2:
        drift = float(np.abs(results["grpc"] - results["http"]).max())
        print(f"\nmax |gRPC - HTTP| = {drift:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
