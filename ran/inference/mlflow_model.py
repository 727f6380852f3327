"""The MLflow model that training logs and registers: encoded images in, top-5 classes out.

MLflow loads this file as code (models-from-code), never a pickle: its ``model.pt``
artifact is read with ``torch.load(weights_only=True)``, so the model loads and predicts
with ``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``. In-process, ``predict`` takes a list of
JPEG/PNG/… ``bytes``; MLflow's scoring server and ``ran-cli serve`` take them as base64
strings (``{"inputs": ["<base64>", ...]}``) and answer
``{"predictions": [{"labels": [...], "probs": [...]}, ...]}``, as ``ran-cli predict --json``.
Its input example is one real image of the data the network was trained on (the first test
record, as PNG bytes). A vitmask network's model also holds its ViT's weights file (artifact
``vit``; none for a prior made without one), from which it computes each image's prior map.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from ran.inference.predictor import Predictor


class ImageModel(PythonModel):
    """A :class:`~ran.inference.predictor.Predictor` behind MLflow's pyfunc interface."""

    def load_context(self, context: Any) -> None:
        vit = context.artifacts.get("vit")  # a vitmask network's ViT weights, if from a file
        self.predictor = Predictor.from_model_file(
            Path(context.artifacts["model"]), vit_weights=Path(vit) if vit else None
        )

    def predict(
        self, model_input: list[bytes], params: dict[str, Any] | None = None
    ) -> list[dict[str, list[Any]]]:
        return self.predictor.predict_bytes(model_input)


set_model(ImageModel())
