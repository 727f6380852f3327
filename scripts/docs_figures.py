"""Regenerate the documentation's figures (docs/figures/*.png) from a real run's outputs.

Run after `make repro` (and any study: `dvc repro --keep-going studies/dvc.yaml:noise`):

    .venv/bin/python scripts/docs_figures.py            # or: make docs-figures
    .venv/bin/python scripts/docs_figures.py --root PATH  # another checkout's outputs

Every figure comes from the project's own outputs or commands, never drawn by hand:

- confusion.png, masks-test-NN.png: copies of `data/evaluate/confusion.png` and of the first
  attention-mask figures in `data/evaluate/masks/` (the evaluate stage draws them);
- training-curves.png: `data/train/curves.csv` (and `holdout.csv` when training kept a
  hold-out), drawn here with matplotlib;
- noise-transition.png: the `transition.png` that `ran-cli noise --kind symmetric --rate 0.3`
  writes for `data/ingest`, run into a temporary folder with a temporary MLflow store (the
  project's store gets no run from the docs);
- study-<study>.png: copies of `reports/<study>/report.png` for every study that has one;
- pretrain-knn.png, pretrain-maps.png: copies of the `knn.png` and `maps.png` the pretrain
  stage writes for CIFAR-10 (`data/pretrain/cifar10`).

A missing input is one line naming the command that makes it, and its figure is skipped
(the pages show a note instead: scripts/mkdocs_hooks.py). Each figure is written to a
temporary file and renamed. Exit status 1 only when no figure could be produced.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ran.outputs import atomic_write

REPO = Path(__file__).resolve().parents[1]
OUT = Path("docs/figures")
MASKS = 4  # how many of evaluate's mask figures the docs show
STUDIES = ("noise", "arl-nal", "attention", "mask", "vitmask")
STUDY_COMMAND = {name: f"dvc repro --keep-going studies/dvc.yaml:{name}" for name in STUDIES}
NOISE_ARGS = ("--kind", "symmetric", "--rate", "0.3")
PRETRAIN_COMMAND = "dvc repro studies/dvc.yaml:pretrain@cifar10"


@dataclass(frozen=True)
class Figure:
    """One figure of the docs: its file name, the input it is made from (relative to the
    root) and the command that makes that input."""

    name: str
    source: str
    command: str


FIGURES: tuple[Figure, ...] = (
    Figure("training-curves.png", "data/train/curves.csv", "make repro"),
    Figure("confusion.png", "data/evaluate/confusion.png", "make repro"),
    *(
        Figure(f"masks-test-{n:02d}.png", f"data/evaluate/masks/test-{n:02d}.png", "make repro")
        for n in range(MASKS)
    ),
    Figure("noise-transition.png", "data/ingest", "make repro"),
    *(
        Figure(f"study-{name}.png", f"reports/{name}/report.png", STUDY_COMMAND[name])
        for name in STUDIES
    ),
    *(
        Figure(f"pretrain-{name}.png", f"data/pretrain/cifar10/{name}.png", PRETRAIN_COMMAND)
        for name in ("knn", "maps")
    ),
)
BY_NAME = {figure.name: figure for figure in FIGURES}


def missing_note(name: str) -> str:
    """What the docs say where a figure has not been generated (scripts/mkdocs_hooks.py)."""
    figure = BY_NAME[name]
    return (
        f"Figure not generated yet: `{figure.source}` comes from `{figure.command}`, "
        "then `make docs-figures` draws it."
    )


def copy_figure(source: Path, target: Path) -> None:
    atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def _read_csv(path: Path) -> dict[str, list[float]]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {key: [float(row[key]) for row in rows if row.get(key)] for key in rows[0]}


def draw_curves(curves: Path, holdout: Path | None, target: Path) -> None:
    """Loss, accuracy (train, and hold-out when present) and learning rate per iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = _read_csv(curves)
    for column in ("iteration", "loss", "train_accuracy", "lr"):
        if column not in data or not data[column]:
            raise ValueError(f"{curves} has no {column!r} values")
    held = _read_csv(holdout) if holdout is not None else {}
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    x = data["iteration"]
    style = {"marker": "o", "markersize": 3} if len(x) <= 20 else {}  # a few steps: show them
    axes[0].plot(x, data["loss"], color="C0", **style)
    axes[0].set_title("training loss")
    axes[1].plot(x, data["train_accuracy"], color="C1", label="train (augmented batches)", **style)
    if held.get("holdout_accuracy"):
        axes[1].plot(
            held["iteration"], held["holdout_accuracy"], "o-", color="C2", label="hold-out"
        )
    axes[1].set_title("accuracy")
    axes[1].set_ylim(0, 1)
    axes[1].legend(loc="lower right", fontsize=8)
    axes[2].plot(x, data["lr"], color="C3", **style)
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    steps = f"{len(x)} logging step{'' if len(x) == 1 else 's'}"
    fig.suptitle(f"{curves.parent.name}/{curves.name}: {steps}", fontsize=9)
    fig.tight_layout()

    def save(tmp: Path) -> None:
        fig.savefig(tmp, dpi=100, format="png")

    try:
        atomic_write(target, save)
    finally:
        plt.close(fig)


