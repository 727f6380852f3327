"""DDP as ``torchrun`` launches it, on the CPU with gloo: two processes train one network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

# The real training stage, with each process's step recording the records it was given.
PROBE = """
import sys
from pathlib import Path
import numpy as np, torch
import ran.train.loop as loop
from ran.config import TrainParams
from ran.train.stage import train_model

data, out = Path(sys.argv[1]), Path(sys.argv[2])
trainers, seen = [], []
step = loop.Trainer.step
def recording(self, images, index):
    trainers[:1] = [self]
    seen.append(index.numpy().copy())
    return step(self, images, index)
loop.Trainer.step = recording
params = TrainParams(depth=56, width=0.25, batch_size=20, iterations=6, device="cpu",
                     log_every=2, checkpoint_every=3)
train_model(params, data, out, "ddp")
rank = int(__import__("os").environ["RANK"])
np.save(out / f"seen-{rank}.npy", np.concatenate(seen))
torch.save(dict(trainers[0].model.named_parameters()), out / f"weights-{rank}.pt")
"""


def test_two_processes_see_disjoint_records_and_agree(small_ingest: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    out = tmp_path / "train"
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [str(torchrun), "--nproc-per-node", "2", str(probe), str(small_ingest), str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    seen = [np.load(out / f"seen-{rank}.npy") for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 60  # 6 steps of 10 records each
    assert not set(seen[0]) & set(seen[1])  # one epoch is 200 records: no overlap
    # Parameters: identical (gradients are all-reduced). BatchNorm's running statistics are
    # rank 0's, broadcast before every forward (DDP's broadcast_buffers), and rank 0 saves.
    first, second = (torch.load(out / f"weights-{r}.pt", weights_only=True) for r in (0, 1))
    for name in first:
        assert torch.equal(first[name], second[name]), name
    final = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(final[name], first[name]) for name in first)

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert run.data.params["world_size"] == "2" and run.info.status == "FINISHED"
