"""The one exception type a user is meant to read, and how every front door reports it.

Library code raises :class:`RanError` for bad input (missing path, wrong layout, unknown
depth...). Its message is a single line naming the problem and the fix; the CLI commands
and the DVC stage entry points (both wrapped in :func:`user_errors`) print it without a
traceback and exit non-zero.
"""

import functools
import sys
from collections.abc import Callable
from typing import Any


class RanError(Exception):
    """A user-facing error: one line, names the problem and how to fix it."""


def user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``command``; a RanError prints ``error: <message>`` on stderr and exits with 1."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except RanError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(1) from None

    return wrapper
