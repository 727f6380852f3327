"""What the paper-profile studies cost: GPU-hours per study from a measured training step.

Three steps, because the machine that measures need not be the one that plans::

    python benchmarks/cost.py plan > plan.json            # every cell's network, batch, length
    python benchmarks/cost.py measure plan.json > rates.json   # on the GPU: images/s per network
    python benchmarks/cost.py table plan.json rates.json  # GPU-hours and wall time on N GPUs

``plan`` resolves each study cell's parameters exactly as a cell does (``params.yaml``, the
paper profile, the study's overlays; :func:`ran.studies.cell.cell_params`). ``measure``
needs only torch and :mod:`ran.models`, so it runs on a GPU machine with no project install:
each distinct network trains on random data at its cell's batch and input side as the
trainer runs it on a GPU (channels_last, bf16 autocast, SGD-Nesterov or AdamW, a vitmask
network fed a random 28×28 prior), and the step rate is timed with CUDA events after a
warm-up. What it leaves out, stated as the table's assumption: the data loader (FFCV keeps a
GPU fed at these sizes), the per-iteration augmentation and the checkpoint/eval cadence (a
few per cent), and the vitmask study's ``pretrain`` (DINO) and ``prior`` stages.
Without a GPU, ``table --tflops X`` prices the cells from their FLOPs at an assumed rate.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

CLUSTER_SIZES = (1, 4, 8, 16)


def network_key(row: dict[str, Any]) -> str:
    """Cells that train the same network at the same batch and side share one measurement."""
    fields = ("variant", "options", "num_classes", "batch", "side", "optimizer", "prior")
    return json.dumps({k: row[k] for k in fields}, sort_keys=True)


def plan() -> list[dict[str, Any]]:
    """One row per paper-profile cell of every study."""
    from ran.models import find_variant
    from ran.studies.cell import cell_params
    from ran.studies.tables import STUDIES
    from ran.train.recipe import Recipe, model_options

    rows = []
    for study in STUDIES.values():
        for cell in study.cells:
            _, train, _ = cell_params(cell, "paper", study=study.name)
            dataset = cell.setting.get("data", {}).get("dataset", "cifar10")
            recipe = Recipe.resolve(train, "cifar")
            variant = find_variant(train.family, train.depth, "cifar")
            rows.append(
                {
                    "study": study.name,
                    "cell": cell.name,
                    "variant": variant.name,
                    "options": model_options(train),
                    "num_classes": {"cifar10": 10, "cifar100": 100}[dataset],
                    "batch": train.batch_size,
                    "side": train.upsample or 32,
                    "optimizer": train.optimizer,
                    "prior": bool(cell.setting.get("data", {}).get("prior")),
                    "iterations": recipe.iterations,
                }
            )
    return rows


def measure_one(row: dict[str, Any], warmup: int, steps: int, compiled: bool) -> float:
    """Training images/s of one network on the GPU, as the trainer steps it there
    (``compiled``: through ``torch.compile``, as ``--compile`` trains it)."""
    import torch

    from ran.models import build_model

    torch.manual_seed(0)
    device = torch.device("cuda")
    model = build_model(row["variant"], row["num_classes"], **row["options"])
    model = model.to(device, memory_format=torch.channels_last).train()
    forward = torch.compile(model) if compiled else model
    if row["optimizer"] == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    batch, side = row["batch"], row["side"]
    x = torch.randn(batch, 3, side, side, device=device).to(memory_format=torch.channels_last)
    inputs = (
        (x, torch.rand(batch, 1, side // 8, side // 8, device=device)) if row["prior"] else (x,)
    )
    y = torch.randint(0, row["num_classes"], (batch,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(forward(*inputs), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    return batch * steps / (start.elapsed_time(end) / 1000)


def measure(
    rows: list[dict[str, Any]], warmup: int, steps: int, compiled: bool = False
) -> dict[str, Any]:
    import torch

    rates: dict[str, float] = {}
    for row in rows:
        key = network_key(row)
        if key not in rates:
            began = time.perf_counter()
            rates[key] = measure_one(row, warmup, steps, compiled)
            took = time.perf_counter() - began
            print(
                f"{row['variant']} {row['options']} side {row['side']}: "
                f"{rates[key]:.0f} images/s ({took:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "setting": f"bf16 autocast, channels_last, {'torch.compile' if compiled else 'eager'}; "
        f"{warmup} warm-up + {steps} timed steps",
        "images_per_s": rates,
    }


def flops_rates(rows: list[dict[str, Any]], tflops: float) -> dict[str, Any]:
    """Images/s from FLOPs: a training step costs about 3× the forward pass."""
    import torch

    from ran.models import build_model, count_macs

    rates = {}
    for row in rows:
        key = network_key(row)
        if key not in rates:
            with torch.device("meta"):
                model = build_model(row["variant"], row["num_classes"], **row["options"])
            macs = count_macs(model, row["side"])
            rates[key] = tflops * 1e12 / (3 * 2 * macs)
    return {"device": f"FLOPs at an assumed {tflops} TFLOP/s", "images_per_s": rates}


def makespan(hours: list[float], gpus: int) -> float:
    """Wall time of independent cells on ``gpus`` GPUs, longest first to the least loaded
    (what a Ray cluster with one GPU per cell does to a study's queue)."""
    loads = [0.0] * gpus
    for h in sorted(hours, reverse=True):
        heapq.heapreplace(loads, loads[0] + h)
    return max(loads)


def table(rows: list[dict[str, Any]], rates: dict[str, Any], price: float, seeds: int) -> str:
    studies: dict[str, list[float]] = {}
    for row in rows:
        seconds = row["iterations"] * row["batch"] / rates["images_per_s"][network_key(row)]
        studies.setdefault(row["study"], []).extend([seconds / 3600] * seeds)
    sizes = " | ".join(f"wall, {n} GPU{'s' if n > 1 else ''}" for n in CLUSTER_SIZES)
    lines = [
        f"| study | cells | GPU-hours | at ${price:.2f}/GPU-h | {sizes} |",
        "|---|---:|---:|---:|" + "---:|" * len(CLUSTER_SIZES),
    ]
    for name, hours in studies.items():
        walls = " | ".join(f"{makespan(hours, n):.1f} h" for n in CLUSTER_SIZES)
        total = sum(hours)
        lines.append(
            f"| {name} | {len(hours)} | {total:.1f} | ${math.ceil(total * price):,} | {walls} |"
        )
    lines.append(
        f"\nRates: {rates['device']}" + (f", {rates['setting']}" if "setting" in rates else "")
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plan", help="every paper-profile cell as JSON on stdout")
    p = sub.add_parser("measure", help="images/s per network on this machine's GPU")
    p.add_argument("plan", type=Path)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--compile", action="store_true", help="through torch.compile")
    p.add_argument("--studies", help="comma-separated studies to measure (default: all)")
    t = sub.add_parser("table", help="GPU-hours and wall time per study (markdown)")
    t.add_argument("plan", type=Path)
    t.add_argument("rates", type=Path, nargs="?", help="measure's output")
    t.add_argument("--tflops", type=float, help="no measurement: price FLOPs at this rate")
    t.add_argument("--usd-per-gpu-hour", type=float, default=3.0, help="the price assumed")
    t.add_argument("--seeds", type=int, default=1, help="runs of each cell")
    args = parser.parse_args()

    if args.command == "plan":
        json.dump(plan(), sys.stdout, indent=1)
    elif args.command == "measure":
        rows = json.loads(args.plan.read_text())
        if args.studies:
            rows = [row for row in rows if row["study"] in args.studies.split(",")]
        json.dump(
            measure(rows, args.warmup, args.steps, args.compile),
            sys.stdout,
            indent=1,
        )
    else:
        rows = json.loads(args.plan.read_text())
        if args.rates:
            rates = json.loads(args.rates.read_text())
        elif args.tflops:
            rates = flops_rates(rows, args.tflops)
        else:
            parser.error("give measure's rates file or --tflops")
        print(table(rows, rates, args.usd_per_gpu_hour, args.seeds))


if __name__ == "__main__":
    main()
