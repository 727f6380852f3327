"""A study's cells as DVC knows them: their stages, which are done, their lock entries.

DVC decides what is done, on the driver and on every worker alike: a cell is done when
``dvc status`` finds its stage's dependencies and parameters as ``studies/dvc.lock``
records them (its outputs may still be in the remote only: ``dvc pull`` brings them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ran import paths
from ran.errors import RanError
from ran.outputs import atomic_write
from ran.studies.tables import Cell, Study

STUDIES_DVC = "studies/dvc.yaml"
STUDIES_LOCK = "studies/dvc.lock"
# what `dvc status` says of an output that is merely not here (the remote has it)
ABSENT = {"deleted", "not in cache"}


def select(study: Study, names: list[str] | None) -> list[Cell]:
    """The cells a run takes: ``names`` (each checked) or all of the study's."""
    return [study.cell(name) for name in names] if names else study.cells


def stage_name(study: Study, cell: Cell) -> str:
    """The cell's stage in ``studies/dvc.yaml`` (a vitmask cell without the prior is the
    ``vitmask-baseline`` stage of its data set)."""
    if study.name == "vitmask":
        data = cell.setting.get("data", {})
        if not data.get("prior"):
            return f"vitmask-baseline@{data['dataset']}"
        return f"vitmask-cell@{cell.name}"
    return f"{study.name}-cell@{cell.name}"


def target(study: Study, cell: Cell) -> str:
    return f"{STUDIES_DVC}:{stage_name(study, cell)}"


def output(study: Study, cell: Cell) -> str:
    return str(paths.cell_folder(study.name, cell.name))


def inputs(cell: Cell) -> list[str]:
    """The data folders the cell's stage depends on (outputs of earlier stages)."""
    from ran.studies.cell import cell_data  # imports torch: not at --help time

    data, prior = cell_data(cell)
    return [str(data), *([str(prior)] if prior else [])]


def dvc(root: Path, *args: str, what: str, env: dict[str, str] | None = None) -> str:
    """Run ``dvc ARGS`` in ``root`` with this environment's DVC, waiting for DVC's lock (a
    ``study status`` may hold it a moment); its last error line as a RanError naming
    ``what`` failed."""
    env = {**(env or os.environ), "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "--wait-for-lock", *args],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        # a stage's own one-line error (ran.errors) says more than DVC's last line
        ours = [line for line in lines if line.startswith("error: ")]
        reason = (ours or lines or [f"exit {result.returncode}"])[-1]
        raise RanError(f"{what} failed: `dvc {' '.join(args)}`: {reason}")
    return result.stdout


def done(root: Path, study: Study, cells: list[Cell]) -> set[str]:
    """The names of ``cells`` whose stage is up to date in ``root``'s lock files."""
    if not cells:
        return set()
    targets = [target(study, cell) for cell in cells]
    report = json.loads(dvc(root, "status", "--json", *targets, what="checking the cells") or "{}")
    finished = set()
    for cell, name in zip(cells, targets, strict=True):
        changes = report.get(name, [])
        if all(_only_absent_outputs(change) for change in changes):
            finished.add(cell.name)
    return finished


def _only_absent_outputs(change: Any) -> bool:
    return (
        isinstance(change, dict)
        and set(change) == {"changed outs"}
        and set(change["changed outs"].values()) <= ABSENT
    )


def lock_entry(root: Path, stage: str) -> dict[str, Any]:
    """``stage``'s entry in ``root``'s ``studies/dvc.lock`` (after a ``dvc repro`` of it)."""
    lock = root / STUDIES_LOCK
    stages = yaml.safe_load(lock.read_text())["stages"] if lock.is_file() else {}
    if stage not in stages:
        raise RanError(f"{lock} has no entry for {stage} after its `dvc repro`")
    return stages[stage]


def merge_lock(root: Path, entries: dict[str, dict[str, Any]]) -> None:
    """Write ``entries`` (stage → lock entry) into ``root``'s ``studies/dvc.lock``, as
    ``dvc repro`` of those stages there would have (all or nothing)."""
    lock = root / STUDIES_LOCK
    data = yaml.safe_load(lock.read_text()) if lock.is_file() else None
    data = data or {"schema": "2.0", "stages": {}}
    data.setdefault("stages", {}).update(entries)
    text = yaml.safe_dump(data, sort_keys=False, width=120)
    atomic_write(lock, lambda tmp: tmp.write_text(text))


def overridden_params(root: Path, overrides: list[str]) -> str:
    """``params.yaml``'s text with ``-S key=value`` applied as ``dvc exp run -S`` applies
    them (DVC's own Hydra override grammar), on a copy: the caller writes it."""
    text = (root / "params.yaml").read_text()
    if not overrides:
        return text
    for override in overrides:
        if "=" not in override:
            raise RanError(f"-S {override!r} is not key=value (e.g. -S train.lr=0.05)")
    from dvc.utils.hydra import apply_overrides

    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "params.yaml"
        copy.write_text(text)
        try:
            apply_overrides(copy, overrides)
        except Exception as exc:  # Hydra's parse and key errors: one line
            reason = str(exc).strip().splitlines()[0]
            raise RanError(f"-S {' '.join(overrides)}: {reason}") from None
        return copy.read_text()
