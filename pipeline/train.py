"""DVC stage ``train``: data/ingest + data/noise/labels.npy → data/train.

The profile (``profile`` in params.yaml: paper, quick or auto) picks the recipe; a killed
run resumes from data/train/checkpoint-last.pt when its settings are unchanged.
"""

from ran import paths
from ran.config import TrackingParams, TrainParams, load_section, profiled_section
from ran.dvc_stage import stage_profile, stage_tags
from ran.errors import user_errors
from ran.train.stage import train_model


def main() -> None:
    params = profiled_section("train", TrainParams, stage_profile())
    tracking = load_section("mlflow", TrackingParams)
    train_model(
        params,
        paths.INGEST,
        paths.TRAIN,
        tracking.experiment,
        labels=paths.LABELS,
        resume="auto",
        tags=stage_tags("train"),
    )


if __name__ == "__main__":
    user_errors(main)()
