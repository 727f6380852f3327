"""Loader throughput: one training epoch of CIFAR-10 with the standard augmentation.

Three loaders side by side, same data, same work per image (pad-4 random crop 32,
horizontal flip, normalise, float32 NCHW batches of 256, 2 workers):

- ``ran`` — the project's loader as training uses it: :func:`ran.data.beton.make_loader`
  with the seeded training order, then the seeded batch augmentation
  (:class:`ran.train.augment.BatchTransform`);
- ``ffcv`` — a plain FFCV pipeline written directly against FFCV, with FFCV's own
  augmentation (fast, but not seeded per record: the bound on what FFCV can do here);
- ``torchvision`` — ``ImageFolder`` + ``DataLoader`` over the JPEG files.

The first FFCV epoch pays for numba compilation; it is reported on its own, and the rate
is over the later epochs, which run round-robin. Usage::

    python benchmarks/loader.py --source ../shared/data/cifar10-jpeg.tar.gz --epochs 4
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from ran.config import IngestParams, TrainParams
from ran.data.beton import LoaderSpec, import_ffcv, make_loader
from ran.data.ingest import ingest
from ran.data.sources import extract_archive, is_archive

BATCH, WORKERS, SIDE = 256, 2, 32


def _epoch(loader: Iterable) -> tuple[float, int]:
    """Seconds and images of one pass over ``loader``."""
    start, images = time.perf_counter(), 0
    for batch in loader:
        x = batch[0]
        shape = (x.dtype, tuple(x.shape[1:]))
        assert shape == (torch.float32, (3, SIDE, SIDE)), f"{type(loader).__name__}: {shape}"
        images += x.shape[0]
    return time.perf_counter() - start, images


def compare(makers: dict[str, Callable[[], Iterable]], epochs: int) -> dict[str, tuple]:
    """Per loader: (first-epoch seconds, steady images/s, images per epoch).

    Epochs run round-robin (one epoch of each loader per round), so a neighbour's load or
    a warming page cache slows every loader alike instead of whichever runs first.
    """
    loaders = {name: make() for name, make in makers.items()}
    seconds: dict[str, list[float]] = {name: [] for name in loaders}
    images: dict[str, int] = {}
    for _ in range(epochs):
        for name, loader in loaders.items():
            took, images[name] = _epoch(loader)
            seconds[name].append(took)
    return {
        name: (s[0], images[name] * len(s[1:]) / sum(s[1:]), images[name])
        for name, s in seconds.items()
    }


class ProjectLoader:
    """The project's FFCV loader and its seeded batch augmentation, epoch after epoch."""

    def __init__(self, beton: Path, spec: LoaderSpec) -> None:
        from ran.data.order import seeded_order
        from ran.train.augment import BatchTransform

        self.loader = make_loader(
            beton, spec, BATCH, train=True, num_workers=WORKERS, order=seeded_order(0)
        )
        self.transform = BatchTransform(spec, TrainParams(), seed=0)
        self.epoch = 0

    def __iter__(self) -> Iterable:
        for images, labels, index in self.loader:
            yield self.transform(images, index.numpy(), self.epoch), labels
        self.epoch += 1


def plain_ffcv(beton: Path, mean: np.ndarray, std: np.ndarray) -> Iterable:
    import_ffcv()
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import (
        NormalizeImage,
        RandomHorizontalFlip,
        RandomTranslate,
        Squeeze,
        ToTensor,
        ToTorchImage,
    )

    image = [
        SimpleRGBImageDecoder(),
        RandomHorizontalFlip(),
        RandomTranslate(padding=4),
        NormalizeImage(mean, std, np.float32),
        ToTensor(),
        ToTorchImage(),
    ]
    label = [IntDecoder(), ToTensor(), Squeeze()]
    return Loader(
        str(beton),
        batch_size=BATCH,
        num_workers=WORKERS,
        order=OrderOption.RANDOM,
        drop_last=True,
        os_cache=True,
        pipelines={"image": image, "label": label, "index": None},
    )


def torchvision_folder(train_dir: Path, mean: np.ndarray, std: np.ndarray) -> Iterable:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    transform = T.Compose(
        [
            T.RandomCrop(SIDE, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize((mean / 255).tolist(), (std / 255).tolist()),
        ]
    )
    dataset = ImageFolder(str(train_dir), transform=transform)
    return torch.utils.data.DataLoader(
        dataset, batch_size=BATCH, shuffle=True, num_workers=WORKERS, drop_last=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("../shared/data/cifar10-jpeg.tar.gz"))
    parser.add_argument("--epochs", type=int, default=4, help="epochs per loader (≥ 2)")
    parser.add_argument("--torch-threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory(prefix="ran-bench-") as tmp:
        work = Path(tmp)
        tree = (
            extract_archive(args.source, work / "src") if is_archive(args.source) else args.source
        )
        meta = ingest(IngestParams(dataset="cifar10", source=tree), work / "ingest")
        beton = work / "ingest" / "train.beton"
        train_dir = next(p for p in tree.rglob("train") if p.is_dir())
        mean, std = np.array(meta["mean"]), np.array(meta["std"])
        spec = LoaderSpec(tuple(mean), tuple(std), side=SIDE, small_images=True)

        loaders = {
            "ran (project FFCV loader)": lambda: ProjectLoader(beton, spec),
            "ffcv (plain pipeline)": lambda: plain_ffcv(beton, mean, std),
            "torchvision ImageFolder + DataLoader": lambda: torchvision_folder(
                train_dir, mean, std
            ),
        }
        results = compare(loaders, args.epochs)

    reference = results["ffcv (plain pipeline)"][1]
    table = Table(title=f"CIFAR-10 train epoch, batch {BATCH}, {WORKERS} workers, CPU")
    for column in ("loader", "first epoch (s)", "steady images/s", "vs plain FFCV", "images"):
        table.add_column(column, justify="left" if column == "loader" else "right")
    for name, (first, rate, images) in results.items():
        table.add_row(
            name, f"{first:.1f}", f"{rate:,.0f}", f"{rate / reference:.0%}", f"{images:,}"
        )
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
