"""DVC stage ``evaluate``: data/train/model.pt on data/ingest/val.beton → data/evaluate."""

from ran import paths
from ran.config import EvaluateParams, TrackingParams, load_section, profiled_section
from ran.dvc_stage import stage_profile, stage_tags
from ran.errors import user_errors
from ran.evaluate import tracked_evaluate


def main() -> None:
    params = profiled_section("evaluate", EvaluateParams, stage_profile())
    tracking = load_section("mlflow", TrackingParams)
    tags = stage_tags("evaluate")
    tracked_evaluate(
        paths.MODEL, paths.INGEST, paths.EVALUATE, params, tracking.experiment, tags=tags
    )


if __name__ == "__main__":
    user_errors(main)()
