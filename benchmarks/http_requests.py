#!/usr/bin/env python3
"""Sequential HTTP API requests against a running Warren (or RabbitMQ with
its management plugin): confirmed publishes, gets and queue declarations,
one at a time over one keep-alive connection, with their rate and p50/p99
latency. Standard library only.

    python3 benchmarks/http_requests.py [--port 15672] [--count 2000] [--user guest:guest]
"""

import argparse
import base64
import http.client
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=15672)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--user", default="guest:guest")
    args = parser.parse_args()
    headers = {
        "Authorization": "Basic " + base64.b64encode(args.user.encode()).decode(),
        "Content-Type": "application/json",
    }
    connection = http.client.HTTPConnection(args.host, args.port)

    def request(method: str, path: str, body=None) -> int:
        payload = json.dumps(body) if body is not None else None
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status

    def measure(label: str, send) -> None:
        latencies = []
        started = time.perf_counter()
        for index in range(args.count):
            sent = time.perf_counter()
            status = send(index)
            latencies.append(time.perf_counter() - sent)
            if status >= 300:
                raise SystemExit(f"{label}: HTTP {status} at request {index}")
        elapsed = time.perf_counter() - started
        latencies.sort()
        p50 = latencies[len(latencies) // 2] * 1e3
        p99 = latencies[int(len(latencies) * 0.99)] * 1e3
        print(f"{label:8} {args.count / elapsed:8.0f}/s  p50 {p50:.2f} ms  p99 {p99:.2f} ms")

    queue = "http-requests-bench"
    if request("PUT", f"/api/queues/%2F/{queue}", {"durable": True}) >= 300:
        raise SystemExit("could not declare the queue")
    measure("publish", lambda index: request(
        "POST", "/api/exchanges/%2F/amq.default/publish",
        {"routing_key": queue, "payload": f"m{index}", "payload_encoding": "string",
         "properties": {"delivery_mode": 2}}))
    measure("get", lambda index: request(
        "POST", f"/api/queues/%2F/{queue}/get",
        {"count": 1, "ackmode": "ack_requeue_false", "encoding": "auto"}))
    measure("declare", lambda index: request(
        "PUT", f"/api/queues/%2F/{queue}-{index % 50}", {"durable": False}))
    for index in range(50):
        request("DELETE", f"/api/queues/%2F/{queue}-{index}")
    request("DELETE", f"/api/queues/%2F/{queue}")


if __name__ == "__main__":
    main()
