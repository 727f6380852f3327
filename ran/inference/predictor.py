"""A trained network ready for a user's images, wherever it was stored.

``model.pt`` (or the training folder holding it) loads directly; an MLflow URI
(``models:/NAME/VERSION``, ``models:/NAME@alias``, ``runs:/RUN_ID/model``) or a downloaded
MLflow model folder loads through MLflow with its pickle refusal on, and the
:class:`Predictor` inside the image model is used as it is. Both paths give the same
probabilities.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import ran
from ran.data.beton import LoaderSpec, make_loader
from ran.data.meta import read_meta
from ran.data.transforms import network_view
from ran.errors import RanError
from ran.inference.images import network_input, read_image
from ran.inference.scoring import channel_mean_masks, class_scores
from ran.inference.vitprior import moved, network_prior, prior_maps, prior_weights
from ran.modelfile import data_side, load_model, loader_spec, read_record
from ran.models.attention import AttentionModule
from ran.tracking import tracking_uri

if TYPE_CHECKING:
    from ran.prior.vit import PriorSource

PICKLE_SWITCH = "MLFLOW_ALLOW_PICKLE_DESERIALIZATION"
TOP = 5  # classes reported per image, by default and by the registered model


@dataclass
class Predictor:
    """A network in eval mode with its ``model.pt`` record (classes, statistics, input size)
    and, for a vitmask network, the ViT that computes each image's prior map."""

    model: torch.nn.Module
    record: dict[str, Any]
    flip: bool = False
    translate: bool = False  # airbench94's test-time shifts (ran.inference.scoring)
    prior: PriorSource | None = None  # a vitmask network's ViT (ran.inference.vitprior)

    @classmethod
    def from_model_file(
        cls,
        path: Path,
        flip: bool = False,
        translate: bool = False,
        vit_weights: Path | None = None,
    ) -> Predictor:
        """``vit_weights``: for a vitmask network whose prior came from a weights file, that
        file, if it is no longer where the prior stage read it."""
        model, record = load_model(path)
        prior = None
        if getattr(model, "takes_prior", False):
            prior = network_prior(record, str(path), vit_weights)
        return cls(model.to(memory_format=torch.channels_last), record, flip, translate, prior)

    @property
    def classes(self) -> list[str]:
        return self.record["classes"]

    @property
    def spec(self) -> LoaderSpec:
        return loader_spec(self.record)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def has_masks(self) -> bool:
        """Attention modules, or a vitmask network's attention branch."""
        modules = self.model.modules()
        return self.prior is not None or any(isinstance(m, AttentionModule) for m in modules)

    def to(self, device: str | torch.device) -> Predictor:
        self.model.to(device)
        if self.prior is not None:
            self.prior = moved(self.prior, device)
        return self

    def inputs(self, images: list[np.ndarray]) -> torch.Tensor:
        """Decoded images (H×W×3 uint8) cut as the loader cut the training data: a ``uint8``
        N×3×S×S batch at the data's side (:func:`network_view` upsamples it further for a
        network trained with ``--upsample``; records before ``data_side``: the input size)."""
        side = data_side(self.record)
        cut = [network_input(image, side, self.spec.small_images) for image in images]
        return torch.from_numpy(np.stack(cut)).permute(0, 3, 1, 2)

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N×K, float32 on the CPU) of a ``uint8`` input batch."""
        with torch.inference_mode():
            x = network_view(batch.to(self.device), self.spec)
            maps = self.prior_maps(batch)
            scores = class_scores(self.model, x, self.flip, maps, translate=self.translate)
            return scores.softmax(1).cpu()

    def prior_maps(self, batch: torch.Tensor) -> torch.Tensor | None:
        """A vitmask network's prior maps of a ``uint8`` input batch, as the ``prior`` stage
        computes and stores them for a record (``None`` for the other networks)."""
        if self.prior is None:
            return None
        return prior_maps(self.prior, batch, self.device)

    def top(self, probs: torch.Tensor, k: int = TOP) -> list[dict[str, list]]:
        """Per image: the ``k`` likeliest class names and their probabilities."""
        values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
        return [
            {"labels": [self.classes[i] for i in row], "probs": [float(p) for p in vals]}
            for row, vals in zip(indices.tolist(), values, strict=True)
        ]

    def masks(self, batch: torch.Tensor) -> list[np.ndarray]:
        return channel_mean_masks(self.model, batch, self.spec, self.prior_maps(batch))

    def predict_bytes(self, blobs: list[bytes], k: int = TOP) -> list[dict[str, list]]:
        """Encoded images (JPEG, PNG, … bytes) → per image, top-``k`` labels and probs."""
        images = [read_image(blob, f"image {n}") for n, blob in enumerate(blobs)]
        if not images:
            return []
        return self.top(self.probabilities(self.inputs(images)), k)


@contextlib.contextmanager
def pickle_refused() -> Iterator[None]:
    """MLflow loads inside this block refuse to unpickle (the project's models never need to)."""
    before = os.environ.get(PICKLE_SWITCH)
    os.environ[PICKLE_SWITCH] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ[PICKLE_SWITCH]
        else:
            os.environ[PICKLE_SWITCH] = before


@contextlib.contextmanager
def mlflow_errors(action: str, model: str) -> Iterator[None]:
    """MLflow on the project's tracking store; its errors about ``model`` as one line."""
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri())
    try:
        yield
    except (MlflowException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RanError(
            f"cannot {action} MLflow model {model} from {tracking_uri()}: {first} (check the "
            "name and version, and MLFLOW_TRACKING_URI)"
        ) from None


def is_mlflow_uri(model: str) -> bool:
    return "://" in model or model.startswith(("models:/", "runs:/"))


def load_predictor(
    model: str,
    device: str = "cpu",
    flip: bool = False,
    translate: bool = False,
    vit_weights: Path | None = None,
) -> Predictor:
    """``model``: a ``model.pt``, a training output folder, an MLflow model folder or URI;
    ``flip`` and ``translate``: the test-time averaging, as ``evaluate`` takes them;
    ``vit_weights``: a vitmask ``model.pt``'s ViT file, if not where the prior stage read it
    (an MLflow model carries its own)."""
    path = Path(model)
    if not is_mlflow_uri(model) and not (path / "MLmodel").is_file():
        if path.is_dir():
            path = path / "model.pt"
        if not path.is_file():
            raise RanError(
                f"model {model} does not exist; pass a model.pt, a `ran-cli train` output "
                "folder or an MLflow model URI (models:/NAME/VERSION)"
            )
        predictor = Predictor.from_model_file(path, flip, translate, vit_weights)
        return predictor.to(device)
    import mlflow

    with mlflow_errors("load", model), pickle_refused():
        loaded = mlflow.pyfunc.load_model(model)
    image_model = loaded.unwrap_python_model()
    if not hasattr(image_model, "predictor"):
        raise RanError(f"{model} is not an image model of this project; pass one `train` logged")
    predictor = image_model.predictor
    predictor.flip, predictor.translate = flip, translate
    return predictor.to(device)


MODEL_NAME = "model"  # the image model's name in its run


def model_requirements(takes_prior: bool = False) -> list[str]:
    """What the image model's code imports, pinned to this environment's versions (timm and
    safetensors too for a vitmask network: its ViT)."""
    from importlib.metadata import version

    names = ("torch", "torchvision", "numpy", "pillow", "opencv-python")
    names += ("timm", "safetensors") if takes_prior else ()
    return [f"{name}=={version(name).split('+')[0]}" for name in names]


def input_example(data: Path) -> bytes:
    """The image model's input example: the first test record of the ingest output ``data``
    (the data the model was trained on), as the test loader decodes it, encoded as PNG
    (lossless: it decodes to the record's pixels), as a client sends an image file."""
    import io

    from PIL import Image

    spec = LoaderSpec.from_meta(read_meta(data))
    loader = make_loader(data / "val.beton", spec, 1, train=False, indices=np.arange(1))
    images, _, _ = next(iter(loader))
    encoded = io.BytesIO()
    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(encoded, format="PNG")
    return encoded.getvalue()


def _staged(path: Path, target: Path) -> Path:
    """``path`` as ``target`` (a hard link; a copy across file systems): MLflow keeps every
    artifact of a model in one folder by its file name, and refuses symbolic links."""
    import shutil

    try:
        target.hardlink_to(path)
    except OSError:
        shutil.copy2(path, target)
    return target


def log_image_model(
    model_file: Path,
    registered_name: str | None = None,
    run_id: str | None = None,
    example: Path | None = None,
    vit: Path | None = None,
) -> Any:
    """Log ``model_file`` to run ``run_id`` (default: the active MLflow run) as the image
    model (``model``): MLflow's models-from-code, with ``ran`` as its code and ``model.pt``
    as its artifact, so it loads with pickle refused (``torch.load(weights_only=True)``
    reads the weights); registered as ``registered_name`` when given.

    ``example``: an image file, the model's input example (MLflow keeps it with the model,
    and its scoring form in ``serving_input_example.json``; logging runs the model on it).
    A vitmask network's ViT weights file (``vit``, else where its prior stage read it, its
    sha256 checked) is logged with it as the artifact ``vit``, read by timm pickle-free
    (safetensors, or ``torch.load(weights_only=True)``); a prior made without a file (init
    random or constant) needs none."""
    import tempfile

    import mlflow
    from mlflow.models import Model

    record = read_record(model_file)
    takes_prior = record.get("prior") is not None
    with tempfile.TemporaryDirectory(prefix="ran-model-") as folder:
        artifacts = {"model": str(model_file)}
        if takes_prior and (weights := prior_weights(record["prior"], vit, str(model_file))):
            artifacts["vit"] = str(_staged(weights, Path(folder) / f"vit{weights.suffix}"))
        if run_id is not None:  # the model belongs to its run's experiment, not the active one
            experiment = mlflow.MlflowClient().get_run(run_id).info.experiment_id
            mlflow.set_experiment(experiment_id=experiment)
        return Model.log(
            artifact_path=None,
            name=MODEL_NAME,
            flavor=mlflow.pyfunc,
            python_model=str(Path(__file__).with_name("mlflow_model.py")),
            artifacts=artifacts,
            code_paths=[str(Path(ran.__file__).parent)],
            registered_model_name=registered_name,
            pip_requirements=model_requirements(takes_prior),
            input_example=[example.read_bytes()] if example is not None else None,
            run_id=run_id,
        )


def log_image_model_once(
    uri: str,
    run_id: str,
    model: Path,
    registered_name: str | None = None,
    example: Path | None = None,
    vit: Path | None = None,
) -> None:
    """:func:`log_image_model` as the training stage's outbox runs it
    (:func:`ran.tracking.log_later`): safe to repeat after a try that failed half-way, it
    logs the model only if the run has none, and registers it only if no version comes
    from this run."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment = client.get_run(run_id).info.experiment_id
    logged = client.search_logged_models(
        experiment_ids=[experiment],
        filter_string=f"source_run_id = '{run_id}' AND name = '{MODEL_NAME}'",
    )
    ready = [m for m in logged if str(m.status) in ("READY", "LoggedModelStatus.READY")]
    if not ready:
        log_image_model(model, registered_name, run_id, example, vit)
        return
    if registered_name and not client.search_model_versions(f"run_id = '{run_id}'"):
        mlflow.register_model(ready[0].model_uri, registered_name)
