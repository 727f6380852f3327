"""Serving throughput: MLflow's scoring server against ``ran-cli serve``, side by side.

The model is the quick profile's network (width-0.5 Attention-56, CIFAR-10; random weights
unless ``--model`` names a trained ``model.pt``: the speed does not depend on them), logged
as the project's image model, and served from the same MLflow model folder by

- ``mlflow models serve --env-manager local`` (one request at a time through the model),
- ``ran-cli serve --max-batch-size 1`` (LitServe without batching),
- ``ran-cli serve`` (LitServe batching the requests waiting together, the defaults: up to
  64, a 5 ms window only while requests keep arriving).

Every request posts one real CIFAR-10 test JPEG as ``{"inputs": ["<base64>"]}``. One
asyncio client (aiohttp, in this process) keeps ``C`` requests in flight for ``--seconds``
per concurrency level, after a warm-up; it shares the machine's cores with the server, as
a client on the same host does. Beside them, the in-process limit: the model's own
images/s at batch 1 and 64, decoding included. Usage::

    python benchmarks/serve.py --source ../shared/data/cifar10-jpeg.tar.gz
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from ran.progress import quiet_in_logs

BIN = Path(sys.executable).parent
CONCURRENCY = (1, 4, 16, 64)
CIFAR10_STATS = ([125.3, 123.0, 113.9], [63.0, 62.1, 66.7])  # 0–255 scale


def quick_model(path: Path, classes: list[str]) -> Path:
    """The quick profile's network with seeded random weights, as a ``model.pt``."""
    from ran.config import TrainParams
    from ran.data.beton import LoaderSpec
    from ran.modelfile import model_record, save
    from ran.models import build_model, find_variant
    from ran.train.recipe import model_options

    torch.manual_seed(0)
    params = TrainParams(depth=56, width=0.5)
    arch = {
        "variant": find_variant("attention", 56, "cifar").name,
        "options": model_options(params),
        "num_classes": len(classes),
    }
    model = build_model(arch["variant"], arch["num_classes"], **arch["options"])
    mean, std = CIFAR10_STATS
    spec = LoaderSpec(tuple(mean), tuple(std), side=32, small_images=True)
    meta = {"classes": classes, "dataset": "cifar10"}
    save(path, model_record(arch, model.state_dict(), meta, spec, 32, 0, "", None))
    return path


def logged_model(model_file: Path, folder: Path) -> Path:
    """``model_file`` logged as the image model into a scratch store, downloaded as the
    MLflow model folder both servers load."""
    import mlflow

    from ran.inference.predictor import log_image_model

    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    with mlflow.start_run():
        info = log_image_model(model_file)
    return Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(folder / "m")))


def test_images(source: Path, folder: Path, count: int = 64) -> list[bytes]:
    """The first ``count`` test JPEGs of the real CIFAR-10 archive, in a fixed order."""
    blobs = []
    with tarfile.open(source) as tar:
        for member in tar:
            if "/test/" in member.name and member.name.endswith(".jpg"):
                blobs.append(tar.extractfile(member).read())
                if len(blobs) == count:
                    break
    return blobs


