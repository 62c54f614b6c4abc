"""NVIDIA's `tritonclient.http` (from PyPI) against `warren serve`: health,
metadata, model configuration, the repository index, statistics, and
inference with JSON and with binary tensor data (docs/http-api.md).

One broker serves the module with two models:

* `minilm`: all-MiniLM-L6-v2 as an embedding model (BYTES in, FP32 out),
  checked against ONNX Runtime's reference values;
* `tiny-cnn`: tests/models/tiny-cnn.onnx as a tensor model (FP32 in and
  out), checked against tests/models/tiny-cnn-tensor-response.json.

Waits are deadlines around polling, never sleeps.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.http.auth import BasicAuth
from tritonclient.utils import InferenceServerException

from conftest import REPO_ROOT, external_addr, start_broker
from test_http_inference import (BREAD, DIMENSIONS, FOOD, MODEL_VERSION, TOLERANCE,
                                 eventually, http_url_of, model_entry,
                                 onnxruntime_library, reference, wait_for_consumer)

pytestmark = [pytest.mark.warren_only("the KServe v2 endpoints are Warren's"),
              pytest.mark.timeout(300)]

EMBEDDING = "minilm"
EMBEDDING_QUEUE = "triton-embed"
TENSOR = "tiny-cnn"
TENSOR_QUEUE = "triton-tensor"
# A second version of the tensor model, on a queue of its own; the first
# is version "1", the default.
TENSOR_NEWER = "10"
TENSOR_NEWER_QUEUE = "triton-tensor-10"
# What test_http_inference.model_entry configures.
VERSION = MODEL_VERSION
BATCH_SIZE_MAX = 8
BATCH_DELAY_MAX_MS = 5
CNN_REQUEST = REPO_ROOT / "tests" / "models" / "tiny-cnn-tensor-request.json"
CNN_RESPONSE = REPO_ROOT / "tests" / "models" / "tiny-cnn-tensor-response.json"
CNN_TOLERANCE = 1e-4


def tensor_entry(version: str, queue: str) -> str:
    return f"""
[[model]]
name = "{TENSOR}"
version = "{version}"
path = "{(REPO_ROOT / 'tests' / 'models' / 'tiny-cnn.onnx').resolve()}"
task = "tensor"
queue = "{queue}"

