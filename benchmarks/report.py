#!/usr/bin/env python3
"""Turns the results of benchmarks/compare.sh into BENCHMARKS.md.

Usage:
  python3 benchmarks/report.py RESULTS_DIR [--out BENCHMARKS.md]
      Reads RESULTS_DIR/runs.jsonl (one line per run, written by compare.sh),
      the warren-bench JSON of each run and RESULTS_DIR/meta.json, and writes
      the report (default: BENCHMARKS.md at the repository root). Scenarios
      or brokers without results are reported as not measured.
  python3 benchmarks/report.py machine-info OUT.json [KEY=VALUE ...]
      Records the machine, versions and the given settings (compare.sh calls
      this before the first run).
  python3 benchmarks/report.py summary RUN.json
      Prints a one-line summary of one warren-bench JSON result.

Standard library only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BROKERS = ("warren", "rabbitmq")
BROKER_NAMES = {"warren": "Warren", "rabbitmq": "RabbitMQ"}
KIB = 1024
MIB = 1024 * 1024
GIB = 1024 * MIB


# ----------------------------------------------------------------- helpers
def dig(doc: Any, *path: str) -> Optional[float]:
    """doc[path[0]][path[1]]..., or None when any step is missing or null."""
    for key in path:
        if not isinstance(doc, dict) or doc.get(key) is None:
            return None
        doc = doc[key]
    if isinstance(doc, bool):
        return float(doc)
    if isinstance(doc, (int, float)):
        return float(doc)
    return None


def fmt_rate(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:,.0f} msg/s"


def fmt_us(value: Optional[float]) -> str:
    if value is None:
        return "—"
    if value < 1_000:
        return f"{value:.0f} µs"
    if value < 1_000_000:
        return f"{value / 1e3:.2f} ms"
    return f"{value / 1e6:.2f} s"


def fmt_bytes(value: Optional[float]) -> str:
    if value is None:
        return "—"
    if value < MIB:
        return f"{value / KIB:.1f} KiB"
    if value < GIB:
        return f"{value / MIB:.1f} MiB"
    return f"{value / GIB:.2f} GiB"


def fmt_seconds(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f} s"


def fmt_count(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:,.0f}"


def median(values: list[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def run_command(args: list[str], timeout: float = 30) -> Optional[str]:
    """stdout of a command, stripped, or None if it cannot run or fails."""
    if shutil.which(args[0]) is None and not os.path.exists(args[0]):
        return None
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


# ----------------------------------------------------------------- metrics
@dataclass
class Metric:
    label: str
    extract: Callable[[dict], Optional[float]]
    kind: str  # rate | latency | bytes | seconds | count
    better: Optional[str] = None  # higher | lower | None (no comparison)

    def fmt(self, value: Optional[float]) -> str:
        return {
            "rate": fmt_rate,
            "latency": fmt_us,
            "bytes": fmt_bytes,
            "seconds": fmt_seconds,
            "count": fmt_count,
        }[self.kind](value)


WORDS = {  # kind -> (Warren better, Warren worse)
    "rate": ("faster", "slower"),
    "latency": ("lower latency", "higher latency"),
    "bytes": ("less memory", "more memory"),
    "seconds": ("quicker", "slower"),
    "count": ("more", "fewer"),
}


def reading(metric: Metric, warren: Optional[float], rabbit: Optional[float]) -> str:
    """The ratio in words, always from Warren's side ("Warren 5.2× faster")."""
    if metric.better is None or warren is None or rabbit is None:
        return ""
    if warren <= 0 or rabbit <= 0:
        return ""
    factor = max(warren / rabbit, rabbit / warren)
    if factor < 1.01:
        return "about equal"
    warren_better = (warren > rabbit) == (metric.better == "higher")
    good, bad = WORDS[metric.kind]
    return f"Warren {factor:.1f}× {good if warren_better else bad}"


def ratio(warren: Optional[float], rabbit: Optional[float]) -> Optional[float]:
    if warren is None or rabbit is None or rabbit == 0:
        return None
    return warren / rabbit


def rate(direction: str) -> Callable[[dict], Optional[float]]:
    return lambda doc: dig(doc, direction, "rate_per_s")


def latency(which: str, key: str) -> Callable[[dict], Optional[float]]:
    return lambda doc: dig(doc, which, key)


def memory(key: str) -> Callable[[dict], Optional[float]]:
    return lambda doc: dig(doc, "broker_memory", key)


def idle(key: str) -> Callable[[dict], Optional[float]]:
    return lambda doc: dig(doc, "idle", key)


def stall(*path: str) -> Callable[[dict], Optional[float]]:
    return lambda doc: dig(doc, "stall", *path)


PEAK_RSS = Metric("Broker peak RSS", memory("peak_rss_bytes"), "bytes", "lower")


def left_queued(doc: dict) -> Optional[float]:
    """Copies published but not consumed by the end of a timed run: a backlog
    that grew because publishers outran consumers (it inflates latency)."""
    published = dig(doc, "publish", "messages")
    consumed = dig(doc, "consume", "messages")
    if published is None or consumed is None:
        return None
    config = doc.get("config") or {}
    copies = float(config.get("queues") or 1) if config.get("exchange_fanout") else 1.0
    return max(published * copies - consumed, 0.0)


BACKLOG = Metric("Left queued at the end", left_queued, "count")


@dataclass
class Scenario:
    number: int
    title: str
    setup: str
    metrics: list[Metric]
    # Scenarios that make one run per variant per round (7: each disruption,
    # 8: each queue count) have their medians taken per variant.
    variant_kind: Optional[str] = None  # "disruption" | "queues"


