"""Readers for every source layout ingestion accepts, behind one shape: :class:`SourceData`.

A source is *what* the data is (``dataset``: cifar10, cifar100, imagenet, tiny-imagenet,
imagefolder) and *where* it lies (``source``: an archive, a folder, or nothing for the
official download). Whatever the layout, a reader returns two :class:`Split` objects (train
and the official held-out split, called ``val``) that load one RGB ``uint8`` image by index,
so the rest of ingestion never looks at layouts again.

Archives are never trusted: a member with an absolute path or ``..`` is refused before
anything is extracted, and extraction itself uses Python's ``data`` filter.
"""

from __future__ import annotations

import csv
import hashlib
import pickle
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ran.errors import RanError

DATASETS = ("cifar10", "cifar100", "imagenet", "tiny-imagenet", "imagefolder")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
SOURCE_HINT = (
    "point the source at a local copy: `--source PATH`, params.yaml `ingest.source` "
    "(`dvc exp run -S ingest.source=PATH`) or the RAN_INGEST_SOURCE environment variable, "
    "e.g. ../shared/data/cifar10-jpeg.tar.gz"
)


class Split(Protocol):
    """One split of a source: images by index, their labels, and each record's stable name.

    Names are relative to the source (never to a temporary extraction folder), so the
    manifest is the same wherever the source was unpacked.
    """

    labels: np.ndarray

    def __len__(self) -> int: ...

    def load(self, i: int) -> np.ndarray:
        """Image ``i`` as an H×W×3 ``uint8`` RGB array (raises on unreadable data)."""
        ...

    def name(self, i: int) -> str: ...


@dataclass
class ArraySplit:
    """Images already decoded in memory (the CIFAR python format)."""

    images: np.ndarray  # N×H×W×3 uint8
    labels: np.ndarray
    origin: str

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> np.ndarray:
        return self.images[i]

    def name(self, i: int) -> str:
        return f"{self.origin}[{i}]"


def to_rgb(img: Any) -> np.ndarray:
    """A decoded PIL image as H×W×3 ``uint8`` RGB: greyscale, CMYK, palette (transparency
    through RGBA) and RGBA convert; 16-bit greyscale is scaled to 8 bits, not clipped."""
    if img.mode.startswith("I;16") or (img.mode == "I" and np.asarray(img).max() > 255):
        wide = np.asarray(img, dtype=np.uint32)
        grey = (wide * 255 + 32767) // 65535
        return np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


@dataclass
class FileSplit:
    """Images as files on disk (ImageFolder, ImageNet, Tiny-ImageNet)."""

    root: Path
    files: list[str]  # relative to root, sorted for determinism
    labels: np.ndarray
    prefix: str = ""  # root relative to the source, so names do not depend on where it lies

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> np.ndarray:
        from PIL import Image

        with Image.open(self.root / self.files[i]) as img:
            img.load()  # decode now, so truncated files fail here, naming the file
            return to_rgb(img)

    def name(self, i: int) -> str:
        return f"{self.prefix}/{self.files[i]}" if self.prefix else self.files[i]


@dataclass
class SourceData:
    """What a reader hands to ingestion: class names, both splits, and where they came from."""

    classes: list[str]
    splits: dict[str, Split]
    origin: str  # path or URL, for meta.json and MLflow
    archive: Path | None = None  # the single file the data came from, hashed for the digest
    wnids: list[str] | None = None


# --------------------------------------------------------------------------- archives


def _checked_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """All members, after refusing any that would land outside the target folder."""
    members = tar.getmembers()
    for m in members:
        parts = Path(m.name).parts
        if m.name.startswith(("/", "\\")) or ".." in parts or (m.issym() or m.islnk()):
            raise RanError(
                f"unsafe archive {archive}: member '{m.name}' has an absolute path, '..' or a "
                "link; refusing to extract it — repack the archive with relative paths"
            )
    return members


# tarfile's extraction filters came with Python 3.11.4 (Debian 12 ships 3.11.2); without
# them, _checked_members alone refuses what the "data" filter would.
SAFE_EXTRACTION = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def extract_archive(archive: Path, target: Path) -> Path:
    """Safely extract a ``.tar``/``.tar.gz`` into ``target`` and return ``target``."""
    try:
        with tarfile.open(archive) as tar:
            members = _checked_members(tar, archive)
            tar.extractall(target, members=members, **SAFE_EXTRACTION)
    except tarfile.TarError as exc:
        raise RanError(f"cannot read archive {archive}: {exc}; check the file is a tar") from exc
    return target


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.endswith((".tar", ".tar.gz", ".tgz"))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- CIFAR python


def _cifar_layout(dataset: str) -> tuple[str, list[str], str, str, str, str]:
    """(folder, train files, test file, meta file, label key, class-names key)."""
    if dataset == "cifar10":
        batches = [f"data_batch_{i}" for i in range(1, 6)]
        return "cifar-10-batches-py", batches, "test_batch", "batches.meta", "labels", "label_names"
    return "cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names"


