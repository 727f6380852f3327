"""``ran-cli serve`` as a client sees it: a real server process, real CIFAR-10 JPEGs over
HTTP, answers equal to ``ran-cli predict --json``, 400 for bad bodies, 64 concurrent
requests, and MLflow's own scoring server answering the same request the same way."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import BIN, free_port, serving

pytestmark = pytest.mark.slow
NAME = "cifar10-attention56"


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/invocations", body, {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _inputs(files: list[Path]) -> bytes:
    encoded = [base64.b64encode(f.read_bytes()).decode() for f in files]
    return json.dumps({"inputs": encoded}).encode()


def _same(answers: list[dict], expected: list[dict]) -> None:
    assert [a["labels"] for a in answers] == [e["labels"] for e in expected]
    for answer, want in zip(answers, expected, strict=True):
        np.testing.assert_allclose(answer["probs"], want["probs"], rtol=1e-4, atol=1e-6)


@pytest.fixture
def registered(trained_model: Path) -> str:
    """The tiny model registered in this test's MLflow store, as training registers it."""
    import mlflow

    from ran.inference.predictor import log_image_model
    from ran.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment("residual-attention")  # not an id cached from an earlier store
    with mlflow.start_run():
        log_image_model(trained_model / "model.pt", NAME)
    return f"models:/{NAME}/1"


def test_serve_answers_like_predict_and_survives_bad_bodies(
    registered: str, trained_model: Path, cifar10_small: Path, tmp_path: Path
) -> None:
    files = [f for c in sorted((cifar10_small / "test").iterdir()) for f in sorted(c.iterdir())[:2]]
    predicted = subprocess.run(
        [sys.executable, "-m", "ran.cli", "predict", *map(str, files), "--model",
         str(trained_model), "--json"], capture_output=True, text=True,
    )  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    expected = {row["file"]: row for row in json.loads(predicted.stdout)}
    port = free_port()
    args = [str(BIN / "ran-cli"), "serve", "--model", registered, "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    with serving(args, url, tmp_path / "serve.log", stops_cleanly=True):
        status, answer = _post(url, _inputs(files))
        assert status == 200
        _same(answer["predictions"], [expected[str(f)] for f in files])
        hello = base64.b64encode(b"hello").decode()
        for body, says in (
            (b"not json", "the body must be JSON"),
            (b'{"inputs": "x"}', "the body must be JSON"),
            (b'{"instances": []}', "the body must be JSON"),
            (json.dumps({"inputs": [hello]}).encode(), "inputs[0] is not an image"),
            (b'{"inputs": ["!!"]}', "inputs[0] is not base64"),
            (b'{"inputs": []}', "inputs is empty"),
        ):
            status, answer = _post(url, body)
            assert status == 400 and says in answer["error"], (body, status, answer)
        with ThreadPoolExecutor(64) as pool:  # 64 at once: batched together by the server
            bodies = [_inputs([files[n % len(files)]]) for n in range(64)]
            answers = list(pool.map(lambda body: _post(url, body), bodies))
        for n, (status, answer) in enumerate(answers):
            assert status == 200
            _same(answer["predictions"], [expected[str(files[n % len(files)])]])
    with pytest.raises(OSError):  # the server and its children are gone: nothing listens
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_mlflow_scoring_server_takes_the_same_request(
    registered: str, cifar10_small: Path, tmp_path: Path
) -> None:
    """A client of ``ran-cli serve`` works unchanged against ``mlflow models serve``, which
    loads the same registered model with pickle refused."""
    from ran.inference.predictor import load_predictor

    files = sorted((cifar10_small / "test" / "frog").iterdir())[:3]
    port = free_port()
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"  # mlflow runs uvicorn from PATH
    args = [str(BIN / "mlflow"), "models", "serve", "-m", registered, "--env-manager", "local"]
    args += ["--port", str(port)]
    with serving(args, f"http://127.0.0.1:{port}", tmp_path / "mlflow.log", env=env) as url:
        status, answer = _post(url, _inputs(files))
    assert status == 200
    expected = load_predictor(registered).predict_bytes([f.read_bytes() for f in files])
    _same(answer["predictions"], expected)
