"""What a run sends to MLflow, kept on disk until the store has it.

MLflow's client logs synchronously: against a tracking server that is down it retries for
minutes, blocking the training loop, then raises and the stage dies. Its asynchronous
logging (``synchronous=False``) keeps the loop going but holds the queue in memory and drops
what fails. A stage's run therefore goes through an :class:`Outbox`:

- every call (metrics, tags, an artifact, the model, the run's end) is appended to a journal
  file first, artifacts copied beside it, so the caller never waits on the network;
- one thread sends the journal in order with MLflow's own client (``log_batch`` for metrics,
  up to 1,000 at a time), retrying while the server is away, and records how far it got;
- what is still unsent when the stage ends stays on disk, under ``$RAN_CACHE/outbox/<run>``,
  and :func:`deliver_pending` sends it later (the next stage, or ``ran-cli sync``).

Nothing is sent twice in effect: a metric keeps the timestamp it was logged with, and the
tracking store ignores a metric identical to one it has (key, value, step, timestamp); an
artifact is written to the same path again; the model step checks the run's models first.
A run's folder is removed once everything, its end included, was sent. One process sends a
given run at a time (an ``flock`` on its folder).
"""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import shutil
import threading
import time
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

from ran.config import cache_dir
from ran.outputs import atomic_write

JOURNAL = "journal.jsonl"
SENT = "sent"  # how many journal records the store has
META = "meta.json"  # the tracking URI and run id
FILES = "files"  # artifacts copied at the time they were logged
MAX_METRICS = 1000  # MLflow's log_batch limit
RETRY_S = (0.5, 1.0, 2.0, 5.0)  # the sender's pauses between tries while the store is away
GRACE_ENV = "RAN_TRACKING_GRACE_S"
DEFAULT_GRACE_S = 30.0  # at the end: how long to keep trying a store that does not answer


def outbox_root() -> Path:
    return cache_dir() / "outbox"


def _describe(records: list[dict[str, Any]]) -> str:
    """``1,204 metric values, 3 artifacts, the model, the run's end``."""
    metrics = sum(len(r["metrics"]) for r in records if r["op"] == "metrics")
    counts = {
        "tags": sum(1 for r in records if r["op"] == "tags"),
        "artifacts": sum(1 for r in records if r["op"] == "artifact"),
    }
    parts = [f"{metrics:,} metric values"] if metrics else []
    parts += [f"{n} {what}" for what, n in counts.items() if n]
    parts += [r["what"] for r in records if r["op"] == "call"]
    parts += ["the run's end"] * any(r["op"] == "end" for r in records)
    return ", ".join(parts)


