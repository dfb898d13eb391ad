"""The daemon's own CPU time per single submission: steadier than wall-clock
latency on a shared machine, so the measure for A/B comparisons of the hot path
(run it from two checkouts in turn; see docs/performance.md).

Starts a jobd (synchronous=normal, a 2-thread pool), submits N no-op callables
one at a time after a warm-up, and reads the daemon's utime + stime from /proc
before and after. Prints one JSON document. Usage:
python benchmarks/submit_cpu.py [--submits N] [--rounds R]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from benchmarks.throughput import running_daemon
from jobd.client import Client

WARM_UP = 500  # submissions before measuring (imports, caches, first pages of the WAL)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_round(submits: int) -> tuple[float, float]:
    with running_daemon("normal", 2) as socket_path, Client(socket_path) as client:
        pid = client.stats()["daemon"]["pid"]
        for _ in range(WARM_UP):
            client.submit(call="jobd.demo:noop", pool="python")
        cpu0, wall0 = cpu_seconds(pid), time.perf_counter()
        for _ in range(submits):
            client.submit(call="jobd.demo:noop", pool="python")
        cpu1, wall1 = cpu_seconds(pid), time.perf_counter()
    return (cpu1 - cpu0) / submits * 1e6, (wall1 - wall0) / submits * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--submits", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rounds = [one_round(args.submits) for _ in range(args.rounds)]
    print(
        json.dumps(
            {
                "submits": args.submits,
                "daemon_cpu_us_per_submit": [round(c, 1) for c, _ in rounds],
                "daemon_cpu_us_per_submit_median": round(statistics.median(c for c, _ in rounds)),
                "wall_us_per_submit_median": round(statistics.median(w for _, w in rounds)),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
