"""The one exception type a user is meant to read.

Library code raises :class:`RanError` for bad input (missing path, wrong layout, unknown
depth...). Its message is a single line naming the problem and the fix; the CLI and the DVC
stage entry points print it without a traceback and exit non-zero.
"""


class RanError(Exception):
    """A user-facing error: one line, names the problem and how to fix it."""
