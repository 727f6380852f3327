"""CPU throughput of the model zoo: training step and inference, images per second.

Usage::

    python benchmarks/models.py                          # CIFAR table + ImageNet Attention-56
    python benchmarks/models.py --only cifar --steps 5

Every row is the same registered model; only the execution settings change, which is the
point: channels_last and torch.compile are options applied to one model, never copies of
it. The ``reference`` setting is the architecture as a plain port runs it (NCHW, eager,
ReLUs that allocate a new tensor) and is the baseline the speed-ups are measured against.
A training step is forward, cross-entropy, backward and an SGD step (momentum 0.9, weight
decay 1e-4, as in the paper). Timings are medians over ``--steps`` steps after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from ran.models import build_model, get_variant

SETTINGS = ("reference", "eager", "channels_last", "channels_last+compile")


@dataclass(frozen=True)
class Case:
    """A registered model at a batch size; ImageNet inference is not part of the brief."""

    name: str
    batch: int
    inference: bool = True


CASES = {
    "cifar": [
        Case("attention56-cifar", 64),
        Case("attention92-cifar", 64),
        Case("resnet164-cifar", 64),
    ],
    "imagenet": [Case("attention56-imagenet", 8, inference=False)],
}


def prepare(name: str, setting: str) -> tuple[nn.Module, torch.memory_format]:
    """The registered model with one execution setting applied."""
    model = build_model(name)
    memory_format = torch.contiguous_format
    if setting == "reference":
        for module in model.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False
    if setting.startswith("channels_last"):
        memory_format = torch.channels_last
        model = model.to(memory_format=memory_format)
    if setting.endswith("compile"):
        model = torch.compile(model)
    return model, memory_format


def steps_for(case: Case, setting: str) -> dict[str, Callable[[], None]]:
    """Closures running one training step and (if wanted) one inference batch."""
    torch.manual_seed(0)
    variant = get_variant(case.name)
    model, memory_format = prepare(case.name, setting)
    size = variant.input_size
    x = torch.randn(case.batch, 3, size, size).to(memory_format=memory_format)
    y = torch.randint(0, variant.default_classes, (case.batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def train() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()

    def infer() -> None:
        model.eval()
        with torch.inference_mode():
            model(x)

    return {"train": train, "infer": infer} if case.inference else {"train": train}


def measure(case: Case, settings: tuple[str, ...], warmup: int, steps: int) -> dict[str, dict]:
    """Images/second per setting and phase, median over ``steps`` rounds.

    Settings run round-robin, one step each per round, so a neighbour's load on a shared
    machine slows every setting alike instead of whichever happened to run then.
    """
    runs = {setting: steps_for(case, setting) for setting in settings}
    times: dict[tuple[str, str], list[float]] = {}
    for round_ in range(warmup + steps):
        for setting, phases in runs.items():
            for phase, step in phases.items():
                start = time.perf_counter()
                step()
                if round_ >= warmup:
                    times.setdefault((setting, phase), []).append(time.perf_counter() - start)
    return {
        setting: {
            phase: case.batch / statistics.median(samples)
            for (name, phase), samples in times.items()
            if name == setting
        }
        for setting in settings
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=sorted(CASES), help="run one group of cases")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, help="subset of settings")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    console = Console(width=max(Console().width, 120))  # seven columns need 120
    table = Table(
        title=f"CPU throughput, images/s ({args.threads} threads, median of {args.steps} steps)"
    )
    for column in ("model", "batch", "setting", "train img/s", "vs ref", "infer img/s", "vs ref"):
        table.add_column(
            column, justify="left" if column in ("model", "setting") else "right", no_wrap=True
        )
    groups = [args.only] if args.only else list(CASES)
    for case in (c for g in groups for c in CASES[g]):
        settings = tuple(args.settings or SETTINGS)
        results = measure(case, settings, args.warmup, args.steps)
        console.log(case.name, results)  # progress: a full run takes about 20 minutes
        baseline = results[settings[0]]
        for setting, result in results.items():
            cells = []
            for phase in ("train", "infer"):
                if phase in result:
                    cells += [f"{result[phase]:.2f}", f"{result[phase] / baseline[phase]:.2f}x"]
                else:
                    cells += ["-", "-"]
            table.add_row(case.name, str(case.batch), setting, *cells)
    console.print(table)


if __name__ == "__main__":
    main()
