"""Throughput and submit latency of a real jobd, against this machine's SQLite ceiling.

Starts a jobd process per `synchronous` mode on a temp state directory, then:

- throughput: N no-op Python callables (jobd.demo:noop) submitted over the
  socket in batches (several requests in flight), run in a 2-thread pool and
  journaled; jobs/s from the first submit to the last run terminal.
- latency: single submissions, one at a time, submit → acknowledgement
  (journal committed) p50/p99.
- baseline, in the same run: single-row SQLite commits/s with the same
  `synchronous`, which is what a scheduler committing each job on its own
  could reach at best.

Prints one JSON document. Usage: python benchmarks/throughput.py [--jobs N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import apsw

from jobd.client import Client
from jobd.errors import ClientError

TARGETS = {"normal": 10_000, "full": 5_000}  # jobs/s, issue 2; the project's goal is 25,000
BATCH = 1_000  # runs per submit request
WINDOW = 4  # submit requests in flight
WAIT_CHUNK = 10_000  # ids per wait request


@contextlib.contextmanager
def running_daemon(synchronous: str, workers: int) -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="jobd-bench-", dir="/tmp"))
    config = directory / "jobd.toml"
    config.write_text(f"""
[daemon]
state_dir = "{directory}"
socket = "{directory}/jobd.sock"
synchronous = "{synchronous}"

[pools.python]
kind = "thread"
workers = {workers}
""")
    log = open(directory / "daemon.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "jobd.daemon", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    socket_path = directory / "jobd.sock"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                Client(socket_path, timeout=5).close()
                break
            except ClientError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit((directory / "daemon.log").read_text()) from None
                time.sleep(0.05)
        yield socket_path
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        log.close()
        shutil.rmtree(directory, ignore_errors=True)


def throughput(socket_path: Path, jobs: int) -> dict[str, float]:
    with Client(socket_path) as client:
        run = {"call": "jobd.demo:noop", "pool": "python"}
        batches = [[run] * BATCH for _ in range(jobs // BATCH)]
        start = time.perf_counter()
        ids = client.submit_batches(batches, window=WINDOW)
        submitted = time.perf_counter()
        for i in range(0, len(ids), WAIT_CHUNK):
            result = client.wait(ids[i : i + WAIT_CHUNK])
            assert all(r["state"] == "succeeded" for r in result["runs"]), result
        done = time.perf_counter()
    return {
        "jobs": len(ids),
        "submit_per_s": round(len(ids) / (submitted - start)),
        "end_to_end_per_s": round(len(ids) / (done - start)),
        "seconds": round(done - start, 3),
    }


def latency(socket_path: Path, samples: int) -> dict[str, float]:
    with Client(socket_path) as client:
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            client.submit(call="jobd.demo:noop", pool="python")
            times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return {
        "samples": samples,
        "submit_ack_p50_ms": round(statistics.median(times), 3),
        "submit_ack_p99_ms": round(times[int(len(times) * 0.99) - 1], 3),
    }


def sqlite_single_row_commits(synchronous: str, seconds: float = 1.0) -> int:
    directory = tempfile.mkdtemp(prefix="jobd-bench-sqlite-", dir="/tmp")
    try:
        db = apsw.Connection(os.path.join(directory, "x.db"))
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        n = 0
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            with db:
                db.execute("INSERT INTO t (v) VALUES ('x')")
            n += 1
        db.close()
        return round(n / seconds)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--latency-samples", type=int, default=2_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    report: dict[str, object] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "jobs": args.jobs,
        "batch": BATCH,
        "window": WINDOW,
        "workers": args.workers,
    }
    for mode in ("normal", "full"):
        with running_daemon(mode, args.workers) as socket_path:
            result = throughput(socket_path, args.jobs)
            result.update(latency(socket_path, args.latency_samples))
        baseline = sqlite_single_row_commits(mode)
        result["baseline_sqlite_single_row_commits_per_s"] = baseline
        result["ratio_to_baseline"] = round(result["end_to_end_per_s"] / baseline, 2)
        result["target_per_s"] = TARGETS[mode]
        result["meets_target"] = result["end_to_end_per_s"] >= TARGETS[mode]
        report[f"synchronous={mode}"] = result
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
