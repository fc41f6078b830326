#!/usr/bin/env python3
"""Headless load test against a running Triton: locust's CSV, HTML and JSON reports, a summary, plots.

    python loadtest/run_locust.py --name bert --users 16 --run-time 60s BertGrpcUser BertHttpUser
    python loadtest/run_locust.py --name gpt-steps --step --step-users 4 --step-time 30 \\
        --step-max-users 64 --prompt-tokens 128 --max-tokens 128 GptGrpcStreamUser
    python loadtest/run_locust.py --host http://triton:8000 --grpc-port 8001 ... -- --processes 4

Everything lands in <out-dir>/<name>/ (default loadtest/results/<name>/):
    <name>_stats.csv, <name>_stats_history.csv, <name>_failures.csv, <name>_exceptions.csv  (locust)
    report.html (locust's report)   <name>.json (locust's final stats, complete: see summary.csv)
    summary.csv  one line per stats row from the final stats: requests, failures, throughput, p50/p90/p99
    throughput.png latency.png streaming.png saturation.png  (loadtest/plots.py says what each shows)

Workload options (--prompt-tokens, --max-tokens, --bert-batch, ...) are forwarded to the locust file;
arguments after `--` go to locust unchanged. The exit status is locust's: 0 only when no request
failed (a request that did not get its final response is a failure); 2 when locust wrote no stats.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from plots import draw_all  # noqa: E402
from workload import OPTIONS, STREAMING_TYPES, is_timing_row  # noqa: E402

LOCUSTFILE = HERE / "locustfile.py"
SHAPES = HERE / "shapes.py"
USER_CLASSES = ("BertGrpcUser", "BertHttpUser", "GptGrpcStreamUser", "GptHttpStreamUser")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    locust_extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("user_classes", nargs="*", metavar="USER_CLASS",
                        help=f"any of {', '.join(USER_CLASSES)} (default: the BERT users)")
    parser.add_argument("--host", default=os.environ.get("TRIDENT_HOST", "http://127.0.0.1:8000"),
                        help="Triton's HTTP address (env TRIDENT_HOST); gRPC: same machine, --grpc-port")
    parser.add_argument("--name", default=time.strftime("run-%Y%m%d-%H%M%S"), help="results folder name")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results")
    parser.add_argument("--users", type=int, default=4, help="concurrent users (each one request in flight)")
    parser.add_argument("--spawn-rate", type=float, help="users started per second (default: all at once)")
    parser.add_argument("--run-time", default="30s", help="locust time span: 30s, 5m, 1h30m")
    parser.add_argument("--step", action="store_true", help="step load (loadtest/shapes.py) instead of "
                                                            "--users/--spawn-rate/--run-time")
    parser.add_argument("--stop-timeout", type=float, help="seconds in-flight requests get to finish at the "
                                                           "end (default: --request-timeout)")
    for option in OPTIONS:
        parser.add_argument(option.flag, type=option.type, help=f"{option.help} [default {option.default}]")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.user_classes) - set(USER_CLASSES))
    if unknown:
        parser.error(f"unknown user class(es) {', '.join(unknown)}; choose from {', '.join(USER_CLASSES)}")
    args.user_classes = args.user_classes or ["BertGrpcUser", "BertHttpUser"]
    return args, locust_extra


def locust_command(args: argparse.Namespace, prefix: Path, locust_extra: list[str]) -> list[str]:
    files = f"{LOCUSTFILE},{SHAPES}" if args.step else str(LOCUSTFILE)
    timeout = args.request_timeout if args.request_timeout is not None else _default("--request-timeout")
    command = [sys.executable, "-m", "locust", "-f", files, "--headless", "--host", args.host,
               "--only-summary", "--csv", str(prefix), "--csv-full-history",
               "--html", str(prefix.parent / "report.html"),
               "--json-file", str(prefix),  # locust adds .json; written after the last user stopped
               "--stop-timeout", f"{math.ceil(args.stop_timeout if args.stop_timeout is not None else timeout)}s"]
    if not args.step:
        command += ["--users", str(args.users), "--spawn-rate", str(args.spawn_rate or args.users),
                    "--run-time", args.run_time]
    for option in OPTIONS:
        value = getattr(args, option.dest)
        if value is not None:
            command += [option.flag, str(value)]
    return command + locust_extra + args.user_classes


def _default(flag: str):
    return next(o.default for o in OPTIONS if o.flag == flag)


# -- summary --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SummaryRow:
    """One stats row of the final stats (locust's JSON, which includes the requests that finished
    after the last CSV write)."""
    type: str
    name: str
    requests: int
    failures: int
    duration_s: float
    requests_per_s: float
    items_per_s: float
    mean_size: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


def percentile(histogram: dict[str, int], fraction: float) -> float:
    """Percentile of locust's response-time histogram {rounded ms: count}."""
    total = sum(histogram.values())
    if total == 0:
        return float("nan")
    seen = 0
    for value, count in sorted(((float(k), c) for k, c in histogram.items())):
        seen += count
        if seen >= fraction * total:
            return value
    return float("nan")


