"""DVC stage ``pretrain`` of ``studies/dvc.yaml``: an ingest output's train images →
data/pretrain/DATASET (vit.safetensors: the prior's ViT trained by DINO; report.json with the
k-NN top-1 of it and of its random initialisation; curves.csv, knn.csv).

Usage: ``python pipeline/pretrain.py DATASET``. params.yaml's ``pretrain`` section with the
profile's overlay (``quick.pretrain``: the 2-core CPU recipe). A killed run resumes from its
checkpoint (the output is ``persist``ed), exactly.
"""

import sys

from ran import paths
from ran.config import PARAMS_FILE, PretrainParams, TrackingParams, load_section, profiled_section
from ran.dvc_stage import stage_profile, stage_tags
from ran.errors import user_errors
from ran.pretrain.stage import pretrain


def main(dataset: str) -> None:
    params = profiled_section("pretrain", PretrainParams, stage_profile(), PARAMS_FILE)
    data = paths.ingest_folder(dataset)
    tracking = load_section("mlflow", TrackingParams)
    tags = stage_tags("pretrain", deps=[str(data)])
    out = paths.pretrain_folder(dataset)
    pretrain(params, data, out, tracking.experiment, resume="auto", tags=tags)


if __name__ == "__main__":
    user_errors(main)(*sys.argv[1:2])