# Scenario 7's disruptions, in the order of the report.
DISRUPTIONS = ("unacked-close", "declare", "paged-drain", "connection-churn")
DISRUPTION_TEXT = {
    "unacked-close": "a client holding unacked deliveries closes its channel (all requeued)",
    "declare": "a client declares durable queues one after another",
    "paged-drain": "a client fills a durable queue (most paged to disk) and drains it",
    "connection-churn": "a client opens and closes connections, each with a channel",
}


SCENARIOS = {
    1: Scenario(
        1,
        "Transient 16 B, 1 producer, 1 consumer, no confirms, auto-ack",
        "Throughput is messages consumed per second over the run.",
        [
            Metric("Throughput (consumed)", rate("consume"), "rate", "higher"),
            Metric("Publish rate", rate("publish"), "rate", "higher"),
            Metric("Latency p50", latency("end_to_end_latency", "p50_us"), "latency", "lower"),
            Metric("Latency p99", latency("end_to_end_latency", "p99_us"), "latency", "lower"),
            Metric("Latency p99.9", latency("end_to_end_latency", "p999_us"), "latency", "lower"),
            BACKLOG,
            PEAK_RSS,
        ],
    ),
    2: Scenario(
        2,
        "Persistent 1 KiB, durable queue, 4 producers with confirms (window 256), "
        "2 consumers, manual ack, prefetch 100",
        "Throughput is messages consumed (and acknowledged) per second over the run.",
        [
            Metric("Throughput (consumed)", rate("consume"), "rate", "higher"),
            Metric("Publish rate", rate("publish"), "rate", "higher"),
            Metric("Latency p50", latency("end_to_end_latency", "p50_us"), "latency", "lower"),
            Metric("Latency p99", latency("end_to_end_latency", "p99_us"), "latency", "lower"),
            Metric("Latency p99.9", latency("end_to_end_latency", "p999_us"), "latency", "lower"),
            Metric("Confirm latency p99", latency("confirm_latency", "p99_us"), "latency", "lower"),
            BACKLOG,
            PEAK_RSS,
        ],
    ),
    3: Scenario(
        3,
        "Fixed 10,000 msg/s, persistent 1 KiB, confirms (window 256), "
        "1 producer, 1 consumer, manual ack",
        "The offered load is fixed; latency is end to end (publish to delivery).",
        [
            Metric("Latency p50", latency("end_to_end_latency", "p50_us"), "latency", "lower"),
            Metric("Latency p99", latency("end_to_end_latency", "p99_us"), "latency", "lower"),
            Metric("Latency p99.9", latency("end_to_end_latency", "p999_us"), "latency", "lower"),
            Metric("Latency max", latency("end_to_end_latency", "max_us"), "latency", "lower"),
            Metric("Confirm latency p99", latency("confirm_latency", "p99_us"), "latency", "lower"),
            Metric("Achieved publish rate", rate("publish"), "rate"),
            Metric("Achieved consume rate", rate("consume"), "rate"),
            PEAK_RSS,
        ],
    ),
    4: Scenario(
        4,
        "Fan-out: 1 producer to a fanout exchange bound to 10 queues, "
        "10 consumers, transient 1 KiB, no confirms, auto-ack",
        "Each published message reaches all 10 queues; deliveries count every copy.",
        [
            Metric("Publish rate", rate("publish"), "rate", "higher"),
            Metric("Deliveries (all queues)", rate("consume"), "rate", "higher"),
            Metric("Latency p50", latency("end_to_end_latency", "p50_us"), "latency", "lower"),
            Metric("Latency p99", latency("end_to_end_latency", "p99_us"), "latency", "lower"),
            BACKLOG,
            PEAK_RSS,
        ],
    ),
    5: Scenario(
        5,
        "Backlog: prefill persistent 1 KiB messages (confirms, window 256), then drain "
        "(manual ack, prefetch 100)",
        "Prefill with no consumer attached, then one consumer drains the queue.",
        [
            Metric("Prefill rate", rate("publish"), "rate", "higher"),
            Metric("Drain rate", rate("consume"), "rate", "higher"),
            Metric("Broker RSS after prefill", memory("after_prefill_rss_bytes"), "bytes", "lower"),
            Metric("Broker peak RSS (prefill and drain)", memory("peak_rss_bytes"), "bytes", "lower"),
            Metric("Messages prefilled", lambda d: dig(d, "publish", "messages"), "count"),
        ],
    ),
    6: Scenario(
        6,
        "Idle connections, one channel each",
        "Broker RSS is read before the connections open and after they have been held.",
        [
            Metric("Broker memory per connection", idle("bytes_per_connection"), "bytes", "lower"),
            Metric("Broker RSS before", idle("rss_before_bytes"), "bytes", "lower"),
            Metric("Broker RSS with connections open", idle("rss_after_bytes"), "bytes", "lower"),
            Metric("Time to open them all", idle("opened_in_s"), "seconds", "lower"),
            Metric("Connections held", idle("connections"), "count"),
        ],
    ),
    7: Scenario(
        7,
        "Stall probe: does one client stall another?",
        "A probe publishes 16 B messages at a fixed rate to a queue of its own and consumes "
        "them (auto-ack), from a 1 s settle before a disruption to a 1 s settle after it. "
        "Latency and silence are the probe's during the disruption: latency over the probe "
        "messages in flight during it, silence the largest gap between consecutive deliveries "
        "to the probe that overlaps it (it catches a stall while no probe message is in "
        "flight).",
        [
            Metric("Probe p99.9", stall("window", "latency", "p999_us"), "latency", "lower"),
            Metric("Worst latency", stall("window", "latency", "max_us"), "latency", "lower"),
            Metric("Longest silence", stall("window", "longest_silence_us"), "latency", "lower"),
            Metric("Disruption took", stall("disruption_s"), "seconds", "lower"),
            Metric("Probe p99.9 before (baseline)", stall("before", "latency", "p999_us"),
                   "latency", "lower"),
            Metric("Disruption count", stall("count"), "count"),
        ],
        variant_kind="disruption",
    ),
    8: Scenario(
        8,
        "Independent queues, each with its own producer and consumer, transient, "
        "no confirms, auto-ack",
        "N queues, N producers and N consumers: producer i and consumer i use queue i, so "
        "the queues share nothing but the broker. Throughput is messages consumed per second, "
        "all queues together.",
        [
            Metric("Throughput (consumed)", rate("consume"), "rate", "higher"),
            Metric("Publish rate", rate("publish"), "rate", "higher"),
            Metric("Latency p99", latency("end_to_end_latency", "p99_us"), "latency", "lower"),
            BACKLOG,
        ],
        variant_kind="queues",
    ),
}


