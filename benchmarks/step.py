"""Where a training step's time goes on the CPU, phase by phase, for the quick profile's
recipe: waiting for the loader, augmentation (with normalisation), forward, backward, and
the optimiser (with the schedule and lookahead), each timed with the step's other work done.

Rows: today's quick profile (Attention-8, batch 1024) in bf16 autocast and in fp32, and the
profile it replaced (width-0.5 Attention-56 at batch 128, fp32), so one run on one machine
shows whether bf16 pays there and what the new network buys per image. Usage::

    python benchmarks/step.py --data data/ingest --steps 8
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ran.config import TrainParams, profiled_section
from ran.devices import cpu_computes_bf16
from ran.train.distributed import setup
from ran.train.loop import Trainer

PHASES = ("loader", "augment", "forward", "backward", "optimiser")
# The quick profile before Attention-8 (for comparison): its network, batch and schedule.
PREVIOUS = {"depth": 56, "width": 0.5, "batch_size": 128, "lr": 0.2, "schedule": "onecycle"}
PREVIOUS |= {"momentum": 0.9, "weight_decay": 5e-4, "norm_lr_scale": 1.0, "lookahead": False}
PREVIOUS |= {"freeze_norm_scale": False, "label_smoothing": 0.1, "crop_padding": 4}


def timed_steps(trainer: Trainer, steps: int, warmup: int) -> dict[str, float]:
    """Seconds per phase over ``steps`` steps after ``warmup`` untimed ones; ``images``."""
    totals = dict.fromkeys(PHASES, 0.0) | {"images": 0.0}
    batches = iter(trainer.loader)
    autocast = torch.autocast("cpu", dtype=trainer.dtype) if trainer.dtype else nullcontext()
    for step in range(warmup + steps):
        marks = [time.perf_counter()]
        try:
            images, _, index = next(batches)
        except StopIteration:
            batches = iter(trainer.loader)
            images, _, index = next(batches)
        marks.append(time.perf_counter())
        x, _ = trainer.transform(images, index.numpy(), 0)
        y = trainer.labels_on_device[index]
        marks.append(time.perf_counter())
        with autocast:
            loss = trainer.criterion(trainer.step_model(x), y)
        marks.append(time.perf_counter())
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(time.perf_counter())
        trainer.optimizer.step()
        trainer.schedule.step()
        if trainer.lookahead:
            trainer.lookahead.after_step(step + 1)
        marks.append(time.perf_counter())
        if step >= warmup:
            for phase, start, end in zip(PHASES, marks[:-1], marks[1:], strict=True):
                totals[phase] += end - start
            totals["images"] += len(y)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/ingest"))
    parser.add_argument("--steps", type=int, default=8, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)

    from rich.console import Console
    from rich.table import Table

    quick = profiled_section("train", TrainParams, "quick")
    rows = {
        "quick profile, bf16": quick.model_copy(update={"precision": "bf16"}),
        "quick profile, fp32": quick.model_copy(update={"precision": "fp32"}),
        "previous profile (Attention-56 x0.5, b128), fp32": quick.model_copy(
            update={**PREVIOUS, "precision": "fp32"}
        ),
    }
    bf16 = "has" if cpu_computes_bf16() else "has no"
    table = Table(title=f"One training step on this CPU ({bf16} native bf16), 2 threads")
    for column in ("recipe", "batch", "images/s", *PHASES):
        table.add_column(column, justify="left" if column == "recipe" else "right")
    for name, params in rows.items():
        params = params.model_copy(update={"device": "cpu", "iterations": 1000})
        trainer = Trainer(params, args.data, Path("/nonexistent"), setup("cpu"))
        trainer.build()
        totals = timed_steps(trainer, args.steps, args.warmup)
        seconds = sum(totals[p] for p in PHASES)
        shares = [f"{totals[p] / seconds:.0%}" for p in PHASES]
        table.add_row(name, str(params.batch_size), f"{totals['images'] / seconds:.0f}", *shares)
        del trainer
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
