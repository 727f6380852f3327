"""An ingest output's ``meta.json``: what every later stage reads first (classes, splits,
their hashes and counts, normalisation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ran.errors import RanError


def read_meta(data: Path) -> dict[str, Any]:
    """``data/meta.json``; a folder without one is not an ingest output (one-line error)."""
    path = data / "meta.json"
    if not path.is_file():
        raise RanError(f"{path} not found: --data must be an ingest output (run `ran-cli ingest`)")
    return json.loads(path.read_text())
