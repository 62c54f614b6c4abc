"""ONNX Runtime found where `pip install onnxruntime` put it: a fresh
virtualenv with onnxruntime installed, its bin first on PATH, and nothing
else pointing at the library (no ORT_DYLIB_PATH, no VIRTUAL_ENV, no .venv in
the broker's working directory, no onnxruntime_library in the model's
configuration). The broker asks that Python where the package is, loads its
library instead of falling back to tract, and says which library and
version it loaded, in its log and in /api/models."""

import pathlib
import re
import subprocess
import sys
import time

import pytest
import requests

from conftest import REPO_ROOT, start_broker

pytestmark = [pytest.mark.warren_only("the model runtime is Warren's"),
              pytest.mark.timeout(300)]

MODEL_DIR = REPO_ROOT / "models" / "all-MiniLM-L6-v2"
REQUIREMENTS = REPO_ROOT / "tests" / "models" / "requirements.txt"


def onnxruntime_requirement() -> str:
    for line in REQUIREMENTS.read_text(encoding="utf-8").splitlines():
        if line.startswith("onnxruntime=="):
            return line.strip()
    raise AssertionError(f"no onnxruntime pin in {REQUIREMENTS}")


def test_the_library_is_found_through_the_python_on_path(tmp_path, monkeypatch):
    for file in ("model.onnx", "tokenizer.json"):
        assert (MODEL_DIR / file).exists(), f"{MODEL_DIR / file}: run `bash scripts/fetch-models.sh`"
    venv = tmp_path / "fresh-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # The package alone: the broker needs its shared library, not its
    # Python dependencies.
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                    "--no-deps", onnxruntime_requirement()], check=True)
    version = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import importlib.metadata as m; print(m.version('onnxruntime'))"],
        check=True, capture_output=True, text=True).stdout.strip()

    monkeypatch.delenv("ORT_DYLIB_PATH", raising=False)
    monkeypatch.delenv("VIRTUAL_ENV", raising=False)
    monkeypatch.setenv("PATH", f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin")
    config = f"""
[[model]]
name = "minilm"
path = "{(MODEL_DIR / 'model.onnx').resolve()}"
tokenizer = "{(MODEL_DIR / 'tokenizer.json').resolve()}"
task = "embedding"
queue = "discovery-embed"
"""
    workdir = tmp_path / "warren"
    broker = start_broker(workdir, config)
    try:
        assert not (workdir / ".venv").exists()
        session = requests.Session()
        session.trust_env = False
        session.auth = ("guest", "guest")
        deadline = time.monotonic() + 60
        while True:
            models = session.get(f"{broker.http_url}/api/models", timeout=10).json()
            if models and models[0]["backend"] is not None:
                break
            assert time.monotonic() < deadline, f"the model never loaded: {models}"
            time.sleep(0.05)
        model = models[0]
        assert model["backend"] == "onnxruntime", (model, broker.log(tail=50))
        library = pathlib.Path(model["onnxruntime"]["library"])
        assert library.is_relative_to(venv), library
        assert re.match(r"libonnxruntime\.so", library.name), library
        assert model["onnxruntime"]["version"] == version, model["onnxruntime"]
        loaded = [line for line in broker.log_lines() if "ONNX Runtime loaded" in line]
        assert loaded and str(library) in loaded[0] and version in loaded[0], loaded
        assert not any("running the model on tract" in line for line in broker.log_lines())
    finally:
        broker.stop()
        broker.finish()
