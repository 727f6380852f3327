"""FFCV ``.beton`` files: how records are written, and the loaders that read them back.

A record is ``(image, label, index)``. The index is the record's position in its split, so
later stages (label noise, per-sample losses) look data up by index without rewriting
images.

Writing is byte-for-byte deterministic, because DVC hashes outputs: FFCV's writer runs a
single process (with several, pages land in whatever order the processes finish: two
2-process writes of CIFAR-10's test split gave two different files), fed in order by
processes that decode the source images ahead of it; and its 'proportion' mode, which
draws from numpy's global RNG, is reseeded per record from ``(seed, index)``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ran import lifetime
from ran.data.parallel import ordered_map
from ran.data.sources import Split
from ran.errors import RanError
from ran.progress import progress_bar

FIELDS = ("image", "label", "index")
IMAGENET_CROP_RATIO = 224 / 256
IMAGENET_SIDE = 224
SMALL_SIDE = 64  # data whose sides all fit (CIFAR, 32 px) trains at its stored side


def import_ffcv() -> Any:
    """Import ffcv without letting it change torch's thread count (it sets 1 on import)."""
    import torch

    threads = torch.get_num_threads()
    import ffcv

    torch.set_num_threads(threads)
    return ffcv


@dataclass(frozen=True)
class WriteSettings:
    """The FFCV image-field settings, recorded in meta.json."""

    write_mode: str  # raw | proportion | jpg | smart
    max_resolution: int
    jpeg_quality: int
    compress_probability: float
    seed: int
    page_size: int = 1 << 23  # FFCV's default (4 × 2 MiB); see page_size_for

    @staticmethod
    def page_size_for(max_pixels: int) -> int:
        """FFCV's default page, or the power of two that holds the largest raw image: a
        record larger than a page makes FFCV's writer process fail."""
        return max(1 << 23, 1 << int(3 * max_pixels - 1).bit_length())


def prepare_image(image: np.ndarray, max_resolution: int) -> np.ndarray:
    """The image as FFCV will store it: its longer side capped by FFCV's own resizer."""
    import_ffcv()
    from ffcv.fields.rgb_image import resizer

    return resizer(np.ascontiguousarray(image), max_resolution)


class _Records:
    """The indexed dataset FFCV's writer reads: kept source records, renumbered 0..n-1.

    FFCV's single writer process asks for records in order, so images are decoded ahead of
    it by ``workers`` processes (started inside the writer process, on first access); an
    out-of-order request restarts the stream there, slower but still correct.
    """

    def __init__(self, split: Split, keep: np.ndarray, settings: WriteSettings, workers: int):
        self.split, self.keep, self.settings, self.workers = split, keep, settings, workers
        self._stream: Iterator[np.ndarray] | None = None
        self._next = 0
        self.failed = multiprocessing.Value("q", -1, lock=False)  # a failed index, seen by all

    def __len__(self) -> int:
        return len(self.keep)

    def _image(self, index: int) -> np.ndarray:
        source = int(self.keep[index])
        try:
            return prepare_image(self.split.load(source), self.settings.max_resolution)
        except Exception:
            self.failed.value = index  # marked where it fails: the main process polls it
            raise

    def __getitem__(self, index: int) -> tuple[np.ndarray, int, int]:
        if self._stream is None or index != self._next:
            self._stream = ordered_map(self._image, range(index, len(self)), self.workers)
        image = next(self._stream)
        self._next = index + 1
        if self._next == len(self):
            self._stream.close()  # stops the decoding processes
        np.random.seed([self.settings.seed, index])  # FFCV's proportion mode draws next
        return image, int(self.split.labels[self.keep[index]]), index