def summarize(entries: list[dict], started_at: float) -> list[SummaryRow]:
    """Rates are over the whole run, from `started_at` (locust's first history sample, within a
    second of the start) to the last response of any row: locust's own per-row clock starts at a
    row's first response, which credits a row that ran briefly with absurd rates."""
    active = [e for e in entries if e["num_requests"]]
    duration = max(e["last_request_timestamp"] for e in active) - started_at if active else 0.0
    rows = []
    for e in entries:
        rate = e["num_requests"] / duration if duration > 0 else 0.0
        mean_size = e["total_content_length"] / e["num_requests"] if e["num_requests"] else 0.0
        rows.append(SummaryRow(
            type=e["method"], name=e["name"], requests=e["num_requests"], failures=e["num_failures"],
            duration_s=round(duration, 3), requests_per_s=round(rate, 3), items_per_s=round(rate * mean_size, 3),
            mean_size=round(mean_size, 3), p50_ms=percentile(e["response_times"], 0.50),
            p90_ms=percentile(e["response_times"], 0.90), p99_ms=percentile(e["response_times"], 0.99),
            max_ms=round(e["max_response_time"] or 0.0, 3)))
    return sorted(rows, key=lambda r: (r.type, r.name))


def first_sample_time(history_csv: Path) -> float:
    with history_csv.open(newline="") as f:
        return float(next(csv.DictReader(f))["Timestamp"])


def write_summary(rows: list[SummaryRow], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(SummaryRow.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)


def print_summary(rows: list[SummaryRow]) -> None:
    print(f"{'type':<12} {'name':<14} {'requests':>9} {'failures':>8} {'req/s':>9} {'items/s':>10} "
          f"{'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
    for r in rows:
        items = "" if is_timing_row(r.name) else f"{r.items_per_s:10.1f}"
        print(f"{r.type:<12} {r.name:<14} {r.requests:>9} {r.failures:>8} {r.requests_per_s:>9.1f} {items:>10} "
              f"{r.p50_ms:>8.1f} {r.p90_ms:>8.1f} {r.p99_ms:>8.1f}")
    print("items/s: embeddings/s for BERT rows, output tokens/s for "
          f"{'/'.join(STREAMING_TYPES)} rows; ttft/itl/tpot rows are GPT timings of completed requests")


def run(argv: list[str] | None = None) -> int:
    args, locust_extra = parse_args(argv)
    out_dir = args.out_dir / args.name
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / args.name
    command = locust_command(args, prefix, locust_extra)
    print("[run_locust]", " ".join(command), flush=True)
    # The locust file imports workload.py from its own folder; locust puts that folder on sys.path.
    code = subprocess.call(command)
    final_stats = prefix.with_name(prefix.name + ".json")
    history = prefix.with_name(prefix.name + "_stats_history.csv")
    if not final_stats.is_file() or not history.is_file():
        print(f"[run_locust] locust exited with {code} and wrote no stats in {out_dir}", file=sys.stderr)
        return 2
    rows = summarize(json.loads(final_stats.read_text()), first_sample_time(history))
    write_summary(rows, out_dir / "summary.csv")
    print_summary(rows)
    for path in draw_all(history, out_dir):
        print(f"[run_locust] plot {path}")
    print(f"[run_locust] results in {out_dir} (locust exit code {code})")
    return code


if __name__ == "__main__":
    sys.exit(run())