@dataclass
class Target:
    scenario: int
    text: str
    metric: str  # label of a metric of the scenario
    kind: str  # ratio_at_least | below | at_most
    bound: float
    note: str = ""
    variant: str = ""  # for scenarios with variants


TARGETS = [
    Target(1, "throughput at least 5× RabbitMQ's", "Throughput (consumed)", "ratio_at_least", 5),
    Target(2, "throughput at least 5× RabbitMQ's", "Throughput (consumed)", "ratio_at_least", 5),
    Target(2, "p99 latency under 10 ms", "Latency p99", "below", 10_000,
           "RabbitMQ 3.10 on the issue's machine: several hundred ms"),
    Target(3, "p99 latency under 5 ms", "Latency p99", "below", 5_000),
    Target(5, "broker RSS under 100 MiB (after prefill and at peak)",
           "Broker peak RSS (prefill and drain)", "below", 100 * MIB,
           "RabbitMQ 3.10 on the issue's machine: 3.7 GiB after prefill, 5.7 GiB peak"),
    Target(5, "prefill at least 3× RabbitMQ's", "Prefill rate", "ratio_at_least", 3,
           "RabbitMQ 3.10 on the issue's machine: 15k msg/s"),
    Target(5, "drain at least 3× RabbitMQ's", "Drain rate", "ratio_at_least", 3,
           "RabbitMQ 3.10 on the issue's machine: 14k msg/s"),
    Target(6, "under 16 KiB of broker memory per idle connection with a channel",
           "Broker memory per connection", "below", 16 * KIB,
           "RabbitMQ 3.10 on the issue's machine: about 59 KiB"),
    Target(7, "10,000 durable queues declared in under 5 s", "Disruption took", "below", 5,
           variant="declare"),
] + [
    Target(7, f"{disruption}: the probe's worst latency at most 10 ms", "Worst latency",
           "at_most", 10_000, variant=disruption)
    for disruption in DISRUPTIONS
]


# ----------------------------------------------------------------- runs
@dataclass
class Run:
    scenario: int
    round: int
    broker: str
    status: Optional[int]
    json_name: str
    variant: str = ""
    command: str = ""
    broker_command: str = ""
    doc: Optional[dict] = None
    problems: list[str] = field(default_factory=list)