class Outbox:
    """One run's journal and the thread that sends it (see the module's docstring)."""

    def __init__(self, uri: str, run_id: str, root: Path | None = None) -> None:
        self.uri, self.run_id = uri, run_id
        self.folder = (root or outbox_root()) / run_id
        (self.folder / FILES).mkdir(parents=True, exist_ok=True)
        self._lock = os.open(self.folder, os.O_RDONLY)
        fcntl.flock(self._lock, fcntl.LOCK_EX)  # a replay of this run waits for us
        meta = json.dumps({"uri": uri, "run_id": run_id})
        atomic_write(self.folder / META, lambda tmp: tmp.write_text(meta))
        self.records = _read_journal(self.folder)
        self.sent = _read_sent(self.folder)
        self._journal = open(self.folder / JOURNAL, "a")  # noqa: SIM115 (closed in close)
        self._wake = threading.Condition()
        self._stop = False
        self.failing_since: float | None = None
        self.last_error = ""
        self._thread: threading.Thread | None = None

    # --- what the stage calls ------------------------------------------------------------

    def start(self) -> Outbox:
        self._thread = threading.Thread(target=self._send_loop, name="ran-outbox", daemon=True)
        self._thread.start()
        return self

    def metrics(self, values: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        rows = [[key, float(value), now, int(step)] for key, value in values.items()]
        self._append({"op": "metrics", "metrics": rows})

    def tags(self, tags: Mapping[str, str]) -> None:
        self._append({"op": "tags", "tags": dict(tags)})

    def artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Log a file or a folder, as it is now (copied into the outbox)."""
        copy = self._keep(path)
        self._append({"op": "artifact", "path": str(copy), "artifact_path": artifact_path})

    def call(self, target: str, what: str, files: Mapping[str, Path], **kwargs: Any) -> None:
        """Run ``module:function(uri, run_id, **files, **kwargs)`` in order with the rest
        (logging the model): ``files`` are copied now and passed as paths."""
        copies = {name: str(self._keep(path, name)) for name, path in files.items()}
        self._append(
            {"op": "call", "target": target, "what": what, "files": copies, "kwargs": kwargs}
        )

    def _keep(self, path: Path, slot: str = "") -> Path:
        """A copy of ``path`` under the outbox, by the same name; relative to its files.
        ``slot``: a call's name for the file (a call's files share its record's folder)."""
        folder = self.folder / FILES / f"{len(self.records):06d}" / slot
        folder.mkdir(parents=True)
        if path.is_dir():
            shutil.copytree(path, folder / path.name)
        else:
            shutil.copy2(path, folder / path.name)
        return (folder / path.name).relative_to(self.folder / FILES)

    def end(self, status: str) -> None:
        self._append({"op": "end", "status": status})

    def close(self, grace_s: float | None = None) -> str:
        """Wait until everything is sent, or until the store has not answered for
        ``grace_s`` (default ``$RAN_TRACKING_GRACE_S``, 30 s); stop the thread. Returns what
        is still pending, described ('' when nothing is)."""
        if grace_s is None:
            grace_s = float(os.environ.get(GRACE_ENV, DEFAULT_GRACE_S))
        with self._wake:
            self._wake.notify_all()
            while self.sent < len(self.records):
                failing = self.failing_since
                if failing is not None and time.monotonic() - failing >= grace_s:
                    break
                self._wake.wait(0.1)
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._journal.close()
        pending = _describe(self.records[self.sent :])
        if not pending:
            shutil.rmtree(self.folder, ignore_errors=True)
        os.close(self._lock)
        return pending

    # --- the sender ------------------------------------------------------------------------

    def _append(self, record: dict[str, Any]) -> None:
        with self._wake:
            self._journal.write(json.dumps(record) + "\n")
            self._journal.flush()
            self.records.append(record)
            self._wake.notify_all()

    def _send_loop(self) -> None:
        from mlflow import MlflowClient

        client = MlflowClient(self.uri)
        tries = 0
        while True:
            with self._wake:
                while not self._stop and self.sent >= len(self.records):
                    self._wake.wait()
                if self._stop:
                    return
                start = self.sent
                batch = _next_batch(self.records, start)
            try:
                _apply(client, self.run_id, self.folder, batch)
            except Exception as exc:  # the store is away or refused: keep it, try again
                with self._wake:
                    if self.failing_since is None:
                        self.failing_since = time.monotonic()
                    self.last_error = str(exc).strip().splitlines()[0] if str(exc) else repr(exc)
                    self._wake.notify_all()
                    self._wake.wait(RETRY_S[min(tries, len(RETRY_S) - 1)])
                tries += 1
                continue
            tries = 0
            with self._wake:
                self.sent = start + len(batch)
                self.failing_since = None
                _write_sent(self.folder, self.sent)
                self._wake.notify_all()


def _next_batch(records: list[dict[str, Any]], start: int) -> list[dict[str, Any]]:
    """The next record, or consecutive metrics records up to :data:`MAX_METRICS` values."""
    batch = [records[start]]
    if batch[0]["op"] != "metrics":
        return batch
    count = len(batch[0]["metrics"])
    for record in records[start + 1 :]:
        if record["op"] != "metrics" or count + len(record["metrics"]) > MAX_METRICS:
            break
        batch.append(record)
        count += len(record["metrics"])
    return batch


def _apply(client: Any, run_id: str, folder: Path, batch: list[dict[str, Any]]) -> None:
    from mlflow.entities import Metric, RunTag

    record = batch[0]
    op = record["op"]
    if op == "metrics":
        rows = [row for r in batch for row in r["metrics"]]
        client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in rows])
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in record["tags"].items()])
    elif op == "artifact":
        local = folder / FILES / record["path"]
        if local.is_dir():
            client.log_artifacts(run_id, str(local), record["artifact_path"] or local.name)
        else:
            client.log_artifact(run_id, str(local), record["artifact_path"])
    elif op == "call":
        module, function = record["target"].split(":")
        files = {k: folder / FILES / v for k, v in record["files"].items()}
        getattr(importlib.import_module(module), function)(
            client.tracking_uri, run_id, **files, **record["kwargs"]
        )
    elif op == "end":
        client.set_terminated(run_id, record["status"])


def _read_journal(folder: Path) -> list[dict[str, Any]]:
    path = folder / JOURNAL
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        with suppress(json.JSONDecodeError):  # a line cut short by a kill
            records.append(json.loads(line))
    return records


def _read_sent(folder: Path) -> int:
    with suppress(FileNotFoundError, ValueError):
        return int((folder / SENT).read_text())
    return 0


def _write_sent(folder: Path, count: int) -> None:
    atomic_write(folder / SENT, lambda tmp: tmp.write_text(str(count)))


def pending_runs(uri: str | None = None, root: Path | None = None) -> list[tuple[str, str]]:
    """(uri, run id) of every run with something unsent (for ``uri`` only, when given)."""
    found = []
    for meta in sorted((root or outbox_root()).glob(f"*/{META}")):
        with suppress(OSError, json.JSONDecodeError):
            info = json.loads(meta.read_text())
            if uri is None or info["uri"] == uri:
                found.append((info["uri"], info["run_id"]))
    return found


def deliver_pending(uri: str | None = None, grace_s: float = 5.0) -> dict[str, str]:
    """Send what earlier stages left unsent (to ``uri`` only, when given), skipping runs
    another process is sending now. Returns, per run, what is still pending."""
    left = {}
    for run_uri, run_id in pending_runs(uri):
        folder = outbox_root() / run_id
        try:
            probe = os.open(folder, os.O_RDONLY)
        except FileNotFoundError:
            continue  # sent meanwhile by another process
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its stage is still running and sending
        finally:
            os.close(probe)
        pending = Outbox(run_uri, run_id).start().close(grace_s)
        if pending:
            left[run_id] = pending
    return left
