"""PNG plots of a locust run, drawn from its `<prefix>_stats_history.csv` (--csv-full-history).

    python loadtest/plots.py loadtest/results/<name>/<name>_stats_history.csv   # redraw a run's plots

throughput.png  requests/s per request row, with the user count; items/s below it (output tokens/s
                for GPT, embeddings/s for BERT: the request rows' size)
latency.png     request latency p50 / p90 / p99 over time, one panel per model (locust's 10 s window)
streaming.png   TTFT, ITL and TPOT p50 / p99 over time (only when GPT users ran)
saturation.png  throughput and p50 / p99 latency against the number of users, one point per user
                count the run held (a step-load run draws the saturation curve)
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workload import ITL, STREAMING_TYPES, TPOT, TTFT, is_timing_row  # noqa: E402

PERCENTILES = ("50%", "90%", "99%")
RATE_WINDOW = 5  # history samples (about 1 s apart) per throughput point: smooth, little lag


@dataclass(frozen=True)
class Sample:
    """One row of locust's stats history: a stats entry at one moment of the run."""
    time_s: float
    users: int
    percentiles_ms: dict[str, float]
    total_requests: int
    total_failures: int
    mean_size: float


def _number(text: str) -> float:
    return math.nan if text in ("", "N/A") else float(text)


def load_history(path: Path) -> dict[str, list[Sample]]:
    """Samples per stats row ("<type> <name>"), times in seconds since the run's first sample."""
    rows = list(csv.DictReader(path.open(newline="")))
    if not rows:
        return {}
    start = min(float(r["Timestamp"]) for r in rows)
    series: dict[str, list[Sample]] = defaultdict(list)
    for r in rows:
        if r["Name"] == "Aggregated" or int(r["Total Request Count"]) == 0:
            continue  # Aggregated mixes request rows with TTFT/ITL rows; an empty entry has no numbers
        series[f"{r['Type']} {r['Name']}"].append(Sample(
            time_s=float(r["Timestamp"]) - start, users=int(r["User Count"]),
            percentiles_ms={p: _number(r[p]) for p in PERCENTILES},
            total_requests=int(r["Total Request Count"]), total_failures=int(r["Total Failure Count"]),
            mean_size=_number(r["Total Average Content Size"])))
    return dict(series)


def request_rows(history: dict[str, list[Sample]]) -> dict[str, list[Sample]]:
    return {k: v for k, v in history.items() if not is_timing_row(k.split(" ", 1)[1])}


def timing_rows(history: dict[str, list[Sample]], metric: str) -> dict[str, list[Sample]]:
    return {k: v for k, v in history.items() if k.endswith(f" {metric}")}


def rates(samples: list[Sample], value) -> tuple[list[float], list[float]]:
    """Per-second rate of a cumulative `value(sample)` over a sliding window of samples."""
    times, per_s = [], []
    for i in range(1, len(samples)):
        earlier, later = samples[max(0, i - RATE_WINDOW)], samples[i]
        if later.time_s > earlier.time_s:
            times.append(later.time_s)
            per_s.append((value(later) - value(earlier)) / (later.time_s - earlier.time_s))
    return times, per_s


def items(sample: Sample) -> float:
    """Cumulative items (embeddings or output tokens): request count x mean size."""
    return sample.total_requests * (0.0 if math.isnan(sample.mean_size) else sample.mean_size)


def plot_throughput(history, path: Path) -> Path:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    users_axis = top.twinx()
    for label, samples in request_rows(history).items():
        times, per_s = rates(samples, lambda s: s.total_requests)
        line, = top.plot(times, per_s, label=f"{label} requests/s")
        times, failed = rates(samples, lambda s: s.total_failures)
        if any(failed):
            top.plot(times, failed, "--", color=line.get_color(), label=f"{label} failures/s")
        times, per_s = rates(samples, items)
        unit = "output tokens/s" if label.split(" ", 1)[0] in STREAMING_TYPES else "embeddings/s"
        bottom.plot(times, per_s, color=line.get_color(), label=f"{label} {unit}")
    any_samples = next(iter(history.values()), [])
    users_axis.step([s.time_s for s in any_samples], [s.users for s in any_samples], "k:", where="post",
                    label="users")
    top.set_ylabel("requests / s")
    users_axis.set_ylabel("users")
    users_axis.set_ylim(bottom=0)
    bottom.set_ylabel("embeddings or tokens / s")
    bottom.set_xlabel("seconds since start")
    top.set_title(f"Throughput over time (sliding {RATE_WINDOW} s)")
    _legend(top, users_axis)
    _legend(bottom)
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
        axis.set_ylim(bottom=0)
    return _save(fig, path)