def load_runs(results_dir: str) -> list[Run]:
    manifest = os.path.join(results_dir, "runs.jsonl")
    records: list[dict] = []
    if os.path.exists(manifest):
        with open(manifest) as handle:
            for number, line in enumerate(handle, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    print(f"report.py: {manifest}:{number}: not JSON, skipped", file=sys.stderr)
    else:
        # No manifest: take whatever results are there, named
        # s<N>-r<R>-<broker>.json or s<N>-<variant>-r<R>-<broker>.json.
        for path in sorted(glob.glob(os.path.join(results_dir, "s*-r*-*.json"))):
            match = re.fullmatch(r"s(\d+)(?:-([\w-]+?))?-r(\d+)-(\w+)\.json",
                                 os.path.basename(path))
            if match:
                records.append({"scenario": match[1], "variant": match[2] or "",
                                "round": match[3], "broker": match[4],
                                "json": os.path.basename(path)})
    runs = []
    for record in records:
        try:
            scenario = int(record["scenario"])
            round_number = int(record.get("round", 0))
        except (KeyError, ValueError):
            continue
        status_text = record.get("status")
        status = int(status_text) if status_text not in (None, "") else None
        run = Run(scenario, round_number, record.get("broker", "?"), status,
                  record.get("json", ""), record.get("variant", ""),
                  record.get("command", ""), record.get("broker_command", ""))
        path = os.path.join(results_dir, run.json_name) if run.json_name else ""
        if path and os.path.exists(path):
            try:
                with open(path) as handle:
                    run.doc = json.load(handle)
            except (OSError, json.JSONDecodeError) as error:
                run.problems.append(f"unreadable JSON ({error})")
        else:
            run.problems.append("no JSON result")
        run.problems = check_run(run) + run.problems
        runs.append(run)
    return runs


def check_run(run: Run) -> list[str]:
    """What makes this run's numbers suspect, in words."""
    problems = []
    if run.status in (124, 137):
        problems.append("timed out")
    elif run.status not in (None, 0):
        problems.append(f"warren-bench exited {run.status}")
    doc = run.doc
    if not doc:
        return problems
    errors = doc.get("errors") or []
    if errors:
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        problems.append(f"error: {str(errors[0])[:160]}{more}")
    if doc.get("interrupted"):
        problems.append("interrupted")
    if doc.get("drain_complete") is False:
        problems.append(
            f"drain incomplete ({fmt_count(dig(doc, 'consume', 'messages'))} of "
            f"{fmt_count(dig(doc, 'drain_expected'))})")
    nacked = dig(doc, "publish_totals", "nacked")
    if nacked:
        problems.append(f"{nacked:,.0f} publishes nacked")
    unsettled = dig(doc, "publish_totals", "unsettled")
    if unsettled:
        problems.append(f"{unsettled:,.0f} publishes never confirmed")
    failed = dig(doc, "broker_memory", "failed_samples")
    if failed:
        problems.append(f"{failed:,.0f} RSS samples failed")
    if dig(doc, "stall", "complete") == 0.0:
        problems.append(
            f"disruption incomplete ({fmt_count(stall('completed')(doc))} of "
            f"{fmt_count(stall('count')(doc))})")
    published = stall("probe", "published")(doc)
    received = stall("probe", "received")(doc)
    if published is not None and received is not None and received < published:
        problems.append(f"the probe lost {published - received:,.0f} of {published:,.0f} messages")
    offered = dig(doc, "config", "rate_per_s")
    achieved = dig(doc, "publish", "rate_per_s")
    if offered and achieved is not None and achieved < 0.95 * offered:
        problems.append(f"offered {offered:,.0f} msg/s but published {achieved:,.0f} msg/s")
    return problems


def summary_line(doc: dict) -> str:
    """One line of the numbers that matter for a result."""
    parts = []
    if isinstance(doc.get("stall"), dict):
        parts.append(f"stall {doc['stall'].get('disruption', '?')}: "
                     f"took {fmt_seconds(stall('disruption_s')(doc))}, probe p99.9 "
                     f"{fmt_us(stall('window', 'latency', 'p999_us')(doc))}, worst "
                     f"{fmt_us(stall('window', 'latency', 'max_us')(doc))}, longest silence "
                     f"{fmt_us(stall('window', 'longest_silence_us')(doc))}")
    elif isinstance(doc.get("idle"), dict):
        parts.append(f"idle {fmt_count(idle('connections')(doc))} connections: "
                     f"{fmt_bytes(idle('bytes_per_connection')(doc))}/connection, "
                     f"RSS {fmt_bytes(idle('rss_before_bytes')(doc))} -> "
                     f"{fmt_bytes(idle('rss_after_bytes')(doc))}")
    else:
        prefill = (doc.get("config") or {}).get("mode", {}).get("kind") == "prefill"
        parts.append(f"{'prefill' if prefill else 'publish'} {fmt_rate(rate('publish')(doc))}")
        parts.append(f"{'drain' if prefill else 'consume'} {fmt_rate(rate('consume')(doc))}")
        p50 = latency("end_to_end_latency", "p50_us")(doc)
        p99 = latency("end_to_end_latency", "p99_us")(doc)
        if p99 is not None and not prefill:  # a backlog's age, not latency
            parts.append(f"p50 {fmt_us(p50)} p99 {fmt_us(p99)}")
        after = memory("after_prefill_rss_bytes")(doc)
        if after is not None:
            parts.append(f"RSS after prefill {fmt_bytes(after)}")
        peak = memory("peak_rss_bytes")(doc)
        if peak is not None:
            parts.append(f"peak RSS {fmt_bytes(peak)}")
    errors = doc.get("errors") or []
    if errors:
        parts.append(f"{len(errors)} error(s)")
    return ", ".join(parts)


# ----------------------------------------------------------------- machine info
def machine_info(extra: dict[str, str]) -> dict:
    info: dict[str, Any] = {}
    cpu_model = None
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpu_model"] = cpu_model or platform.processor() or platform.machine()
    info["arch"] = platform.machine()
    nproc = run_command(["nproc"])
    info["cores_nproc"] = int(nproc) if nproc and nproc.isdigit() else os.cpu_count()
    info["cpus_online"] = os.cpu_count()
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    info["mem_total_bytes"] = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    info["kernel"] = platform.release()
    try:
        with open("/etc/os-release") as handle:
            for line in handle:
                if line.startswith("PRETTY_NAME="):
                    info["os"] = line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    info["date_utc"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    info["git_commit"] = run_command(["git", "rev-parse", "HEAD"])
    dirty = run_command(["git", "status", "--porcelain", "--untracked-files=no"])
    info["git_dirty"] = bool(dirty) if info["git_commit"] else None
    info["git_subject"] = run_command(["git", "log", "-1", "--format=%s"])
    warren_bin = os.path.join(ROOT, extra.get("warren_bin", "target/release/warren"))
    bench_bin = os.path.join(ROOT, extra.get("bench_bin", "target/release/warren-bench"))
    info["warren_version"] = run_command([warren_bin, "--version"])
    info["bench_version"] = run_command([bench_bin, "--version"])
    info["rustc_version"] = run_command(["rustc", "--version"])
    info["rabbitmq_package"] = run_command(
        ["dpkg-query", "-W", "-f=${Version}", "rabbitmq-server"])
    info["erlang_package"] = run_command(["dpkg-query", "-W", "-f=${Version}", "erlang-base"])
    # The server's version from its installation directory (Debian:
    # /usr/lib/rabbitmq/lib/rabbitmq_server-3.10.8). Not `rabbitmqctl
    # version`: that starts a system-wide epmd daemon as a side effect.
    sbin = extra.get("rabbitmq_sbin", "/usr/lib/rabbitmq/bin")
    server_dirs = sorted(glob.glob(os.path.join(os.path.dirname(sbin), "lib", "rabbitmq_server-*")))
    info["rabbitmq_version"] = (os.path.basename(server_dirs[-1]).split("-", 1)[1]
                                if server_dirs else None)
    work_dir = extra.get("work_dir")
    if work_dir and os.path.isdir(work_dir):
        df = run_command(["df", "-PT", work_dir])
        if df and len(df.splitlines()) >= 2:
            fields = df.splitlines()[1].split()
            info["data_disk"] = f"{fields[0]} ({fields[1]}), {int(fields[3]) * 1024 / GIB:.0f} GiB"
    info["settings"] = extra
    return info


# ----------------------------------------------------------------- report
def md_escape(text: str) -> str:
    return text.replace("|", "\\|")


class Report:
    def __init__(self, results_dir: str, runs: list[Run], meta: dict):
        self.results_dir = results_dir
        self.runs = runs
        self.meta = meta
        self.settings = meta.get("settings", {})
        self.quick = str(self.settings.get("quick", "0")) == "1"
        wanted = str(self.settings.get("idle_connections", ""))
        if wanted.isdigit():
            for run in runs:
                held = idle("connections")(run.doc) if run.doc else None
                if held is not None and held < int(wanted):
                    run.problems.append(f"held {held:,.0f} of {int(wanted):,} connections")
        # (scenario, variant) -> metric label -> broker -> median; the
        # variant is "" for scenarios without variants.
        self.medians: dict[tuple[int, str], dict[str, dict[str, Optional[float]]]] = {}
        self.counts: dict[tuple[int, str], dict[str, int]] = {}
        for number, scenario in SCENARIOS.items():
            for variant in self.variants_of(number):
                key = (number, variant)
                self.medians[key] = {}
                self.counts[key] = {}
                for broker in BROKERS:
                    docs = [r.doc for r in self.runs_of(number, broker, variant) if r.doc]
                    self.counts[key][broker] = len(docs)
                    for metric in scenario.metrics:
                        values = [v for v in (metric.extract(d) for d in docs) if v is not None]
                        self.medians[key].setdefault(metric.label, {})[broker] = median(values)

    def runs_of(self, scenario: int, broker: Optional[str] = None,
                variant: Optional[str] = None) -> list[Run]:
        return [r for r in self.runs
                if r.scenario == scenario and (broker is None or r.broker == broker)
                and (variant is None or r.variant == variant)]

    def variants_of(self, scenario: int) -> list[str]:
        """The variants run of a scenario in report order ([""] without variants)."""
        kind = SCENARIOS[scenario].variant_kind
        if kind is None:
            return [""]
        seen = {r.variant for r in self.runs_of(scenario)}
        if kind == "disruption":
            return [d for d in DISRUPTIONS if d in seen] + sorted(seen - set(DISRUPTIONS))

        def queues(variant: str) -> float:
            digits = variant.lstrip("q")
            return float(digits) if digits.isdigit() else float("inf")
        return sorted(seen, key=lambda v: (queues(v), v))

    def value(self, scenario: int, label: str, broker: str,
              variant: str = "") -> Optional[float]:
        return self.medians.get((scenario, variant), {}).get(label, {}).get(broker)

    def metric(self, scenario: int, label: str) -> Metric:
        return next(m for m in SCENARIOS[scenario].metrics if m.label == label)

    # -- targets
    def judge(self, target: Target) -> tuple[str, str]:
        """(verdict, measured text) for one target."""
        metric = self.metric(target.scenario, target.metric)
        warren = self.value(target.scenario, target.metric, "warren", target.variant)
        rabbit = self.value(target.scenario, target.metric, "rabbitmq", target.variant)
        if target.kind == "ratio_at_least":
            value = ratio(warren, rabbit)
            if value is None:
                missing = [BROKER_NAMES[b] for b, v in (("warren", warren), ("rabbitmq", rabbit))
                           if v is None]
                return "not measured", f"no result for {' and '.join(missing)}"
            measured = (f"{value:.2f}× ({metric.fmt(warren)} against {metric.fmt(rabbit)})")
            return ("met" if value >= target.bound else "MISSED"), measured
        if warren is None:
            return "not measured", "no Warren result"
        measured = f"{metric.fmt(warren)}"
        if target.scenario == 5:
            after = self.value(5, "Broker RSS after prefill", "warren")
            measured = f"{fmt_bytes(after)} after prefill, {fmt_bytes(warren)} peak"
            if rabbit is not None:
                rabbit_after = self.value(5, "Broker RSS after prefill", "rabbitmq")
                measured += (f"; RabbitMQ {fmt_bytes(rabbit_after)} after prefill, "
                             f"{fmt_bytes(rabbit)} peak")
        elif rabbit is not None and rabbit > 0:
            if metric.kind == "bytes":
                measured += f"; RabbitMQ {metric.fmt(rabbit)} ({rabbit / warren:.1f}× Warren's)" \
                    if warren > 0 else f"; RabbitMQ {metric.fmt(rabbit)}"
            else:
                measured += f"; RabbitMQ {metric.fmt(rabbit)}"
        if target.kind == "at_most":
            return ("met" if warren <= target.bound else "MISSED"), measured
        return ("met" if warren < target.bound else "MISSED"), measured

    # -- rendering
    def render(self) -> str:
        out: list[str] = []
        meta = self.meta
        out.append("# Warren and RabbitMQ, side by side")
        out.append("")
        out.append(
            "Produced by `benchmarks/compare.sh` and `benchmarks/report.py` "
            f"on {meta.get('date_utc', 'an unrecorded date')}; raw results in "
            f"`{self.settings.get('results_dir', self.results_dir)}`"
            f"{' (under target/, not in the repository)' if str(self.settings.get('results_dir', '')).startswith('target/') else ''}. "
            "Regenerate the report alone with "
            f"`python3 benchmarks/report.py {self.settings.get('results_dir', 'RESULTS_DIR')}`.")
        out.append("")
        if self.quick:
            out.append("> **QUICK trial run**: shortened runs (see Method). These numbers "
                       "check that the harness works; they are not the published comparison.")
            out.append("")
        ran = sorted({r.scenario for r in self.runs})
        not_run = [n for n in SCENARIOS if n not in ran]
        if not_run:
            out.append(f"> Scenarios not run in this session: {', '.join(map(str, not_run))}.")
            out.append("")
        out += self.render_machine()
        out += self.render_method()
        out += self.render_targets()
        out += self.render_results()
        out += self.render_in_the_way()
        out += self.render_storage()
        out += self.render_all_runs()
        out += self.render_commands()
        return "\n".join(out).rstrip() + "\n"

    def render_machine(self) -> list[str]:
        meta = self.meta
        rows = []
        cores = meta.get("cores_nproc")
        rows.append(("CPU", f"{meta.get('cpu_model', '?')} ({meta.get('arch', '?')})"))
        rows.append(("Cores (nproc)", f"{cores if cores is not None else '?'}"))
        mem = meta.get("mem_total_bytes")
        rows.append(("Memory", fmt_bytes(mem) if mem else "?"))
        rows.append(("OS, kernel", f"{meta.get('os', '?')}, Linux {meta.get('kernel', '?')}"))
        if meta.get("data_disk"):
            rows.append(("Disk of the broker data", meta["data_disk"]))
        rows.append(("Date", meta.get("date_utc", "?")))
        commit = meta.get("git_commit")
        if commit:
            warren = f"`{commit[:12]}`"
            if meta.get("git_dirty"):
                warren += " with uncommitted changes"
        else:
            warren = "commit unknown"
        version = meta.get("warren_version") or "warren ?"
        rows.append(("Warren", f"{version}, {warren}"))
        rabbit = meta.get("rabbitmq_version") or meta.get("rabbitmqctl_version") or "?"
        package = meta.get("rabbitmq_package")
        erlang = meta.get("erlang_package")
        text = f"RabbitMQ {rabbit}"
        if package:
            text += f" (Debian package {package})"
        if erlang:
            text += f", Erlang (erlang-base {erlang})"
        rows.append(("RabbitMQ", text))
        if meta.get("bench_version"):
            rows.append(("Load generator", meta["bench_version"]))
        if meta.get("rustc_version"):
            rows.append(("Rust", meta["rustc_version"]))
        out = ["## Machine", "", "| | |", "|---|---|"]
        out += [f"| {name} | {md_escape(str(value))} |" for name, value in rows]
        out.append("")
        if cores is not None and str(cores) != "2":
            out.append(f"The issue's targets were stated for a 2-core machine; this one has "
                       f"{cores} cores.")
            out.append("")
        return out

    def render_method(self) -> list[str]:
        s = self.settings
        out = ["## Method", ""]
        out.append(
            f"- {s.get('rounds', '?')} round(s) per scenario. In each round Warren runs first, "
            "then RabbitMQ (A, B, A, B, ...), so drift of the machine during the session hits "
            "both. The tables show the median of the rounds.")
        out.append(
            "- Every run starts its broker afresh with an empty data directory and stops it "
            "afterwards; only the broker under test runs while it is measured, and no "
            "run's memory carries over to the next. Both brokers keep their data on the same "
            "disk, and both run with their default settings (RabbitMQ: a private node from "
            "`scripts/rabbitmq.sh`, Debian's package, no plugins).")
        out.append(
            "- The load generator is `warren-bench` on the same machine. Latency is end to end, "
            "from the send time stamped in the body to delivery. Broker RSS is the resident set "
            "of the broker process (`VmRSS`; for RabbitMQ the Erlang VM, `beam.smp`), sampled "
            "every 100 ms.")
        runs = f"{s.get('duration_s', '?')} s"
        out.append(
            f"- Scenarios 1-4 run for {runs} each; scenario 5 prefills "
            f"{fmt_count(float(s['prefill_count'])) if str(s.get('prefill_count', '')).isdigit() else '?'}"
            f" messages (phase limit {s.get('phase_timeout_s', '?')} s); scenario 6 holds "
            f"{s.get('idle_connections', '?')} connections for {s.get('idle_hold_s', '?')} s.")
        if s.get("stall_disruptions"):
            out.append(
                f"- Scenario 7 runs each disruption ({s['stall_disruptions']}) with a freshly "
                f"started broker, the probe at {s.get('probe_rate', '?')} msg/s, and a limit of "
                f"{s.get('stall_timeout_s', '?')} s on the disruption"
                + (", each broker started on CPU 0 alone and warren-bench on the other CPUs "
                   "(STALL_PIN=1), so that the probe measures the broker and not the CPU it "
                   "shares with the disrupting client" if s.get("stall_pin") == "1" else "")
                + ". Within warren-bench the probe has threads of its own and the disrupting "
                "client runs at nice 10, so that where they share a CPU the probe's messages "
                "do not wait behind the disruptor's work in the load generator"
                + ". Scenario 8 runs "
                f"{s.get('queue_counts', '?')} queue(s) for {runs} each, each count with a "
                "freshly started broker.")
        out.append("- Ratios are Warren/RabbitMQ of the medians; the Reading column says which "
                   "way is better for each metric.")
        out.append("")
        return out

    def render_targets(self) -> list[str]:
        out = ["## Targets", ""]
        if self.quick:
            out.append("Judged on this QUICK trial run: indicative only.")
            out.append("")
        out += ["| Scenario | Target | Measured (Warren, medians) | Verdict |", "|---|---|---|---|"]
        for target in TARGETS:
            verdict, measured = self.judge(target)
            shown = {"met": "met", "MISSED": "**MISSED**"}.get(verdict, verdict)
            text = target.text + (f" ({target.note})" if target.note else "")
            out.append(f"| {target.scenario} | {md_escape(text)} | {md_escape(measured)} | {shown} |")
        out.append("")
        return out

    def render_results(self) -> list[str]:
        out = ["## Results", ""]
        for number, scenario in SCENARIOS.items():
            out.append(f"### {number}. {scenario.title}")
            out.append("")
            runs = self.runs_of(number)
            if not runs:
                out.append("Not run in this session.")
                out.append("")
                continue
            if scenario.variant_kind == "disruption":
                out += self.render_stall(number, scenario, runs)
                continue
            if scenario.variant_kind == "queues":
                out += self.render_queue_scaling(number, scenario, runs)
                continue
            counts = self.counts[(number, "")]
            planned = {b: len(self.runs_of(number, b)) for b in BROKERS}
            out.append(f"{scenario.setup} Medians of {counts['warren']} Warren and "
                       f"{counts['rabbitmq']} RabbitMQ run(s) with results "
                       f"(of {planned['warren']} and {planned['rabbitmq']}).")
            config = next((r.doc.get("config") for r in runs if r.doc and r.doc.get("config")), None)
            if number == 5 and config:
                count = (config.get("mode") or {}).get("count")
                if count:
                    out.append(f"Backlog: {count:,} messages.")
            if number == 6:
                held = self.value(6, "Connections held", "warren") or \
                    self.value(6, "Connections held", "rabbitmq")
                if held:
                    out.append(f"Connections: {held:,.0f}.")
            out.append("")
            out.append("| Metric | Warren | RabbitMQ | Warren/RabbitMQ | Reading |")
            out.append("|---|--:|--:|--:|---|")
            for metric in scenario.metrics:
                warren = self.value(number, metric.label, "warren")
                rabbit = self.value(number, metric.label, "rabbitmq")
                value = ratio(warren, rabbit)
                ratio_text = "—" if value is None or metric.better is None else f"{value:.2f}×"
                out.append(f"| {metric.label} | {metric.fmt(warren)} | {metric.fmt(rabbit)} | "
                           f"{ratio_text} | {reading(metric, warren, rabbit)} |")
            out.append("")
            out += self.render_problems(runs)
        return out

    def render_problems(self, runs: list[Run]) -> list[str]:
        problems = [(r, p) for r in runs for p in r.problems]
        if not problems:
            return []
        out = ["Problems in these runs:", ""]
        for run, problem in problems:
            variant = f", {run.variant}" if run.variant else ""
            out.append(f"- round {run.round}{variant}, "
                       f"{BROKER_NAMES.get(run.broker, run.broker)}: {md_escape(problem)}")
        out.append("")
        return out

    def counts_text(self, number: int, variants: list[str]) -> str:
        """The sentence that says how many runs the medians of a scenario come from."""
        have = {b: sum(self.counts[(number, v)][b] for v in variants) for b in BROKERS}
        planned = {b: len(self.runs_of(number, b)) for b in BROKERS}
        return (f"Medians of {have['warren']} Warren and {have['rabbitmq']} RabbitMQ run(s) "
                f"with results (of {planned['warren']} and {planned['rabbitmq']}).")

    def render_stall(self, number: int, scenario: Scenario, runs: list[Run]) -> list[str]:
        """Scenario 7: per disruption, the probe's numbers for each broker."""
        variants = self.variants_of(number)
        rate_text = str(self.settings.get("probe_rate", "1000"))
        if rate_text.isdigit():
            rate_text = fmt_count(float(rate_text))
        out = [f"{scenario.setup} The probe publishes {rate_text} msg/s. "
               f"{self.counts_text(number, variants)}", ""]
        labels = ["Probe p99.9", "Worst latency", "Longest silence", "Disruption took"]
        out.append("| Disruption | Broker | " + " | ".join(labels) + " | Probe p99.9 before |")
        out.append("|---|---|" + "--:|" * (len(labels) + 1))
        for variant in variants:
            count = self.value(number, "Disruption count", "warren", variant) or \
                self.value(number, "Disruption count", "rabbitmq", variant)
            unit = next((r.doc["stall"].get("unit", "") for r in self.runs_of(number, None, variant)
                         if r.doc and isinstance(r.doc.get("stall"), dict)), "")
            title = f"{variant} ({fmt_count(count)} {unit})" if count else variant
            text = DISRUPTION_TEXT.get(variant)
            if text:
                title += f": {text}"
            for index, broker in enumerate(BROKERS):
                cells = []
                for label in labels + ["Probe p99.9 before (baseline)"]:
                    metric = self.metric(number, label)
                    cells.append(metric.fmt(self.value(number, label, broker, variant)))
                first = md_escape(title) if index == 0 else ""
                out.append(f"| {first} | {BROKER_NAMES[broker]} | " + " | ".join(cells) + " |")
        out.append("")
        out.append("Worst latency is the slowest probe message in flight during the disruption; "
                   "the last column is the probe's p99.9 during the settle before it, undisturbed.")
        out.append("")
        out += self.render_problems(runs)
        return out

    def render_queue_scaling(self, number: int, scenario: Scenario,
                             runs: list[Run]) -> list[str]:
        """Scenario 8: total throughput per queue count, and its growth from the fewest."""
        variants = self.variants_of(number)
        size = self.settings.get("multi_queue_size", "16")
        out = [f"{scenario.setup} Messages of {size} B. {self.counts_text(number, variants)}", ""]
        label = "Throughput (consumed)"
        metric = self.metric(number, label)
        base = variants[0] if variants else ""
        base_queues = base.lstrip("q") or "?"
        base_text = f"{base_queues} queue" + ("" if base_queues == "1" else "s")
        out.append(f"| Queues | Warren | RabbitMQ | Warren/RabbitMQ | Warren vs {base_text} "
                   f"| RabbitMQ vs {base_text} | Left queued (Warren, RabbitMQ) |")
        out.append("|--:|--:|--:|--:|--:|--:|---|")
        for variant in variants:
            warren = self.value(number, label, "warren", variant)
            rabbit = self.value(number, label, "rabbitmq", variant)
            value = ratio(warren, rabbit)
            growth = []
            for broker, current in (("warren", warren), ("rabbitmq", rabbit)):
                first = self.value(number, label, broker, base)
                grown = ratio(current, first)
                growth.append("—" if grown is None else f"{grown:.2f}×")
            backlog = ", ".join(fmt_count(self.value(number, BACKLOG.label, b, variant))
                                for b in BROKERS)
            out.append(f"| {variant.lstrip('q')} | {metric.fmt(warren)} | {metric.fmt(rabbit)} | "
                       f"{'—' if value is None else f'{value:.2f}×'} | {growth[0]} | "
                       f"{growth[1]} | {backlog} |")
        out.append("")
        out.append("With a broker that serves independent queues independently, throughput "
                   "grows with the queues until the cores run out.")
        out.append("")
        out += self.render_problems(runs)
        return out

    def render_in_the_way(self) -> list[str]:
        out = ["## What is in the way", ""]
        missed = []
        for target in TARGETS:
            verdict, measured = self.judge(target)
            if verdict == "MISSED":
                missed.append((target, measured))
        if not missed:
            unmeasured = [t for t in TARGETS if self.judge(t)[0] == "not measured"]
            if unmeasured:
                out.append("No measured target is missed; "
                           f"{len(unmeasured)} target(s) were not measured in this session.")
            else:
                out.append("No target is missed.")
            out.append("")
            return out
        # What stands in the way of each scenario's missed targets is kept
        # in benchmarks/in-the-way.json ({"SCENARIO": "text"}), written from
        # the profiles, so that re-rendering keeps it.
        analysis_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "in-the-way.json")
        try:
            with open(analysis_path, encoding="utf-8") as analysis_file:
                analysis = json.load(analysis_file)
        except (OSError, ValueError):
            analysis = {}
        scenarios = []
        for target, _ in missed:
            if target.scenario not in scenarios:
                scenarios.append(target.scenario)
        for scenario in scenarios:
            for target, measured in missed:
                if target.scenario == scenario:
                    out.append(f"- Scenario {target.scenario}, {target.text}: missed, measured "
                               f"{md_escape(measured)}.")
            text = analysis.get(str(scenario))
            out.append("")
            out.append(text if text else "_Profile analysis pending._")
            out.append("")
        return out

    def render_storage(self) -> list[str]:
        """The storage measurements (benchmarks/storage.sh), kept in
        benchmarks/storage.md so that re-rendering keeps them: they need a
        ten-million-message backlog and are not part of compare.sh's
        rounds."""
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "storage.md")
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read().strip()
        except OSError:
            return []
        return [text, ""]

    def render_all_runs(self) -> list[str]:
        out = ["## Every run", "", "| Scenario | Round | Broker | Exit | Numbers | Problems |",
               "|--:|--:|---|--:|---|---|"]
        for run in sorted(self.runs, key=lambda r: (r.scenario, r.round, r.variant,
                                                    r.broker != "warren")):
            numbers = summary_line(run.doc) if run.doc else "—"
            status = "?" if run.status is None else str(run.status)
            problems = "; ".join(run.problems) or ""
            scenario = f"{run.scenario} ({run.variant})" if run.variant else f"{run.scenario}"
            out.append(f"| {scenario} | {run.round} | "
                       f"{BROKER_NAMES.get(run.broker, run.broker)} | {status} | "
                       f"{md_escape(numbers)} | {md_escape(problems)} |")
        out.append("")
        return out

    def render_commands(self) -> list[str]:
        s = self.settings
        out = ["## Commands", ""]
        if s.get("invocation"):
            out.append(f"The whole session: `{s['invocation']}`")
            out.append("")
        out.append("Each run below started its broker with the first line, then ran "
                   "warren-bench with the second (ports, pids and data directories differ "
                   "per run).")
        out.append("")
        for number in SCENARIOS:
            runs = sorted(self.runs_of(number),
                          key=lambda r: (r.round, r.variant, r.broker != "warren"))
            if not runs:
                continue
            out.append(f"Scenario {number}:")
            out.append("")
            out.append("```sh")
            for run in runs:
                status = "?" if run.status is None else run.status
                variant = f", {run.variant}" if run.variant else ""
                out.append(f"# round {run.round}{variant}, "
                           f"{BROKER_NAMES.get(run.broker, run.broker)} (exit {status})")
                if run.broker_command:
                    out.append(run.broker_command)
                out.append(run.command or "(command not recorded)")
            out.append("```")
            out.append("")
        return out


