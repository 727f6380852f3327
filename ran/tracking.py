"""MLflow: one run per stage execution, with the tags that tie it to git and DVC.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set (a team's ``mlflow server``), else the
embedded default ``sqlite:///mlflow.db`` at the repository root, so the CLI and the DVC
stages write to the same store wherever they are started from.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ran.errors import RanError
from ran.outbox import Outbox, deliver_pending
from ran.outputs import claim_output
from ran.progress import quiet_in_logs

DIGEST_CHARS = 36  # MLflow stores dataset digests in a 36-character column


def repo_root() -> Path:
    """DVC's root inside a stage, else the enclosing git work tree, else the current folder."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"])
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], capture_output=True, text=True, check=True
        )
        return Path(out.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return Path.cwd()


def tracking_uri() -> str:
    """The store's URI; a local SQLite store is created first (:func:`_create_sqlite_store`).
    Outside a terminal, MLflow's per-file artifact bars are turned off (:func:`quiet_in_logs`)."""
    quiet_in_logs()
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        _create_sqlite_store(uri)
    return uri


@functools.cache
def _create_sqlite_store(uri: str) -> None:
    """Create or upgrade the SQLite store's tables now, under a lock file beside it.

    MLflow builds a new database's tables on first use, and two processes doing that at once
    both fail ("duplicate column name: step"): two DVC stages, or a training and the UI,
    started together on a fresh store. Once per URI and process.
    """
    from filelock import FileLock
    from mlflow import MlflowClient

    _quiet_mlflow()
    database = Path(uri.removeprefix("sqlite:///"))
    with FileLock(database.with_name(f"{database.name}.lock")):
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # the tracking tables
        client.search_registered_models(max_results=1)  # the model registry's


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_commit(root: Path) -> str | None:
    """The commit of ``root``; for code shipped without its history (a study cell on a
    cluster node, :mod:`ran.cluster.worker`), the one ``RAN_GIT_COMMIT`` names."""
    return _git(root, "rev-parse", "HEAD") or os.environ.get("RAN_GIT_COMMIT") or None


def _env_tags() -> dict[str, str]:
    """Tags a caller hands every run of a process tree it starts (``RAN_RUN_TAGS``, a JSON
    object): a cluster cell's attempt and node."""
    return json.loads(os.environ.get("RAN_RUN_TAGS") or "{}")


def _git_dirty(root: Path) -> str | None:
    """``true`` when tracked files differ from the commit (the run's code is not the
    commit's); DVC's outputs are ignored by git and do not count."""
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return None if status is None else str(bool(status)).lower()


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested parameters as MLflow's flat ``a.b`` keys."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _quiet_mlflow() -> None:
    chatty_loggers = ("mlflow.store.db.utils", "mlflow.tracking.fluent", "alembic")
    for chatty in (*chatty_loggers, "mlflow.system_metrics"):
        logging.getLogger(chatty).setLevel(logging.WARNING)  # keep stderr for real problems


HTTP_DEFAULTS = {  # MLflow's own retry and timeout settings, for a server that is away
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",  # MLflow: 7, about four minutes of backoff
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",  # MLflow: 120 s
}


@dataclass
class _Active:
    """The run a stage is logging to, and the outbox its calls go through."""

    run: Any
    outbox: Outbox
    tags: dict[str, str]


_active: _Active | None = None


def _current() -> _Active:
    if _active is None:
        raise RuntimeError("no tracked stage is running (ran.tracking.tracked_stage)")
    return _active


def active_run_id() -> str:
    return _current().run.info.run_id


@contextmanager
def tracked_stage(
    stage: str,
    experiment: str,
    params: Mapping[str, Any],
    out: Path,
    *,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
    system_metrics: bool = False,
) -> Iterator[Any]:
    """The one way a stage runs: it holds its output folder ``out`` and one MLflow run.

    - The output is claimed first (:func:`ran.outputs.claim_output`): a second run into it
      is refused with one line, and what a killed run left there is removed.
    - A tracking server is asked first whether it answers and takes the login
      (:func:`check_store`), so a missing or wrong password stops the stage before any
      work; what earlier stages could not send it is sent now (:func:`deliver_pending`).
    - The run of a process killed while holding ``out`` is ended as KILLED, unless it is
      the run this one continues (``run_id``: ``train --resume``).
    - The run is named after the stage and tagged with the git commit, whether the tree is
      dirty, the DVC stage and experiment, and ``tags``; its params are ``params``
      flattened (a continued run keeps those it was started with: MLflow refuses changed
      values).
    - Everything logged inside the block (:func:`log_metrics`, :func:`log_artifact`...)
      goes through an :class:`~ran.outbox.Outbox`: the stage never waits on the server,
      and what the server does not take before the stage ends stays on disk, with one
      warning, to be sent later. The run ends FINISHED, or FAILED on an exception.
    """
    import mlflow

    global _active
    with claim_output(out) as claim:
        uri = tracking_uri()
        check_store(uri)
        if claim.previous_run_id != run_id:
            end_killed_run(claim.previous_run_id)
        deliver_pending(uri)
        _quiet_mlflow()
        mlflow.set_tracking_uri(uri)
        root = repo_root()
        run_tags = {
            "stage": stage,
            "git_commit": _git_commit(root),
            "git_dirty": _git_dirty(root),
            "dvc.stage": os.environ.get("DVC_STAGE"),
            "dvc.exp_name": os.environ.get("DVC_EXP_NAME"),
            **_env_tags(),
            **(tags or {}),
        }
        run_tags = {k: v for k, v in run_tags.items() if v}
        with refused_writes(uri):
            run = _open_run(uri, experiment, stage, run_id, run_tags)
            claim.record_run(run.info.run_id)
            if run_id is None:
                _log_params(uri, run.info.run_id, flatten(params))
        outbox = Outbox(uri, run.info.run_id).start()
        _active = _Active(run, outbox, {**run.data.tags, **run_tags})
        monitor = _system_metrics(run.info.run_id, outbox) if system_metrics else None
        status = "FAILED"
        try:
            yield run
            status = "FINISHED"
        finally:
            if monitor is not None:
                monitor.finish()
            _active = None
            outbox.end(status)
            pending = outbox.close()
            if pending:
                print(
                    f"warning: MLflow store {uri} did not take everything "
                    f"({outbox.last_error}): {pending} of run {run.info.run_id} wait in "
                    f"{outbox.folder}; the next stage or `ran-cli sync` sends them",
                    file=sys.stderr,
                )


def _open_run(
    uri: str, experiment: str, stage: str, run_id: str | None, tags: dict[str, str]
) -> Any:
    """A new run named ``stage`` in ``experiment`` (made if new), or run ``run_id``
    continued (one-line error if the store does not have it)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.tracking.context.registry import resolve_tags

    client = MlflowClient(uri)
    if run_id is None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            try:
                client.create_experiment(experiment)
            except MlflowException as exc:  # made meanwhile by a stage started with this one
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            found = client.get_experiment_by_name(experiment)
        if EXPERIMENT_KIND not in found.tags:
            _mark_model_training(client, found.experiment_id)
        return client.create_run(found.experiment_id, run_name=stage, tags=resolve_tags(tags))
    try:
        client.update_run(run_id, status="RUNNING")
    except MlflowException as exc:
        if exc.error_code == "PERMISSION_DENIED":
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RanError(
            f"cannot continue MLflow run {run_id} in {uri}: {first} (set "
            "MLFLOW_TRACKING_URI to the store and mlflow.experiment to the experiment it "
            "was started in)"
        ) from None
    client.log_batch(run_id, tags=[_tag(k, v) for k, v in tags.items()])
    return client.get_run(run_id)


def _tag(key: str, value: str) -> Any:
    from mlflow.entities import RunTag

    return RunTag(key, str(value))


def _log_params(uri: str, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow import MlflowClient
    from mlflow.entities import Param

    rows = [Param(k, str(v)) for k, v in params.items()]
    for start in range(0, len(rows), 100):  # MLflow's limit per log_batch
        MlflowClient(uri).log_batch(run_id, params=rows[start : start + 100])


def _system_metrics(run_id: str, outbox: Outbox) -> Any:
    """MLflow's system metrics (CPU, memory, disk, network, GPU) sampled for the run and
    sent through ``outbox``: MLflow's own monitor asks the server about the run at every
    sample and stops for good the first time it does not answer."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class Monitor(SystemMetricsMonitor):
        def monitor(self) -> None:
            while not self._shutdown_event.is_set():
                for _ in range(self.samples_before_logging):
                    self.collect_metrics()
                    if self._shutdown_event.wait(self.sampling_interval):
                        break
                metrics = self.aggregate_metrics()
                if metrics:
                    self.publish_metrics(metrics)

    class ToOutbox:
        total_training_time = total_log_batch_time = 0.0
        data: tuple = ()

        def record_metrics(self, metrics: Mapping[str, float], step: int) -> None:
            outbox.metrics(metrics, step)

        def flush(self) -> None: ...

    monitor = Monitor(run_id, resume_logging=True)
    monitor.mlflow_logger = ToOutbox()
    monitor.start()
    return monitor


NOTE = "mlflow.note.content"  # the run's description in the MLflow UI
EXPERIMENT_KIND = "mlflow.experimentKind"  # which view the MLflow UI opens an experiment in


def _mark_model_training(client: Any, experiment_id: str) -> None:
    """Tag a new experiment as model training, so that MLflow 3's UI opens it on its runs
    rather than its GenAI view (an experiment someone tagged otherwise is left as it is)."""
    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, "custom_model_development")