def ran_cli() -> str:
    """The `ran-cli` of the environment running this script, else the one on PATH."""
    beside = Path(sys.executable).parent / "ran-cli"
    return str(beside) if beside.exists() else shutil.which("ran-cli") or "ran-cli"


def noise_transition(ingest: Path, target: Path) -> None:
    """`ran-cli noise ... --out TMP` on ``ingest``; its transition.png becomes ``target``."""
    with tempfile.TemporaryDirectory(prefix="docs-noise-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
        env.pop("DVC_ROOT", None)
        args = [ran_cli(), "noise", "--data", str(ingest.resolve()), "--out", str(work / "noise")]
        result = subprocess.run(
            [*args, *NOISE_ARGS], cwd=work, env=env, capture_output=True, text=True
        )
        if result.returncode != 0:
            last = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()
            raise RuntimeError(f"`ran-cli noise {' '.join(NOISE_ARGS)}` failed: {last[-1]}")
        copy_figure(work / "noise" / "transition.png", target)


def generate(root: Path, out: Path) -> tuple[list[str], list[str]]:
    """Write every figure whose input exists under ``root`` into ``out``; returns the names
    written and one line per figure skipped."""
    written: list[str] = []
    skipped: list[str] = []

    def missing(figure: Figure) -> None:
        skipped.append(f"{figure.source} missing: run `{figure.command}` ({figure.name} skipped)")

    for figure in FIGURES:
        source = root / figure.source
        if not source.exists():
            missing(figure)
            continue
        try:
            out.mkdir(parents=True, exist_ok=True)  # once there is something to draw
            if figure.name == "training-curves.png":
                holdout = source.with_name("holdout.csv")
                draw_curves(source, holdout if holdout.is_file() else None, out / figure.name)
            elif figure.name == "noise-transition.png":
                noise_transition(source, out / figure.name)
            else:
                copy_figure(source, out / figure.name)
        except (OSError, ValueError, RuntimeError) as exc:
            skipped.append(f"{figure.name} not written: {exc}")
            continue
        written.append(figure.name)
    return written, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root",
        type=Path,
        default=REPO,
        help="checkout whose data/ and reports/ are read (default: this one)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where figures go (default: ROOT/docs/figures)"
    )
    args = parser.parse_args(argv)
    root = args.root.resolve()
    out = args.out if args.out is not None else root / OUT
    written, skipped = generate(root, out)
    for line in skipped:
        print(line, file=sys.stderr)
    for name in written:
        print(f"wrote {out / name}")
    if not written:
        print(f"no figure produced under {out}: run `make repro` first", file=sys.stderr)
        return 1
    print(f"{len(written)} figures written, {len(skipped)} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
