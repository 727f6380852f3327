"""Crash hygiene with real processes and a real ``kill -9``: output locks, leftovers of
killed runs, MLflow runs of killed stages ended as KILLED."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from contextlib import suppress
from pathlib import Path

import pytest
from conftest import wait_for

from ran.errors import RanError
from ran.outputs import atomic_write, claim_output, leftovers, lock_path

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "ran.cli"]

# A holder: claims argv[1], records argv[2] (unless "-"), optionally forks a worker that
# outlives it (argv[3] == "fork"), prints its pid(s), then sleeps until killed.
HOLDER = """
import multiprocessing, sys, time
from pathlib import Path
from ran.outputs import claim_output
with claim_output(Path(sys.argv[1])) as claim:
    if sys.argv[2] != "-":
        claim.record_run(sys.argv[2])
    pids = [multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
            for _ in range(sys.argv[3:] == ["fork"])]
    for p in pids:
        p.start()
    print(" ".join(str(p.pid) for p in pids), flush=True)
    time.sleep(60)
"""


def _start(code: str, *args: str, **popen: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        env=os.environ.copy(),
        start_new_session=True,  # its whole group can be cleaned up afterwards
        text=True,
        **popen,
    )


def _kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _kill_group(proc: subprocess.Popen) -> None:
    """Whatever is left of the process and what it started (orphaned workers)."""
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def _holder(out: Path, run_id: str = "-", fork: bool = False) -> tuple[subprocess.Popen, str]:
    proc = _start(HOLDER, str(out), run_id, *(["fork"] if fork else []), stdout=subprocess.PIPE)
    line = proc.stdout.readline()  # printed once the claim is held
    assert proc.poll() is None, "holder died"
    return proc, line.strip()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # not a zombie


def test_a_live_holder_blocks_a_killed_one_does_not(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc, _ = _holder(out, "run-1")
    try:
        # What a run killed mid-write leaves: ingest's temporary sibling, an atomic write.
        (tmp_path / ".out.tmp-k2j4x9").mkdir()
        (tmp_path / ".out.tmp-k2j4x9" / "train.beton").write_bytes(b"half")
        out.mkdir()
        (out / ".f.tmp-123").write_text("half")
        (out / "meta.json").write_text("{}")
        with pytest.raises(RanError) as error, claim_output(out):
            pass
        message = str(error.value)
        assert message == (
            f"{out} is in use by another run (pid {proc.pid}); wait for it or stop it "
            f"(kill {proc.pid})"
        )
        assert (tmp_path / ".out.tmp-k2j4x9").exists()  # the loser touches nothing
        assert json.loads(lock_path(out).read_text()) == {"pid": proc.pid, "run_id": "run-1"}
        _kill9(proc)
        with claim_output(out) as claim:
            assert claim.previous_run_id == "run-1"
            assert claim.removed == [tmp_path / ".out.tmp-k2j4x9", out / ".f.tmp-123"]
            assert json.loads(lock_path(out).read_text())["pid"] == os.getpid()
            claim.record_run("run-2")
            assert json.loads(lock_path(out).read_text())["run_id"] == "run-2"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # lock file removed
        assert [p.name for p in out.iterdir()] == ["meta.json"]
    finally:
        _kill_group(proc)


def test_orphaned_workers_of_a_killed_holder_do_not_hold_the_lock(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc, worker = _holder(out, "run-1", fork=True)
    try:
        _kill9(proc)
        assert _alive(int(worker))  # a forked worker outlives its killed parent
        with claim_output(out) as claim:
            assert claim.previous_run_id == "run-1"
    finally:
        with suppress(ProcessLookupError):
            os.kill(int(worker), signal.SIGKILL)
        _kill_group(proc)


def test_killed_before_recording_keeps_the_earlier_killed_run(tmp_path: Path) -> None:
    """A run killed between its claim and its record_run still passes on the id it read."""
    out = tmp_path / "out"
    first, _ = _holder(out, "run-1")
    _kill9(first)
    second, _ = _holder(out)  # records nothing of its own
    try:
        _kill9(second)
        with claim_output(out) as claim:
            assert claim.previous_run_id == "run-1"
    finally:
        _kill_group(first)
        _kill_group(second)


def test_exceptions_release_and_clear(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError), claim_output(out) as claim:
        claim.record_run("run-1")
        raise ValueError
    assert not lock_path(out).exists()
    with claim_output(out) as claim:
        assert claim.previous_run_id is None and claim.removed == []


def test_claims_exclude_each_other_across_lock_file_removal(tmp_path: Path) -> None:
    """Holders remove the lock file on exit; a claimer that locked the removed file retries,
    so two claims never overlap."""
    out = tmp_path / "out"
    inside, most, refused = [0], [0], [0]
    count = threading.Lock()

    def claimer() -> None:
        for _ in range(150):
            try:
                with claim_output(out):
                    with count:
                        inside[0] += 1
                        most[0] = max(most[0], inside[0])
                    time.sleep(0)
                    with count:
                        inside[0] -= 1
            except RanError as exc:
                assert f"pid {os.getpid()}" in str(exc)
                refused[0] += 1

    threads = [threading.Thread(target=claimer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1 and refused[0] > 0
    assert not lock_path(out).exists()


def test_atomic_write(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    atomic_write(target, lambda tmp: tmp.write_text("1"))
    assert target.read_text() == "1"

    def fails(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fails)
    assert target.read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_atomic_write_killed_mid_write_is_cleaned_up(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "sub").mkdir()
    code = (
        "import sys, time; from pathlib import Path; from ran.outputs import atomic_write\n"
        "def write(tmp):\n"
        "    tmp.write_text('half'); print(tmp, flush=True); time.sleep(60)\n"
        "atomic_write(Path(sys.argv[1]), write)\n"
    )
    proc = _start(code, str(out / "sub" / "checkpoint.pt"), stdout=subprocess.PIPE)
    try:
        tmp = Path(proc.stdout.readline().strip())
        assert tmp == out / "sub" / f".checkpoint.pt.tmp-{proc.pid}"
        _kill9(proc)
        assert leftovers(out) == [tmp]
        with claim_output(out) as claim:
            assert claim.removed == [tmp]
        assert not tmp.exists() and not (out / "sub" / "checkpoint.pt").exists()
    finally:
        _kill_group(proc)


def test_leftover_names_match_the_temporary_folders_exactly(tmp_path: Path) -> None:
    from ran.outputs import temporary_sibling

    out = tmp_path / "data"
    made = [temporary_sibling(out, kind) for kind in ("tmp", "failed")]
    old = tmp_path / f".data.old-{os.getpid()}"  # publish_dir's
    old.mkdir()
    for name in (".data2.tmp-x", ".dat.tmp-x", "data.tmp-x", ".data.lock", ".data.tmpx"):
        (tmp_path / name).mkdir()  # not this output's, or not a temporary
    assert leftovers(out) == sorted([*made, old])


def test_tracked_stage_continues_a_run_and_end_killed_run(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from ran.tracking import end_killed_run, tracked_stage, tracking_uri

    out = tmp_path / "train"
    with tracked_stage("train", "resume", {"lr": 0.1}, out, tags={"pipeline": "quick"}) as run:
        run_id = run.info.run_id
    client = MlflowClient(tracking_uri())
    client.set_terminated(run_id, "RUNNING")  # as a killed process leaves it
    end_killed_run(run_id)
    assert client.get_run(run_id).info.status == "KILLED"
    end_killed_run(run_id)  # no longer RUNNING: left alone
    end_killed_run(None)
    end_killed_run("0" * 32)  # not in this store
    assert client.get_run(run_id).info.status == "KILLED"

    # train --resume: the same run goes on; changed params are not logged again.
    resumed = {"resumed": "1"}
    with tracked_stage("train", "resume", {"lr": 0.2}, out, run_id=run_id, tags=resumed) as run:
        assert run.info.run_id == run_id
        assert client.get_run(run_id).info.status == "RUNNING"
    continued = client.get_run(run_id)
    assert continued.info.status == "FINISHED" and continued.data.params == {"lr": "0.1"}
    assert continued.data.tags["pipeline"] == "quick" and continued.data.tags["resumed"] == "1"
    assert continued.data.tags["stage"] == "train"
    assert len(_mlflow_runs("resume")) == 1

    unknown = r"cannot continue MLflow run 0{32} in sqlite:.* not found"
    with (
        pytest.raises(RanError, match=unknown) as error,
        tracked_stage("t", "resume", {}, out, run_id="0" * 32),
    ):
        pass
    assert "\n" not in str(error.value)


# A stage that starts its run the moment argv[1] exists (mlflow imported before).
STARTER = """
import os, sys, time
from pathlib import Path
import mlflow
from ran.tracking import tracked_stage
while not Path(sys.argv[1]).exists():
    time.sleep(0.01)