def runs_page(base_url: str, experiment: str) -> str:
    """The MLflow UI's page of ``experiment``'s runs, in its model-training view (MLflow 3
    opens in its GenAI view, where a new user sees no runs), or ``base_url`` when the store
    has no such experiment yet."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    _quiet_mlflow()
    try:
        found = MlflowClient(tracking_uri()).get_experiment_by_name(experiment)
    except MlflowException:
        found = None
    if found is None:
        return base_url
    return f"{base_url}/#/experiments/{found.experiment_id}/runs?workflowType=machine_learning"


def describe(text: str) -> None:
    """Set the active run's description (MLflow's run note): what the stage did, with what,
    and its headline result; a study cell's run also names the study, the cell, the
    profile and the seed (from its tags)."""
    tags = _current().tags
    if "study" in tags and "study.cell" in tags:
        seed = f", seed {tags['study.seed']}" if "study.seed" in tags else ""
        text += (
            f"\n\nStudy `{tags['study']}`, cell `{tags['study.cell']}` "
            f"({tags.get('study.profile', '?')} profile{seed})."
        )
    set_tags({NOTE: text})


def log_metrics(values: Mapping[str, float], step: int = 0) -> None:
    """Log ``values`` at ``step`` to the active run (through its outbox: never waits)."""
    _current().outbox.metrics(values, step)


def set_tags(tags: Mapping[str, str]) -> None:
    _current().outbox.tags(tags)


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    """Log a file (or a folder, under its own name) as it is now to the active run."""
    _current().outbox.artifact(path, artifact_path)


def log_later(target: str, what: str, files: Mapping[str, Path], **kwargs: Any) -> None:
    """Queue ``module:function(uri, run_id, **files, **kwargs)`` behind what the run
    logged so far (:meth:`ran.outbox.Outbox.call`): how the model is logged."""
    _current().outbox.call(target, what, files, **kwargs)


def log_outputs(out: Path, names: Iterable[str]) -> None:
    """Log the files ``names`` of ``out`` that exist as artifacts of the active run, and
    folders among them as artifact folders of the same name."""
    for name in names:
        path = out / name
        if path.exists():
            log_artifact(path)


def end_killed_run(run_id: str | None) -> None:
    """End run ``run_id`` as KILLED if it is still RUNNING (its process was killed).

    :func:`tracked_stage` calls it with :attr:`ran.outputs.OutputClaim.previous_run_id`; an
    unknown run (a different tracking store, a deleted run) is left alone.
    """
    if not run_id:
        return
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    _quiet_mlflow()
    client = MlflowClient(tracking_uri())
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return
    if run.info.status == "RUNNING":
        client.set_terminated(run_id, "KILLED")


def log_file_dataset(path: Path, name: str, digest: str, context: str) -> None:
    """Record ``path`` as the active run's dataset input (digest: the file's own hash);
    at the start of a stage, directly (a dataset input is not retried later)."""
    from mlflow import MlflowClient
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local file
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(path.resolve().as_uri())
    dataset = MetaDataset(source=source, name=name, digest=digest[:DIGEST_CHARS])
    entity = DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])
    MlflowClient(tracking_uri()).log_inputs(active_run_id(), datasets=[entity])


def http_settings() -> None:
    """MLflow's HTTP retry and timeout settings, shortened where the user set none: the
    outbox retries for as long as it takes, so each request need not."""
    for key, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def check_store(uri: str | None = None) -> None:
    """A tracking server answers and takes this login, else one line naming the server and
    what is missing; nothing to check for a local store."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    http_settings()
    creds = get_default_host_creds(uri)
    try:
        response = http_request(
            creds,
            "/api/2.0/mlflow/experiments/search",
            "POST",
            max_retries=0,
            timeout=10,
            json={"max_results": 1},
        )
    except Exception as exc:
        raise RanError(
            f"MLflow server {uri} does not answer ({_first_line(exc)}): start it (`ran-cli "
            "stack up` for the team stack on this machine) or unset MLFLOW_TRACKING_URI for "
            "the local store"
        ) from None
    if response.status_code == 401:
        if not creds.username:
            raise RanError(
                f"MLflow server {uri} asks for a login: set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or write them to ~/.mlflow/credentials)"
            )
        raise RanError(
            f"MLflow server {uri} refused the login of user {creds.username!r}: check "
            "MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials)"
        )
    if response.status_code != 200:
        raise RanError(
            f"MLflow server {uri} answered {response.status_code} to a search: is it an MLflow "
            "tracking server, and its database up?"
        )


@contextmanager
def refused_writes(uri: str) -> Iterator[None]:
    """A write the server refuses for this login (READ permission) as one line."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import read_mlflow_creds

    try:
        yield
    except MlflowException as exc:
        if exc.error_code != "PERMISSION_DENIED":
            raise
        user = read_mlflow_creds().username
        raise RanError(
            f"MLflow server {uri} refused a write for user {user!r}: {_first_line(exc)} (ask "
            "the server's admin for EDIT permission on the experiment, or log to your own "
            "with -S mlflow.experiment=NAME)"
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
