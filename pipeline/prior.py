"""DVC stage ``prior`` of ``studies/dvc.yaml``: an ingest output → data/prior/DATASET
(train.npy, val.npy: the ViT's [CLS] attention per record; report.json, sample.png).

Usage: ``python pipeline/prior.py DATASET``. params.yaml's ``prior`` section, with the
vitmask study's profile overlay (``studies.vitmask.<profile>.prior``: the CPU profile's
smaller input, for one) laid over it.
"""

import sys

from ran import paths
from ran.config import (
    PARAMS_FILE,
    PriorParams,
    TrackingParams,
    load_section,
    profiled_section,
    study_overlay,
)
from ran.dvc_stage import stage_profile, stage_tags
from ran.errors import user_errors
from ran.prior.stage import tracked_prior


def main(dataset: str) -> None:
    profile = stage_profile()
    overlay = study_overlay("prior", profile, study="vitmask")
    params = profiled_section("prior", PriorParams, profile, PARAMS_FILE, overlay)
    data = paths.ingest_folder(dataset)
    tracking = load_section("mlflow", TrackingParams)
    tags = stage_tags("prior", deps=[str(data)])
    tracked_prior(params, data, paths.prior_folder(dataset), tracking.experiment, tags=tags)


if __name__ == "__main__":
    user_errors(main)(*sys.argv[1:2])
