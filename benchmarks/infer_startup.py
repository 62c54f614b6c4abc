"""Time from `warren serve` starting to its first answered inference request.

    .venv/bin/python benchmarks/infer_startup.py target/release/warren model.toml \
        [--rounds 5]

Each round starts the broker with an empty data directory and the
configuration's first `[[model]]`, then sends a KServe v2 request (one text)
as fast as the HTTP listener accepts it, retrying while the model is not
ready (503) or not yet known (404), and stops the broker. It prints each
round and the median: the time a user waits after `warren serve` before the
model answers, with the model already on disk.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib

import requests

READY_LINE = re.compile(r"HTTP listener ready addr=(\S+)")
ROUND_TIMEOUT_S = 120.0
RETRY_INTERVAL_S = 0.005


def first_answer(binary: str, config: str, model: str) -> float:
    with tempfile.TemporaryDirectory(prefix="warren-startup.") as data_dir:
        started = time.monotonic()
        broker = subprocess.Popen(
            [binary, "serve", "--config", config, "--data-dir", data_dir,
             "--amqp-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        address: list[str] = []
        found = threading.Event()

        def read_log() -> None:
            assert broker.stderr is not None
            for line in broker.stderr:
                match = READY_LINE.search(line)
                if match and not found.is_set():
                    address.append(match.group(1))
                    found.set()

        threading.Thread(target=read_log, daemon=True).start()
        try:
            if not found.wait(ROUND_TIMEOUT_S):
                raise SystemExit("the broker never logged its HTTP address")
            url = f"http://{address[0]}/v2/models/{model}/infer"
            body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                "data": ["How long until the first answer?"]}]}
            session = requests.Session()
            session.trust_env = False
            while time.monotonic() - started < ROUND_TIMEOUT_S:
                response = session.post(url, json=body, auth=("guest", "guest"), timeout=30)
                if response.status_code == 200:
                    return time.monotonic() - started
                if response.status_code not in (404, 503):
                    raise SystemExit(f"unexpected answer {response.status_code}: {response.text}")
                time.sleep(RETRY_INTERVAL_S)
            raise SystemExit(f"no answer within {ROUND_TIMEOUT_S} s")
        finally:
            broker.terminate()
            broker.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("binary")
    parser.add_argument("config")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with open(args.config, "rb") as file:
        model = tomllib.load(file)["model"][0]["name"]
    times = []
    for round_index in range(args.rounds):
        elapsed = first_answer(args.binary, args.config, model)
        times.append(elapsed)
        print(f"round {round_index + 1}: first answer {elapsed * 1000:.0f} ms after start")
    print(f"median: {statistics.median(times) * 1000:.0f} ms over {len(times)} rounds "
          f"(model '{model}')")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
