"""DVC stages of ``studies/dvc.yaml``: a study's report from its cells' MLflow runs.

Usage: ``python pipeline/report.py STUDY`` → reports/STUDY/{report.md, report.png, results.json}.
"""

import sys

from ran import paths
from ran.config import TrackingParams, load_section
from ran.dvc_stage import stage_profile, stage_tags
from ran.errors import user_errors
from ran.studies import get_study
from ran.studies.report import tracked_report


def main(study_name: str) -> None:
    study = get_study(study_name)
    tracking = load_section("mlflow", TrackingParams)
    tags = stage_tags("report", deps=[])  # the pipeline execution it belongs to
    out = paths.report_folder(study.name)
    tracked_report(study, tracking.experiment, stage_profile(), out, tags=tags)


if __name__ == "__main__":
    user_errors(main)(*sys.argv[1:2])
