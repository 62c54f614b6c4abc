#!/usr/bin/env python3
"""Records what a real AMQP client sends and turns it into fuzz seeds.

A fuzzer finds its way into a parser much faster from real frames than
from nothing, so the committed corpus starts from a pika session: a TCP
proxy sits between pika and a broker and keeps the client-to-server bytes,
and this script splits them into frames and writes one seed per kind of
frame for each target in fuzz/fuzz_targets (each seed in the input layout
that target's header comment describes). A few seeds nested just past the
depth limit are added by hand, since no client sends them.

    .venv/bin/python fuzz/seed/capture.py --warren target/release/warren

starts Warren on free loopback ports with a scratch data directory; use
--broker HOST:PORT instead to record against a broker already running
(RabbitMQ, say). Seeds go to fuzz/corpus/<target>/, named by content hash.
pika's consumer tags are random, so to record again without near-duplicate
seeds, delete fuzz/corpus first.
"""

import argparse
import asyncio
import datetime
import decimal
import hashlib
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pika

FUZZ_DIR = Path(__file__).resolve().parent.parent
PROTOCOL_HEADER = b"AMQP\x00\x00\x09\x01"
FRAME_METHOD, FRAME_HEADER, FRAME_BODY = 1, 2, 3
# The session negotiates the smallest frame_max the protocol allows, so that
# a body of a few kilobytes already spans several frames and the seeds stay
# small. frame_decoder's first two bytes choose frame_max = 4096 + 16 * n.
FRAME_MAX_BYTES = 4096
FRAME_MAX_SELECTOR = struct.pack(">H", (FRAME_MAX_BYTES - 4096) // 16)
# field_table's first byte chooses the depth limit, 1 + n % 64: 16, the default.
DEPTH_SELECTOR = bytes([15])
# content_header's first byte chooses the headers limit, 16 * n: 4080 bytes.
HEADERS_LIMIT_SELECTOR = bytes([255])
# Body bytes kept in a content_header seed: enough for several body frames
# at the smallest chunk sizes, small enough to keep the corpus small.
SEED_BODY_MAX_BYTES = 2048

# Fields before the field table of each method that has one, as in
# warren_proto::table_limits: o = octet, s = short, n = short string.
TABLE_LAYOUTS = {
    (10, 10): "oo",
    (10, 11): "",
    (40, 10): "snno",
    (40, 30): "snnno",
    (40, 40): "snnno",
    (50, 10): "sno",
    (50, 20): "snnno",
    (50, 50): "snnn",
    (60, 20): "snno",
}


class RecordingProxy:
    """Forwards one port to the broker and keeps each connection's
    client-to-server bytes."""

    def __init__(self, upstream_host, upstream_port):
        self.upstream = (upstream_host, upstream_port)
        self.streams = []
        self.port = None
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self.thread.start()
        self.ready.wait()
        return self

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.port = server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _handle(self, client_reader, client_writer):
        recorded = bytearray()
        self.streams.append(recorded)
        upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        await asyncio.gather(
            self._pipe(client_reader, upstream_writer, recorded),
            self._pipe(upstream_reader, client_writer, None),
        )

    @staticmethod
    async def _pipe(reader, writer, recorded):
        try:
            while chunk := await reader.read(65536):
                if recorded is not None:
                    recorded.extend(chunk)
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


def drive(port):
    """One pika session touching every frame that carries a field table."""
    parameters = pika.ConnectionParameters(
        host="127.0.0.1",
        port=port,
        frame_max=FRAME_MAX_BYTES,
        client_properties={
            "connection_name": "fuzz-seed",
            "product": "warren fuzz seed",
            "capabilities": {"consumer_cancel_notify": True},
        },
    )
    connection = pika.BlockingConnection(parameters)
    channel = connection.channel()
    channel.basic_qos(prefetch_count=10)
    channel.confirm_delivery()
    channel.exchange_declare("seed.dlx", "fanout")
    channel.exchange_declare(
        "seed.headers", "headers", arguments={"alternate-exchange": "seed.dlx"}
    )
    channel.exchange_declare("seed.topic", "topic")
    channel.exchange_bind("seed.topic", "seed.headers", arguments={"x-match": "any", "kind": "e2e"})
    channel.exchange_unbind("seed.topic", "seed.headers", arguments={"x-match": "any", "kind": "e2e"})
    channel.queue_declare(
        "seed.q",
        arguments={
            "x-message-ttl": 60000,
            "x-dead-letter-exchange": "seed.dlx",
            "x-max-priority": 5,
        },
    )
    binding = {"x-match": "all", "tenant": "t1", "region": "eu"}
    channel.queue_bind("seed.q", "seed.headers", arguments=binding)
    headers = {
        "tenant": "t1",
        "region": "eu",
        "trace": {"id": "4bf92f3577b34da6", "hops": [1, 2, {"n": 3, "ok": True}]},
        "price": decimal.Decimal("12.50"),
        "sent": datetime.datetime(2024, 5, 1, 12, 0, 0),
        "raw": b"\x00\x01\xff",
        "nothing": None,
        "big": 1 << 40,
        "debt": -(1 << 40),
    }
    properties = pika.BasicProperties(
        content_type="application/json",
        content_encoding="utf-8",
        headers=headers,
        delivery_mode=2,
        priority=3,
        correlation_id="c-1",
        reply_to="replies",
        expiration="60000",
        message_id="m-1",
        timestamp=1_700_000_000,
        type="order.created",
        user_id="guest",
        app_id="seed",
    )
    channel.basic_publish("seed.headers", "", b'{"order": 1}', properties)
    # A body longer than one frame, so that body frames are split.
    channel.basic_publish("seed.headers", "", b"x" * 10_000, pika.BasicProperties(headers=headers))
    channel.basic_publish("", "seed.q", b"plain", pika.BasicProperties())
    method, _, _ = channel.basic_get("seed.q")
    if method is not None:
        channel.basic_ack(method.delivery_tag)
    received = []

    def on_message(channel, method, _properties, body):
        received.append(body)
        channel.basic_ack(method.delivery_tag)

    tag = channel.basic_consume("seed.q", on_message, arguments={"x-priority": 3})
    deadline = time.monotonic() + 5
    while len(received) < 2 and time.monotonic() < deadline:
        connection.process_data_events(time_limit=0.2)
    channel.basic_cancel(tag)
    channel.queue_unbind("seed.q", "seed.headers", arguments=binding)
    channel.queue_delete("seed.q")
    for exchange in ("seed.topic", "seed.headers", "seed.dlx"):
        channel.exchange_delete(exchange)
    channel.close()
    connection.close()


def split_frames(stream):
    """The frames of a client-to-server stream, after the protocol header."""
    assert stream.startswith(PROTOCOL_HEADER), "not an AMQP 0-9-1 stream"
    frames, position = [], len(PROTOCOL_HEADER)
    while position + 7 <= len(stream):
        frame_type, channel, size = struct.unpack_from(">BHI", stream, position)
        end = position + 7 + size + 1
        if end > len(stream):
            break
        frames.append((frame_type, channel, stream[position + 7 : end - 1], stream[position:end]))
        position = end
    return frames


def method_table(payload):
    """The field table of a method payload, or None."""
    class_id, method_id = struct.unpack_from(">HH", payload)
    layout = TABLE_LAYOUTS.get((class_id, method_id))
    if layout is None:
        return None
    position = 4
    for field in layout:
        if field == "o":
            position += 1
        elif field == "s":
            position += 2
        else:
            position += 1 + payload[position]
    return table_at(payload, position)


def headers_table(payload):
    """The headers table of a content header payload, or None."""
    (flags,) = struct.unpack_from(">H", payload, 12)
    position = 14
    for bit in (15, 14):
        if flags & (1 << bit):
            position += 1 + payload[position]
    return table_at(payload, position) if flags & (1 << 13) else None


def table_at(payload, position):
    (length,) = struct.unpack_from(">I", payload, position)
    return payload[position : position + 4 + length]


def write_seed(target, data):
    directory = FUZZ_DIR / "corpus" / target
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / hashlib.sha1(data).hexdigest()
    if not path.exists():
        path.write_bytes(data)
        print(f"{target}: {path.name} ({len(data)} bytes)")


def write_seeds(stream):
    write_connection_seeds(stream)
    write_seed("frame_decoder", FRAME_MAX_SELECTOR + stream[len(PROTOCOL_HEADER) :])
    frames = split_frames(stream)
    seen_methods = set()
    for index, (frame_type, _channel, payload, raw) in enumerate(frames):
        if frame_type == FRAME_METHOD:
            ids = struct.unpack_from(">HH", payload)
            if ids not in seen_methods:
                seen_methods.add(ids)
                write_seed("frame_decoder", FRAME_MAX_SELECTOR + raw)
            table = method_table(payload)
            if table:
                write_seed("field_table", DEPTH_SELECTOR + table)
        elif frame_type == FRAME_HEADER:
            write_seed("frame_decoder", FRAME_MAX_SELECTOR + raw)
            table = headers_table(payload)
            if table:
                write_seed("field_table", DEPTH_SELECTOR + table)
            body = bytearray()
            for next_type, _, next_payload, _ in frames[index + 1 :]:
                if next_type != FRAME_BODY:
                    break
                body.extend(next_payload)
            body = bytes(body[:SEED_BODY_MAX_BYTES])
            for chunk_selector in (0, 99, 255):
                write_seed(
                    "content_header",
                    HEADERS_LIMIT_SELECTOR
                    + struct.pack(">H", len(payload))
                    + payload
                    + bytes([chunk_selector])
                    + body,
                )


def write_connection_seeds(stream):
    """Seeds for the connection target: the whole session from the first
    byte after the protocol header (mode 0), and, after the target's own
    login and channel.open (mode 1), the session's frames that follow its
    channel.open, whole and one kind of method at a time."""
    write_seed("connection", b"\x00" + stream[len(PROTOCOL_HEADER) :])
    frames = split_frames(stream)
    opened = next(
        (index for index, (frame_type, _, payload, _) in enumerate(frames)
         if frame_type == FRAME_METHOD and struct.unpack_from(">HH", payload) == (20, 10)),
        None,
    )
    if opened is None:
        return
    after = frames[opened + 1 :]
    write_seed("connection", b"\x01" + b"".join(raw for *_, raw in after))
    seen = set()
    for index, (frame_type, _, payload, raw) in enumerate(after):
        if frame_type != FRAME_METHOD:
            continue
        ids = struct.unpack_from(">HH", payload)
        if ids in seen:
            continue
        seen.add(ids)
        # A method with the content that follows it, if any.
        content = [raw]
        for next_type, _, _, next_raw in after[index + 1 :]:
            if next_type == FRAME_METHOD:
                break
            content.append(next_raw)
        write_seed("connection", b"\x01" + b"".join(content))


def nested_table(depth, container=b"F"):
    """A field table nested `depth` levels, each level the only entry of the
    one around it: the shape of the stack-overflow attack, which no client
    sends, so it is written here rather than recorded."""
    inner = struct.pack(">I", 0)
    for level in range(depth - 1, 0, -1):
        # Entries of the top-level table and of nested tables have keys;
        # elements of arrays do not.
        key = b"\x01a" if level == 1 or container == b"F" else b""
        entry = key + container + inner
        inner = struct.pack(">I", len(entry)) + entry
    return inner


def write_hostile_seeds():
    """Seeds just past the default depth limit of 16, so that every target
    starts with the refusal path covered."""
    for container in (b"F", b"A"):
        table = nested_table(20, container)
        write_seed("field_table", DEPTH_SELECTOR + table)
        declare = struct.pack(">HHH", 50, 10, 0) + b"\x01q\x00" + table
        write_seed(
            "frame_decoder",
            FRAME_MAX_SELECTOR
            + struct.pack(">BHI", FRAME_METHOD, 1, len(declare))
            + declare
            + b"\xce",
        )
        header = struct.pack(">HHQH", 60, 0, 0, 1 << 13) + table
        write_seed(
            "content_header", HEADERS_LIMIT_SELECTOR + struct.pack(">H", len(header)) + header
        )


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_port(port, timeout_s=30):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"nothing listens on port {port} after {timeout_s} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--warren", help="path of the warren binary to start")
    where.add_argument("--broker", help="HOST:PORT of a running broker")
    parser.add_argument("--stream-out", help="also write each raw stream here (prefix)")
    arguments = parser.parse_args()

    broker = None
    data_dir = None
    if arguments.warren:
        amqp_port, http_port = free_port(), free_port()
        data_dir = tempfile.mkdtemp(prefix="warren-seed-")
        broker = subprocess.Popen(
            [
                arguments.warren,
                "serve",
                "--amqp-listen",
                f"127.0.0.1:{amqp_port}",
                "--http-listen",
                f"127.0.0.1:{http_port}",
                "--data-dir",
                data_dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        host = "127.0.0.1"
        wait_for_port(amqp_port)
    else:
        host, port = arguments.broker.rsplit(":", 1)
        amqp_port = int(port)
    try:
        proxy = RecordingProxy(host, amqp_port).start()
        drive(proxy.port)
        time.sleep(0.5)
        proxy.stop()
    finally:
        if broker is not None:
            broker.terminate()
            broker.wait(timeout=30)
            shutil.rmtree(data_dir, ignore_errors=True)
    for number, stream in enumerate(proxy.streams):
        stream = bytes(stream)
        if arguments.stream_out:
            Path(f"{arguments.stream_out}{number}.bin").write_bytes(stream)
        write_seeds(stream)
    write_hostile_seeds()


if __name__ == "__main__":
    main()
