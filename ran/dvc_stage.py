"""The context a DVC stage script (``pipeline/``) runs in: the profile it runs, and the tags
that tie its MLflow runs to one pipeline execution and to the data versions DVC recorded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from ran.config import PARAMS_FILE, resolve_profile

LOCK_FILE = Path("dvc.lock")
STAGES_FILE = Path("dvc.yaml")


def stage_profile() -> str:
    """params.yaml's ``profile``, ``auto`` resolved by whether this machine has a GPU; the
    choice is said in one line, with how to pick the other."""
    import torch

    requested = (yaml.safe_load(PARAMS_FILE.read_text()) or {}).get("profile", "auto")
    has_gpu = torch.cuda.is_available()
    profile = resolve_profile(requested, has_gpu)
    if requested == "auto":
        why = "a GPU is present" if has_gpu else "no GPU found"
        other = "quick" if profile == "paper" else "paper"
        print(
            f"profile auto → {profile} ({why}); `dvc exp run -S profile={other}` runs the "
            f"{other} recipe",
            file=sys.stderr,
        )
    return profile


def pipeline_id() -> str | None:
    """One id per ``dvc repro`` / ``dvc exp run``: the DVC process that started this stage
    (its pid and start time), shared by every stage it runs."""
    if not os.environ.get("DVC_STAGE") and not os.environ.get("DVC_ROOT"):
        return None
    import psutil

    process = psutil.Process().parent()
    while process is not None:
        if "dvc" in " ".join(process.cmdline()[:2]):
            return f"{process.pid}-{int(process.create_time())}"
        process = process.parent()
    return None


def stage_deps(stage: str) -> list[str]:
    """The dependencies ``dvc.yaml`` declares for ``stage``."""
    if not STAGES_FILE.is_file():
        return []
    stages = (yaml.safe_load(STAGES_FILE.read_text()) or {}).get("stages", {})
    return [str(d) for d in stages.get(stage, {}).get("deps", [])]


def input_hashes(deps: list[str]) -> dict[str, str]:
    """The md5 DVC recorded in dvc.lock for each output of an earlier stage that ``deps``
    name, whole or in part (those outputs are locked before a stage using them starts)."""
    if not LOCK_FILE.is_file():
        return {}
    hashes = {}
    for locked in ((yaml.safe_load(LOCK_FILE.read_text()) or {}).get("stages") or {}).values():
        for out in locked.get("outs", []):
            path = out.get("path")
            used = any(dep == path or dep.startswith(f"{path}/") for dep in deps)
            if used and out.get("md5"):
                hashes[path] = out["md5"]
    return hashes


def stage_tags(stage: str, deps: list[str] | None = None) -> dict[str, str]:
    """The MLflow tags of a DVC stage's run: the data versions it read (``deps``, default
    its ``dvc.yaml`` dependencies) and the pipeline execution it belongs to."""
    used = stage_deps(stage) if deps is None else deps
    tags = {f"dvc.input.{path}": md5 for path, md5 in input_hashes(used).items()}
    pipeline = pipeline_id()
    if pipeline:
        tags["pipeline"] = pipeline
    return tags
