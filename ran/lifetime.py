"""Worker processes that end with their parent, however it ends (``kill -9`` included).

A stage's workers (ingest's decoders, FFCV's writer, serve's API server, queue manager and
inference worker) block on pipes and queues; orphaned by a killed parent they would wait
forever, holding memory and ports. :func:`install` makes every later ``fork`` of the
process set ``PR_SET_PDEATHSIG`` (SIGKILL) in the child before it runs its task (and so
in the children it forks in turn); a child started by ``exec`` (multiprocessing's spawn)
runs no fork hook and calls :func:`die_with_parent` itself.

The kernel sends the signal when the *thread* that forked the child ends, not the
process. Python's main thread lasts as long as the process, so forks from it get the
signal; a fork from another thread (a pool's maintenance thread replacing a dead worker)
may outlive that thread, so its child polls its parent's pid instead.

Standard library only: it is imported before any heavy module. Linux only (prctl); a
no-op elsewhere.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_S = 0.5  # how often a child forked from another thread checks its parent

_forking = threading.local()  # in the parent, per forking thread: who forks, from where
_installed = False


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()  # loaded once here, not in every child


def _ended(sig: int) -> None:
    os._exit(128 + sig)  # as if the signal had arrived


def die_with_parent(parent: int | None = None, sig: int = signal.SIGKILL) -> bool:
    """Make this process get ``sig`` when its parent ends; end it now if it already has.

    ``parent`` is the pid the parent had (default: the process that started this one
    through multiprocessing; in a process not started so, nothing is done): a parent that
    died before the prctl cannot signal any more, so the parent pid is checked after it.
    Call it from the child's main thread (the setting belongs to the calling thread).
    Returns whether the signal is armed (False off Linux, or with no parent to die with).
    """
    if parent is None:
        import multiprocessing

        known = multiprocessing.parent_process()
        if known is None:
            return False
        parent = known.pid
    args = (ctypes.c_ulong(int(sig)), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    armed = _PRCTL is not None and _PRCTL(PR_SET_PDEATHSIG, *args) == 0
    if os.getppid() != parent:
        _ended(sig)
    return armed


def _watch_parent(parent: int) -> None:
    """A daemon thread that ends this process once ``parent`` is no longer its parent."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(POLL_S)
        _ended(signal.SIGKILL)

    if os.getppid() != parent:
        _ended(signal.SIGKILL)
    threading.Thread(target=watch, name="ran-lifetime-watch", daemon=True).start()


def _before_fork() -> None:
    _forking.parent = os.getpid()
    _forking.from_main = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    parent = getattr(_forking, "parent", None)
    if parent is None:  # a fork whose before-hook did not run here: nothing known
        return
    if _forking.from_main:
        die_with_parent(parent)
    else:
        _watch_parent(parent)


def install() -> None:
    """From now on, every child this process forks dies with it (idempotent)."""
    global _installed
    if not _installed:
        os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
        _installed = True
