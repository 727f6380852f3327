"""DVC stage ``ingest``: params.yaml ``ingest`` → data/ingest/{train,val}.beton, meta.json.

``python pipeline/ingest.py DATASET`` ingests another data set with the same settings into
data/DATASET/ingest (studies/dvc.yaml's CIFAR-100 for the vitmask study); its source is
$RAN_<DATASET>_SOURCE (e.g. RAN_CIFAR100_SOURCE), else the official download.
"""

import os
import sys

from ran import paths
from ran.config import IngestParams, TrackingParams, load_section, parse, with_source_override
from ran.data.ingest import tracked_ingest
from ran.dvc_stage import stage_tags
from ran.errors import user_errors


def main(dataset: str | None = None) -> None:
    params = load_section("ingest", IngestParams)
    out = paths.INGEST
    if dataset is None:
        params = with_source_override(params)
    else:
        source = os.environ.get(f"RAN_{dataset.upper().replace('-', '_')}_SOURCE")
        values = {**params.model_dump(), "dataset": dataset, "source": source}
        params = parse(IngestParams, values, "ingest")
        out = paths.ingest_folder(dataset)
    tracking = load_section("mlflow", TrackingParams)
    tracked_ingest(params, out, tracking.experiment, tags=stage_tags("ingest", deps=[]))


if __name__ == "__main__":
    user_errors(main)(*sys.argv[1:2])
