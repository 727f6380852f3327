"""Crash hygiene for stage outputs: one run per output folder, no leftovers from killed runs.

A stage claims its output with :func:`claim_output` before it writes anything:

- The claim is an exclusive ``flock`` on ``.<name>.lock`` beside the output. The kernel
  drops it when the holder dies, even by ``kill -9``, so a stale lock cannot block anyone;
  a second run into the same output while the first is alive is a one-line error naming
  the holder's pid. Processes the holder forks (decoding workers, FFCV's writer, data
  loader workers) close their copy of the lock at once, so an orphan left behind by a
  killed holder does not keep the output locked.
- While it runs, the lock file records the holder's pid and MLflow run id. A run that
  finishes (or fails with an exception) removes the file; one that is killed leaves it,
  and the next run reads the killed run's id there (:attr:`OutputClaim.previous_run_id`)
  to end that MLflow run as KILLED (:func:`ran.tracking.end_killed_run`).
- Once the lock is held, the temporary siblings a killed run of the same output left
  (ingest's ``.<name>.tmp-*``, ``.<name>.old-*``, ``.<name>.failed-*``) and the hidden
  ``.*.tmp-*`` files of :func:`atomic_write` inside the output are removed.

Lock files are removed race-free: an acquirer that locked a file which its previous
holder has just unlinked sees that the path no longer names that file and tries again.
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ran.errors import RanError

LEFTOVER_KINDS = ("tmp", "old", "failed")  # temporary_sibling, publish_dir
INSIDE_TMP = ".*.tmp-*"  # atomic_write's temporaries inside an output
HOLDER_WAIT_S = 2.0  # how long to wait for a fresh holder to write its pid

log = logging.getLogger(__name__)

_HELD_FDS: set[int] = set()  # lock files held by this process


def _drop_inherited_locks() -> None:
    """In a forked child: close the inherited lock descriptors (the parent keeps its own).

    A flock belongs to the open file, which a fork shares: without this, an orphaned worker
    of a killed holder would hold the lock for as long as it lives.
    """
    for fd in _HELD_FDS:
        with suppress(OSError):
            os.close(fd)
    _HELD_FDS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


def lock_path(out: Path) -> Path:
    """The lock file of output ``out``: a hidden sibling, ``.<name>.lock``."""
    return out.parent / f".{out.name}.lock"


@dataclass
class OutputClaim:
    """An output held by this process (see :func:`claim_output`)."""

    out: Path
    previous_run_id: str | None = None  # MLflow run id the killed previous holder recorded
    removed: list[Path] = field(default_factory=list)  # leftovers removed
    _fd: int = field(default=-1, repr=False)

    def record_run(self, run_id: str) -> None:
        """Record our MLflow run id in the lock file, so that a later run can end it as
        KILLED if this process is killed."""
        _write_record(self._fd, {"pid": os.getpid(), "run_id": run_id})


def _read_record(fd: int) -> dict[str, Any]:
    """The JSON record of a lock file; ``{}`` when empty or being written."""
    data = os.pread(fd, 1 << 16, 0)
    try:
        value, _ = json.JSONDecoder().raw_decode(data.decode())
    except (UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _write_record(fd: int, record: dict[str, Any]) -> None:
    """Replace the record in place (one small write; the locked file itself must stay)."""
    data = (json.dumps(record) + "\n").encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
    os.fsync(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kernel_holders(fd: int) -> list[int]:
    """Pids holding a flock on ``fd``'s file, from ``/proc/locks`` (Linux), else ``[]``."""
    inode = os.fstat(fd).st_ino
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    pids = []
    for line in lines:
        parts = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"; waiters have "->" after "1:"
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(inode):
            pids.append(int(parts[4]))
    return pids


