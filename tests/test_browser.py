"""The MLflow UI as a user opens it: ``ran-cli ui`` on a store holding a real training run,
looked at in a real headless Chromium (Debian's ``chromium`` driven by Playwright, both
installed by scripts/setup.sh; another binary: ``RAN_CHROMIUM``), and ``ran-cli ui`` when the
tracking URI is already a server.

The browser test leaves its screenshots in its tmp_path and a copy of the run's page in
/tmp/mlflow-ui-run.png.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TINY_TRAIN, free_port, serving

BIN = Path(sys.executable).parent
CHROMIUM = Path(os.environ.get("RAN_CHROMIUM", "/usr/bin/chromium"))
# Known to work as root on the project's machines; Playwright adds --headless and a fresh
# --user-data-dir itself.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EXPERIMENT = "residual-attention"
REGISTERED = "cifar10-attention56"
SCREENSHOT = Path("/tmp/mlflow-ui-run.png")  # a copy to look at after the run
TIMEOUT_MS = 60_000  # the UI's first load takes ~10 s on 2 busy cores


@pytest.fixture
def training_run(small_ingest: Path, tmp_path: Path):
    """A tiny real training run: ``ran-cli train`` (ran.train.train_model), 4 steps of a
    width-0.25 Attention-56 on 200 real CIFAR-10 images, metrics at every step. Logged to
    MLFLOW_TRACKING_URI (conftest: tmp_path/mlflow.db) from tmp_path, so its artifacts lie
    in tmp_path/mlruns, MLflow's default ./mlruns as from the repository root."""
    from mlflow import MlflowClient

    args = [str(BIN / "ran-cli"), "train", "--data", str(small_ingest)]
    args += ["--out", str(tmp_path / "train"), *TINY_TRAIN, "--iterations", "4", "--log-every", "1"]
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name(EXPERIMENT)
    (run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'train'")
    return run


@pytest.fixture
def mlflow_ui(training_run, tmp_path: Path) -> Iterator[str]:
    """``ran-cli ui`` on a free port, started where the run was logged (tmp_path)."""
    port = free_port()
    args = [str(BIN / "ran-cli"), "ui", "--port", str(port)]
    with serving(args, f"http://127.0.0.1:{port}", tmp_path / "ui.log", cwd=tmp_path) as url:
        yield url


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real ``mlflow server`` on loopback."""
    port = free_port()
    args = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"]
    args += ["--artifacts-destination", str(tmp_path / "artifacts")]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # 8 fewer processes
    with serving(args, f"http://127.0.0.1:{port}", tmp_path / "server.log", env=env) as url:
        yield url


def _as_shown(value: float) -> str:
    """A metric value as the UI prints it (JavaScript's number formatting: 2, not 2.0)."""
    return repr(float(value)).removesuffix(".0")


@pytest.mark.slow
def test_ui_shows_the_training_run(mlflow_ui: str, training_run, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} missing: run scripts/setup.sh as root (apt-get install chromium)")
    run = training_run
    (logged,) = run.outputs.model_outputs  # the model logged by the run, MLflow 3's LoggedModel
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1900})
            page.set_default_timeout(TIMEOUT_MS)
            main = page.get_by_role("main")
            # The link `ran-cli ui` prints opens the experiment's runs (MLflow 3 would open
            # its GenAI view, where training runs hide behind a "Model training" switch).
            (link,) = re.findall(r"MLflow UI: (\S+)", (tmp_path / "ui.log").read_text())
            assert link.startswith(f"{mlflow_ui}/#/experiments/{run.info.experiment_id}/runs")
            page.goto(link)
            main.get_by_role("link", name="train", exact=True).click()

            # The run's overview: its description, its metrics (last values) and its logged,
            # registered model.
            expect(main.get_by_role("heading", name="train", exact=True)).to_be_visible()
            assert page.url.endswith(f"/runs/{run.info.run_id}")
            expect(main.get_by_text("Trains attention56-cifar").first).to_be_visible()
            for name in ("loss", "train_accuracy"):
                row = main.get_by_role("row").filter(
                    has=page.get_by_role("cell", name=name, exact=True)
                )
                expect(row).to_contain_text(_as_shown(run.data.metrics[name]))
            expect(main.get_by_role("heading", name="Logged models (1)")).to_be_visible()
            # The "Logged models" grid's link (the metrics table's open a new tab).
            model_link = main.get_by_role("grid").get_by_role("link", name="model", exact=True)
            expect(model_link).to_have_attribute("href", re.compile(f"/models/{logged.model_id}$"))
            expect(main.get_by_role("link", name=REGISTERED).first).to_be_visible()
            close = page.get_by_role("button", name="Close")  # the assistant panel, for the picture
            if close.count():
                close.last.click()
            page.screenshot(path=tmp_path / "run.png")
            shutil.copy(tmp_path / "run.png", SCREENSHOT)

            # Files the run logged, read by the UI from the artifact store (./mlruns).
            main.get_by_role("tab", name="Artifacts").click()
            main.get_by_text("summary.json", exact=True).click()
            expect(main.get_by_text(f'"run_id": "{run.info.run_id}"')).to_be_visible()

            # The logged model's own page and files (MLmodel, the weights).
            main.get_by_role("tab", name="Overview").click()
            model_link.click()
            expect(main.get_by_role("heading", name="model", exact=True)).to_be_visible()
            main.get_by_role("link", name="Artifacts", exact=True).click()
            expect(main.get_by_text("MLmodel", exact=True)).to_be_visible()
            page.screenshot(path=tmp_path / "model-artifacts.png")
        finally:
            browser.close()


def test_ui_names_a_tracking_server(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    result = subprocess.run(
        [str(BIN / "ran-cli"), "ui"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.strip().splitlines()
    assert line.startswith(f"MLflow UI is already at {mlflow_server} ")
    with urllib.request.urlopen(mlflow_server, timeout=30) as response:
        assert b"<title>MLflow</title>" in response.read()


@pytest.mark.parametrize("store", ["default", "file"])
def test_ui_serves_the_project_store(
    store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command line ``ran-cli ui`` hands to ``mlflow server`` (exec'd, so not run here)."""
    from typer.testing import CliRunner

    from ran.cli import app

    repo = Path(__file__).resolve().parents[1]
    if store == "default":
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        uri = f"sqlite:///{repo / 'mlflow.db'}"
    else:
        uri = (tmp_path / "mlruns").as_uri()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(repo)
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, args, env: calls.append((path, args, env)))
    result = CliRunner().invoke(app, ["ui", "--port", "5123"])
    assert result.exit_code == 0, result.output
    ((path, args, env),) = calls
    artifacts = ["--default-artifact-root", (repo / "mlruns").as_uri()]
    assert path == sys.executable and args[:4] == [sys.executable, "-m", "mlflow", "server"]
    assert args[4:10] == ["--backend-store-uri", uri, "--host", "127.0.0.1", "--port", "5123"]
    assert args[10:] == ["--workers", "1", *(artifacts if store == "default" else [])]
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert "MLflow UI: http://127.0.0.1:5123" in result.output
