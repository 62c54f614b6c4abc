"""Smoke tests of the release `warren-bench` load generator (crates/warren-bench)
against the real broker the `broker` fixture starts.

The binary is $WARREN_BENCH_BIN, by default <repo>/target/release/warren-bench
(`cargo build --release -p warren-bench`; scripts/test.sh builds it and sets
the variable).

1. A 2-second load run (persistent messages, confirms, manual acks) whose
   JSON report must hold non-zero publish and consume rates, ordered latency
   percentiles and the counts the tool guarantees: with no errors, every
   published message is confirmed, and every confirmed message was either
   consumed (and acked) or is still in the queue once the bench has closed
   its connections.
2. An idle-connections run (`--idle-connections 20 --idle-hold 1
   --broker-pid PID`) whose report must carry the broker's RSS before and
   after and the bytes per connection, while the broker's HTTP API lists the
   20 connections during the hold and none after.

Both are `warren_only`: the bench always uses the queue name warren-bench-0,
which the tests here may not use on a shared external broker, and the idle
run reads the broker's memory through its PID.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import threading
import time
from typing import List

import pytest
import requests

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_BENCH_BIN = REPO_ROOT / "target" / "release" / "warren-bench"

# Limit on one bench run: the runs below take 2 to 4 s; the bench's own setup
# limits are 30 s per operation.
BENCH_TIMEOUT_S = 90.0
POLL_INTERVAL_S = 0.05
# Queue the bench publishes to with --queues 1 (the default).
BENCH_QUEUE = "warren-bench-0"
# Prefix of the connection_name client property of idle connections.
IDLE_CONNECTION_NAME = "warren-bench idle "


def bench_bin() -> pathlib.Path:
    path = pathlib.Path(os.environ.get("WARREN_BENCH_BIN") or DEFAULT_BENCH_BIN)
    if not path.exists():
        pytest.fail(
            f"warren-bench binary not found at {path}; run "
            "`cargo build --release -p warren-bench` or set WARREN_BENCH_BIN",
            pytrace=False,
        )
    return path


def describe(proc) -> str:
    return (f"exit status {proc.returncode}\n--- stdout\n{proc.stdout}"
            f"\n--- stderr\n{proc.stderr}")


def run_bench(args: List[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(bench_bin()), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=BENCH_TIMEOUT_S,
    )


def eventually(check, what, timeout: float = 10.0) -> None:
    """Calls check() until it returns true; fails after `timeout`. `what` is
    a string, or a callable giving one, evaluated only on failure."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {text}")
        time.sleep(POLL_INTERVAL_S)


