"""DVC stage ``prior`` of ``studies/dvc.yaml``: an ingest output → data/prior/DATASET
(train.npy, val.npy: the ViT's [CLS] attention per record; report.json, sample.png).

Usage: ``python pipeline/prior.py DATASET`` or ``python pipeline/prior.py DATASET-constant``.
params.yaml's ``prior`` section, with the vitmask study's profile overlay
(``studies.vitmask.<profile>.prior``: the CPU profile's smaller input, for one) laid over it;
``DATASET-constant`` is the study's control, ``init: constant`` over the same ViT and size
(so the same grid) into data/prior/DATASET-constant. With ``init: trained`` the ViT is the
one the ``pretrain`` stage trained on DATASET: its name is the profile's ``pretrain.vit``
and its weights data/pretrain/DATASET/vit.safetensors.
"""

import sys

from ran import paths
from ran.config import (
    PARAMS_FILE,
    PretrainParams,
    PriorParams,
    TrackingParams,
    load_section,
    profiled_section,
    study_overlay,
)
from ran.dvc_stage import stage_profile, stage_tags
from ran.errors import user_errors
from ran.prior.stage import tracked_prior


def main(name: str) -> None:
    dataset, constant = paths.prior_name(name)
    profile = stage_profile()
    overlay = study_overlay("prior", profile, study="vitmask")
    if overlay.get("init") == "trained":
        vit = profiled_section("pretrain", PretrainParams, profile, PARAMS_FILE).vit
        weights = paths.pretrain_folder(dataset) / paths.VIT_WEIGHTS
        overlay |= {"vit": vit, "vit_weights": str(weights)}
    control = {"init": "constant", "vit_weights": None} if constant else {}
    params = profiled_section("prior", PriorParams, profile, PARAMS_FILE, overlay, control)
    data = paths.ingest_folder(dataset)
    tracking = load_section("mlflow", TrackingParams)
    tags = stage_tags("prior", deps=[str(data)])
    out = paths.prior_folder(dataset, constant)
    tracked_prior(params, data, out, tracking.experiment, tags=tags)


if __name__ == "__main__":
    user_errors(main)(*sys.argv[1:2])