def write_beton(
    split: Split, keep: np.ndarray, path: Path, settings: WriteSettings, workers: int = 1
) -> None:
    """Write the records ``keep`` of ``split`` to ``path``, with one rich progress bar.

    ``workers`` processes decode the source images; FFCV's writer itself runs one process.
    FFCV's own tqdm bar is replaced, for this call, by the rich bar the rest of ingest uses
    (it advances as FFCV reports written chunks of 1,000 records).
    """
    import_ffcv()
    import ffcv.writer
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {
        "image": RGBImageField(
            write_mode=settings.write_mode,
            max_resolution=settings.max_resolution,
            jpeg_quality=settings.jpeg_quality,
            compress_probability=settings.compress_probability,
        ),
        "label": IntField(),
        "index": IntField(),
    }
    writer = DatasetWriter(str(path), fields, page_size=settings.page_size, num_workers=1)
    records = _Records(split, keep, settings, workers)
    with progress_bar() as progress:
        task = progress.add_task(f"writing {path.name}", total=len(keep))

        class _RichBar:  # what FFCV's writer calls tqdm: total=, update(n), close()
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                pass

            def update(self, n: int = 1) -> None:
                progress.advance(task, n)

            def close(self) -> None:
                pass

        lifetime.install()  # FFCV's writer process (and its decoders) die with this one
        ffcv_hooks = ffcv.writer.tqdm, ffcv.writer.sleep
        ffcv.writer.tqdm, ffcv.writer.sleep = _RichBar, _failure_poll(records, path)
        try:
            writer.from_indexed_dataset(records, chunksize=1000)
        except RanError:
            writer.metadata_sm.close()  # FFCV frees its shared metadata only on success
            writer.metadata_sm.unlink()
            raise
        finally:
            ffcv.writer.tqdm, ffcv.writer.sleep = ffcv_hooks


def _failure_poll(records: _Records, path: Path) -> Callable[[float], None]:
    """A ``sleep`` for FFCV's wait loop that raises when its writer process has failed.

    FFCV's ``DatasetWriter`` sleeps in a loop until a shared counter says every record is
    written; if its writer process dies (a source file vanished after the decode pass, a
    record larger than a page) it waits forever. This poll, called there instead of
    ``time.sleep``, sees the record that failed (marked in shared memory by the process
    that decoded it) or a writer process that exited with an error, and raises in the main
    thread at a known point, once the writer's processes are gone. (It replaces a watchdog
    thread that interrupted the main thread: one full test run hung in this path, cause
    not pinned down, so nothing here relies on threads or on the writer's own teardown.)
    """
    before = set(multiprocessing.active_children())

    def poll(seconds: float) -> None:
        time.sleep(seconds)
        started = set(multiprocessing.active_children()) - before  # reaps exited ones too
        index = records.failed.value
        crashed = [p for p in started if p.exitcode not in (None, 0)]
        if index < 0 and not crashed:
            return
        _stop(started)
        if index < 0:
            raise RanError(
                f"writing {path.name} failed: FFCV's writer process exited with code "
                f"{crashed[0].exitcode} (traceback above)"
            )
        raise RanError(
            f"writing {path.name} failed at {records.split.name(int(records.keep[index]))} "
            "(traceback above); the source changed after it was checked: fix it and run again"
        )

    return poll


