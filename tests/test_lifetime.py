"""A stage killed with ``kill -9`` leaves no process behind: its forked workers (ingest's
decoders, FFCV's writer, serve's API server, queue manager and inference worker) die with
it (:mod:`ran.lifetime`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import numpy as np
import psutil
import pytest
from conftest import free_port
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
GONE_WITHIN_S = 10

# Forks one child from the main thread and one from a thread that then ends, prints their
# pids, and sleeps until killed.
FORKER = """
import os, threading, time
from ran import lifetime
lifetime.install()
pids = []
def fork():
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    pids.append(pid)
    time.sleep(0.5)  # the child is set up before its thread ends
fork()
thread = threading.Thread(target=fork)
thread.start()
thread.join()
print(*pids, flush=True)
time.sleep(60)
"""


def _running(process: psutil.Process) -> bool:
    """Alive and not a zombie (an exited orphan that init has not reaped yet runs nothing)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(processes: list[psutil.Process]) -> list[str]:
    described = []
    for process in processes:
        with suppress(psutil.Error):
            described.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
    return described


def _kill9_halfway(
    args: list[str],
    ready: Callable[[psutil.Process, list[psutil.Process]], bool],
    log: Path,
    timeout: float = 240,
) -> list[psutil.Process]:
    """Start ``args`` in a session of its own; once ``ready(main, descendants)``, ``kill -9``
    the main process; return the processes it had started that are still running
    ``GONE_WITHIN_S`` seconds later (and kill them)."""
    with open(log, "wb") as out:
        main = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    started: list[psutil.Process] = []
    try:
        parent = psutil.Process(main.pid)
        deadline = time.monotonic() + timeout
        while True:
            with suppress(psutil.Error):
                started = parent.children(recursive=True)
                if started and ready(parent, started):
                    break
            if main.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{args[1:3]} never got ready to be killed:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        os.kill(main.pid, signal.SIGKILL)
        main.wait(timeout=30)
        deadline = time.monotonic() + GONE_WITHIN_S
        while any(map(_running, started)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [p for p in started if _running(p)]
    finally:
        with suppress(ProcessLookupError):
            os.killpg(main.pid, signal.SIGKILL)  # orphans stay in the killed one's group
        for process in started:
            with suppress(psutil.Error):
                process.kill()
        with suppress(subprocess.TimeoutExpired):
            main.wait(timeout=30)


def test_forked_children_die_with_their_parent_not_with_its_thread() -> None:
    """The child forked by a thread that has ended lives on while its parent does: the
    kernel's parent-death signal follows the forking thread, so that child polls instead."""
    parent = subprocess.Popen(
        [sys.executable, "-c", FORKER],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    children: list[psutil.Process] = []
    try:
        children = [psutil.Process(int(pid)) for pid in parent.stdout.readline().split()]
        assert len(children) == 2
        time.sleep(1)  # more than the poll
        assert all(map(_running, children)), "a child died while its parent lives"
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
        deadline = time.monotonic() + 5
        while any(map(_running, children)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(map(_running, children)), _describe(children)
    finally:
        with suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
        for child in children:
            with suppress(psutil.Error):
                child.kill()
        parent.wait(timeout=30)


def _image_tree(root: Path, per_class: int, side: int = 32) -> Path:
    """An ImageFolder tree (train/ and test/, two classes) of distinct noisy JPEGs."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    n = 0
    for split, count in (("train", per_class), ("test", per_class // 4)):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                n += 1
                image = np.roll(base, (n // side, n % side), axis=(0, 1))
                Image.fromarray(image).save(root / split / label / f"{i:05d}.jpg", quality=90)
    return root


def _writing(main: psutil.Process, started: list[psutil.Process]) -> bool:
    """FFCV's writer process is running, with the decoders it started."""
    return any(p.ppid() != main.pid for p in started)


@pytest.mark.slow
def test_killed_ingest_leaves_no_process(tmp_path: Path) -> None:
    # 7,000 train records: FFCV's writer, orphaned, then blocks for good on exit (its list
    # of allocations fills the pipe to the dead parent), as the leftovers did.
    tree = _image_tree(tmp_path / "tree", per_class=3500)
    args = [str(BIN / "ran-cli"), "ingest", "--dataset", "imagefolder", "--source", str(tree)]
    args += ["--out", str(tmp_path / "out"), "--num-workers", "2"]
    left = _kill9_halfway(args, _writing, tmp_path / "ingest.log")
    assert not left, f"ingest left processes after kill -9: {_describe(left)}"


@pytest.mark.slow
def test_killed_serve_leaves_no_process(trained_model: Path, tmp_path: Path) -> None:
    """Killed once it answers: LitServe's queue manager, API server (forked) and inference
    worker (spawned) go with it."""
    port = free_port()
    args = [str(BIN / "ran-cli"), "serve", "--model", str(trained_model), "--device", "cpu"]
    args += ["--port", str(port)]

    def answering(main: psutil.Process, started: list[psutil.Process]) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    left = _kill9_halfway(args, answering, tmp_path / "serve.log")
    assert not left, f"serve left processes after kill -9: {_describe(left)}"
