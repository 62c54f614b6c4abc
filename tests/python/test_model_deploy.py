"""Model versions loaded and unloaded while `warren serve` runs
(docs/inference.md, "Live replacement"): `PUT /api/models/{name}/versions/{v}`
loads a version, warms it up and switches the model's traffic to it once
it serves; `DELETE` takes a version out of traffic and stops its workers
once its queue has drained. Every step is a model event on the
`amq.warren.model-events` topic exchange and at `/api/models/events`.

The model is all-MiniLM-L6-v2 (test_http_inference's entry). The switch is
made under load: client threads send requests without pause from before
the new version loads until after the old one is gone, and every one of
them must be answered. Waits are deadlines around polling, never sleeps.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections import Counter
from typing import Any, Dict, List

import pytest

from conftest import start_broker, warren_bin
from test_http_inference import (FOOD, MODEL_DIR, TIMEOUT, describe, embeddings,
                                 eventually, http_url_of, onnxruntime_library,
                                 session, texts_request, wait_for_consumer)

pytestmark = [pytest.mark.warren_only("loading models at run time is Warren's"),
              pytest.mark.timeout(300)]

MODEL = "minilm-live"
LOAD_TIMEOUT = 120.0
CLIENTS = 3


def entry(queue: str) -> Dict[str, Any]:
    """A [[model]] entry as JSON, as PUT /api/models/... takes it."""
    return {
        "path": str((MODEL_DIR / "model.onnx").resolve()),
        "tokenizer": str((MODEL_DIR / "tokenizer.json").resolve()),
        "task": "embedding",
        "queue": queue,
        "max_tokens": 256,
        "batch_size_max": 8,
        "batch_delay_max_ms": 5,
        "runtime": {"backend": "onnxruntime",
                    "onnxruntime_library": str(onnxruntime_library())},
    }


def toml_entry(version: str, queue: str) -> str:
    fields = entry(queue)
    runtime = fields.pop("runtime")
    lines = [f'name = "{MODEL}"', f'version = "{version}"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in fields.items()]
    lines += ["", "[model.runtime]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in runtime.items()]
    return "[[model]]\n" + "\n".join(lines) + "\n"


class Load:
    """Client threads sending requests without pause, counting answers by
    the version that gave them, and every failure."""

    def __init__(self, base: str):
        self.base = base
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.versions: Counter = Counter()
        self.failures: List[str] = []
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(CLIENTS)]

    def run(self) -> None:
        http = session()
        while not self.stop.is_set():
            try:
                resp = http.post(f"{self.base}/v2/models/{MODEL}/infer",
                                 json=texts_request([FOOD]), timeout=LOAD_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - any failure is counted
                with self.lock:
                    self.failures.append(repr(exc))
                continue
            with self.lock:
                if resp.status_code == 200:
                    self.versions[resp.json()["model_version"]] += 1
                else:
                    self.failures.append(describe(resp))

    def count(self, version: str) -> int:
        with self.lock:
            return self.versions[version]

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(LOAD_TIMEOUT)


@pytest.fixture
def live(tmp_path):
    broker = start_broker(tmp_path / "warren", toml_entry("1", "live-v1"))
    try:
        wait_for_consumer(broker, "live-v1")
        yield broker, http_url_of(broker)
    finally:
        broker.close_connections()
        assert broker.stop() == 0, broker.log(tail=100)
        broker.finish()


def versions_listed(http, base: str) -> Dict[str, str]:
    resp = http.get(f"{base}/api/models", timeout=TIMEOUT)
    assert resp.status_code == 200, describe(resp)
    return {m["version"]: m["state"] for m in resp.json() if m["name"] == MODEL}


def test_a_new_version_takes_the_traffic_and_the_old_one_drains_with_no_request_failed(live):
    broker, base = live
    http = session()
    conn = broker.connect()
    ch = conn.channel()
    events_queue = ch.queue_declare(queue="", exclusive=True).method.queue
    ch.queue_bind(queue=events_queue, exchange="amq.warren.model-events",
                  routing_key=f"{MODEL}.#")

    with Load(base) as load:
        eventually(lambda: load.count("1") >= 5, "answers from version 1", timeout=LOAD_TIMEOUT)
        resp = http.put(f"{base}/api/models/{MODEL}/versions/2", json=entry("live-v2"),
                        timeout=LOAD_TIMEOUT)
        assert resp.status_code == 201, describe(resp)
        loaded = resp.json()
        assert (loaded["version"], loaded["state"], loaded["ready"]) == ("2", "serving", True), \
            loaded
        # Side by side: version 1 still answers when asked for by name.
        resp = http.post(f"{base}/v2/models/{MODEL}/versions/1/infer",
                         json=texts_request([FOOD]), timeout=LOAD_TIMEOUT)
        assert resp.status_code == 200 and resp.json()["model_version"] == "1", describe(resp)
        answered_by_2 = load.count("2")
        eventually(lambda: load.count("2") >= answered_by_2 + 5, "answers from version 2",
                   timeout=LOAD_TIMEOUT)

        resp = http.delete(f"{base}/api/models/{MODEL}/versions/1", timeout=TIMEOUT)
        assert resp.status_code == 202, describe(resp)
        eventually(lambda: versions_listed(http, base) == {"2": "serving"},
                   "version 1 to be unloaded", timeout=LOAD_TIMEOUT)
        answered_by_2 = load.count("2")
        eventually(lambda: load.count("2") >= answered_by_2 + 5,
                   "answers from version 2 after the unload", timeout=LOAD_TIMEOUT)

    assert load.failures == [], load.failures[:5]
    assert load.count("1") >= 5 and load.count("2") >= 10, load.versions
    resp = http.post(f"{base}/v2/models/{MODEL}/versions/1/infer", json=texts_request([FOOD]),
                     timeout=TIMEOUT)
    assert resp.status_code == 404, describe(resp)
    embeddings(http.post(f"{base}/v2/models/{MODEL}/infer", json=texts_request([FOOD]),
                         timeout=LOAD_TIMEOUT).json(), 1)

    expected = [("loading", "2"), ("loaded", "2"), ("switched", "2"),
                ("unloading", "1"), ("unloaded", "1")]

    def published():
        got = []
        while True:
            method, props, body = ch.basic_get(queue=events_queue, auto_ack=True)
            if method is None:
                return got
            assert props.content_type == "application/json", props
            event = json.loads(body)
            assert method.routing_key == f"{MODEL}.{event['event']}", (method, event)
            got.append(event)

    events: List[Dict[str, Any]] = []

    def all_published():
        events.extend(published())
        return len(events) >= len(expected)
    eventually(all_published, "the model events on amq.warren.model-events", timeout=TIMEOUT)
    assert [(e["event"], e["version"]) for e in events] == expected, events
    assert events[2]["from"] == "1", events[2]
    assert events[0]["queue"] == "live-v2", events[0]
    listed = http.get(f"{base}/api/models/events", timeout=TIMEOUT).json()
    assert [(e["event"], e["model"], e["version"]) for e in listed] == \
        [("loaded", MODEL, "1")] + [(e, MODEL, v) for e, v in expected], listed
    conn.close()


def test_loads_and_unloads_are_refused_as_they_should_be(live):
    broker, base = live
    http = session()
    path = f"{base}/api/models/{MODEL}/versions"

    resp = http.put(f"{path}/1", json=entry("live-v1-again"), timeout=TIMEOUT)
    assert resp.status_code == 409, describe(resp)
    resp = http.put(f"{path}/3", json=entry("live-v1"), timeout=TIMEOUT)
    assert resp.status_code == 400 and "queue" in resp.json()["reason"], describe(resp)
    resp = http.put(f"{path}/3", json={**entry("live-v3"), "batch_size_max": 0}, timeout=TIMEOUT)
    assert resp.status_code == 400 and "batch_size_max" in resp.json()["reason"], describe(resp)
    resp = http.put(f"{path}/3", json={**entry("live-v3"), "shiny": True}, timeout=TIMEOUT)
    assert resp.status_code == 400 and "shiny" in resp.json()["reason"], describe(resp)
    resp = http.put(f"{path}/3", json={**entry("live-v3"), "version": "4"}, timeout=TIMEOUT)
    assert resp.status_code == 400, describe(resp)
    resp = http.put(f"{path}/3", json={**entry("live-v3"), "path": "/nonexistent.onnx"},
                    timeout=LOAD_TIMEOUT)
    assert resp.status_code == 500, describe(resp)
    assert versions_listed(http, base) == {"1": "serving"}
    failed = [e for e in http.get(f"{base}/api/models/events", timeout=TIMEOUT).json()
              if e["event"] == "load_failed"]
    assert len(failed) == 1 and failed[0]["version"] == "3" and failed[0]["reason"], failed

    resp = http.delete(f"{path}/7", timeout=TIMEOUT)
    assert resp.status_code == 404, describe(resp)

    # Only an administrator loads and unloads models.
    admin = http.put(f"{base}/api/users/watcher", json={"password": "pw", "tags": "monitoring"},
                     timeout=TIMEOUT)
    assert admin.status_code in (201, 204), describe(admin)
    watcher = session(auth=("watcher", "pw"))
    assert watcher.put(f"{path}/3", json=entry("live-v3"), timeout=TIMEOUT).status_code == 401
    assert watcher.delete(f"{path}/1", timeout=TIMEOUT).status_code == 401
    assert versions_listed(http, base) == {"1": "serving"}


def test_a_triton_model_directory_serves_its_numbered_versions(tmp_path):
    """`path` naming a directory of numbered versions (`<n>/model.onnx`, as
    Triton's model repository lays them out): `versions = 2` serves the two
    newest side by side, each on `<queue>.<n>`, the newest taking the
    traffic; a version added to the directory later loads by its number."""
    repository = tmp_path / "repository" / MODEL
    for version in ("1", "2", "10"):
        (repository / version).mkdir(parents=True)
        (repository / version / "model.onnx").symlink_to((MODEL_DIR / "model.onnx").resolve())
    fields = entry("repo")
    fields["path"] = str(repository)
    runtime = fields.pop("runtime")
    config = "[[model]]\n" + f'name = "{MODEL}"\nversions = 2\n' + "".join(
        f"{key} = {json.dumps(value)}\n" for key, value in fields.items()
    ) + "\n[model.runtime]\n" + "".join(
        f"{key} = {json.dumps(value)}\n" for key, value in runtime.items())
    broker = start_broker(tmp_path / "warren", config)
    try:
        wait_for_consumer(broker, "repo.10")
        wait_for_consumer(broker, "repo.2")
        base = http_url_of(broker)
        http = session()
        assert versions_listed(http, base) == {"2": "serving", "10": "serving"}
        metadata = http.get(f"{base}/v2/models/{MODEL}", timeout=TIMEOUT).json()
        assert metadata["versions"] == ["2", "10"], metadata
        resp = http.post(f"{base}/v2/models/{MODEL}/infer", json=texts_request([FOOD]),
                         timeout=LOAD_TIMEOUT)
        assert resp.status_code == 200 and resp.json()["model_version"] == "10", describe(resp)

        (repository / "11").mkdir()
        (repository / "11" / "model.onnx").symlink_to((MODEL_DIR / "model.onnx").resolve())
        added = {**entry("repo"), "path": str(repository)}
        resp = http.put(f"{base}/api/models/{MODEL}/versions/11", json=added, timeout=LOAD_TIMEOUT)
        assert resp.status_code == 201, describe(resp)
        assert resp.json()["queue"] == "repo.11", resp.json()
        resp = http.post(f"{base}/v2/models/{MODEL}/infer", json=texts_request([FOOD]),
                         timeout=LOAD_TIMEOUT)
        assert resp.status_code == 200 and resp.json()["model_version"] == "11", describe(resp)
    finally:
        broker.close_connections()
        assert broker.stop() == 0, broker.log(tail=100)
        broker.finish()


def test_warren_ctl_loads_lists_and_unloads_a_version(live, tmp_path):
    _broker, base = live
    http = session()
    entry_file = tmp_path / "v5.toml"
    entry_file.write_text(toml_entry("5", "live-v5"), encoding="utf-8")

    def ctl(*args: str) -> str:
        done = subprocess.run([str(warren_bin()), "ctl", "--url", base, *args],
                              capture_output=True, text=True, timeout=LOAD_TIMEOUT, check=False)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    out = ctl("load-model", str(entry_file))
    assert "version '5' serving on queue 'live-v5'" in out, out
    assert versions_listed(http, base) == {"1": "serving", "5": "serving"}
    listed = ctl("list-models")
    assert any(line.split()[:4] == [MODEL, "5", "serving", "live-v5"]
               for line in listed.splitlines()), listed
    ctl("unload-model", MODEL, "5")
    eventually(lambda: versions_listed(http, base) == {"1": "serving"},
               "version 5 to be unloaded", timeout=LOAD_TIMEOUT)
