"""The team stores with real servers (``ran-cli stack``): SeaweedFS as the S3 store,
PostgreSQL and an MLflow server with logins, all on 127.0.0.1; a DVC S3 remote shared by two
clones; stages that log to the server with a login; and a server that goes away."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import BIN, REPO, TINY_TRAIN, run_ok, wait_for

from ran import stack as team

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "ran.cli"]


def _processes_naming(folder: Path) -> list[str]:
    """Running processes whose command line names ``folder`` (the stack's servers do)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode()
            state = (cmdline.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(folder) in text and state != "Z":
            found.append(text)
    return found


def _stack_folder() -> Path:
    """Under /tmp: the postgres user must reach it (pytest's own folders are private)."""
    folder = Path(tempfile.mkdtemp(prefix="ran-stack-", dir="/tmp"))
    folder.chmod(0o755)
    return folder


@pytest.fixture(scope="module")
def stack() -> Iterator[team.Stack]:
    """One team stack for the module's tests; stopped afterwards, nothing left running."""
    folder = _stack_folder()
    try:
        yield team.up(folder)
    finally:
        team.down(team.Stack(folder))
        left = _processes_naming(folder)
        shutil.rmtree(folder, ignore_errors=True)
        assert not left, f"the stack left processes: {left}"


@pytest.fixture
def on_server(stack: team.Stack, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This test's process and its children log to the stack's server as its admin."""
    for key, value in stack.environment().items():
        monkeypatch.setenv(key, value)
    return {**os.environ}


def _psql(stack: team.Stack, sql: str, database: str = "mlflow") -> list[list[str]]:
    """Rows straight from PostgreSQL (not through MLflow)."""
    port = stack.state()["ports"]["postgres"]
    env = {**os.environ, "PGPASSFILE": str(stack.folder / "pgpass")}
    args = [str(team._postgres_bin("psql")), "-h", "127.0.0.1", "-p", str(port)]
    args += ["-U", team.PG_USER, "-d", database, "-tA", "-F", "\t", "-c", sql]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
    return [line.split("\t") for line in out.splitlines() if line]


def _s3_keys(stack: team.Stack, prefix: str) -> list[str]:
    """Object keys straight from the S3 server."""
    client = stack.s3_client()
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=team.BUCKET, Prefix=prefix):
        keys += [item["Key"] for item in page.get("Contents", [])]
    return keys


def test_stack_command_starts_reports_and_stops_exactly_its_servers(tmp_path: Path) -> None:
    """``eval "$(ran-cli stack up)"`` sets the login, adds the DVC remote locally, starts
    nothing the second time; the S3 server refuses a wrong secret; ``down`` stops all."""
    import boto3
    from botocore.exceptions import ClientError

    folder = _stack_folder()
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAN_STACK_DIR": str(folder)}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(key, None)
    run_ok(["git", "init", "-q"], repo, env)
    run_ok([str(BIN / "dvc"), "init", "-q"], repo, env)
    try:
        script = 'eval "$(ran-cli stack up)" && env | grep ^MLFLOW_TRACKING_ | sort'
        shown = run_ok(["bash", "-c", script], repo, env).stdout
        stack = team.Stack(folder)
        assert f"MLFLOW_TRACKING_URI={stack.tracking_uri()}\n" in shown
        assert f"MLFLOW_TRACKING_USERNAME={team.MLFLOW_USER}\n" in shown
        assert "MLFLOW_TRACKING_PASSWORD=" in shown
        local = (repo / ".dvc/config.local").read_text()
        assert "remote = team" in local and stack.s3_endpoint() in local
        assert "secret_access_key" not in (repo / ".dvc/config").read_text()
        assert ".dvc/config.local" not in run_ok(["git", "status", "--short"], repo, env).stdout

        pids = {k: v["pid"] for k, v in stack.state()["pids"].items()}
        run_ok([*CLI, "stack", "up"], repo, env)  # already up: nothing new
        assert {k: v["pid"] for k, v in stack.state()["pids"].items()} == pids
        status = run_ok([*CLI, "stack", "status"], repo, env).stdout
        assert status.count(" up ") == 3, status

        keys = stack.s3_environment()
        s3 = {"endpoint_url": stack.s3_endpoint(), "region_name": "us-east-1"}
        good = boto3.client("s3", aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"], **s3)  # fmt: skip
        good.put_object(Bucket=team.BUCKET, Key="probe", Body=b"x")
        bad = boto3.client("s3", aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                           aws_secret_access_key="wrong", **s3)  # fmt: skip
        with pytest.raises(ClientError, match=r"SignatureDoesNotMatch|AccessDenied"):
            bad.get_object(Bucket=team.BUCKET, Key="probe")

        stopped = run_ok([*CLI, "stack", "down"], repo, env).stdout
        assert "mlflow, postgres, seaweedfs" in stopped
        after = subprocess.run([*CLI, "stack", "status"], cwd=repo, env=env, capture_output=True)
        assert after.returncode == 1 and after.stdout.decode().count(" down ") == 3
        assert not _processes_naming(folder)
    finally:
        team.down(team.Stack(folder))
        shutil.rmtree(folder, ignore_errors=True)


def _cli(args: list, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_ok([*CLI, *map(str, args)], cwd, env or {**os.environ})


def _tiny_train(data: Path, out: Path, *extra: str) -> list[str]:
    return [*CLI, "train", "--data", str(data), "--out", str(out), *TINY_TRAIN, *extra]


def test_a_stage_without_the_login_stops_before_any_work(
    stack: team.Stack, on_server: dict, small_ingest: Path, cifar10_small: Path, tmp_path: Path
) -> None:
    """No login, a wrong one, a user with READ permission: one line each, nothing written;
    the reader still browses the runs and loads the registered model with pickle refused."""
    from mlflow import MlflowClient
    from mlflow.server import get_app_client

    uri = stack.tracking_uri()
    run_ok(_tiny_train(small_ingest, tmp_path / "train", "--iterations", "2",
                       "--experiment", "team-login"), REPO, on_server)  # fmt: skip
    out = tmp_path / "ingest"
    ingest = [*CLI, "ingest", "--source", str(cifar10_small), "--out", str(out)]
    ingest += ["--experiment", "team-login"]
    base = {k: v for k, v in on_server.items() if not k.startswith("MLFLOW_TRACKING_")}
    base["MLFLOW_TRACKING_URI"] = uri

    def refused(env: dict[str, str]) -> str:
        result = subprocess.run(ingest, env=env, capture_output=True, text=True)
        assert result.returncode == 1 and not out.exists(), result.stderr[-2000:]
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith("error: ") and uri in line, line
        return line

    assert "asks for a login: set MLFLOW_TRACKING_USERNAME" in refused(base)
    wrong = {**base, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "nope"}
    assert "refused the login of user 'admin'" in refused(wrong)

    get_app_client("basic-auth", tracking_uri=uri).create_user("reader", "reader-pass-1")
    reader = {**base, "MLFLOW_TRACKING_USERNAME": "reader"}
    reader["MLFLOW_TRACKING_PASSWORD"] = "reader-pass-1"
    assert "refused a write for user 'reader'" in refused(reader)

    os.environ.update(reader)  # the reader browses: this process, its login
    try:
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("team-login").experiment_id])
        assert run.info.status == "FINISHED" and run.data.metrics["loss"] > 0
    finally:
        os.environ.update(on_server)
    jpeg = next((cifar10_small / "test" / "cat").iterdir())
    predict = [*CLI, "predict", "--json", "--model", "models:/cifar10-attention56/latest"]
    env = {**reader, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    (row,) = json.loads(run_ok([*predict, str(jpeg)], REPO, env).stdout)
    assert len(row["labels"]) == 5 and abs(sum(row["probs"]) - 1) < 0.05


def _outputs(repo: Path) -> dict[str, bytes]:
    """Every file of ``repo``'s DVC outputs (its dvc.lock files) that DVC caches, and so
    pushes (its md5 is in ``repo``'s cache), by path."""
    import hashlib

    cache = repo / ".dvc" / "cache" / "files" / "md5"
    files = {}
    for lock in (repo / "dvc.lock", repo / "studies" / "dvc.lock"):
        if not lock.is_file():
            continue
        for stage in yaml.safe_load(lock.read_text())["stages"].values():
            for out in stage.get("outs", []):
                path = lock.parent / out["path"]
                for file in [path] if path.is_file() else sorted(path.rglob("*")):
                    if not file.is_file():
                        continue
                    data = file.read_bytes()
                    md5 = hashlib.md5(data).hexdigest()
                    if (cache / md5[:2] / md5[2:]).is_file():
                        files[str(file.relative_to(repo))] = data
    return files


def test_a_second_clone_pulls_every_output_and_experiment_from_the_team_stores(
    stack: team.Stack, project: tuple, cifar10_small: Path, tmp_path: Path
) -> None:
    """Clone 1: the pipeline, a study cell and its report log to the team server; outputs
    and an experiment are pushed. Clone 2 pulls them byte for byte and has nothing to
    reproduce. The runs are rows in PostgreSQL, their files objects in S3; the registered
    model loads with pickle refused and serves; the password is nowhere it should not be."""
    repo, env = project
    env = {**env, **stack.environment()}
    dvc, git = str(BIN / "dvc"), ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["studies"]["quick"] = {"train": {"iterations": 4, "log_model": False}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    logs = [run_ok([*CLI, "stack", "up", "--dir", str(stack.folder)], repo, env)]
    logs.append(run_ok([dvc, "repro"], repo, env))
    cell = "studies/dvc.yaml:attention-cell@attention56-mixed"
    logs.append(run_ok([dvc, "repro", cell], repo, env))
    report = run_ok([*CLI, "report", "attention", "--out", str(tmp_path / "report")], repo, env)
    assert "attention56-mixed" in report.stdout
    logs.append(report)
    hub = tmp_path / "hub.git"
    run_ok(["git", "init", "-q", "--bare", str(hub)], tmp_path, env)
    for args in (["add", "-A"], ["commit", "-qm", "repro"], ["remote", "add", "origin", str(hub)],
                 ["push", "-q", "origin", "main"]):  # fmt: skip
        run_ok([*git, *args], repo, env)
    logs.append(run_ok([dvc, "push"], repo, env))
    pushed = _outputs(repo)  # the experiment below changes the workspace
    logs.append(run_ok([dvc, "exp", "run", "-n", "longer", "-S", "quick.train.iterations=6"],
                       repo, env))  # fmt: skip
    logs.append(run_ok([dvc, "exp", "push", "origin", "longer"], repo, env))

    clone = tmp_path / "clone"
    run_ok(["git", "clone", "-q", "-b", "main", str(hub), str(clone)], tmp_path, env)
    if not (clone / ".venv").exists():  # the first clone's link came along in git
        (clone / ".venv").symlink_to(BIN.parent)
    run_ok([*CLI, "stack", "up", "--dir", str(stack.folder)], clone, env)
    ran = ["dvc.yaml", cell]  # what clone 1 ran (the other study cells never ran)
    logs.append(run_ok([dvc, "pull", *ran], clone, env))
    assert len(pushed) > 10 and {"data/ingest/train.beton", "data/train/model.pt"} <= set(pushed)
    for name in ("data/noise/labels.npy", "data/evaluate/metrics.json", "data/train/curves.csv"):
        assert name in pushed
    assert _outputs(clone) == pushed
    status = run_ok([dvc, "status", *ran], clone, env).stdout
    assert "Data and pipelines are up to date." in status, status
    again = run_ok([dvc, "repro", *ran], clone, env).stdout
    assert "Running stage" not in again, again
    logs.append(run_ok([dvc, "exp", "pull", "origin", "longer"], clone, env))
    shown = json.loads(run_ok([dvc, "exp", "show", "--json"], clone, env).stdout)
    experiments = [e for row in shown for e in (row.get("experiments") or [])]
    (longer,) = [e for e in experiments if e.get("name") == "longer"]
    ((_, metrics),) = [
        (path, data["data"]) for path, data in longer["revs"][0]["data"]["metrics"].items()
        if path.endswith("evaluate/metrics.json")
    ]  # fmt: skip
    assert 0 <= metrics["top1_accuracy"] <= 1

    # the runs as PostgreSQL has them, their files as the S3 server has them
    rows = _psql(
        stack,
        "SELECT r.name, r.status, r.run_uuid FROM runs r JOIN experiments e "
        "ON e.experiment_id = r.experiment_id WHERE e.name = 'residual-attention'",
    )
    names = {name for name, status, _ in rows if status == "FINISHED"}
    assert {"ingest", "noise", "train", "evaluate", "report"} <= names, rows
    train_run = next(uuid for name, _, uuid in rows if name == "train")
    steps = _psql(
        stack, f"SELECT step FROM metrics WHERE run_uuid = '{train_run}' AND key = 'loss'"
    )
    assert len(steps) >= 2
    keys = _s3_keys(stack, "mlflow/")
    assert any(k.endswith("/confusion.png") for k in keys)
    assert any(k.endswith("/model.pt") and "/models/" in k for k in keys), keys[:20]

    jpeg = next((cifar10_small / "test" / "dog").iterdir())
    depth = params["quick"]["train"]["depth"]  # the profile a machine without a GPU runs
    model = f"models:/cifar10-attention{depth}/latest"
    no_pickle = {**env, "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    (row,) = json.loads(run_ok([*CLI, "predict", "--json", "--model", model, str(jpeg)],
                               repo, no_pickle).stdout)  # fmt: skip
    assert len(row["labels"]) == 5
    from conftest import free_port, serving

    port = free_port()
    args = [*CLI, "serve", "--model", model, "--port", str(port), "--device", "cpu"]
    with serving(args, f"http://127.0.0.1:{port}", tmp_path / "serve.log", env=no_pickle) as url:
        import base64
        import urllib.request

        body = json.dumps({"inputs": [base64.b64encode(jpeg.read_bytes()).decode()]}).encode()
        request = urllib.request.Request(
            f"{url}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
    assert len(answer["predictions"][0]["labels"]) == 5

    # the password: not in git, params.yaml, dvc.lock, MLflow params or tags, nor any log
    password = stack.environment()["MLFLOW_TRACKING_PASSWORD"]
    secrets = [password, *team.Stack(stack.folder).secrets().values()]
    history = run_ok(["git", "log", "-p", "--all"], repo, env).stdout
    texts = {"git history": history, "params.yaml": (repo / "params.yaml").read_text(),
             "dvc.lock": (repo / "dvc.lock").read_text()}  # fmt: skip
    for table in ("params", "tags", "experiment_tags"):
        texts[f"MLflow {table}"] = str(_psql(stack, f"SELECT * FROM {table}"))
    texts["stage output"] = "".join(r.stdout + r.stderr for r in logs[1:])
    for log in stack.folder.glob("*.log"):
        texts[log.name] = log.read_text(errors="replace")
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"a secret of the stack is in {where}"


def _the_run(experiment: str):
    """The one run of ``experiment`` on the server, once it exists (else None)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])  # not an earlier test's
    try:
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id]) if found else []
    except MlflowException:
        return None
    return runs[0] if runs else None


def _logged_exactly_once(run_id: str, out: Path) -> None:
    """Every row of curves.csv is in the run, at its step, once; the run ended FINISHED and
    its model is registered once."""
    import csv

    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    with open(out / "curves.csv") as f:
        expected = [int(float(row["iteration"])) for row in csv.DictReader(f)]
    for key in ("loss", "train_accuracy", "lr"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == expected, (key, sorted(steps), expected)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert "final_top1" in run.data.metrics or run.data.metrics.get("loss") is not None
    assert len(client.search_model_versions(f"run_id = '{run_id}'")) == 1


SHORT_RETRIES = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "3", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}


def test_training_goes_on_while_the_server_and_then_its_database_are_away(
    stack: team.Stack, on_server: dict, small_ingest: Path, tmp_path: Path
) -> None:
    """In the middle of a training: the MLflow server killed and started again on its port
    and store; PostgreSQL frozen (SIGSTOP: requests time out) and thawed; PostgreSQL
    stopped (the server answers 500) and started again. The training finishes, and the run
    has every metric once, its end and its registered model."""
    out = tmp_path / "train"
    args = _tiny_train(small_ingest, out, "--iterations", "360", "--log-every", "4")
    args += ["--experiment", "team-outage", "--checkpoint-every", "1000"]
    env = {**on_server, **SHORT_RETRIES, "RAN_TRACKING_GRACE_S": "120"}
    training = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    try:
        run = wait_for(lambda: _the_run("team-outage"), 180, "the training's run")
        from mlflow import MlflowClient

        client = MlflowClient(stack.tracking_uri())
        logged = lambda: len(client.get_metric_history(run.info.run_id, "loss"))  # noqa: E731
        wait_for(lambda: logged() >= 2, 180, "the first metrics")
        team.stop_service(stack, "mlflow")
        time.sleep(4)
        assert training.poll() is None, "the training ended while the server was away"
        team.up(stack.folder)  # the same port, store and bucket
        seen = logged()
        wait_for(lambda: logged() > seen, 180, "metrics sent after the restart")
        postgres = stack.state()["pids"]["postgres"]["pid"]
        os.killpg(postgres, signal.SIGSTOP)
        try:
            time.sleep(5)
            assert training.poll() is None, "the training ended while the database was away"
        finally:
            os.killpg(postgres, signal.SIGCONT)
        team.stop_service(stack, "postgres")  # now the server answers 500
        time.sleep(3)
        assert training.poll() is None, "the training ended while the database was down"
        team.up(stack.folder)
        _, stderr = training.communicate(timeout=600)
    finally:
        if training.poll() is None:
            training.kill()
    assert training.returncode == 0, stderr[-3000:]
    assert "did not take everything" not in stderr
    _logged_exactly_once(run.info.run_id, out)


def test_a_stage_ending_while_the_server_is_down_keeps_its_logs_until_sync(
    stack: team.Stack, on_server: dict, small_ingest: Path, tmp_path: Path
) -> None:
    """The server is away when the training ends: all outputs written, exit 0, one warning
    naming what is pending; ``ran-cli sync`` sends it once the server is back, and a second
    sync has nothing to send."""
    out = tmp_path / "train"
    args = _tiny_train(small_ingest, out, "--iterations", "60", "--log-every", "4")
    args += ["--experiment", "team-pending"]
    env = {**on_server, **SHORT_RETRIES, "RAN_TRACKING_GRACE_S": "2"}
    training = subprocess.Popen(args, env=env, stderr=subprocess.PIPE, text=True)
    try:
        run = wait_for(lambda: _the_run("team-pending"), 180, "the training's run")
        team.stop_service(stack, "mlflow")
        _, stderr = training.communicate(timeout=600)
    finally:
        if training.poll() is None:
            training.kill()
        team.up(stack.folder)
    assert training.returncode == 0, stderr[-3000:]
    assert {"model.pt", "summary.json", "curves.csv"} <= {p.name for p in out.iterdir()}
    (warning,) = [line for line in stderr.splitlines() if "did not take everything" in line]
    assert "metric values" in warning and "the image model" in warning
    assert "the run's end" in warning and "ran-cli sync" in warning
    pending = Path(on_server["RAN_CACHE"]) / "outbox" / run.info.run_id
    assert pending.is_dir()

    sent = _cli(["sync"], env=env)
    assert "sent what 1 of 1 runs had pending" in sent.stdout, sent.stdout
    assert not pending.exists()
    _logged_exactly_once(run.info.run_id, out)
    assert "nothing pending" in _cli(["sync"], env=env).stdout
    _logged_exactly_once(run.info.run_id, out)


def test_two_trainings_and_a_study_cell_log_to_one_server_at_once(
    stack: team.Stack, project: tuple, small_ingest: Path, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    repo, env = project
    env = {**env, **stack.environment(), "MLFLOW_TRACKING_URI": stack.tracking_uri()}
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["studies"]["quick"] = {"train": {"iterations": 8, "log_model": False}}
    params["mlflow"]["experiment"] = "team-together"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copytree(small_ingest, repo / "data" / "ingest")
    commands = [
        _tiny_train(
            small_ingest,
            tmp_path / f"train-{n}",
            "--iterations",
            "20",
            "--experiment",
            "team-together",
            "--seed",
            str(n),
        )
        for n in (1, 2)
    ]
    commands.append([str(BIN / "python"), "pipeline/study.py", "attention", "attention56-mixed"])
    running = [
        subprocess.Popen(c, cwd=repo, env=env, stderr=subprocess.PIPE, text=True) for c in commands
    ]
    for process in running:
        _, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stderr[-3000:]
    os.environ.update(stack.environment())
    client = MlflowClient(stack.tracking_uri())
    experiment = client.get_experiment_by_name("team-together").experiment_id
    runs = client.search_runs([experiment])
    assert len(runs) == 5 and {r.info.status for r in runs} == {"FINISHED"}
    names = sorted(r.info.run_name for r in runs)
    assert names == ["evaluate", "noise", "train", "train", "train"]
    for run in runs:
        if run.info.run_name == "train":
            assert run.data.metrics["loss"] > 0 and "images_per_s" in run.data.metrics
