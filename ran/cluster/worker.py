"""What a Ray task runs on a node: one study cell, as its own ``dvc repro``.

The task's folder is Ray's copy of the driver's code (its commit, its ``params.yaml`` and
lock files). The cell runs in a private copy of that folder, so cells on one node never
share a DVC workspace:

1. pull the cell's input data (the ingest output, the prior) from the DVC remote;
2. fetch the last checkpoint of each of the cell's seeds from the remote's storage, if an
   earlier attempt left them, and mirror every new checkpoint there while the stage runs (a
   node that dies loses nothing of a seed in training but the steps since its last
   checkpoint);
3. ``dvc repro --single-item`` the cell's stage: the same stage, command and code as the
   local path, so the same seed gives the same weights;
4. push the outputs and hand the stage's ``dvc.lock`` entry back to the driver.

Each attempt is recorded in the remote's storage beside the checkpoint (which node, when),
and tags every MLflow run of the cell (``study.attempt``), so ``study status`` can tell a
retried cell. Nothing here imports torch: the stage's own process does.
"""

from __future__ import annotations

import json
import posixpath
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ran import paths
from ran.cluster.cells import STUDIES_DVC, dvc, lock_entry

CHECKPOINT = "train/checkpoint-last.pt"  # inside each seed's folder of the cell's output
POLL_S = 0.5  # how often the mirror looks for a new checkpoint


@dataclass(frozen=True)
class CellJob:
    """Everything a node needs to run one cell (plain data: Ray pickles it)."""

    study: str
    cell: str
    stage: str  # its stage in studies/dvc.yaml
    output: str  # its output folder, data/studies/STUDY/CELL
    inputs: tuple[str, ...]  # the data folders it reads
    key: str  # a hash of its inputs: where its checkpoints live
    commit: str
    remote: str | None = None  # DVC remote name (None: the default)
    tags: dict[str, str] = field(default_factory=dict)


def checkpoints(output: Path) -> list[Path]:
    """The checkpoints of a cell's seeds in its output folder ``output``."""
    return sorted(output.glob(f"{paths.SEED_FOLDERS}/{CHECKPOINT}"))