def _iter_cifar_files(root: Path, names: set[str]) -> Iterator[tuple[str, bytes]]:
    """Yield (name, bytes) of the wanted CIFAR pickles from an archive or a folder."""
    if is_archive(root):
        with tarfile.open(root) as tar:
            _checked_members(tar, root)
            for m in tar:
                if m.isfile() and Path(m.name).name in names:
                    yield Path(m.name).name, tar.extractfile(m).read()
    else:
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.name in names:
                yield path.name, path.read_bytes()


def read_cifar(dataset: str, root: Path) -> SourceData:
    """The official CIFAR-10/100 python format, from its archive or extracted folder."""
    folder, train_files, test_file, meta_file, label_key, names_key = _cifar_layout(dataset)
    wanted = {*train_files, test_file, meta_file}
    found: dict[str, dict] = {}
    for name, blob in _iter_cifar_files(root, wanted):
        try:
            found[name] = pickle.loads(blob, encoding="latin1")
        except Exception as exc:
            raise RanError(f"corrupt CIFAR file {name} in {root}: {exc}") from exc
    missing = sorted(wanted - found.keys())
    if missing:
        raise RanError(
            f"{root} is not the CIFAR python format for {dataset}: missing {', '.join(missing)} "
            f"(expected {folder}/ as in the official archive); for JPEG folders use "
            "--dataset imagefolder or an ImageFolder tree"
        )

    def to_split(files: list[str]) -> ArraySplit:
        data = np.concatenate([np.asarray(found[f]["data"], dtype=np.uint8) for f in files])
        labels = np.concatenate([np.asarray(found[f][label_key], dtype=np.int64) for f in files])
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # row-major RGB planes
        return ArraySplit(np.ascontiguousarray(images), labels, "+".join(files))

    return SourceData(
        classes=list(found[meta_file][names_key]),
        splits={"train": to_split(train_files), "val": to_split([test_file])},
        origin=str(root),
        archive=root if root.is_file() else None,
    )


def download_cifar(dataset: str, cache: Path) -> SourceData:
    """The official download through torchvision (needs network; fails fast without)."""
    import torchvision

    cls = torchvision.datasets.CIFAR10 if dataset == "cifar10" else torchvision.datasets.CIFAR100
    try:
        cls(root=str(cache), train=True, download=True)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RanError(
            f"cannot download {dataset} from {cls.url} ({reason}); {SOURCE_HINT}"
        ) from exc
    data = read_cifar(dataset, cache / cls.filename)
    data.origin = cls.url
    return data


# --------------------------------------------------------------------------- image trees


