"""What tracking costs a training: the SQLite default against the team server
(``ran-cli stack``: MLflow on PostgreSQL + S3 with logins), side by side in one run.

1. **Per logging step**: the quick profile's row of metrics (loss, accuracy, lr, images/s,
   data wait, step time) logged ``--rows`` times inside a real tracked stage. "in the loop"
   is what the training loop pays per call: the outbox's append (``ran.tracking``), beside
   MLflow's synchronous ``log_metrics`` (what the loop would pay without the outbox);
   "sent" is the outbox thread's time per row to deliver them, off the loop. The share is
   against the quick profile's step time (width-0.5 Attention-56, batch 128, 32 px,
   forward + backward + SGD) measured in the same run, per logged step (it logs every
   ``log_every`` = 10 steps).
2. **The model**: logging the quick profile's ``model.pt`` as the image model and
   registering it.
3. **An outage**: the quick profile trained ``--iterations`` steps against the team server
   twice with the same seed, once with the server killed from a third to two thirds of the
   way and started again; images/s of the logged windows, with and without the outage.

Usage::

    python benchmarks/tracking.py --data data/ingest        # after make repro
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve import quick_model

from ran import stack as team
from ran import tracking
from ran.inference.predictor import log_image_model_once

ROW = ("loss", "train_accuracy", "lr", "images_per_s", "data_wait", "step_s")


def step_seconds(steps: int = 8) -> float:
    """The quick profile's optimiser step on this machine (random 32 px batch of 128)."""
    from ran.config import TrainParams
    from ran.models import build_model, find_variant
    from ran.train.recipe import model_options

    torch.manual_seed(0)
    params = TrainParams(depth=56, width=0.5)
    model = build_model(find_variant("attention", 56, "cifar").name, 10, **model_options(params))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    times = []
    for i in range(steps + 2):
        start = time.perf_counter()
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimiser.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def logging_costs(uri: str, rows: int, folder: Path) -> dict[str, float]:
    """Seconds per row: in the loop (outbox, synchronous MLflow) and sent (outbox thread)."""
    import mlflow

    os.environ["MLFLOW_TRACKING_URI"] = uri
    row = dict.fromkeys(ROW, 0.5)
    with tracking.tracked_stage("bench", "bench-tracking", {}, folder / "out") as run:
        outbox = tracking._current().outbox
        start = time.perf_counter()
        for step in range(rows):
            tracking.log_metrics(row, step)
        in_loop = (time.perf_counter() - start) / rows
        while outbox.sent < len(outbox.records):
            time.sleep(0.005)
        sent = (time.perf_counter() - start) / rows
        client = mlflow.MlflowClient(uri)
        start = time.perf_counter()
        for step in range(rows):
            client.log_batch(
                run.info.run_id,
                metrics=[mlflow.entities.Metric(k, v, int(time.time() * 1000), rows + step)
                         for k, v in row.items()],
            )  # fmt: skip
        synchronous = (time.perf_counter() - start) / rows
    return {"outbox": in_loop, "sent": sent, "mlflow": synchronous}


def model_seconds(uri: str, folder: Path, model_file: Path) -> float:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("bench-tracking").experiment_id
    run = client.create_run(experiment, run_name="bench-model")
    start = time.perf_counter()
    log_image_model_once(uri, run.info.run_id, model_file, "bench-tracking-model")
    seconds = time.perf_counter() - start
    client.set_terminated(run.info.run_id)
    return seconds


def images_per_s(curves: Path) -> list[tuple[int, float]]:
    with open(curves) as f:
        return [(int(float(r["iteration"])), float(r["images_per_s"])) for r in csv.DictReader(f)]


def outage(stack: team.Stack, data: Path, iterations: int, folder: Path) -> dict[str, float]:
    """Mean images/s inside the outage window, with and without the outage (same seed)."""
    env = {**os.environ, **stack.environment(), "RAN_TRACKING_GRACE_S": "120"}
    args = [sys.executable, "-m", "ran.cli", "train", "--data", str(data), "--profile", "quick"]
    args += ["--iterations", str(iterations), "--experiment", "bench-outage", "--no-log-model"]
    results = {}
    for name in ("server up", "server away"):
        out = folder / name.replace(" ", "-")
        process = subprocess.Popen([*args, "--out", str(out)], env=env, stderr=subprocess.PIPE)
        away = (iterations // 3, 2 * iterations // 3)
        if name == "server away":
            while (
                not (out / "curves.csv").exists()
                or images_per_s(out / "curves.csv")[-1][0] < away[0]
            ):
                time.sleep(0.5)
            team.stop_service(stack, "mlflow")
            while images_per_s(out / "curves.csv")[-1][0] < away[1]:
                time.sleep(0.5)
            team.up(stack.folder)
        _, stderr = process.communicate()
        if process.returncode != 0:
            raise SystemExit(f"training failed: {stderr.decode()[-2000:]}")
        rows = images_per_s(out / "curves.csv")
        results[name] = statistics.mean(v for i, v in rows if away[0] < i <= away[1])
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("data/ingest"))
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--iterations", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    folder = Path(tempfile.mkdtemp(prefix="ran-bench-tracking-", dir="/tmp"))
    folder.chmod(0o755)
    os.environ["RAN_CACHE"] = str(folder / "cache")
    stack = team.up(folder / "stack")
    try:
        os.environ.update(stack.environment())
        model_file = quick_model(folder / "model.pt", [str(i) for i in range(10)])
        stores = {
            "SQLite (default)": f"sqlite:///{folder / 'mlflow.db'}",
            "team server": stack.tracking_uri(),
        }
        step = step_seconds()
        per_log = 10 * step  # the quick profile logs every 10 steps
        print(f"quick profile step: {step * 1000:.0f} ms (one logged row per {per_log:.2f} s)")
        print("\n| store | in the loop, outbox | in the loop, MLflow sync | sent (thread) "
              "| outbox share of training time | model log + register |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- |")
        for name, uri in stores.items():
            costs = logging_costs(uri, args.rows, folder / name.split()[0])
            model = model_seconds(uri, folder, model_file)
            print(
                f"| {name} | {costs['outbox'] * 1e6:.0f} µs | {costs['mlflow'] * 1e3:.1f} ms | "
                f"{costs['sent'] * 1e3:.2f} ms | {costs['outbox'] / per_log:.4%} | "
                f"{model:.1f} s |"
            )
        if args.data.is_dir():
            rates = outage(stack, args.data, args.iterations, folder)
            up, away = rates["server up"], rates["server away"]
            print(f"\noutage ({args.iterations} quick-profile steps, server away for the middle "
                  f"third): {away:.0f} images/s against {up:.0f} with the server up "
                  f"({away / up - 1:+.1%})")  # fmt: skip
        else:
            print(f"\n(no {args.data}: the outage run needs an ingest output; run make repro)")
    finally:
        team.down(stack)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