def _holder_pid(fd: int) -> int | None:
    """The pid of the live process holding the lock on ``fd``'s file, if it can be told."""
    holders = {pid for pid in _kernel_holders(fd) if pid > 0}
    if len(holders) == 1:
        return holders.pop()
    pid = _read_record(fd).get("pid")
    if isinstance(pid, int) and _alive(pid):
        return pid
    return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _acquire(out: Path) -> int:
    """An fd of the lock file of ``out``, exclusively flocked; RanError if a live run has it."""
    lock = lock_path(out)
    deadline = time.monotonic() + HOLDER_WAIT_S
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder_pid(fd)
            os.close(fd)
            if pid is None and time.monotonic() < deadline:
                time.sleep(0.05)  # a holder that has only just started: its pid comes next
                continue
            if pid is None:
                raise RanError(
                    f"{out} is in use by another run (lock {lock}); wait for it or stop it"
                ) from None
            raise RanError(
                f"{out} is in use by another run (pid {pid}); wait for it or stop it (kill {pid})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, lock):
            return fd
        os.close(fd)  # its holder removed it while we waited for the lock: take the new one


def _remove(path: Path) -> bool:
    """Remove a file or folder tree; True when it is gone."""
    for attempt in range(2):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if not os.path.lexists(path):
            return True
        time.sleep(0.1 * (attempt + 1))  # e.g. an orphaned worker still writing into it
    return False


def leftovers(out: Path) -> list[Path]:
    """What killed runs of ``out`` may have left: temporary siblings and, inside ``out``,
    hidden ``.*.tmp-*`` files (and folders), sorted."""
    found: list[Path] = []
    prefixes = tuple(f".{out.name}.{kind}-" for kind in LEFTOVER_KINDS)
    if out.parent.is_dir():
        found += [p for p in out.parent.iterdir() if p.name.startswith(prefixes)]
    if out.is_dir() and not out.is_symlink():
        for folder, dirs, files in os.walk(out):
            for name in files + dirs:
                if fnmatch.fnmatchcase(name, INSIDE_TMP):
                    found.append(Path(folder) / name)
            dirs[:] = [d for d in dirs if not fnmatch.fnmatchcase(d, INSIDE_TMP)]
    return sorted(found)


@contextmanager
def claim_output(out: Path) -> Iterator[OutputClaim]:
    """Hold an exclusive lock on output ``out`` for this process, for the block's duration.

    Raises :class:`RanError` (one line, naming the holder's pid) if another live process
    holds it. Once held: ``previous_run_id`` is the MLflow run id a killed previous holder
    recorded (end it with :func:`ran.tracking.end_killed_run`), and the leftovers of killed
    runs of ``out`` have been removed (``removed``). Until :meth:`OutputClaim.record_run`
    the record keeps the previous run id, so that being killed before recording our own
    does not lose it. On leaving the block, normally or by an exception, the record is
    removed and the lock released.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(out)
    owner = os.getpid()
    _HELD_FDS.add(fd)
    try:
        previous = _read_record(fd).get("run_id")
        previous_run_id = previous if isinstance(previous, str) and previous else None
        _write_record(fd, {"pid": owner, "run_id": previous_run_id})
        claim = OutputClaim(out=out, previous_run_id=previous_run_id, _fd=fd)
        for path in leftovers(out):
            if _remove(path):
                claim.removed.append(path)
        if claim.removed:
            names = ", ".join(p.name for p in claim.removed)
            log.info("removed what a killed run of %s left: %s", out, names)
        yield claim
    finally:
        if os.getpid() == owner:  # not in a child forked inside the block
            _HELD_FDS.discard(fd)
            try:
                if _same_file(fd, lock_path(out)):
                    os.unlink(lock_path(out))  # while still locked: see _acquire
            finally:
                os.close(fd)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` all or nothing: ``write(tmp)`` into the hidden sibling
    ``.<name>.tmp-<pid>``, fsync, then rename it over ``path``.

    On an exception the temporary file is removed; after ``kill -9`` it is left, and the
    next :func:`claim_output` of the folder holding it removes it.
    """
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    with suppress(OSError):  # make the rename itself durable, where the system allows it
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def temporary_sibling(out: Path, kind: str = "tmp") -> Path:
    """A new hidden folder ``.<name>.<kind>-*`` beside ``out`` (same file system, so the
    final rename is atomic; a killed run's is removed by the next :func:`claim_output`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)  # mkdtemp's 0700 would leak into the published folder
    return path


def publish_dir(tmp: Path, out: Path) -> None:
    """Move ``tmp`` to ``out``, replacing what was there, with one rename for the new data."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """A temporary sibling folder to write ``out`` into: published as ``out`` when the
    block ends normally, removed when it raises (nothing partial is ever at ``out``)."""
    tmp = temporary_sibling(out)
    try:
        yield tmp
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_csv(path: Path, rows: list[dict[str, float]], empty: str) -> None:
    """``rows`` (dicts with the same keys) as a CSV at ``path``, all or nothing; with no
    rows, a header of the one column ``empty``."""
    import csv

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [empty])
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)
