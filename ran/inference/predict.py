"""``ran-cli predict``: top-k classes for image files and folders, optionally with the
attention masks drawn over them.

Folders are searched recursively for files with an extension PIL reads; a file named on
the command line is always tried. Images are decoded and scored in batches behind one
progress bar (on stderr, so ``--json`` output stays clean). A missing path or an image
that does not decode stops the command with one line naming the file, unless
``skip_bad``: then it is listed and the rest go on. Mask figures are written to a
temporary folder published whole at the end (:func:`ran.outputs.staged_output`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ran.errors import RanError
from ran.inference.images import read_image
from ran.inference.masks import write_overlays
from ran.inference.predictor import TOP, Predictor
from ran.outputs import staged_output
from ran.progress import progress_bar


@dataclass(frozen=True)
class ImageFile:
    path: Path
    stem: str  # unique among the inputs: names the mask figures


@dataclass
class Predictions:
    rows: list[dict[str, Any]] = field(default_factory=list)  # file, labels, probs
    skipped: list[str] = field(default_factory=list)  # "file: reason"


def collect(paths: list[Path], skip_bad: bool) -> tuple[list[ImageFile], list[str]]:
    """The image files under ``paths`` (folders recursively, sorted) and the missing ones."""
    from PIL import Image

    extensions = set(Image.registered_extensions())
    found: list[tuple[Path, str]] = []
    missing = []
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix.lower() in extensions)
            found += [(f, "__".join(f.relative_to(path).with_suffix("").parts)) for f in files]
        elif path.is_file():
            found.append((path, path.stem))
        elif skip_bad:
            missing.append(f"{path}: does not exist")
        else:
            raise RanError(f"{path} does not exist; pass image files or folders of images")
    stems: dict[str, int] = {}
    images = []
    for path, stem in found:
        stems[stem] = stems.get(stem, 0) + 1
        images.append(ImageFile(path, stem if stems[stem] == 1 else f"{stem}-{stems[stem]}"))
    return images, missing


def _batches(files: list[ImageFile], size: int) -> Iterator[list[ImageFile]]:
    for start in range(0, len(files), size):
        yield files[start : start + size]


def predict_files(
    predictor: Predictor,
    paths: list[Path],
    top: int = TOP,
    batch_size: int = 64,
    skip_bad: bool = False,
    masks: Path | None = None,
) -> Predictions:
    """Score every image under ``paths``; with ``masks``, draw each module's mask there."""

    files, missing = collect(paths, skip_bad)
    if not files and not missing:
        raise RanError(f"no image files under {', '.join(map(str, paths))}; pass JPEG, PNG, …")
    if masks is not None and not predictor.has_masks:
        raise RanError("this network has no attention modules, so no masks: drop --masks")
    result = Predictions(skipped=missing)
    with (
        staged_output(masks) if masks else nullcontext() as folder,
        progress_bar(transient=True) as progress,
    ):
        task = progress.add_task("predicting", total=len(files))
        for batch in _batches(files, batch_size):
            decoded = []
            for file in batch:
                try:
                    decoded.append((file, read_image(file.path, str(file.path))))
                except RanError as exc:
                    if not skip_bad:
                        raise
                    result.skipped.append(f"{file.path}: {exc}")
            progress.advance(task, len(batch))
            if not decoded:
                continue
            result.rows += _score(predictor, decoded, top, folder)
    return result


def _score(
    predictor: Predictor, decoded: list[tuple[ImageFile, Any]], top: int, folder: Path | None
) -> list[dict[str, Any]]:
    """One batch: its rows, and its mask figures into ``folder`` when given."""
    inputs = predictor.inputs([image for _, image in decoded])
    tops = predictor.top(predictor.probabilities(inputs), top)
    if folder is not None:
        drawn = predictor.masks(inputs)
        for n, (file, image) in enumerate(decoded):
            modules = [mask[n] for mask in drawn]
            write_overlays(image, modules, predictor.spec.small_images, folder, file.stem)
    return [{"file": str(file.path), **best} for (file, _), best in zip(decoded, tops, strict=True)]
