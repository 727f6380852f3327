"""DVC stages of ``studies/dvc.yaml``: one study cell (noise → train → evaluate).

Usage: ``python pipeline/study.py STUDY CELL`` → data/studies/STUDY/CELL/{noise,train,evaluate}.
"""

import sys
from pathlib import Path

from ran.config import TrackingParams, load_section
from ran.errors import user_errors
from ran.pipeline import stage_profile, stage_tags
from ran.studies import get_study
from ran.studies.cell import run_cell

DATA, OUT = Path("data/ingest"), Path("data/studies")


def main(study_name: str, cell_name: str) -> None:
    study = get_study(study_name)
    cell = study.cell(cell_name)
    tracking = load_section("mlflow", TrackingParams)
    tags = stage_tags("study", deps=[str(DATA)])
    out = OUT / study.name / cell.name
    run_cell(study, cell, DATA, out, tracking.experiment, stage_profile(), tags=tags)


if __name__ == "__main__":
    user_errors(main)(*sys.argv[1:3])
