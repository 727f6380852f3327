"""DVC stage ``ingest``: params.yaml ``ingest`` → data/ingest/{train,val}.beton, meta.json."""

from pathlib import Path

from ran.config import IngestParams, TrackingParams, load_section, with_source_override
from ran.data.ingest import tracked_ingest
from ran.errors import user_errors
from ran.pipeline import stage_tags

OUT = Path("data/ingest")


def main() -> None:
    params = with_source_override(load_section("ingest", IngestParams))
    tracking = load_section("mlflow", TrackingParams)
    tracked_ingest(params, OUT, tracking.experiment, tags=stage_tags("ingest"))


if __name__ == "__main__":
    user_errors(main)()