def plot_latency(history, path: Path) -> Path:
    """One panel per model (BERT and GPT latencies differ by orders of magnitude)."""
    rows = request_rows(history)
    models = sorted({label.split(" ", 1)[1] for label in rows}) or [""]
    fig, axes = plt.subplots(len(models), 1, figsize=(10, 3.2 + 2.6 * len(models)), sharex=True, squeeze=False)
    for axis, model in zip(axes[:, 0], models):
        _percentile_lines(axis, {k: v for k, v in rows.items() if k.split(" ", 1)[1] == model})
        axis.set_title(f"{model} request latency (locust's 10 s sliding window)", fontsize=10)
        axis.set_ylabel("ms")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        _legend(axis, ncol=2)
    axes[-1, 0].set_xlabel("seconds since start")
    return _save(fig, path)


def plot_streaming(history, path: Path) -> Path | None:
    metrics = [(TTFT, "time to first token"), (ITL, "inter-token latency (per streamed response)"),
               (TPOT, "time per output token")]
    if not any(timing_rows(history, m) for m, _ in metrics):
        return None
    fig, axes = plt.subplots(len(metrics), 1, figsize=(10, 9), sharex=True)
    for axis, (metric, title) in zip(axes, metrics):
        rows = timing_rows(history, metric)
        _percentile_lines(axis, rows, percentiles=("50%", "99%"))
        axis.set_title(f"{metric.upper()}: {title}", fontsize=10)
        axis.set_ylabel("ms")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        _legend(axis, ncol=2)
    axes[-1].set_xlabel("seconds since start")
    return _save(fig, path)


@dataclass(frozen=True)
class Level:
    """What one request row did while the run held one user count."""
    users: int
    requests_per_s: float
    items_per_s: float
    p50_ms: float
    p99_ms: float


def levels(samples: list[Sample]) -> list[Level]:
    """One Level per user count held; latency from the last sample there (the last 10 s of it)."""
    by_users: dict[int, list[Sample]] = defaultdict(list)
    for s in samples:
        if s.users > 0:
            by_users[s.users].append(s)
    result = []
    for users, held in sorted(by_users.items()):
        first, last = held[0], held[-1]
        span = last.time_s - first.time_s
        if span <= 0:
            continue
        result.append(Level(users, (last.total_requests - first.total_requests) / span,
                            (items(last) - items(first)) / span,
                            last.percentiles_ms["50%"], last.percentiles_ms["99%"]))
    return result


def plot_saturation(history, path: Path) -> Path:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for label, samples in request_rows(history).items():
        held = levels(samples)
        users = [level.users for level in held]
        line, = top.plot(users, [level.requests_per_s for level in held], "o-", label=f"{label} requests/s")
        bottom.plot(users, [level.p50_ms for level in held], "o-", color=line.get_color(), label=f"{label} p50")
        bottom.plot(users, [level.p99_ms for level in held], "s--", color=line.get_color(), label=f"{label} p99")
    top.set_title("Saturation: throughput and latency against concurrent users")
    top.set_ylabel("requests / s")
    bottom.set_ylabel("latency (ms)")
    bottom.set_xlabel("users (each one request in flight)")
    for axis in (top, bottom):
        axis.grid(alpha=0.3)
        axis.set_ylim(bottom=0)
        _legend(axis)
    return _save(fig, path)


def _percentile_lines(axis, rows: dict[str, list[Sample]], percentiles=PERCENTILES) -> None:
    styles = {"50%": "-", "90%": "--", "99%": ":"}
    for index, (label, samples) in enumerate(rows.items()):
        color = f"C{index}"
        samples = samples[1:]  # locust's first window has no percentiles yet (it writes zeros)
        for p in percentiles:
            axis.plot([s.time_s for s in samples], [s.percentiles_ms[p] for s in samples], styles[p],
                      color=color, label=f"{label} p{p.rstrip('%')}")


def _legend(*axes, ncol: int = 1) -> None:
    """One legend on the first axis for the lines of all of them (none when nothing was drawn)."""
    handles, labels = [], []
    for axis in axes:
        h, l = axis.get_legend_handles_labels()
        handles += h
        labels += l
    if handles:
        axes[0].legend(handles, labels, loc="best", fontsize=8, ncol=ncol)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_all(history_csv: Path, out_dir: Path) -> list[Path]:
    """Draw every plot that the run's data supports into out_dir; returns the files written."""
    history = load_history(history_csv)
    drawn = [plot_throughput(history, out_dir / "throughput.png"),
             plot_latency(history, out_dir / "latency.png"),
             plot_streaming(history, out_dir / "streaming.png"),
             plot_saturation(history, out_dir / "saturation.png")]
    return [p for p in drawn if p is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("history_csv", type=Path)
    parser.add_argument("--out-dir", type=Path, help="default: the CSV's folder")
    args = parser.parse_args(argv)
    for path in draw_all(args.history_csv, args.out_dir or args.history_csv.parent):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
