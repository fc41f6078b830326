#!/usr/bin/env python3
"""Container healthcheck: exit 0 when a URL answers HTTP 200, 1 otherwise (standard library only).

    python docker/healthcheck.py [http://127.0.0.1:8000/v2/health/ready] [--timeout 3]

Triton's /v2/health/ready answers 200 only when the server and, with --strict-readiness (the
launcher's setting), every model it loaded are ready.
"""
from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000/v2/health/ready"


def is_healthy(url: str, timeout_s: float) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status == 200, f"HTTP {response.status}"
    except urllib.error.HTTPError as e:
        return False, f"HTTP {e.code}"
    except OSError as e:  # refused, timed out, unresolvable
        return False, f"{type(e).__name__}: {e}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", nargs="?", default=DEFAULT_URL)
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds")
    args = parser.parse_args(argv)
    healthy, detail = is_healthy(args.url, args.timeout)
    print(f"{args.url}: {detail}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
