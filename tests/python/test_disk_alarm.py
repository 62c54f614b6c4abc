"""The free-disk alarm, on a real file system that fills up: a small tmpfs
mounted for the test holds the broker's data directory. Publishers are
blocked (connection.blocked) before the disk is full, consumers keep
draining, space comes back as the log deletes consumed segments, publishers
are unblocked, and every confirmed message is delivered."""

import pathlib
import subprocess
import threading
import time

import pika
import pytest

from conftest import Helpers, start_broker

TMPFS_SIZE = "32m"
MESSAGE_BYTES = 16 * 1024
CONFIG = """
[storage]
disk_free_limit_bytes = 12000000
disk_check_interval_ms = 50
segment_size_bytes = 1048576
"""


@pytest.fixture
def small_disk(tmp_path):
    workdir = tmp_path / "warren"
    data = workdir / "data"
    data.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(data)],
        capture_output=True, text=True,
    )
    assert mounted.returncode == 0, (
        "this test mounts a tmpfs to fill a real file system and needs root: "
        f"{mounted.stderr.strip()}"
    )
    try:
        yield workdir
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def test_publishers_are_blocked_when_disk_is_low_and_released_after(small_disk: pathlib.Path):
    broker = start_broker(small_disk, CONFIG)
    try:
        # 40 MiB of messages do not fit on a 32 MiB disk at all: the
        # publisher must be blocked part way (before the disk is full, or the
        # log would be poisoned), and can only finish once the consumer below
        # has drained enough for space to return.
        total = 2500
        events = []
        published = []

        def publish_all():
            publisher = broker.connect()
            publisher.add_on_connection_blocked_callback(lambda _c, _m: events.append("blocked"))
            publisher.add_on_connection_unblocked_callback(lambda _c, _m: events.append("unblocked"))
            channel = publisher.channel()
            channel.queue_declare("filling", durable=True)
            channel.confirm_delivery()
            persistent = pika.BasicProperties(delivery_mode=2)
            for index in range(total):
                channel.basic_publish("", "filling", index.to_bytes(4, "big") + b"x" * MESSAGE_BYTES, persistent)
                published.append(index)
            publisher.process_data_events(time_limit=0)
            publisher.close()

        publisher_thread = threading.Thread(target=publish_all, daemon=True)
        publisher_thread.start()
        deadline = time.monotonic() + 30
        while "publisher blocked" not in broker.log():
            assert time.monotonic() < deadline, "the publisher was never blocked"
            assert publisher_thread.is_alive(), f"published all {len(published)} without being blocked"
            time.sleep(0.05)
        blocked_at = len(published)
        assert 100 < blocked_at < total, f"blocked after {blocked_at} messages"
        assert "poisoned" not in broker.log(), "the disk filled up before the alarm"

        # A consumer on another connection is not blocked and drains.
        consumer = broker.connect()
        channel = consumer.channel()
        channel.basic_qos(prefetch_count=200)
        received = []

        def on_message(ch, method, _properties, payload):
            received.append(int.from_bytes(payload[:4], "big"))
            ch.basic_ack(method.delivery_tag)

        channel.basic_consume("filling", on_message)
        Helpers.pump_until(consumer, lambda: len(received) == total, timeout=60,
                           what=f"all {total} messages (got {len(received)})")
        publisher_thread.join(timeout=30)
        assert not publisher_thread.is_alive()
        assert len(published) == total, "every publish was confirmed"
        assert sorted(received) == list(range(total)), "nothing lost, nothing duplicated"
        assert events == ["blocked", "unblocked"]
        assert "publisher unblocked" in broker.log()
        assert Helpers.message_count(channel, "filling") == 0
    finally:
        broker.close_connections()
        status = broker.stop()
        broker.finish()
        assert status == 0, broker.log(tail=50)
