"""What every DVC stage entry point shares: user errors as one line and a non-zero exit."""

import sys
from collections.abc import Callable


def stage_main(run: Callable[[], None]) -> None:
    """Run a stage; a RanError prints ``error: <message>`` and exits 1 (no traceback)."""
    from ran.errors import RanError

    try:
        run()
    except RanError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