# ----------------------------------------------------------------- main
def main(argv: list[str]) -> int:
    if argv and argv[0] == "machine-info":
        if len(argv) < 2:
            print("usage: report.py machine-info OUT.json [KEY=VALUE ...]", file=sys.stderr)
            return 2
        extra = {}
        for arg in argv[2:]:
            key, _, value = arg.partition("=")
            extra[key] = value
        with open(argv[1], "w") as handle:
            json.dump(machine_info(extra), handle, indent=2)
            handle.write("\n")
        return 0
    if argv and argv[0] == "summary":
        if len(argv) != 2:
            print("usage: report.py summary RUN.json", file=sys.stderr)
            return 2
        with open(argv[1]) as handle:
            print(summary_line(json.load(handle)))
        return 0

    parser = argparse.ArgumentParser(description="Writes BENCHMARKS.md from compare.sh results.")
    parser.add_argument("results_dir")
    parser.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"),
                        help="report to write (default: BENCHMARKS.md at the repository root)")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.results_dir):
        print(f"report.py: {args.results_dir} is not a directory", file=sys.stderr)
        return 1
    meta: dict = {}
    meta_path = os.path.join(args.results_dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as handle:
            meta = json.load(handle)
    else:
        print("report.py: no meta.json; describing this machine as it is now", file=sys.stderr)
        meta = machine_info({})
    runs = load_runs(args.results_dir)
    if not runs:
        print(f"report.py: no runs found in {args.results_dir}", file=sys.stderr)
    report = Report(args.results_dir, runs, meta)
    text = report.render()
    with open(args.out, "w") as handle:
        handle.write(text)
    print(f"report.py: wrote {args.out} ({len(runs)} runs)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
