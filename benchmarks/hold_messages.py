"""Holds long-lived messages for benchmarks/storage.sh's `pinned` scenario.

Publishes one persistent message of SIZE bytes to the durable queue
`pinned` every INTERVAL seconds for DURATION seconds, and consumes that
queue with manual acknowledgement without ever acknowledging: each message
stays unacknowledged, alive in the log, among whatever else is written
meanwhile. Prints how many it holds and their bytes, then keeps holding
them until its standard input closes.

    python hold_messages.py URL INTERVAL DURATION SIZE
"""

import sys
import time

import pika


def main() -> None:
    url, interval, duration, size = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    channel.queue_declare("pinned", durable=True)
    channel.confirm_delivery()
    held = []
    channel.basic_consume("pinned", lambda _ch, method, _props, _body: held.append(method.delivery_tag))
    persistent = pika.BasicProperties(delivery_mode=2)
    started = time.monotonic()
    published = 0
    while time.monotonic() < started + duration:
        channel.basic_publish("", "pinned", b"p" * size, persistent)
        published += 1
        # Deliveries wake pika early: sleep to the next slot, not for
        # `interval` after each publish.
        connection.sleep(max(0.0, started + published * interval - time.monotonic()))
    while len(held) < published:
        connection.process_data_events(time_limit=0.1)
    print(f"holding {len(held)} messages unacknowledged ({len(held) * size} bytes of bodies)", flush=True)
    # Until storage.sh is done measuring: heartbeats keep flowing meanwhile.
    while sys.stdin.read(1):
        pass
    connection.close()


if __name__ == "__main__":
    main()