class CheckpointStore:
    """A cell's checkpoints, one per seed, and attempt records in the DVC remote's storage
    (``<remote>/checkpoints/<key>/``, a seed's checkpoint at ``seed-<k>/train/...`` as in
    the cell's output), through the remote's own filesystem and credentials (S3, a shared
    folder, anything DVC reaches)."""

    def __init__(self, fs: Any, base: str) -> None:
        self.fs, self.base = fs, base

    @classmethod
    def of(cls, repo: Path, remote: str | None, key: str) -> CheckpointStore:
        from dvc.repo import Repo

        with Repo(str(repo)) as dvc_repo:
            found = dvc_repo.cloud.get_remote(remote, "study run")
        fs = found.fs.fs  # the fsspec filesystem under DVC's wrapper
        base = posixpath.join(found.path, "checkpoints", key)
        fs.makedirs(posixpath.join(base, "attempts"), exist_ok=True)
        return cls(fs, base)

    def begin(self, node: str) -> int:
        """Record a new attempt; returns its number (1 for the first)."""
        folder = posixpath.join(self.base, "attempts")
        number = len(self.fs.ls(folder, detail=False)) + 1 if self.fs.exists(folder) else 1
        record = {"attempt": number, "node": node, "started": time.time()}
        self.fs.pipe_file(posixpath.join(folder, f"{number}.json"), json.dumps(record).encode())
        return number

    def stored(self) -> dict[str, str]:
        """The stored checkpoints: each one's path in a cell's output → its path here."""
        found = self.fs.glob(posixpath.join(self.base, paths.SEED_FOLDERS, CHECKPOINT))
        # the last three parts (seed-<k>/train/checkpoint-last.pt), however fs spells the base
        return {"/".join(path.split("/")[-3:]): path for path in found}

    def restore(self, output: Path) -> bool:
        """Copy every stored checkpoint into the cell's output folder ``output``; False
        when there is none."""
        stored = self.stored()
        for name, path in stored.items():
            target = output / name
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(f".{target.name}.part")
            self.fs.get_file(path, str(part))
            part.replace(target)
        return bool(stored)

    def upload(self, output: Path, path: Path, scratch: Path) -> None:
        """Store a snapshot of checkpoint ``path`` of the cell's output ``output`` (copied
        first: the trainer may replace it meanwhile), whole or not at all (written beside,
        then moved)."""
        snapshot = scratch / "checkpoint.upload"
        shutil.copyfile(path, snapshot)
        stored = posixpath.join(self.base, path.relative_to(output).as_posix())
        self.fs.makedirs(posixpath.dirname(stored), exist_ok=True)
        self.fs.put_file(str(snapshot), f"{stored}.part")
        self.fs.mv(f"{stored}.part", stored)

    @contextmanager
    def mirror(self, output: Path, scratch: Path) -> Iterator[None]:
        """While the block runs, store every new version of each seed's checkpoint in the
        cell's output folder ``output``."""
        stop = threading.Event()

        def versions() -> dict[Path, int]:
            found = {}
            for path in checkpoints(output):
                try:
                    found[path] = path.stat().st_mtime_ns
                except FileNotFoundError:  # replaced meanwhile: seen at the next look
                    continue
            return found

        stored = versions()  # before the block starts: those are stored already

        def watch() -> None:
            while not stop.wait(POLL_S):
                for path, version in versions().items():
                    if stored.get(path) != version:
                        self.upload(output, path, scratch)
                        stored[path] = version

        thread = threading.Thread(target=watch, name="checkpoint-mirror", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def clear(self) -> None:
        """The cell is done and pushed: its checkpoints are no longer needed."""
        for path in self.stored().values():
            self.fs.rm(path)


def run_cell(job: CellJob) -> dict[str, Any]:
    """The Ray task: run ``job``'s cell on this node; returns its lock entry and attempt."""
    import os

    import ray

    node = ray.get_runtime_context().get_node_id()
    remote = ["-r", job.remote] if job.remote else []
    with tempfile.TemporaryDirectory(prefix="ran-cell-") as tmp:
        scratch, work = Path(tmp), Path(tmp) / "repo"
        shutil.copytree(Path.cwd(), work, symlinks=True)
        dvc(work, "config", "--local", "core.no_scm", "true", what="preparing the cell")
        store = CheckpointStore.of(work, job.remote, job.key)
        attempt = store.begin(node)
        tags = {**job.tags, "study.attempt": str(attempt), "ray.node_id": node}
        env = {**os.environ, "RAN_RUN_TAGS": json.dumps(tags), "RAN_GIT_COMMIT": job.commit}
        dvc(work, "pull", *remote, *job.inputs, what=f"pulling {', '.join(job.inputs)}")
        output = work / job.output
        resumed = store.restore(output)
        stage = f"{STUDIES_DVC}:{job.stage}"
        with store.mirror(output, scratch):
            dvc(work, "repro", "--single-item", stage, what=f"cell {job.cell}", env=env)
        dvc(work, "push", *remote, stage, what=f"pushing cell {job.cell}")
        entry = lock_entry(work, job.stage)
        store.clear()
    return {
        "cell": job.cell,
        "stage": job.stage,
        "lock": entry,
        "attempt": attempt,
        "resumed": resumed,
        "node": node,
    }


def probe(expected: dict[str, str]) -> str | None:
    """On one node: None when it can run cells, else why not (one line). ``expected``: the
    driver's versions of the packages whose version changes the numbers."""
    import importlib
    import platform
    from importlib.metadata import version

    python = ".".join(platform.python_version_tuple()[:2])
    if python != expected["python"]:
        return f"Python {python}, not {expected['python']}"
    for module in ("torch", "torchvision", "ffcv", "mlflow", "dvc", "timm"):
        try:
            importlib.import_module(module)
        except Exception as exc:
            return f"cannot import {module} ({type(exc).__name__}: {exc})"
        if module in expected and version(module) != expected[module]:
            return f"{module} {version(module)}, not {expected[module]} as on the driver"
    return None