[model.runtime]
backend = "onnxruntime"
onnxruntime_library = "{onnxruntime_library()}"
"""


def config() -> str:
    return (model_entry(EMBEDDING, EMBEDDING_QUEUE)
            + tensor_entry("1", TENSOR_QUEUE)
            + tensor_entry(TENSOR_NEWER, TENSOR_NEWER_QUEUE))


class Served:
    def __init__(self, broker, base: str):
        self.broker = broker
        self.base = base
        self.client = triton.InferenceServerClient(url=base.removeprefix("http://"))
        self.client.register_plugin(BasicAuth("guest", "guest"))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    if external_addr() is not None:
        pytest.skip("starts its own Warren process")
    broker = start_broker(tmp_path_factory.mktemp("warren-tritonclient"), config())
    try:
        wait_for_consumer(broker, EMBEDDING_QUEUE)
        wait_for_consumer(broker, TENSOR_QUEUE)
        wait_for_consumer(broker, TENSOR_NEWER_QUEUE)
        served = Served(broker, http_url_of(broker))
        yield served
        served.client.close()
    finally:
        broker.close_connections()
        status = broker.stop()
        broker.finish()
    assert status == 0, f"warren exited with status {status}:\n{broker.log(tail=100)}"


def texts_input(texts, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=np.object_), binary_data=binary)
    return tensor


def test_health_and_metadata(served):
    client = served.client
    assert client.is_server_live()
    eventually(client.is_server_ready, "every model to be ready")
    assert client.is_model_ready(EMBEDDING)
    assert client.is_model_ready(EMBEDDING, model_version=VERSION)
    assert not client.is_model_ready("no-such-model")
    server = client.get_server_metadata()
    assert server["name"] == "warren"
    assert {"binary_tensor_data", "model_configuration", "statistics"} <= set(
        server["extensions"]), server
    metadata = client.get_model_metadata(EMBEDDING, model_version=VERSION)
    assert metadata["name"] == EMBEDDING and metadata["versions"] == [VERSION], metadata
    assert [tensor["name"] for tensor in metadata["inputs"]] == ["text"], metadata


def test_model_configuration(served):
    config = served.client.get_model_config(EMBEDDING)
    assert config["name"] == EMBEDDING
    assert config["max_batch_size"] == BATCH_SIZE_MAX, config
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == \
        BATCH_DELAY_MAX_MS * 1000, config
    assert config["input"] == [{"name": "text", "data_type": "TYPE_STRING", "dims": [1]}], config
    assert config["output"][0]["name"] == "embedding", config
    assert config["output"][0]["data_type"] == "TYPE_FP32", config
    assert config["parameters"]["queue"]["string_value"] == EMBEDDING_QUEUE, config
    with pytest.raises(InferenceServerException) as refused:
        served.client.get_model_config(EMBEDDING, model_version="999")
    assert "999" in str(refused.value)


def test_repository_index(served):
    index = served.client.get_model_repository_index()
    entries = sorted((entry["name"], entry["version"]) for entry in index)
    assert entries == [(EMBEDDING, VERSION), (TENSOR, "1"), (TENSOR, TENSOR_NEWER)], index
    assert {entry["state"] for entry in index} == {"READY"}, index


def embeddings_by_text(result, texts):
    vectors = result.as_numpy("embedding")
    assert vectors.shape == (len(texts), DIMENSIONS), vectors.shape
    assert vectors.dtype == np.float32
    return dict(zip(texts, vectors))


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_embedding_inference(served, binary):
    dims, _ = reference()
    texts = [FOOD, BREAD]
    result = served.client.infer(
        EMBEDDING, [texts_input(texts, binary)],
        outputs=[triton.InferRequestedOutput("embedding", binary_data=binary)],
        request_id="embed-1")
    response = result.get_response()
    assert response["id"] == "embed-1" and response["model_version"] == VERSION, response
    parameters = response["outputs"][0].get("parameters", {})
    if binary:
        assert parameters.get("binary_data_size") == len(texts) * DIMENSIONS * 4, response
        assert "data" not in response["outputs"][0]
    else:
        assert "binary_data_size" not in parameters, response
    for text, vector in embeddings_by_text(result, texts).items():
        expected = dims[text]
        assert np.allclose(vector[:len(expected)], expected, atol=TOLERANCE), (text, vector[:4])


def test_all_outputs_come_as_binary_when_none_is_named(served):
    # With no outputs listed, tritonclient asks for all of them as binary
    # data (binary_data_output).
    result = served.client.infer(EMBEDDING, [texts_input([FOOD], True)])
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] == \
        DIMENSIONS * 4
    assert result.as_numpy("embedding").shape == (1, DIMENSIONS)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tensor_inference(served, binary):
    request = json.loads(CNN_REQUEST.read_text(encoding="utf-8"))["inputs"][0]
    expected = json.loads(CNN_RESPONSE.read_text(encoding="utf-8"))["outputs"][0]
    tensor = triton.InferInput(request["name"], request["shape"], "FP32")
    tensor.set_data_from_numpy(
        np.array(request["data"], dtype=np.float32).reshape(request["shape"]),
        binary_data=binary)
    result = served.client.infer(
        TENSOR, [tensor],
        outputs=[triton.InferRequestedOutput(expected["name"], binary_data=binary)])
    logits = result.as_numpy(expected["name"])
    assert list(logits.shape) == expected["shape"], logits.shape
    assert np.allclose(logits.flatten(), expected["data"], atol=CNN_TOLERANCE), logits


def cnn_input() -> triton.InferInput:
    request = json.loads(CNN_REQUEST.read_text(encoding="utf-8"))["inputs"][0]
    tensor = triton.InferInput(request["name"], request["shape"], "FP32")
    tensor.set_data_from_numpy(
        np.array(request["data"], dtype=np.float32).reshape(request["shape"]))
    return tensor


def test_a_tensor_model_describes_its_graph(served):
    request = json.loads(CNN_REQUEST.read_text(encoding="utf-8"))["inputs"][0]
    expected = json.loads(CNN_RESPONSE.read_text(encoding="utf-8"))["outputs"][0]
    metadata = served.client.get_model_metadata(TENSOR)
    (graph_input,) = metadata["inputs"]
    assert (graph_input["name"], graph_input["datatype"]) == (request["name"], "FP32"), metadata
    # The batch dimension varies; the others are the image's.
    assert graph_input["shape"][1:] == request["shape"][1:], metadata
    assert [output["name"] for output in metadata["outputs"]] == [expected["name"]], metadata
    config = served.client.get_model_config(TENSOR)
    assert config["input"] == [{"name": request["name"], "data_type": "TYPE_FP32",
                                 "dims": request["shape"][1:]}], config


def test_versions_side_by_side(served):
    client = served.client
    metadata = client.get_model_metadata(TENSOR)
    # Numbered versions order as numbers: 10 is newer than 1.
    assert metadata["versions"] == ["1", TENSOR_NEWER], metadata
    assert metadata["parameters"]["version"] == TENSOR_NEWER, metadata
    assert client.is_model_ready(TENSOR, model_version="1")

    def replies():
        models = requests.get(f"{served.base}/api/models", auth=("guest", "guest"),
                              timeout=10).json()
        return {m["version"]: m["replies"] for m in models if m["name"] == TENSOR}

    before = replies()
    answered = [
        client.infer(TENSOR, [cnn_input()]),  # the newest
        client.infer(TENSOR, [cnn_input()], model_version="1"),  # the KServe path
        client.infer(TENSOR, [cnn_input()], headers={"Warren-Model-Version": "1"}),
    ]
    assert [result.get_response()["model_version"] for result in answered] == \
        [TENSOR_NEWER, "1", "1"]
    # Each went to its version's queue, whose worker answered it.
    eventually(lambda: replies() == {"1": before["1"] + 2, TENSOR_NEWER: before[TENSOR_NEWER] + 1},
               "each version's worker to count its requests")
    with pytest.raises(InferenceServerException) as refused:
        client.infer(TENSOR, [cnn_input()], model_version="3")
    assert "1, 10" in str(refused.value), refused.value
    stats = client.get_inference_statistics(TENSOR)["model_stats"]
    assert sorted(entry["version"] for entry in stats) == ["1", TENSOR_NEWER], stats


def test_an_unknown_output_is_refused(served):
    with pytest.raises(InferenceServerException) as refused:
        served.client.infer(EMBEDDING, [texts_input([FOOD], True)],
                            outputs=[triton.InferRequestedOutput("no-such-output")])
    assert "no-such-output" in str(refused.value)


def test_statistics_count_what_was_served(served):
    def counts():
        stats = served.client.get_inference_statistics(EMBEDDING)["model_stats"]
        assert len(stats) == 1 and stats[0]["name"] == EMBEDDING, stats
        return stats[0]

    # The counts trail the answer a little: a worker counts a batch once
    # its replies are confirmed, after the client may already have them.
    # So the count starts once every request taken is answered.
    def settled():
        models = requests.get(f"{served.base}/api/models", auth=("guest", "guest"),
                              timeout=10).json()
        model = next(m for m in models if m["name"] == EMBEDDING)
        return model["requests"] == model["replies"] and model["messages"] == 0

    eventually(settled, "the model's earlier requests to be answered and counted")
    before = counts()
    started_ms = int(time.time() * 1000)
    served.client.infer(EMBEDDING, [texts_input([FOOD, BREAD, FOOD], True)])

    def moved():
        now = counts()
        if now["inference_count"] == before["inference_count"]:
            return None
        return now

    after = eventually(moved, "the statistics to count the request")
    assert after["inference_count"] == before["inference_count"] + 3, (before, after)
    assert after["execution_count"] > before["execution_count"], (before, after)
    assert after["last_inference"] >= started_ms - 1000, (started_ms, after)
    success = after["inference_stats"]["success"]
    assert success["count"] == after["inference_count"]
    infer = after["inference_stats"]["compute_infer"]
    assert infer["count"] == after["execution_count"] and infer["ns"] > 0, after
    every = served.client.get_inference_statistics()["model_stats"]
    assert {model["name"] for model in every} == {EMBEDDING, TENSOR}, every


def test_malformed_binary_bodies_are_400(served):
    auth = ("guest", "guest")
    url = f"{served.base}/v2/models/{EMBEDDING}/infer"
    header = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": 9}}]}).encode()
    element = (5).to_bytes(4, "little") + b"hello"
    cases = {
        "header longer than the body": (str(len(header) + 100), header + element),
        "bytes left over": (str(len(header)), header + element + b"!"),
        "element overruns its data": (str(len(header)),
                                      header.replace(b"9", b"8") + element[:8]),
        "not a number": ("lots", header + element),
    }
    for what, (length, body) in cases.items():
        resp = requests.post(url, data=body, auth=auth, timeout=10,
                             headers={"Inference-Header-Content-Length": length,
                                      "Content-Type": "application/octet-stream"})
        assert resp.status_code == 400, (what, resp.status_code, resp.text)
        assert resp.json()["error"], what
    # The same body with the right length is served.
    resp = requests.post(url, data=header + element, auth=auth, timeout=60,
                         headers={"Inference-Header-Content-Length": str(len(header))})
    assert resp.status_code == 200, resp.text