def _images_under(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _find_split_root(root: Path) -> Path:
    """The folder holding ``train/``: the root, a lone top-level folder, or ImageNet's CLS-LOC."""
    candidates = [root, root / "ILSVRC" / "Data" / "CLS-LOC"]
    here = root
    while not (here / "train").is_dir():
        children = [c for c in here.iterdir() if c.is_dir() and not c.name.startswith(".")]
        if len(children) != 1:
            break
        here = children[0]
        candidates.append(here)
    for c in candidates:
        if (c / "train").is_dir():
            return c
    raise RanError(
        f"{root} has no train/ folder: expected an ImageFolder tree train/<class>/<image> with "
        "val/ or test/ beside it (or the CIFAR python archive with --dataset cifar10/cifar100)"
    )


def _class_names(root: Path, split_root: Path, wnids: list[str]) -> tuple[list[str], bool]:
    """Human class names from a synset file when there is one (ImageNet, Tiny-ImageNet)."""
    for folder in dict.fromkeys((root, split_root, split_root.parent)):  # ordered, no repeats
        for fname, sep in (("LOC_synset_mapping.txt", " "), ("words.txt", "\t")):
            path = folder / fname
            if path.is_file():
                names = {}
                for line in path.read_text().splitlines():
                    if sep in line:
                        wnid, name = line.split(sep, 1)
                        names[wnid.strip()] = name.strip()
                if all(w in names for w in wnids):
                    return [names[w] for w in wnids], True
    return list(wnids), False


def _labelled_val(split_root: Path, root: Path, index: dict[str, int]) -> FileSplit | None:
    """The held-out split in the layout it comes in, or None when there is none."""
    for name in ("val", "test"):
        val = split_root / name
        if not val.is_dir():
            continue
        annotations = val / "val_annotations.txt"
        if annotations.is_file():  # Tiny-ImageNet: val/images/* + filename<TAB>wnid<TAB>bbox
            pairs = [line.split("\t")[:2] for line in annotations.read_text().splitlines() if line]
            return _file_split(val, [(f"images/{f}", w) for f, w in pairs], index, annotations)
        solutions = [p / "LOC_val_solution.csv" for p in (split_root, root, val)]
        solution = next((p for p in solutions if p.is_file()), None)
        if solution is not None:  # ImageNet: flat val/*.JPEG + ImageId,PredictionString
            with open(solution, newline="") as fh:
                rows = [
                    (r["ImageId"], r["PredictionString"].split()[0]) for r in csv.DictReader(fh)
                ]
            files = {p.stem: p.relative_to(val).as_posix() for p in _images_under(val)}
            missing = [i for i, _ in rows if i not in files]
            if missing:
                raise RanError(
                    f"{solution} lists {len(missing)} images absent from {val} "
                    f"(first: {missing[0]}); restore them or fix the mapping"
                )
            return _file_split(val, [(files[i], w) for i, w in rows], index, solution)
        return _folder_split(val, index)
    return None


def _file_split(
    root: Path, pairs: list[tuple[str, str]], index: dict[str, int], origin: Path
) -> FileSplit:
    unknown = sorted({w for _, w in pairs if w not in index})
    if unknown:
        raise RanError(
            f"{origin} names classes absent from train/: {', '.join(unknown[:5])}; "
            "the held-out split must use the training classes"
        )
    pairs = sorted(pairs)
    return FileSplit(root, [f for f, _ in pairs], np.array([index[w] for _, w in pairs]))


def _folder_split(folder: Path, index: dict[str, int]) -> FileSplit:
    """``folder/<class>/**/<image>``, labels from ``index`` (class folder name → label)."""
    pairs = []
    for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
        if cls.name not in index:
            raise RanError(f"{cls} is a class absent from train/; use the training classes")
        images = _images_under(cls)
        if not images:
            raise RanError(f"empty class folder {cls}: add its images or remove the folder")
        pairs += [(p.relative_to(folder).as_posix(), cls.name) for p in images]
    if not pairs:
        raise RanError(f"{folder} holds no images in <class>/ folders")
    return _file_split(folder, pairs, index, folder)


def read_image_tree(root: Path) -> SourceData:
    """An ImageFolder tree (train/ + val/ or test/), ImageNet's or Tiny-ImageNet's layout."""
    split_root = _find_split_root(root)
    wnids = sorted(p.name for p in (split_root / "train").iterdir() if p.is_dir())
    if not wnids:
        raise RanError(f"{split_root / 'train'} has no class folders: expected train/<class>/")
    index = {w: i for i, w in enumerate(wnids)}
    train = _folder_split(split_root / "train", index)
    val = _labelled_val(split_root, root, index)
    if val is None:
        raise RanError(
            f"{split_root} has train/ but no held-out split: add val/<class>/ (or test/), "
            "ImageNet's flat val/ with LOC_val_solution.csv, or Tiny-ImageNet's val/images "
            "with val_annotations.txt"
        )
    for split in (train, val):
        split.prefix = split.root.relative_to(root).as_posix()
    classes, named = _class_names(root, split_root, wnids)
    return SourceData(
        classes=classes,
        splits={"train": train, "val": val},
        origin=str(root),
        wnids=wnids if named else None,
    )


def read_source(dataset: str, source: Path | None, workdir: Path) -> SourceData:
    """Dispatch on (dataset, source); ``workdir`` receives extractions and downloads."""
    if dataset not in DATASETS:
        raise RanError(f"unknown dataset '{dataset}'; choose one of {', '.join(DATASETS)}")
    if source is None:
        if dataset not in ("cifar10", "cifar100"):
            raise RanError(f"{dataset} has no automatic download; pass --source PATH")
        return download_cifar(dataset, workdir / "download")
    if not source.exists():
        raise RanError(f"source {source} does not exist; {SOURCE_HINT}")
    if dataset in ("cifar10", "cifar100") and _is_cifar_python(dataset, source):
        return read_cifar(dataset, source)
    tree = extract_archive(source, workdir / "extract") if is_archive(source) else source
    if not tree.is_dir():
        raise RanError(f"source {source} is neither a folder nor a .tar/.tar.gz archive")
    data = read_image_tree(tree)
    data.origin = str(source)
    data.archive = source if source.is_file() else None
    _check_known_classes(dataset, data)
    return data


def _is_cifar_python(dataset: str, source: Path) -> bool:
    """True when ``source`` is (or holds) the official python-format folder of ``dataset``."""
    folder, _, _, meta_file, _, _ = _cifar_layout(dataset)
    if source.is_dir():
        return any(p.is_file() for p in source.rglob(meta_file))
    if not is_archive(source):
        return False
    with tarfile.open(source) as tar:
        first = tar.next()  # reads one header, not the whole archive
    return first is not None and Path(first.name).parts[0] == folder


def _check_known_classes(dataset: str, data: SourceData) -> None:
    """A tree claimed to be CIFAR-10/100 must have that many classes (names for CIFAR-10)."""
    expected = {"cifar10": 10, "cifar100": 100}.get(dataset)
    if expected is not None and len(data.classes) != expected:
        raise RanError(
            f"{data.origin} has {len(data.classes)} classes but {dataset} has {expected}; "
            "use --dataset imagefolder for other data"
        )
    if dataset == "cifar10" and sorted(data.classes) != sorted(CIFAR10_CLASSES):
        raise RanError(
            f"{data.origin} class folders {data.classes} are not CIFAR-10's "
            f"{list(CIFAR10_CLASSES)}; use --dataset imagefolder for other data"
        )
