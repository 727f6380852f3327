"""DVC stage ``noise``: data/ingest → data/noise (labels.npy, report.json, transition.png).

``noise.kind: none`` (the default) writes the clean labels, so one pipeline serves clean
and noisy runs: ``dvc exp run -S noise.kind=symmetric -S noise.rate=0.3``.
"""

from ran import paths
from ran.config import NoiseParams, TrackingParams, load_section
from ran.dvc_stage import stage_tags
from ran.errors import user_errors
from ran.noise.stage import tracked_noise


def main() -> None:
    params = load_section("noise", NoiseParams)
    tracking = load_section("mlflow", TrackingParams)
    tracked_noise(params, paths.INGEST, paths.NOISE, tracking.experiment, tags=stage_tags("noise"))


if __name__ == "__main__":
    user_errors(main)()
