"""MLflow: one run per stage execution, with the tags that tie it to git and DVC.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set (a team's ``mlflow server``), else the
embedded default ``sqlite:///mlflow.db`` at the repository root, so the CLI and the DVC
stages write to the same store wherever they are started from.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ran.errors import RanError
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
    return _git(root, "rev-parse", "HEAD") or None


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


@contextmanager
def tracked_stage(
    stage: str,
    experiment: str,
    params: Mapping[str, Any],
    out: Path,
    *,
    run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> Iterator[Any]:
    """The one way a stage runs: it holds its output folder ``out`` and one MLflow run.

    - The output is claimed first (:func:`ran.outputs.claim_output`): a second run into it
      is refused with one line, and what a killed run left there is removed.
    - The run of a process killed while holding ``out`` is ended as KILLED, unless it is
      the run this one continues (``run_id``: ``train --resume``).
    - The run is named after the stage and tagged with the git commit, whether the tree is
      dirty, the DVC stage and experiment, and ``tags``; its params are ``params``
      flattened (a continued run keeps those it was started with: MLflow refuses changed
      values). An exception inside the block ends it as FAILED (MLflow's own behaviour).
    """
    import mlflow

    with claim_output(out) as claim:
        if claim.previous_run_id != run_id:
            end_killed_run(claim.previous_run_id)
        _quiet_mlflow()
        mlflow.set_tracking_uri(tracking_uri())
        _mark_model_training(mlflow.set_experiment(experiment))
        root = repo_root()
        run_tags = {
            "stage": stage,
            "git_commit": _git_commit(root),
            "git_dirty": _git_dirty(root),
            "dvc.stage": os.environ.get("DVC_STAGE"),
            "dvc.exp_name": os.environ.get("DVC_EXP_NAME"),
            **(tags or {}),
        }
        run_tags = {k: v for k, v in run_tags.items() if v}
        with _start_run(stage, run_id, run_tags) as run:
            claim.record_run(run.info.run_id)
            if run_id is None:
                mlflow.log_params(flatten(params))
            yield run


NOTE = "mlflow.note.content"  # the run's description in the MLflow UI
EXPERIMENT_KIND = "mlflow.experimentKind"  # which view the MLflow UI opens an experiment in


def _mark_model_training(experiment: Any) -> None:
    """Tag a new experiment as model training, so that MLflow 3's UI opens it on its runs
    rather than its GenAI view (an experiment someone tagged otherwise is left as it is)."""
    from mlflow import MlflowClient

    if EXPERIMENT_KIND not in experiment.tags:
        MlflowClient(tracking_uri()).set_experiment_tag(
            experiment.experiment_id, EXPERIMENT_KIND, "custom_model_development"
        )


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
    and its headline result; a study cell's run also names the study, the cell and the
    profile (from its tags)."""
    import mlflow

    tags = mlflow.active_run().data.tags
    if "study" in tags and "study.cell" in tags:
        text += (
            f"\n\nStudy `{tags['study']}`, cell `{tags['study.cell']}` "
            f"({tags.get('study.profile', '?')} profile)."
        )
    mlflow.set_tag(NOTE, text)


def _start_run(stage: str, run_id: str | None, tags: dict[str, str]) -> Any:
    """A new run named ``stage``, or run ``run_id`` continued (one-line error if the store
    does not have it)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if run_id is None:
        return mlflow.start_run(run_name=stage, tags=tags)
    try:
        return mlflow.start_run(run_id=run_id, tags=tags)
    except MlflowException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RanError(
            f"cannot continue MLflow run {run_id} in {tracking_uri()}: {first} (set "
            "MLFLOW_TRACKING_URI to the store and mlflow.experiment to the experiment it "
            "was started in)"
        ) from None


def log_outputs(out: Path, names: Iterable[str]) -> None:
    """Log the files ``names`` of ``out`` that exist as artifacts of the active run, and
    folders among them as artifact folders of the same name."""
    import mlflow

    for name in names:
        path = out / name
        if path.is_dir():
            mlflow.log_artifacts(str(path), name)
        elif path.is_file():
            mlflow.log_artifact(str(path))


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
    """Record ``path`` as the run's dataset input (digest: the file's own hash)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local file
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(path.resolve().as_uri())
    dataset = MetaDataset(source=source, name=name, digest=digest[:DIGEST_CHARS])
    mlflow.log_input(dataset, context=context)
