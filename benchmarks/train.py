"""End-to-end training throughput on the CPU: loader + augmentation + step, per model, with
the project's FFCV loader and with torchvision's ``ImageFolder`` + ``DataLoader``.

For each model (the previous quick profile's width-0.5 Attention-56 at its batch of 128, and
CIFAR Attention-56 and -92 at the paper's batch of 64; ``benchmarks/step.py`` times today's
quick profile phase by phase) and each loader, the same network takes
``--steps`` timed optimiser steps after ``--warmup`` untimed ones, on the real CIFAR-10
(JPEG) data. "waiting" is the share of the step time spent waiting for the next batch.
The two loaders of a model run in turns of ``--chunk`` steps, so background load slows
both alike. Usage::

    python benchmarks/train.py --source ../shared/data/cifar10-jpeg.tar.gz --steps 30
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ran.config import IngestParams, TrainParams
from ran.data.ingest import ingest
from ran.data.sources import extract_archive, is_archive
from ran.models import build_model
from ran.train.distributed import setup
from ran.train.loop import Trainer

WORKERS = 2
MODELS = {  # name: (depth, width, batch)
    "previous quick profile (attention56, width 0.5)": (56, 0.5, 128),
    "attention56-cifar": (56, 1.0, 64),
    "attention92-cifar": (92, 1.0, 64),
}


def ffcv_batches(trainer: Trainer) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The training path as it runs: FFCV batches through the seeded augmentation."""
    epoch = 0
    while True:
        for images, _, index in trainer.loader:
            x, _ = trainer.transform(images, index.numpy(), epoch)
            yield x, trainer.labels_on_device[index]
        epoch += 1


def torchvision_batches(train_dir: Path, spec: object, batch: int) -> Iterator:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    mean, std = np.array(spec.mean) / 255, np.array(spec.std) / 255
    transform = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean.tolist(), std.tolist()),
        ]
    )
    loader = torch.utils.data.DataLoader(
        ImageFolder(str(train_dir), transform=transform),
        batch_size=batch,
        shuffle=True,
        num_workers=WORKERS,
        drop_last=True,
        persistent_workers=True,
    )
    while True:
        for x, y in loader:
            yield x.contiguous(memory_format=torch.channels_last), y


class Stepper:
    """One network and optimiser; ``run`` times steps and the waits for data among them."""

    def __init__(self, depth: int, width: float, batches: Iterator) -> None:
        self.model = build_model(f"attention{depth}-cifar", 10, width=width)
        self.model = self.model.to(memory_format=torch.channels_last).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9)
        self.batches = batches
        self.seconds = self.waiting = 0.0
        self.images = 0

    def run(self, steps: int, timed: bool = True) -> None:
        for _ in range(steps):
            start = time.perf_counter()
            x, y = next(self.batches)
            ready = time.perf_counter()
            loss = torch.nn.functional.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if timed:
                self.seconds += time.perf_counter() - start
                self.waiting += ready - start
                self.images += len(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("../shared/data/cifar10-jpeg.tar.gz"))
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model and loader")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.torch_threads)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"CIFAR-10 training, CPU, {args.torch_threads} threads, {WORKERS} workers")
    for column in ("model", "batch", "loader", "images/s", "waiting for data"):
        table.add_column(column, justify="left" if column in ("model", "loader") else "right")
    with tempfile.TemporaryDirectory(prefix="ran-bench-") as tmp:
        work = Path(tmp)
        tree = (
            extract_archive(args.source, work / "src") if is_archive(args.source) else args.source
        )
        ingest(IngestParams(dataset="cifar10", source=tree), work / "ingest")
        train_dir = next(p for p in tree.rglob("train") if p.is_dir())
        for name, (depth, width, batch) in MODELS.items():
            params = TrainParams(depth=depth, width=width, batch_size=batch, device="cpu")
            trainer = Trainer(params, work / "ingest", work / "out", setup("cpu"))
            trainer.build()
            steppers = {
                "ran (FFCV + seeded augmentation)": Stepper(depth, width, ffcv_batches(trainer)),
                "torchvision ImageFolder + DataLoader": Stepper(
                    depth, width, torchvision_batches(train_dir, trainer.spec, batch)
                ),
            }
            for stepper in steppers.values():
                stepper.run(args.warmup, timed=False)
            for _ in range(0, args.steps, args.chunk):
                for stepper in steppers.values():
                    stepper.run(args.chunk)
            for loader, s in steppers.items():
                table.add_row(
                    name,
                    str(batch),
                    loader,
                    f"{s.images / s.seconds:.1f}",
                    f"{s.waiting / s.seconds:.1%}",
                )
    Console(width=130).print(table)


if __name__ == "__main__":
    main()
