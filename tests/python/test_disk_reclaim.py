"""Disk given back around long-lived messages: one message in every segment
stays unacknowledged with a consumer while a heavy flow of acknowledged
messages passes through the other queue. Without compaction each of those
messages would keep its whole segment, and the marks acking its neighbours
would keep the segments after it; with it, the data directory comes back
within twice the live data plus a few segments. The old messages are still
there, in order, after the broker is killed and restarted."""

import pathlib
import time

import pika

from conftest import start_broker

SEGMENT_BYTES = 256 * 1024
CONFIG = f"""
[storage]
segment_size_bytes = {SEGMENT_BYTES}
"""
ROUNDS = 40
BODY = 1024
FLOW_PER_ROUND = SEGMENT_BYTES // BODY


def segment_bytes(data_dir: pathlib.Path) -> int:
    return sum(path.stat().st_size for path in (data_dir / "messages").glob("*.seg"))


def test_one_unacked_message_per_segment_does_not_stop_disk_being_reclaimed(tmp_path):
    workdir = tmp_path / "warren"
    data_dir = workdir / "data"
    broker = start_broker(workdir, CONFIG)
    try:
        publisher = broker.connect()
        channel = publisher.channel()
        channel.confirm_delivery()
        channel.queue_declare("pinned", durable=True)
        channel.queue_declare("flow", durable=True)

        holder = broker.connect()
        holding = holder.channel()
        holding.basic_qos(prefetch_count=0)
        held = []
        holding.basic_consume(
            "pinned", lambda _ch, method, _props, body: held.append(body), auto_ack=False)

        _drainer, draining = broker.channel()
        persistent = pika.BasicProperties(delivery_mode=2)
        for round_number in range(ROUNDS):
            channel.basic_publish(
                "", "pinned", round_number.to_bytes(4, "big") * (BODY // 4), persistent)
            for _ in range(FLOW_PER_ROUND):
                channel.basic_publish("", "flow", b"f" * BODY, persistent)
            taken = 0
            while taken < FLOW_PER_ROUND:
                method, _props, _body = draining.basic_get("flow", auto_ack=True)
                assert method is not None, f"flow ran dry after {taken} in round {round_number}"
                taken += 1
        deadline = time.monotonic() + 10
        while len(held) < ROUNDS:
            assert time.monotonic() < deadline, f"only {len(held)} pinned messages delivered"
            holder.process_data_events(time_limit=0.1)

        written = ROUNDS * (FLOW_PER_ROUND + 1) * BODY
        live = ROUNDS * BODY
        # Twice the live data, the segment being written and the one the
        # compaction rolled away from, and a segment's worth of slack.
        allowed = 2 * live + 3 * SEGMENT_BYTES
        deadline = time.monotonic() + 15
        while (on_disk := segment_bytes(data_dir)) > allowed:
            assert time.monotonic() < deadline, (
                f"{on_disk} bytes of segments for {live} bytes of live messages "
                f"({written} written); at most {allowed} expected")
            holder.process_data_events(time_limit=0.1)
        assert holding.connection.is_open
        assert not broker.log_lines() or not any(
            "compacting the message log failed" in line for line in broker.log_lines())
        # A crash, not a clean stop: the rewritten segments must hold on
        # their own.
        broker.proc.kill()
        broker.proc.wait()
    finally:
        broker.stop()
        broker.finish()

    restarted = start_broker(workdir, CONFIG)
    try:
        _connection, channel = restarted.channel()
        bodies = []
        while True:
            method, _props, body = channel.basic_get("pinned", auto_ack=True)
            if method is None:
                break
            assert method.redelivered, "a message held by a consumer at a crash comes back redelivered"
            bodies.append(body)
        assert bodies == [n.to_bytes(4, "big") * (BODY // 4) for n in range(ROUNDS)]
        assert channel.queue_declare("flow", durable=True, passive=True).method.message_count == 0
    finally:
        restarted.stop()
        restarted.finish()
