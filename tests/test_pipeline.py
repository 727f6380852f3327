"""The product as a team runs it: ``dvc repro`` in a git repo, and a real ``mlflow server``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from conftest import BIN, free_port, run_ok, serving

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_dvc_repro_runs_the_pipeline_once_and_reruns_on_param_change(project: tuple) -> None:
    from mlflow import MlflowClient

    repo, env = project
    first = run_ok([str(BIN / "dvc"), "repro"], repo, env)
    for stage in ("ingest", "noise", "train", "evaluate"):
        assert f"Running stage '{stage}'" in first.stdout
    assert "profile auto → quick (no GPU found)" in first.stderr
    meta = json.loads((repo / "data/ingest/meta.json").read_text())
    assert meta["splits"]["train"]["count"] == 200
    metrics = json.loads((repo / "data/evaluate/metrics.json").read_text())
    assert metrics["test_records"] == 50 and metrics["flip"] is True  # the quick profile's
    assert (repo / "dvc.lock").is_file()

    again = run_ok([str(BIN / "dvc"), "repro"], repo, env)
    assert "didn't change" in again.stdout and "Running stage" not in again.stdout
    shown = run_ok([str(BIN / "dvc"), "metrics", "show", "--json"], repo, env).stdout
    assert '"top1_accuracy"' in shown
    run_ok([str(BIN / "dvc"), "plots", "show", "-o", "plots"], repo, env)
    page = (repo / "plots" / "index.html").read_text()
    assert "curves.csv" in page and "predictions.csv" in page and "confusion.png" in page
    # the default remote: a folder, no server (here the test's own, not ~/.cache/ran)
    remote = repo.parent / "dvc-remote"
    run_ok([str(BIN / "dvc"), "remote", "modify", "--local", "local", "url", remote], repo, env)
    run_ok([str(BIN / "dvc"), "push"], repo, env)
    model = (repo / "data/train/model.pt").read_bytes()
    shutil.rmtree(repo / ".dvc/cache")
    (repo / "data/train/model.pt").unlink()
    run_ok([str(BIN / "dvc"), "pull", "dvc.yaml"], repo, env)  # the studies never ran here
    assert (repo / "data/train/model.pt").read_bytes() == model

    changed = run_ok([str(BIN / "dvc"), "exp", "run", "-S", "quick.train.lr=0.05"], repo, env)
    assert "Running stage 'train'" in changed.stdout
    assert "Running stage 'ingest'" not in changed.stdout
    assert "Running stage 'noise'" not in changed.stdout

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("residual-attention").experiment_id])
    by_stage = {}
    for run in runs:
        by_stage.setdefault(run.data.tags["dvc.stage"], []).append(run)
    counts = {stage: len(stage_runs) for stage, stage_runs in by_stage.items()}
    assert counts == {"ingest": 1, "noise": 1, "train": 2, "evaluate": 2}
    assert {r.data.params["lr"] for r in by_stage["train"]} == {"1.5", "0.05"}
    notes = {
        stage: [r.data.tags["mlflow.note.content"] for r in rs] for stage, rs in by_stage.items()
    }
    assert (
        notes["ingest"][0].startswith("Ingests cifar10 from ") and "200 train" in notes["ingest"][0]
    )
    assert notes["noise"][0].startswith("Writes the train labels of `data/ingest`")
    assert all(n.startswith("Trains attention8-cifar (") for n in notes["train"])
    assert all(
        n.startswith("Scores `data/train/model.pt` (the model of") for n in notes["evaluate"]
    )
    assert all(
        "test images of `data/ingest` with flip and translate averaging: top-1" in n
        for n in notes["evaluate"]
    )
    kind = client.get_experiment_by_name("residual-attention").tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"  # the MLflow UI opens on the runs
    head = run_ok(["git", "rev-parse", "HEAD"], repo, env).stdout.strip()
    assert {r.data.tags["git_commit"] for r in runs} == {head}
    assert {r.data.tags["git_dirty"] for r in by_stage["ingest"]} == {"false"}
    # One repro's runs share a pipeline tag; train's input hash is the one dvc.lock recorded.
    first_train = min(by_stage["train"], key=lambda r: r.info.start_time)
    first_eval = min(by_stage["evaluate"], key=lambda r: r.info.start_time)
    assert by_stage["ingest"][0].data.tags["pipeline"] == first_train.data.tags["pipeline"]
    assert first_train.data.tags["pipeline"] == first_eval.data.tags["pipeline"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    ingest_md5 = lock["stages"]["ingest"]["outs"][0]["md5"]
    assert first_train.data.tags["dvc.input.data/ingest"] == ingest_md5
    noise_md5 = lock["stages"]["noise"]["outs"][0]["md5"]  # train uses data/noise/labels.npy
    assert first_train.data.tags["dvc.input.data/noise"] == noise_md5
    assert by_stage["noise"][0].data.params["kind"] == "none"
    assert first_eval.data.tags["train_run_id"] == first_train.info.run_id


def test_readme_commands_work_as_typed(project: tuple) -> None:
    """The README's activate-then-DVC lines, run as a user types them (no PATH set up)."""
    repo, env = project
    readme = (REPO / "README.md").read_text()
    lines = [
        "source .venv/bin/activate",
        "dvc exp run -S ingest.source=../shared/data/cifar10-jpeg.tar.gz",
        "dvc metrics show",
    ]
    for line in lines:
        assert line in readme, line
    shared = repo.parent / "shared" / "data"
    shared.mkdir(parents=True)
    source = yaml.safe_load((repo / "params.yaml").read_text())["ingest"]["source"]
    with tarfile.open(shared / "cifar10-jpeg.tar.gz", "w:gz") as tar:
        tar.add(source, arcname="cifar10-jpeg")
    user_env = {k: v for k, v in env.items() if k != "PATH"} | {"PATH": "/usr/bin:/bin"}
    script = " && ".join(["cd " + str(repo), *lines])
    result = subprocess.run(["bash", "-c", script], env=user_env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Running stage 'evaluate'" in result.stdout and "top1_accuracy" in result.stdout
    assert "DVC failed to load" not in result.stderr, result.stderr[-3000:]


def test_metrics_and_plots_show_only_what_has_run(project: tuple) -> None:
    """The README's ``dvc metrics show`` and ``dvc plots show`` after the main pipeline alone:
    its metrics and plots, no failure line for the studies that have not run; a study's
    results and plot show up once it has a report (its ``dvc.yaml`` declares them)."""
    repo, env = project
    dvc = str(BIN / "dvc")
    run_ok([dvc, "repro"], repo, env)

    def show() -> tuple[str, str]:
        metrics = run_ok([dvc, "metrics", "show"], repo, env)
        plots = run_ok([dvc, "plots", "show"], repo, env)
        for result in (metrics, plots):  # "DVC failed to load some metrics/plots for ..."
            assert "failed" not in result.stdout + result.stderr, result.stderr
        return metrics.stdout, (repo / "dvc_plots" / "index.html").read_text()

    table, page = show()
    assert "data/evaluate/metrics.json" in table and "top1_accuracy" in table
    assert "reports/" not in table
    assert "curves.csv" in page and "predictions.csv" in page and "confusion.png" in page
    assert "reports/" not in page

    run_ok([str(BIN / "python"), "-m", "ran.cli", "report", "mask"], repo, env)  # no cells run
    table, page = show()
    assert "top1_accuracy" in table and "reports/mask/results.json" in table
    assert "missing_cells" in table and "reports/noise" not in table
    assert "reports/mask/report.png" in page and "confusion.png" in page


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


@pytest.fixture
def mlflow_server(tmp_path: Path) -> str:
    """A real ``mlflow server`` on loopback, with proxied artifact storage."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ["server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    args += ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"]
    args += ["--artifacts-destination", str(tmp_path / "artifacts")]
    with serving([str(BIN / "mlflow"), *args], url, tmp_path / "server.log"):
        yield url


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


def test_train_and_evaluate_log_to_a_real_mlflow_server(
    mlflow_server: str,
    small_ingest: Path,
    cifar10_small: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same runs, model and registry through a team's server as through the sqlite file;
    the registered model loads back from the server with pickle refused."""
    from conftest import TINY_TRAIN
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    out = tmp_path / "train"
    cli = [sys.executable, "-m", "ran.cli"]
    train = [*cli, "train", "--data", str(small_ingest), "--out", str(out), *TINY_TRAIN]
    evaluate = [*cli, "evaluate", "--model", str(out / "model.pt"), "--data", str(small_ingest)]
    for args in (
        [*train, "--iterations", "2", "--experiment", "served"],
        [*evaluate, "--out", str(tmp_path / "eval"), "--experiment", "served", "--masks", "2"],
    ):
        result = subprocess.run(args, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("served").experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert by_name["evaluate"].data.tags["train_run_id"] == by_name["train"].info.run_id
    assert "top1_accuracy" in by_name["evaluate"].data.metrics
    assert {a.path for a in client.list_artifacts(by_name["evaluate"].info.run_id)} >= {
        "confusion.png",
        "metrics.json",
    }
    jpeg = next((cifar10_small / "test" / "cat").iterdir())
    code = (
        "import json, sys, mlflow; "
        "m = mlflow.pyfunc.load_model('models:/cifar10-attention56/1'); "
        "print(json.dumps(m.predict([open(sys.argv[1], 'rb').read()])))"
    )
    env = {**os.environ, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    loaded = subprocess.run(
        [sys.executable, "-c", code, str(jpeg)], env=env, capture_output=True, text=True
    )
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    (answer,) = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert len(answer["labels"]) == 5 and sum(answer["probs"]) <= 1 + 1e-6
