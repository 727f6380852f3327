"""DVC stages of ``studies/dvc.yaml``: one study cell (noise → train → evaluate, per seed).

Usage: ``python pipeline/study.py STUDY CELL`` →
data/studies/STUDY/CELL/seed-K/{noise,train,evaluate} for each seed K (``studies.<profile>.seeds``).
"""

import sys

from ran import paths
from ran.config import TrackingParams, load_section
from ran.dvc_stage import stage_profile, stage_tags
from ran.errors import user_errors
from ran.studies import get_study
from ran.studies.cell import cell_data, run_cell


def main(study_name: str, cell_name: str) -> None:
    study = get_study(study_name)
    cell = study.cell(cell_name)
    data, prior = cell_data(cell)
    tracking = load_section("mlflow", TrackingParams)
    tags = stage_tags("study", deps=[str(data), *([str(prior)] if prior else [])])
    out = paths.cell_folder(study.name, cell.name)
    profile = stage_profile()
    run_cell(study, cell, data, out, tracking.experiment, profile, tags=tags, prior=prior)


if __name__ == "__main__":
    user_errors(main)(*sys.argv[1:3])
