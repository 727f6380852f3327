"""The product as a team runs it: ``dvc repro`` in a git repo, and a real ``mlflow server``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def _run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture
def project(tmp_path: Path, cifar10_small: Path, monkeypatch: pytest.MonkeyPatch) -> tuple:
    """A fresh git + DVC checkout of this project, its ingest source set to real images."""
    repo = tmp_path / "repo"
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    for name in filter(None, tracked):
        if (REPO / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, repo / name)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["ingest"]["source"] = str(cifar10_small)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the embedded default at the repo root
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    for args in (
        ["git", "init", "-q", "-b", "main"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"],
    ):
        _run(args, repo, env)
    return repo, env


def test_dvc_repro_runs_once_and_reruns_on_param_change(project: tuple) -> None:
    from mlflow import MlflowClient

    repo, env = project
    first = _run([str(BIN / "dvc"), "repro"], repo, env)
    assert "Running stage 'ingest'" in first.stdout
    meta = json.loads((repo / "data/ingest/meta.json").read_text())
    assert meta["splits"]["train"]["count"] == 200
    assert (repo / "dvc.lock").is_file()

    again = _run([str(BIN / "dvc"), "repro"], repo, env)
    assert "didn't change" in again.stdout and "Running stage" not in again.stdout

    changed = _run([str(BIN / "dvc"), "exp", "run", "-S", "ingest.max_resolution=400"], repo, env)
    assert "Running stage 'ingest'" in changed.stdout

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("residual-attention").experiment_id])
    assert len(runs) == 2
    assert {r.data.tags["dvc.stage"] for r in runs} == {"ingest"}
    assert {r.data.params["max_resolution"] for r in runs} == {"500", "400"}
    head = _run(["git", "rev-parse", "HEAD"], repo, env).stdout.strip()
    assert {r.data.tags["git_commit"] for r in runs} == {head}


def test_dvc_repro_without_network_names_the_fix(project: tuple) -> None:
    repo, env = project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["ingest"]["source"] = None
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    closed = {k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy")}
    result = subprocess.run(
        [str(BIN / "dvc"), "repro"],
        cwd=repo,
        env={**env, **closed, "RAN_CACHE": str(repo / "cache")},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "error: cannot download cifar10" in result.stderr
    assert "RAN_INGEST_SOURCE" in result.stderr and not (repo / "data/ingest").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path) -> str:
    """A real ``mlflow server`` on loopback, with proxied artifact storage."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    args += ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"]
    args += ["--artifacts-destination", str(tmp_path / "artifacts")]
    server = subprocess.Popen(
        [str(BIN / "mlflow"), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("mlflow server did not start")
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_ingest_logs_to_a_real_mlflow_server(
    mlflow_server: str, cifar10_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    args = ["ingest", "--dataset", "cifar10", "--source", str(cifar10_small)]
    args += ["--out", str(tmp_path / "out"), "--experiment", "served"]
    result = subprocess.run(
        [sys.executable, "-m", "ran.cli", *args], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("served").experiment_id])
    assert run.data.metrics["val_count"] == 50 and run.data.params["dataset"] == "cifar10"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"meta.json"}
    local = client.download_artifacts(run.info.run_id, "meta.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["num_classes"] == 10
