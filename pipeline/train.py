"""DVC stage ``train``: data/ingest + data/noise/labels.npy → data/train.

The profile (``profile`` in params.yaml: paper, quick or auto) picks the recipe; a killed
run resumes from data/train/checkpoint-last.pt when its settings are unchanged.
"""

from pathlib import Path

from ran.config import TrackingParams, TrainParams, load_section, profiled_section
from ran.errors import user_errors
from ran.pipeline import stage_profile, stage_tags
from ran.train import train_model

DATA, LABELS, OUT = Path("data/ingest"), Path("data/noise/labels.npy"), Path("data/train")


def main() -> None:
    params = profiled_section("train", TrainParams, stage_profile())
    tracking = load_section("mlflow", TrackingParams)
    tags = stage_tags("train")
    train_model(params, DATA, OUT, tracking.experiment, labels=LABELS, resume="auto", tags=tags)


if __name__ == "__main__":
    user_errors(main)()
