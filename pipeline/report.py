"""DVC stages of ``studies/dvc.yaml``: a study's report from its cells' MLflow runs.

Usage: ``python pipeline/report.py STUDY`` → reports/STUDY/{report.md, report.png, results.json}.
"""

import sys
from pathlib import Path

from ran.config import TrackingParams, load_section
from ran.errors import user_errors
from ran.pipeline import stage_profile, stage_tags
from ran.studies import get_study
from ran.studies.report import tracked_report

OUT = Path("reports")


def main(study_name: str) -> None:
    study = get_study(study_name)
    tracking = load_section("mlflow", TrackingParams)
    tags = stage_tags("report", deps=[])  # the pipeline execution it belongs to
    tracked_report(study, tracking.experiment, stage_profile(), OUT / study.name, tags=tags)


if __name__ == "__main__":
    user_errors(main)(*sys.argv[1:2])
