"""``ran-cli study run NAME --cluster ADDRESS`` and ``ran-cli study status NAME``.

The driver runs in the user's clone. Before it submits anything it checks what it can:
the cells and ``-S`` overrides, that the cluster answers, that a tracking server all nodes
reach is set, that the code is committed (nodes run the commit), that some node has the
resources a cell asks for and that every node can import the code's dependencies. Then it
pushes the cells' input data to the DVC remote, submits every cell not done as a Ray task
(retried by Ray on another node when its node dies) and, as each ends, writes its lock
entry into ``studies/dvc.lock``. At the end it pulls the cells' outputs and, when the
whole study is done, runs the study's report stage, so the clone is as a local
``dvc repro`` would have left it.

A journal (``data/cluster/STUDY.json``) keeps what the driver knows of each cell (its
Ray task's failure, above all), for ``study status``, which adds MLflow's runs of the cell
and DVC's verdict.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from ran import paths
from ran.cluster import cells as study_cells
from ran.cluster.worker import CellJob, probe, run_cell
from ran.config import resolve_profile
from ran.errors import RanError
from ran.outputs import atomic_write
from ran.progress import progress_bar
from ran.studies.report import run_link
from ran.studies.tables import Cell, Study
from ran.tracking import check_store, tracking_uri

JOURNALS = paths.DATA / "cluster"
# What a worker needs of the driver's environment: the tracking server and its login, and
# S3 credentials for a remote that takes them from the environment.
FORWARDED = (
    "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION",
)  # fmt: skip
# The working-tree files a cluster run takes as they are, not as committed.
WORKSPACE_FILES = ("params.yaml", "dvc.lock", study_cells.STUDIES_LOCK)
# What the nodes run from the commit: a change here that is not committed stops a run.
CODE = ("*.py", "dvc.yaml", study_cells.STUDIES_DVC, "pyproject.toml", "requirements.lock")
RETRIES = 3  # Ray's retries of a cell whose node or worker process dies


def resources(profile: str, cpus: int | None) -> dict[str, float]:
    """What one cell asks of a node: a GPU and a few loader CPUs for the paper profile; the
    quick profile's two cores (its measured setting; torch's thread count follows them)."""
    if profile == "paper":
        return {"num_gpus": 1, "num_cpus": cpus or 4}
    return {"num_gpus": 0, "num_cpus": cpus or 2}


# -- checks that need no cluster ------------------------------------------------------


def check_address(address: str) -> str:
    """This machine's address on the way to the cluster's head, after one TCP connection
    to the head (5 s): Ray's driver announces it instead of guessing (Ray's guess probes a
    public DNS server)."""
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname, parsed.port or 6379
    if not host:
        raise RanError(f"--cluster {address!r} is not HOST:PORT (e.g. --cluster 10.0.0.5:6379)")
    try:
        with socket.create_connection((host, port), timeout=5) as connection:
            return connection.getsockname()[0]
    except OSError as exc:
        raise RanError(
            f"the Ray cluster at {host}:{port} does not answer ({exc.strerror or exc}): start "
            "its head with `ray start --head --port 6379`, or give its address with --cluster"
        ) from None


def check_tracking() -> str:
    """The tracking server every node logs to: an http(s) one (a file or SQLite store on
    the driver's disk is not where other machines can write)."""
    uri = tracking_uri()
    if urlparse(uri).scheme not in ("http", "https"):
        raise RanError(
            f"a cluster's cells log to one MLflow tracking server that every node reaches; "
            f'MLFLOW_TRACKING_URI is {uri}: set it to the team server (`eval "$(ran-cli '
            'stack up)"` starts one)'
        )
    check_store(uri)
    return uri


def check_code(root: Path) -> str:
    """The commit the nodes run; refused when tracked code (:data:`CODE`) differs from it.
    Other changes (lock files, the .gitignore files and report declarations DVC writes)
    are no code: the nodes take the lock files and params.yaml from this working tree."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        if result.returncode:
            raise RanError(f"{root} is not a git checkout with a commit: the nodes run a commit")
        return result.stdout

    commit = git("rev-parse", "HEAD").strip()
    changed = git("status", "--porcelain", "--untracked-files=no", "--", *CODE).splitlines()
    code = [line[3:] for line in changed]
    if code:
        more = f" and {len(code) - 1} more" if len(code) > 1 else ""
        raise RanError(
            f"uncommitted changes in {code[0]}{more}: commit them first (the cluster's nodes "
            f"run the code of commit {commit[:12]}, not this working tree)"
        )
    return commit


# -- the code the nodes run -----------------------------------------------------------


@contextmanager
def staged_code(root: Path, commit: str, params: str) -> Iterator[Path]:
    """The commit's files, with ``params`` as ``params.yaml`` and this working tree's lock
    files and local DVC config (the remote's settings) laid over them: Ray's
    ``working_dir`` for the tasks. Without .gitignore files, which would keep Ray from
    shipping the local DVC config."""
    with tempfile.TemporaryDirectory(prefix="ran-cluster-code-") as tmp:
        staged = Path(tmp)
        archive = subprocess.run(
            ["git", "archive", "--format=tar", commit], cwd=root, capture_output=True, check=True
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(staged, filter="data")
        for name in (*WORKSPACE_FILES, ".dvc/config.local"):
            if (root / name).is_file():
                shutil.copy2(root / name, staged / name)
        (staged / "params.yaml").write_text(params)
        for ignore in staged.rglob(".gitignore"):
            ignore.unlink()
        yield staged


def cell_key(root: Path, commit: str, stage: str) -> str:
    """Where a cell's checkpoints live: a hash of everything its stage's inputs come from
    (the code's commit, the parameters, the upstream lock), so a changed input never
    resumes an old checkpoint."""
    digest = hashlib.sha256(f"{commit}\n{stage}\n".encode())
    for name in ("params.yaml", "dvc.lock"):
        path = root / name
        digest.update(path.read_bytes() if path.is_file() else b"")
    return f"{stage.replace('@', '-')}-{digest.hexdigest()[:16]}"


# -- the journal ------------------------------------------------------------------------


class Journal:
    """What the driver knows of a study's cells, in ``data/cluster/STUDY.json``."""

    def __init__(self, root: Path, study: str) -> None:
        self.path = root / JOURNALS / f"{study}.json"
        self.data: dict[str, Any] = {"study": study, "cells": {}}
        if self.path.is_file():
            self.data = json.loads(self.path.read_text())

    def cell(self, name: str) -> dict[str, Any]:
        return self.data["cells"].get(name, {})

    def update(self, name: str, **values: Any) -> None:
        self.data["cells"].setdefault(name, {}).update(values, updated=time.time())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.data, indent=1)
        atomic_write(self.path, lambda tmp: tmp.write_text(text))


# -- checks on the cluster --------------------------------------------------------------


def check_resources(nodes: list[dict[str, Any]], wanted: dict[str, float], profile: str) -> None:
    """Some node (of ``nodes``, Ray's alive ones) must have what one cell asks for."""
    nodes = [n["Resources"] for n in nodes]
    fits = any(
        r.get("CPU", 0) >= wanted["num_cpus"] and r.get("GPU", 0) >= wanted["num_gpus"]
        for r in nodes
    )
    if not fits:
        have = "; ".join(f"{r.get('CPU', 0):g} CPUs, {r.get('GPU', 0):g} GPUs" for r in nodes)
        need = f"{wanted['num_cpus']} CPUs" + (
            f" and {wanted['num_gpus']} GPU" if wanted["num_gpus"] else ""
        )
        fix = (
            "add GPU nodes, or run the quick profile (-S profile=quick)"
            if wanted["num_gpus"]
            else "add nodes with more CPUs, or lower --cpus-per-cell"
        )
        raise RanError(
            f"no node of the cluster has what a {profile}-profile cell asks ({need}; the "
            f"nodes have: {have or 'none'}): {fix}"
        )


def expected_versions() -> dict[str, str]:
    """The driver's versions of what changes a cell's numbers."""
    from importlib.metadata import version

    return {
        "python": ".".join(platform.python_version_tuple()[:2]),
        **{name: version(name) for name in ("torch", "torchvision", "ffcv")},
    }


def check_nodes(ray: Any, nodes: list[dict[str, Any]]) -> None:
    """Every node of ``nodes`` imports the code's dependencies at the driver's versions."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote_probe = ray.remote(probe)
    expected = expected_versions()
    answers = [
        remote_probe.options(
            num_cpus=0,
            max_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
        ).remote(expected)
        for n in nodes
    ]
    for node, answer in zip(nodes, answers, strict=True):
        try:
            problem = ray.get(answer, timeout=300)
        except Exception as exc:  # the code itself did not import there
            problem = _one_line(exc)
        if problem:
            raise RanError(
                f"node {node['NodeManagerAddress']} ({node['NodeID'][:8]}) cannot run cells: "
                f"{problem}; install the project's environment there (scripts/setup.sh, or "
                "an image built from requirements.lock)"
            )


def _one_line(exc: BaseException) -> str:
    """A Ray task's error as one line: the original exception's last line."""
    cause = getattr(exc, "cause", None) or exc
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(cause).__name__


# -- run --------------------------------------------------------------------------------


def run_study(
    root: Path,
    study: Study,
    address: str,
    names: list[str] | None = None,
    overrides: list[str] | None = None,
    remote: str | None = None,
    cpus: int | None = None,
) -> dict[str, Any]:
    """Run ``study``'s cells (``names``, default all) that are not done on the Ray cluster
    at ``address``; returns {"done": [...], "skipped": [...], "failed": {cell: error}}.

    Every check comes before anything is written or submitted; ``params.yaml`` takes the
    ``-S`` overrides only once they all passed."""
    import ray

    chosen = study_cells.select(study, names)
    params = study_cells.overridden_params(root, overrides or [])
    commit = check_code(root)
    own_address = check_address(address)
    check_tracking()
    with staged_code(root, commit, params) as code:
        env = {name: os.environ[name] for name in FORWARDED if name in os.environ}
        # a driver on the cluster's network says its address (Ray Client's ray:// has none)
        here = {} if "://" in address else {"_node_ip_address": own_address}
        ray.init(address=address, log_to_driver=False, logging_level="ERROR",
                 runtime_env={"working_dir": str(code), "env_vars": env}, **here)  # fmt: skip
    try:
        nodes = [node for node in ray.nodes() if node.get("Alive")]
        profile = _profile(params, nodes)
        wanted = resources(profile, cpus)
        check_resources(nodes, wanted, profile)
        check_nodes(ray, nodes)
        if overrides:
            atomic_write(root / "params.yaml", lambda tmp: tmp.write_text(params))
        finished = study_cells.done(root, study, chosen)
        todo = [cell for cell in chosen if cell.name not in finished]
        print(f"{study.name}: {len(finished)} of {len(chosen)} cells already done with these "
              f"inputs, {len(todo)} to run on {address}", file=sys.stderr)  # fmt: skip
        journal = Journal(root, study.name)
        for name in finished:
            journal.update(name, state="done")
        failed = {}
        if todo:
            inputs = sorted({path for cell in todo for path in study_cells.inputs(cell)})
            study_cells.dvc(root, "push", *_remote(remote), *inputs,
                            what="pushing the cells' input data")  # fmt: skip
            jobs = [_job(root, study, cell, commit, remote, profile) for cell in todo]
            failed = _run_jobs(ray, root, jobs, wanted, address, journal)
    finally:
        ray.shutdown()
    _finish(root, study, [c for c in chosen if c.name not in failed], remote, failed)
    return {
        "done": [c.name for c in todo if c.name not in failed],
        "skipped": sorted(finished),
        "failed": failed,
    }


def _remote(remote: str | None) -> list[str]:
    return ["-r", remote] if remote else []


def _profile(params: str, nodes: list[dict[str, Any]]) -> str:
    """The profile the cells' stages will pick on the nodes: ``auto`` is the paper's on a
    cluster with GPUs (the stage resolves it so on a GPU node), else the quick one."""
    has_gpu = any(n["Resources"].get("GPU", 0) for n in nodes)
    return resolve_profile(yaml.safe_load(params).get("profile", "auto"), has_gpu)


def _job(root: Path, study: Study, cell: Cell, commit: str, remote: str | None,
         profile: str) -> CellJob:  # fmt: skip
    from ran.studies.cell import cell_tags

    stage = study_cells.stage_name(study, cell)
    return CellJob(
        study=study.name,
        cell=cell.name,
        stage=stage,
        output=study_cells.output(study, cell),
        inputs=tuple(study_cells.inputs(cell)),
        key=cell_key(root, commit, stage),
        commit=commit,
        remote=remote,
        tags=cell_tags(study, cell, profile),
    )


def _run_jobs(ray: Any, root: Path, jobs: list[CellJob], wanted: dict[str, float],
              address: str, journal: Journal) -> dict[str, str]:  # fmt: skip
    """Submit every job; write each one's lock entry as it ends. Returns the failures."""
    task = ray.remote(run_cell).options(max_retries=RETRIES, retry_exceptions=False, **wanted)
    pending = {}
    for job in jobs:
        pending[task.remote(job)] = job
        journal.update(job.cell, state="submitted", key=job.key, address=address,
                       commit=job.commit, error=None, attempt=None)  # fmt: skip
    failed: dict[str, str] = {}
    with progress_bar("{task.fields[note]}") as bar:
        progress = bar.add_task("cells", total=len(pending), note="")
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as exc:
                failed[job.cell] = _one_line(exc)
                journal.update(job.cell, state="failed", error=failed[job.cell])
                note = f"{job.cell} failed: {failed[job.cell]}"
            else:
                study_cells.merge_lock(root, {result["stage"]: result["lock"]})
                journal.update(job.cell, state="done", node=result["node"],
                               attempt=result["attempt"], resumed=result["resumed"])  # fmt: skip
                note = f"{job.cell} done (attempt {result['attempt']})"
            bar.update(progress, advance=1, note=note)
            print(note, file=sys.stderr, flush=True)
    return failed


def _finish(root: Path, study: Study, ran: list[Cell], remote: str | None,
            failed: dict[str, str]) -> None:  # fmt: skip
    """Pull the cells' outputs; run the report once the whole study is done."""
    if ran:
        targets = [study_cells.target(study, cell) for cell in ran]
        study_cells.dvc(root, "pull", *_remote(remote), *targets,
                        what="pulling the cells' outputs")  # fmt: skip
    if failed:
        return
    left = len(study.cells) - len(study_cells.done(root, study, study.cells))
    if left:
        print(f"the {study.name} report waits for its {left} other cells (`ran-cli report "
              f"{study.name}` shows what is there)", file=sys.stderr)  # fmt: skip
    else:
        study_cells.dvc(root, "repro", f"{study_cells.STUDIES_DVC}:{study.name}",
                        what=f"the {study.name} report")  # fmt: skip


# -- status -----------------------------------------------------------------------------


def study_status(root: Path, study: Study, experiment: str) -> list[dict[str, Any]]:
    """Each cell of ``study``: done (DVC has it with these inputs), failed (its Ray task's
    error, from the journal), running or retried (its newest MLflow run is RUNNING; the
    attempt from the run's tag), else pending."""
    journal = Journal(root, study.name)
    finished = study_cells.done(root, study, study.cells)
    runs = _cell_runs(study, experiment)
    rows = []
    for cell in study.cells:
        entry, run = journal.cell(cell.name), runs.get(cell.name, {})
        attempt = run.get("attempt") or entry.get("attempt")
        if cell.name in finished:
            state = "done"
        elif entry.get("state") == "failed":
            state = "failed"
        elif run.get("running") and entry.get("state") == "submitted":
            state = "retried" if attempt and attempt > 1 else "running"
        else:
            state = "pending"
        error = entry.get("error") if state == "failed" else None
        rows.append({"cell": cell.name, "state": state, "attempt": attempt,
                     "run": run.get("link"), "error": error})  # fmt: skip
    return rows


def _cell_runs(study: Study, experiment: str) -> dict[str, dict[str, Any]]:
    """Per cell of ``study``, from its MLflow runs: its latest attempt (the runs'
    ``study.attempt`` tag), whether a run of that attempt is RUNNING, and a link to its
    train run (else its newest run)."""
    from mlflow import MlflowClient

    uri = tracking_uri()
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.study = '{study.name}'",
        order_by=["attributes.start_time DESC"],
        max_results=5000,
    )
    cells: dict[str, list[Any]] = {}
    for run in runs:
        if run.data.tags.get("study.cell"):
            cells.setdefault(run.data.tags["study.cell"], []).append(run)
    summary = {}
    for name, found_runs in cells.items():
        attempts = [int(r.data.tags.get("study.attempt", 0)) for r in found_runs]
        latest = max(attempts)
        shown = next((r for r in found_runs if r.data.tags.get("stage") == "train"), found_runs[0])
        summary[name] = {
            "attempt": latest or None,
            "running": any(
                r.info.status == "RUNNING" and a == latest
                for r, a in zip(found_runs, attempts, strict=True)
            ),
            "link": run_link(uri, shown.info.experiment_id, shown.info.run_id),
        }
    return summary
