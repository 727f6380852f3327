"""Study cells on a real Ray cluster: a head and a second node on this machine, inside
private network and process namespaces (``unshare -n -p -f --mount-proc``: Ray and the team
stack listen on that namespace's loopback alone, and nothing outlives its PID 1), with the
team stack's S3 remote and MLflow server. One node is killed in the middle of a cell."""

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

import psutil
import pytest
import yaml
from conftest import BIN, free_port, run_ok, wait_for

from ran import stack as team

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "ran.cli"]
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
STUDY = "mask"  # two Attention-56 cells: the smallest whole study, one cell per node
# Long enough to stop a cell between its first checkpoint and its end.
CELL_TRAIN = {"iterations": 40, "checkpoint_every": 8, "log_model": False}


# PID 1 of the namespaces: brings up loopback, then reaps every orphan (a `sleep` would
# leave zombies, which `ray stop` waits on as if they were alive).
INIT = """
import os, subprocess, sys, time
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.2)
"""


class Namespace:
    """Private network + PID + mount namespaces held open by a reaper as their PID 1;
    :meth:`run` starts a command inside them. Killing PID 1 ends every process inside."""

    def __init__(self) -> None:
        unshare = ["unshare", "-n", "-p", "-f", "--mount-proc"]
        self.outer = subprocess.Popen([*unshare, sys.executable, "-c", INIT, "ran-test-init"])
        self.pid1 = wait_for(self._pid1, 10, "the namespace's PID 1")
        wait_for(self._loopback_up, 10, "loopback to be up in the namespace")

    def _pid1(self) -> int | None:
        children = psutil.Process(self.outer.pid).children()
        if children and "ran-test-init" in children[0].cmdline():
            return children[0].pid
        return None

    def _loopback_up(self) -> bool:
        shown = subprocess.run(self.args(["ip", "link", "show", "lo"]), capture_output=True)
        return b",UP," in shown.stdout

    def args(self, args: list, cwd: Path = Path("/")) -> list[str]:
        enter = ["nsenter", "-t", str(self.pid1), "-n", "-p", "-m", f"--wd={cwd}", "--"]
        return [*enter, *map(str, args)]

    def run(self, args: list, cwd: Path, env: dict) -> subprocess.CompletedProcess:
        return run_ok(self.args(args, cwd), cwd, env)

    def processes(self) -> list[str]:
        """What runs inside, as its own ``ps`` sees it: neither PID 1, nor ``ps`` itself, nor
        a zombie not yet reaped."""
        out = subprocess.run(self.args(["ps", "-eo", "pid=,stat=,args="]), capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
        return [line for line in out.splitlines()
                if line.split()[0] != "1" and not line.split()[1].startswith("Z")
                and "ps -eo" not in line]  # fmt: skip

    def close(self) -> None:
        if self.outer.poll() is None:
            os.kill(self.pid1, signal.SIGKILL)
            self.outer.wait(30)


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    space = Namespace()
    try:
        yield space
    finally:
        space.close()


def _raylet_of(node_id: str) -> psutil.Process:
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if "raylet" in cmdline and f"--node_id={node_id}" in cmdline:
            return process
    raise AssertionError(f"no raylet of node {node_id}")


def _kill_node(node_id: str) -> None:
    """The node dies: its raylet and everything under it (workers, the cell's stage)."""
    raylet = _raylet_of(node_id)
    tree = [raylet, *raylet.children(recursive=True)]
    for process in tree:
        process.send_signal(signal.SIGSTOP)  # nothing more happens on the node
    for process in tree:
        process.kill()


CHECKPOINT = "seed-0/train/checkpoint-last.pt"  # a cell of one seed (studies.quick replaced)


def _in_s3(ns: Namespace, folder: Path, cell: str) -> bool:
    """Whether the S3 store has a checkpoint of ``cell`` (asked from inside the namespace,
    where the store listens)."""
    code = (
        "import sys; from pathlib import Path; from ran import stack; "
        "client = stack.Stack(Path(sys.argv[1])).s3_client(); "
        "listed = client.list_objects_v2(Bucket='ran', Prefix='dvc/checkpoints/'); "
        "print(any(sys.argv[2] in o['Key'] and o['Key'].endswith('checkpoint-last.pt') "
        "for o in listed.get('Contents', [])))"
    )
    out = ns.run([sys.executable, "-c", code, folder, cell], Path("/"), {**os.environ}).stdout
    return out.strip() == "True"


def _refused(ns: Namespace, args: list, cwd: Path, env: dict) -> str:
    """The one line a command exits 1 with."""
    result = subprocess.run(ns.args(args, cwd), cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return line


def _worker_node(ray_tmp: Path, but: str | None = None) -> str:
    """The id of the (one) node of the cluster in ``ray_tmp`` that is not the head."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        args = process.info["cmdline"] or []
        text = " ".join(args)
        if "raylet" in text and str(ray_tmp) in text and "--head" not in args:
            found += [a.split("=", 1)[1] for a in args if a.startswith("--node_id=")]
    (node,) = [n for n in found if n != but]
    return node


def _alive_nodes(ns: Namespace, port: int) -> str:
    code = (
        f"import ray; ray.init(address='127.0.0.1:{port}', logging_level='ERROR'); "
        "print(' '.join(n['NodeID'] for n in ray.nodes() if n['Alive']))"
    )
    return ns.run([sys.executable, "-c", code], Path("/"), {**os.environ}).stdout


def _weights(model: Path) -> dict:
    import torch

    return torch.load(model, weights_only=True)["state_dict"]


def _errors(repo: Path) -> dict[str, float]:
    cells = json.loads((repo / "reports" / STUDY / "results.json").read_text())["cells"]
    return {name: cell["top1_error_pct"] for name, cell in cells.items()}


def test_a_study_runs_on_a_two_node_ray_cluster_with_a_node_killed_mid_cell(
    namespace: Namespace, project: tuple, tmp_path: Path
) -> None:
    """The mask study on a head and one more node: the node running a cell is killed
    after the cell's first checkpoint; Ray retries the cell on the head, which resumes from
    the checkpoint in S3. Every cell's weights and the report equal the local path's (a
    second clone running `dvc repro`); the clone's lock has every cell, `dvc repro` has
    nothing left to do and `dvc pull` brings the outputs back; a cell done locally is not
    run again; nothing is left running."""
    repo, env = project
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["studies"]["quick"] = {"train": CELL_TRAIN}
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    folder = Path(tempfile.mkdtemp(prefix="ran-stack-", dir="/tmp"))
    folder.chmod(0o755)
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    env = {**env, "OMP_NUM_THREADS": "2", "RAY_USAGE_STATS_ENABLED": "0"}
    ns = namespace
    try:
        ns.run([*CLI, "stack", "up", "--dir", folder], repo, env)
        stack = team.Stack(folder)
        env |= stack.environment()
        dvc = [BIN / "dvc"]
        ns.run([*dvc, "repro", "dvc.yaml:ingest"], repo, env)
        for args in (["add", "-A"], ["commit", "-qm", "ingest"]):
            run_ok([*GIT, *args], repo, env)
        ns.run([*dvc, "push", "dvc.yaml:ingest"], repo, env)

        # the cluster: a head and a second node
        port = free_port()
        head = ["ray", "start", "--head", "--port", port, "--node-ip-address", "127.0.0.1",
                "--num-cpus", "2", "--include-dashboard", "false", "--temp-dir", ray_tmp,
                "--disable-usage-stats"]  # fmt: skip
        fast = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "4"}
        ns.run([BIN / head[0], *head[1:]], repo, {**env, **fast})
        node = [BIN / "ray", "start", "--address", f"127.0.0.1:{port}", "--num-cpus", "2",
                "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]  # fmt: skip
        run = [*CLI, "study", "run", STUDY, "--cluster", f"127.0.0.1:{port}"]

        # refused before anything is submitted: a paper-profile cell on a cluster without
        # GPUs; a node whose Python cannot import the code's dependencies (FFCV, here)
        shadow = tmp_path / "no-ffcv" / "ffcv"
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text("raise ImportError('FFCV is not installed')\n")
        ns.run(node, repo, {**env, "PYTHONPATH": shadow.parent})
        params_before = (repo / "params.yaml").read_bytes()
        gpu = _refused(ns, [*run, "-S", "profile=paper"], repo, env)
        assert "no node of the cluster has what a paper-profile cell asks" in gpu, gpu
        assert "1 GPU" in gpu and "-S profile=quick" in gpu, gpu
        assert (repo / "params.yaml").read_bytes() == params_before
        deps = _refused(ns, run, repo, env)
        assert "cannot run cells: cannot import ffcv" in deps and "FFCV is not installed" in deps
        assert not (repo / "data" / "cluster").exists()
        broken = _worker_node(ray_tmp)
        _kill_node(broken)
        wait_for(lambda: broken not in _alive_nodes(ns, port), 60, "the broken node to be dead")

        ns.run(node, repo, env)
        worker_id = _worker_node(ray_tmp, but=broken)
        log = tmp_path / "cluster.log"
        with open(log, "w") as out:
            driver = subprocess.Popen(ns.args(run, repo), cwd=repo, env=env, stdout=out, stderr=out)

            def checkpointed_on_worker() -> str | None:
                """The cell of the node whose checkpoint S3 has (seen from inside)."""
                assert driver.poll() is None, log.read_text()[-3000:]
                for process in _raylet_of(worker_id).children(recursive=True):
                    try:
                        args, cwd = process.cmdline(), Path(process.cwd())
                    except psutil.Error:
                        continue
                    if "pipeline/study.py" in args:
                        cell = args[-1]
                        local_checkpoint = cwd / "data/studies" / STUDY / cell / CHECKPOINT
                        if local_checkpoint.is_file() and _in_s3(ns, folder, cell):
                            return cell
                return None

            killed = wait_for(checkpointed_on_worker, 300, "a checkpoint of a cell on the node")
            _kill_node(worker_id)

            def retry_started() -> bool:
                """The killed cell's stage runs again (on the head; cheap to look for)."""
                assert driver.poll() is None, log.read_text()[-3000:]
                time.sleep(0.5)
                for process in psutil.process_iter(["cmdline"]):
                    args = process.info["cmdline"] or []
                    if "pipeline/study.py" in args and args[-1] == killed:
                        return True
                return False

            def shows_retried() -> bool:
                assert driver.poll() is None, "the study ended before its retry was seen"
                rows = ns.run([*CLI, "study", "status", STUDY], repo, env).stdout.splitlines()
                row = next(line for line in rows if line.startswith(killed))
                return " retried " in row and "attempt 2" in row

            wait_for(retry_started, 600, "the killed cell to run again")
            wait_for(shows_retried, 120, "`study status` to show the killed cell retried")
            assert driver.wait(600) == 0, log.read_text()[-5000:]
        report = log.read_text()
        assert "3 of 3" not in report and "0 failed" in report, report[-3000:]

        # the killed cell ran twice, the second time from the first's checkpoint
        journal = json.loads((repo / "data" / "cluster" / f"{STUDY}.json").read_text())
        attempts = {name: (c["attempt"], c["resumed"]) for name, c in journal["cells"].items()}
        assert attempts.pop(killed) == (2, True), journal
        assert set(attempts.values()) == {(1, False)}, journal
        status = ns.run([*CLI, "study", "status", STUDY], repo, env).stdout
        assert status.count(" done ") == 2 and "attempt 2" in status, status

        # the killed cell on the local path, in a second clone of the same commit: the same
        # weights and top-1; and done there, it is not run again on the cluster
        local = tmp_path / "local"
        run_ok(["git", "clone", "-q", str(repo), str(local)], tmp_path, env)
        (local / ".venv").symlink_to(BIN.parent)
        ns.run([*CLI, "stack", "up", "--dir", folder], local, env)
        ns.run([*dvc, "pull", "dvc.yaml:ingest"], local, env)
        ns.run([*CLI, "study", "run", STUDY, "--cells", killed], local, env)
        model = Path("data/studies") / STUDY / killed / "seed-0" / "train" / "model.pt"
        ours, theirs = _weights(repo / model), _weights(local / model)
        assert ours.keys() == theirs.keys()
        assert all((ours[k] == theirs[k]).all() for k in ours), "the resumed cell differs"
        metrics = Path("data/studies") / STUDY / killed / "seed-0" / "evaluate" / "metrics.json"
        assert json.loads((repo / metrics).read_text()) == json.loads((local / metrics).read_text())
        ns.run([*CLI, "report", STUDY, "--out", tmp_path / "report"], local, env)
        report = json.loads((tmp_path / "report" / "results.json").read_text())["cells"]
        assert _errors(repo) == {name: cell["top1_error_pct"] for name, cell in report.items()}
        assert None not in _errors(repo).values()
        skipped = ns.run([*run, "--cells", killed], local, env)
        assert "1 of 1 cells already done" in skipped.stderr, skipped.stderr

        # the clone's lock has every cell: nothing left to do, and the outputs come back
        again = ns.run([*dvc, "repro", f"studies/dvc.yaml:{STUDY}"], repo, env).stdout
        assert "Running stage" not in again, again
        outputs = repo / "data" / "studies" / STUDY
        before = {p: p.read_bytes() for p in outputs.rglob("*") if p.is_file()}
        shutil.rmtree(outputs)
        ns.run([*dvc, "pull", f"studies/dvc.yaml:{STUDY}-cell"], repo, env)
        assert {p: p.read_bytes() for p in outputs.rglob("*") if p.is_file()} == before

        # a cell that fails by itself is not retried, and says why in one line
        bad = [*run, "--cells", "attention56-local", "-S", "studies.quick.train.iterations=0"]
        failed = subprocess.run(
            ns.args(bad, repo), cwd=repo, env=env, capture_output=True, text=True
        )
        assert failed.returncode == 1 and "1 failed" in failed.stdout, failed.stderr[-3000:]
        status = ns.run([*CLI, "study", "status", STUDY], repo, env).stdout.splitlines()
        row = next(i for i, line in enumerate(status) if line.startswith("attention56-local"))
        assert " failed " in status[row], status
        assert "iterations" in status[row + 1] and status[row + 1].strip().startswith("error:")

        ns.run([BIN / "ray", "stop"], repo, env)
        ns.run([*CLI, "stack", "down", "--dir", folder], repo, env)
        assert ns.processes() == []
    finally:
        ns.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_bad_input_is_refused_in_one_line_before_any_cluster_work(
    project: tuple, tmp_path: Path
) -> None:
    """An unknown cell, an -S that is not key=value, uncommitted code, a cluster that does
    not answer, a tracking store the nodes cannot reach: one line each, exit 1, nothing
    written."""
    import socket

    repo, env = project
    run = [*CLI, "study", "run", STUDY, "--cluster"]
    closed = f"127.0.0.1:{free_port()}"

    def refused(*args: str) -> str:
        result = subprocess.run([*run, *args], cwd=repo, env=env, capture_output=True, text=True)
        assert result.returncode == 1, result.stderr[-2000:]
        (line,) = result.stderr.strip().splitlines()
        return line

    assert "has no cell 'nope'; valid cells: attention56-encoder-decoder" in refused(
        closed, "--cells", "nope"
    )
    assert "-S 'train.lr' is not key=value" in refused(closed, "-S", "train.lr")
    code = repo / "ran" / "evaluate.py"
    original = code.read_text()
    code.write_text(original + "\n# an edit\n")
    try:
        assert "uncommitted changes in ran/evaluate.py: commit them first" in refused(closed)
    finally:
        code.write_text(original)
    assert f"the Ray cluster at {closed} does not answer" in refused(closed)
    with socket.socket() as listening:  # something answers there, but the store is SQLite
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        line = refused(f"127.0.0.1:{listening.getsockname()[1]}")
    assert "MLFLOW_TRACKING_URI is sqlite:///" in line and "ran-cli stack up" in line, line
    assert not (repo / "data" / "cluster").exists()
    assert subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                          text=True).stdout == ""  # fmt: skip
