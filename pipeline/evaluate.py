"""DVC stage ``evaluate``: data/train/model.pt on data/ingest/val.beton → data/evaluate."""

from pathlib import Path

from ran.config import EvaluateParams, TrackingParams, load_section, profiled_section
from ran.errors import user_errors
from ran.evaluate import tracked_evaluate
from ran.pipeline import stage_profile, stage_tags

MODEL, DATA, OUT = Path("data/train/model.pt"), Path("data/ingest"), Path("data/evaluate")


def main() -> None:
    params = profiled_section("evaluate", EvaluateParams, stage_profile())
    tracking = load_section("mlflow", TrackingParams)
    tracked_evaluate(MODEL, DATA, OUT, params, tracking.experiment, tags=stage_tags("evaluate"))


if __name__ == "__main__":
    user_errors(main)()