@pytest.mark.warren_only("the bench's queue name is fixed; not for a shared external broker")
def test_load_run_reports_rates_latency_and_consistent_counts(broker, h, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_bench([
        "--producers", "1", "--consumers", "1", "--size", "1024",
        "--persistent", "--confirm", "64", "--ack", "manual",
        "--duration", "2", "--json", str(out), "--quiet",
        "--url", broker.url,
    ])
    assert proc.returncode == 0, describe(proc)
    assert "end-to-end latency" in proc.stdout, describe(proc)
    report = json.loads(out.read_text(encoding="utf-8"))

    assert report["errors"] == [] and report["interrupted"] is False, report
    config = report["config"]
    assert config["mode"] == {"kind": "duration", "duration_s": 2}, config
    assert (config["size_bytes"], config["persistent"], config["confirm_window"],
            config["ack"]) == (1024, True, 64, "manual"), config
    assert "guest:guest" not in report["url"], "the password must be redacted"

    # Rates.
    assert report["publish"]["rate_per_s"] > 0, report["publish"]
    assert report["consume"]["rate_per_s"] > 0, report["consume"]
    assert report["publish"]["elapsed_s"] >= 2.0, report["publish"]

    # Counts. Producers stop, then wait for every outstanding confirm;
    # consumers stop at the same moment and ack what they received. So on a
    # clean run all published messages are confirmed, and the consumers got
    # at most that many (what they did not get is still queued).
    totals = report["publish_totals"]
    consumed = report["consume_totals"]
    assert totals["published"] > 0, totals
    assert totals["nacked"] == 0 and totals["unsettled"] == 0, totals
    assert totals["confirmed"] == totals["published"] == report["publish"]["messages"], totals
    assert 0 < consumed["consumed"] <= totals["confirmed"], (consumed, totals)
    assert consumed["consumed"] == report["consume"]["messages"], report["consume"]
    assert consumed["redelivered"] == 0 and consumed["unstamped"] == 0, consumed

    # Latency percentiles: present, one sample per message, and ordered.
    latency = report["end_to_end_latency"]
    assert latency is not None, report
    for key in ("samples", "min_us", "p50_us", "p99_us", "p999_us", "max_us"):
        assert isinstance(latency[key], int), (key, latency)
    assert latency["samples"] == consumed["consumed"], latency
    assert 0 < latency["min_us"] <= latency["p50_us"] <= latency["p99_us"] \
        <= latency["p999_us"] <= latency["max_us"], latency
    confirm = report["confirm_latency"]
    assert confirm is not None and confirm["samples"] == totals["confirmed"], confirm
    assert confirm["p50_us"] <= confirm["p99_us"] <= confirm["max_us"], confirm

    # The exact relation: every confirmed message was consumed (and acked)
    # or is back in the durable queue. Deliveries the consumer had not
    # counted when it stopped are requeued when its connection closes.
    _conn, ch = broker.channel()
    seen: List[int] = []

    def balanced() -> bool:
        seen.append(h.message_count(ch, BENCH_QUEUE))
        return consumed["consumed"] + seen[-1] == totals["confirmed"]

    eventually(balanced, lambda: f"consumed ({consumed['consumed']}) + left in {BENCH_QUEUE} "
               f"== confirmed ({totals['confirmed']}); last queue depths: {seen[-5:]}")
    ch.queue_delete(queue=BENCH_QUEUE)


def idle_connections_listed(http_url: str, session=requests) -> int:
    """How many of the bench's idle connections the broker's HTTP API lists."""
    resp = session.get(f"{http_url}/api/connections", auth=("guest", "guest"), timeout=5)
    resp.raise_for_status()
    return sum(
        1 for connection in resp.json()
        if str((connection.get("client_properties") or {}).get("connection_name", ""))
        .startswith(IDLE_CONNECTION_NAME)
    )


class ConnectionWatcher:
    """Polls the broker's /api/connections in a thread and keeps the most
    idle bench connections it listed at once."""

    def __init__(self, http_url: str) -> None:
        self.http_url = http_url
        self.most_seen = 0
        self.failures: List[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-watch", daemon=True)

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                try:
                    listed = idle_connections_listed(self.http_url, session)
                    self.most_seen = max(self.most_seen, listed)
                except Exception as exc:  # noqa: BLE001 - reported by the test
                    self.failures.append(repr(exc))
                self._stop.wait(POLL_INTERVAL_S)

    def __enter__(self) -> "ConnectionWatcher":
        self._thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self._stop.set()
        self._thread.join(10)


@pytest.mark.warren_only("reads the memory of the broker process the fixture started")
def test_idle_connections_report_broker_memory_per_connection(broker, tmp_path):
    assert broker.http_url is not None, broker.log(tail=50)
    out = tmp_path / "idle.json"
    pid = broker.proc.pid
    with ConnectionWatcher(broker.http_url) as watcher:
        proc = run_bench([
            "--idle-connections", "20", "--idle-hold", "1", "--broker-pid", str(pid),
            "--json", str(out), "--quiet", "--url", broker.url,
        ])
    assert proc.returncode == 0, describe(proc)
    assert "per idle connection with a channel" in proc.stdout, describe(proc)
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["errors"] == [] and report["interrupted"] is False, report
    assert report["config"]["mode"] == {"kind": "idle", "connections": 20, "hold_s": 1}
    # Idle mode sends nothing.
    assert report["publish"]["messages"] == 0 and report["consume"]["messages"] == 0, report

    idle = report["idle"]
    assert idle["connections"] == 20, idle
    assert idle["opened_in_s"] > 0, idle
    before, after = idle["rss_before_bytes"], idle["rss_after_bytes"]
    assert isinstance(before, int) and before > 0, idle
    assert isinstance(after, int) and after > 0, idle
    per = idle["bytes_per_connection"]
    assert isinstance(per, (int, float)) and not isinstance(per, bool) and math.isfinite(per), idle
    assert per == pytest.approx((after - before) / 20), idle
    assert report["broker_memory"]["pid"] == pid, report["broker_memory"]
    assert report["broker_memory"]["peak_rss_bytes"] >= after, report["broker_memory"]

    # The broker saw all 20 at once during the hold, and none is left.
    assert not watcher.failures, watcher.failures[:3]
    assert watcher.most_seen == 20, f"the broker listed at most {watcher.most_seen} of 20"
    eventually(lambda: idle_connections_listed(broker.http_url) == 0,
               "the bench's idle connections to be closed")