def _stop(processes: set[multiprocessing.process.BaseProcess], grace: float = 5) -> None:
    """Let FFCV's failed writer processes exit (printing their traceback); terminate any
    still running after ``grace`` seconds, with the decoders they started."""
    import psutil

    for process in processes:
        process.join(grace)
        if process.exitcode is not None:
            continue
        try:
            decoders = psutil.Process(process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            decoders = []
        process.terminate()
        for decoder in decoders:
            with contextlib.suppress(psutil.NoSuchProcess):
                decoder.terminate()
        process.join(5)
        psutil.wait_procs(decoders, timeout=5)


def read_records(path: Path) -> dict[str, np.ndarray]:
    """The metadata table of a beton (label, index, stored height/width, mode): no pixels."""
    import_ffcv()
    from ffcv.reader import Reader

    reader = Reader(str(path))
    names = reader.field_names
    meta = reader.metadata
    image = meta[f"f{names.index('image')}"]
    return {
        "label": np.asarray(meta[f"f{names.index('label')}"], dtype=np.int64),
        "index": np.asarray(meta[f"f{names.index('index')}"], dtype=np.int64),
        "height": np.asarray(image["height"], dtype=np.int64),
        "width": np.asarray(image["width"], dtype=np.int64),
        "mode": np.asarray(image["mode"], dtype=np.int64),
    }


@dataclass(frozen=True)
class LoaderSpec:
    """What a loader needs to know about the data: stored statistics and image geometry."""

    mean: tuple[float, float, float]  # 0–255 scale, from meta.json
    std: tuple[float, float, float]
    side: int  # the data side: what the loader yields; for small raw images the stored side
    small_images: bool  # True: stored at their side (CIFAR); False: variable sizes (ImageNet)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> LoaderSpec:
        """The spec of an ingest output: CIFAR-size data (every side ≤ 64) keeps its side."""
        small = max(info["max_side"] for info in meta["splits"].values()) <= SMALL_SIDE
        side = meta["splits"]["train"]["max_side"] if small else IMAGENET_SIDE
        return cls(tuple(meta["mean"]), tuple(meta["std"]), side, small)


def make_loader(
    path: Path,
    spec: LoaderSpec,
    batch_size: int,
    train: bool,
    num_workers: int = 2,
    device: str = "cpu",
    indices: np.ndarray | None = None,
    order: Any = None,
    distributed: bool = False,
) -> Any:
    """An FFCV loader yielding ``(images uint8 N×3×H×W, labels, indices)`` batches.

    Only decoding happens here: random augmentation and normalisation run on the batch
    afterwards (:mod:`ran.train.augment`), seeded per record, because FFCV's own random
    operations are not reproducible. Small images (CIFAR) come as stored; large ones as
    the central square at 256/224 of ``spec.side`` for training (the random-resized
    crop is cut from it) or ImageNet's centre crop (224/256 of the short side) for
    evaluation. ``order`` is a :class:`ffcv.traversal_order.base.TraversalOrder` subclass
    (training's seeded, sharded, resumable order); by default records come in sequence and
    every one of them (no dropped last batch). On CUDA, images and labels move to the GPU
    with ``non_blocking``; indices stay on the CPU, where augmentation reads them.
    Images are channels-last in memory (NCHW shape).
    """
    import_ffcv()
    import torch
    from ffcv.fields.decoders import CenterCropRGBImageDecoder, IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

    if spec.small_images:
        image = [SimpleRGBImageDecoder()]
    elif train:
        side = round(spec.side / IMAGENET_CROP_RATIO)
        image = [CenterCropRGBImageDecoder((side, side), ratio=1.0)]
    else:
        size = (spec.side, spec.side)
        image = [CenterCropRGBImageDecoder(size, ratio=IMAGENET_CROP_RATIO)]
    on_gpu = device.startswith("cuda")
    to_device = [ToDevice(torch.device(device), non_blocking=True)] if on_gpu else []
    image += [ToTensor(), *to_device, ToTorchImage(channels_last=True)]
    label = [IntDecoder(), ToTensor(), Squeeze(), *to_device]
    index = [IntDecoder(), ToTensor(), Squeeze()]

    threads = torch.get_num_threads()
    loader = Loader(
        str(path),
        batch_size=batch_size,
        num_workers=num_workers,
        order=order or OrderOption.SEQUENTIAL,
        drop_last=order is not None,
        distributed=distributed,
        seed=0,
        indices=indices,
        os_cache=True,
        pipelines={"image": image, "label": label, "index": index},
    )
    return LoaderKeepingTorchThreads(loader, threads)


class LoaderKeepingTorchThreads:
    """An FFCV loader that gives torch back its thread count.

    FFCV's ``Loader`` (and each epoch's iterator) sets torch's global thread count to its
    own ``num_workers``; the model then runs on fewer threads than the user chose.
    """

    def __init__(self, loader: Any, torch_threads: int) -> None:
        import torch

        self.loader, self.torch_threads = loader, torch_threads
        torch.set_num_threads(torch_threads)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        import torch

        iterator = iter(self.loader)
        torch.set_num_threads(self.torch_threads)
        return iterator