def start(args: list[str], port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    with open(log, "wb") as out:
        server = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                  start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            if server.poll() is not None:
                break
            time.sleep(0.5)
    stop(server)
    raise SystemExit(f"{args[:3]} did not start:\n{log.read_text()[-2000:]}")


def stop(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)


async def load(url: str, bodies: list[bytes], concurrency: int, seconds: float) -> list[float]:
    """Latencies (s) of the requests completed in ``seconds`` with ``concurrency`` in flight."""
    import aiohttp

    latencies: list[float] = []
    end = time.perf_counter() + seconds
    headers = {"Content-Type": "application/json"}

    async def client(n: int, session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < end:
            body = bodies[n % len(bodies)]
            n += concurrency
            start_time = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as response:
                payload = await response.read()
                if response.status != 200 or b"predictions" not in payload:
                    raise SystemExit(f"{url}: HTTP {response.status}: {payload[:200]!r}")
            latencies.append(time.perf_counter() - start_time)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(client(n, session) for n in range(concurrency)))
    return latencies


def measure(url: str, bodies: list[bytes], seconds: float) -> dict[int, tuple[float, ...]]:
    asyncio.run(load(url, bodies, 4, 2.0))  # warm-up: first batches, connections
    figures = {}
    for concurrency in CONCURRENCY:
        began = time.perf_counter()
        latencies = asyncio.run(load(url, bodies, concurrency, seconds))
        elapsed = time.perf_counter() - began
        p50, p99 = np.percentile(latencies, [50, 99]) * 1000
        figures[concurrency] = (len(latencies) / elapsed, p50, p99)
    return figures


def in_process(model_file: Path, blobs: list[bytes], seconds: float) -> dict[int, float]:
    """Images/s of the model itself, JPEG bytes to top-5, at batch 1 and 64."""
    from ran.inference.predictor import Predictor

    predictor = Predictor.from_model_file(model_file)
    rates = {}
    for batch in (1, 64):
        chunk = (blobs * (batch // len(blobs) + 1))[:batch]
        predictor.predict_bytes(chunk)  # warm-up
        done, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            predictor.predict_bytes(chunk)
            done += batch
        rates[batch] = done / (time.perf_counter() - began)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=Path("../shared/data/cifar10-jpeg.tar.gz"))
    parser.add_argument("--model", type=Path, help="a trained model.pt (default: random)")
    parser.add_argument("--seconds", type=float, default=10.0, help="per concurrency level")
    args = parser.parse_args()
    quiet_in_logs()  # MLflow's per-file download bars, in a log: one line each, 67 in a row
    classes = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        folder = Path(tmp)
        model_file = args.model or quick_model(folder / "model.pt", classes)
        model_dir = logged_model(model_file, folder)
        blobs = test_images(args.source, folder)
        bodies = [json.dumps({"inputs": [base64.b64encode(b).decode()]}).encode() for b in blobs]
        servers = {
            "mlflow models serve": [str(BIN / "mlflow"), "models", "serve", "-m",
                                    str(model_dir), "--env-manager", "local", "--port"],
            "ran-cli serve, no batching": [str(BIN / "ran-cli"), "serve", "--model",
                                           str(model_dir), "--max-batch-size", "1", "--port"],
            "ran-cli serve": [str(BIN / "ran-cli"), "serve", "--model", str(model_dir), "--port"],
        }  # fmt: skip
        results = {}
        for port, (name, command) in enumerate(servers.items(), start=18601):
            server = start([*command, str(port)], port, folder / f"{port}.log")
            try:
                url = f"http://127.0.0.1:{port}/invocations"
                results[name] = measure(url, bodies, args.seconds)
            finally:
                stop(server)
        limit = in_process(model_file, blobs, args.seconds)
    report(results, limit, torch.get_num_threads())


def report(results: dict, limit: dict[int, float], threads: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Serving the quick profile's network, CPU ({os.cpu_count()} cores, "
                  f"{threads} torch threads), one JPEG per request")  # fmt: skip
    table.add_column("server")
    for concurrency in CONCURRENCY:
        table.add_column(f"c={concurrency}\nreq/s", justify="right")
        table.add_column(f"c={concurrency}\np50/p99 ms", justify="right")
    for name, figures in results.items():
        cells = []
        for concurrency in CONCURRENCY:
            rate, p50, p99 = figures[concurrency]
            cells += [f"{rate:.0f}", f"{p50:.0f}/{p99:.0f}"]
        table.add_row(name, *cells)
    Console(width=160).print(table)
    print(f"in-process limit (JPEG bytes → top-5): batch 1 {limit[1]:.0f} images/s, "
          f"batch 64 {limit[64]:.0f} images/s")  # fmt: skip


if __name__ == "__main__":
    main()
