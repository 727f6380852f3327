"""MLflow: one run per stage execution, with the tags that tie it to git and DVC.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set (a team's ``mlflow server``), else the
embedded default ``sqlite:///mlflow.db`` at the repository root, so the CLI and the DVC
stages write to the same store wherever they are started from.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def _git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() or None


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


@contextmanager
def stage_run(stage: str, experiment: str, params: Mapping[str, Any]) -> Iterator[Any]:
    """A run named after the stage, tagged with git commit and DVC stage/experiment.

    An exception inside the block ends the run as FAILED (MLflow's own behaviour).
    """
    import mlflow

    for chatty in ("mlflow.store.db.utils", "mlflow.tracking.fluent", "alembic"):
        logging.getLogger(chatty).setLevel(logging.WARNING)  # keep stderr for real problems
    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(experiment)
    root = repo_root()
    tags = {
        "stage": stage,
        "git_commit": _git_commit(root),
        "dvc.stage": os.environ.get("DVC_STAGE"),
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME"),
    }
    with mlflow.start_run(run_name=stage, tags={k: v for k, v in tags.items() if v}) as run:
        mlflow.log_params(flatten(params))
        yield run


def log_file_dataset(path: Path, name: str, digest: str, context: str) -> None:
    """Record ``path`` as the run's dataset input (digest: the file's own hash)."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    source = resolve_dataset_source(path.resolve().as_uri())
    dataset = MetaDataset(source=source, name=name, digest=digest[:DIGEST_CHARS])
    mlflow.log_input(dataset, context=context)
