"""The ``ran-cli models`` table, cached by the content of the model code.

Counting MACs means tracing every variant once (about 20 s on a 2-core CPU, most of it
Attention-452); the numbers change only when ``ran/models`` or torch changes, so they are
kept in the cache under a digest of exactly those, and a listing after the first is
instant and imports no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import version
from pathlib import Path
from typing import Any

from ran.config import cache_dir

MODELS_SOURCE = Path(__file__).parent / "models"


def _digest() -> str:
    digest = hashlib.sha256(version("torch").encode())
    for path in sorted(MODELS_SOURCE.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def model_table() -> list[dict[str, Any]]:
    """Every registered variant with its measured params and MACs (see ran.models.complexity)."""
    path = cache_dir() / f"model-table-{_digest()}.json"
    if path.is_file():
        return json.loads(path.read_text())
    from ran.models import model_table as measure

    rows = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(rows))
    tmp.replace(path)
    return rows