with tracked_stage("stage", "together", {}, Path(sys.argv[1]).with_name(f"out-{os.getpid()}")):
    pass
"""


def test_stages_started_together_on_a_fresh_store(tmp_path: Path) -> None:
    """MLflow builds a new SQLite store's tables on first use: stages started at once (two
    DVC stages, a training and the UI) must not race to build them."""
    go = tmp_path / "go"
    starters = [
        subprocess.Popen(
            [sys.executable, "-c", STARTER, str(go)], stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    time.sleep(1)
    go.touch()
    errors = [p.communicate(timeout=120)[1] for p in starters]
    assert [p.returncode for p in starters] == [0] * 4, "\n".join(errors)[-3000:]
    assert len(_mlflow_runs("together")) == 4


def _mlflow_runs(experiment: str) -> list:
    from mlflow import MlflowClient

    from ran.tracking import tracking_uri

    client = MlflowClient(tracking_uri())  # this test's store, not the last one set
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


def _ingest_args(source: Path, out: Path, experiment: str) -> list[str]:
    return [
        "ingest",
        "--dataset",
        "imagefolder",
        "--source",
        str(source),
        "--out",
        str(out),
        "--experiment",
        experiment,
    ]


def _start_ingest(source: Path, out: Path, experiment: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, *_ingest_args(source, out, experiment)],
        cwd=REPO,
        env=os.environ.copy(),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _tmp_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


def _halfway(out: Path) -> bool:
    """The run has its MLflow run and has extracted its source into its temporary folder."""
    try:
        recorded = json.loads(lock_path(out).read_text()).get("run_id")
    except (OSError, ValueError):
        return False
    return bool(recorded) and any(
        any(p.suffix == ".jpg" for p in (tmp / "work").rglob("*")) for tmp in _tmp_dirs(out)
    )


@pytest.fixture
def small_archive(cifar10_small: Path, tmp_path: Path) -> Path:
    """``cifar10_small`` as a .tar.gz: ingest extracts it into its temporary folder, as it
    does the real CIFAR-10 archive (the 220 MB a killed run used to leave behind)."""
    archive = tmp_path / "cifar10-small.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cifar10_small, arcname="cifar10-small")
    return archive


@pytest.mark.slow
def test_ingest_killed_halfway_is_cleaned_up_by_the_next_run(
    small_archive: Path, tmp_path: Path
) -> None:
    from ran.config import IngestParams
    from ran.data.ingest import OUTPUTS, tracked_ingest

    out = tmp_path / "out"
    proc = _start_ingest(small_archive, out, "killed")
    try:
        wait_for(lambda: _halfway(out) or proc.poll() is not None, 120, "ingest to get halfway")
        assert proc.poll() is None, f"ingest ended before it was killed: {proc.stderr.read()}"
        os.kill(proc.pid, signal.SIGSTOP)  # hold it still while we look
        (left,) = _tmp_dirs(out)
        (killed,) = _mlflow_runs("killed")
        assert killed.info.status == "RUNNING"
        assert json.loads(lock_path(out).read_text()) == {
            "pid": proc.pid,
            "run_id": killed.info.run_id,
        }
        _kill9(proc)
        assert left.exists() and not out.exists()

        params = IngestParams(dataset="imagefolder", source=small_archive)
        meta = tracked_ingest(params, out, "killed")
    finally:
        _kill_group(proc)  # orphaned workers, had there been any
    assert meta["splits"]["train"]["count"] == 200
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # tmp, lock
    runs = {run.info.run_id: run.info.status for run in _mlflow_runs("killed")}
    assert runs.pop(killed.info.run_id) == "KILLED"
    assert list(runs.values()) == ["FINISHED"]


@pytest.mark.slow
def test_second_ingest_into_the_same_folder_is_refused(small_archive: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = _start_ingest(small_archive, out, "busy")
    try:
        wait_for(lambda: _halfway(out) or first.poll() is not None, 120, "ingest to get going")
        assert first.poll() is None, f"ingest ended too soon: {first.stderr.read()}"
        os.kill(first.pid, signal.SIGSTOP)  # keep it mid-run, holding the lock
        (working,) = _tmp_dirs(out)
        record = lock_path(out).read_text()
        second = subprocess.run(
            [*CLI, *_ingest_args(small_archive, out, "busy")],
            cwd=REPO,
            env=os.environ.copy(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 1
        assert second.stderr == (
            f"error: {out} is in use by another run (pid {first.pid}); wait for it or stop it "
            f"(kill {first.pid})\n"
        )
        # The refused run touched nothing of the first: its folder, its record, its run.
        assert working.exists() and lock_path(out).read_text() == record
        (run,) = _mlflow_runs("busy")
        assert run.info.status == "RUNNING" and run.info.run_id in record
    finally:
        _kill_group(first)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["noise", "evaluate"])
def test_stage_killed_halfway_ends_its_run_as_killed(
    stage: str, small_ingest: Path, tmp_path: Path
) -> None:
    """``kill -9`` of a stage once its MLflow run is recorded: the next run into the same
    output ends the killed run as KILLED, writes every output and leaves nothing behind."""
    out = tmp_path / stage
    args = [stage, "--data", str(small_ingest), "--out", str(out), "--experiment", stage]
    if stage == "evaluate":
        from ran.config import TrainParams
        from ran.train.stage import train_model

        model = tmp_path / "train"
        tiny = TrainParams(depth=56, width=0.25, batch_size=20, iterations=2, device="cpu")
        train_model(tiny.model_copy(update={"register_model": False}), small_ingest, model, "x")
        args += ["--model", str(model / "model.pt"), "--masks", "2"]
    else:
        args += ["--kind", "symmetric", "--rate", "0.2", "--exact"]

    def recorded() -> bool:
        with suppress(OSError, ValueError):
            return bool(json.loads(lock_path(out).read_text()).get("run_id"))
        return False

    proc = _start("import sys; from ran.cli import app; sys.exit(app())", *args,
                  stderr=subprocess.PIPE)  # fmt: skip
    try:
        wait_for(lambda: recorded() or proc.poll() is not None, 120, f"{stage} to get going")
        assert proc.poll() is None, f"{stage} ended before it was killed: {proc.stderr.read()}"
        _kill9(proc)
        (killed,) = _mlflow_runs(stage)
        assert killed.info.status == "RUNNING" and not out.exists()
        again = subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stderr[-2000:]
    finally:
        _kill_group(proc)
    statuses = {run.info.run_id: run.info.status for run in _mlflow_runs(stage)}
    assert statuses.pop(killed.info.run_id) == "KILLED"
    assert list(statuses.values()) == ["FINISHED"]
    assert (out / ("labels.npy" if stage == "noise" else "metrics.json")).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{stage}")] == []
