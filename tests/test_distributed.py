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


TORCHRUN = Path(sys.executable).parent / "torchrun"


def test_two_processes_see_disjoint_records_and_agree(small_ingest: Path, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    out = tmp_path / "train"
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # this test's MLflow store (conftest)
    result = subprocess.run(
        [str(TORCHRUN), "--nproc-per-node", "2", str(probe), str(small_ingest), str(out)],
        capture_output=True,
        text=True,
        env=env,
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

    # Two nodes of one process each, meeting at a c10d rendezvous (as on a cluster: the
    # same command on every node, the endpoint on the first): the same final network.
    from conftest import free_port

    nodes_out = tmp_path / "two-nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    launch = [str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", endpoint, "--rdzv-id", "two-nodes", str(probe),
              str(small_ingest), str(nodes_out)]  # fmt: skip
    # c10d ranks the nodes by process id: the first started is rank 0, as in the run above
    nodes = [subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env)]  # fmt: skip
    nodes.append(subprocess.Popen(launch, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env=env))  # fmt: skip
    logs = nodes[0].communicate(timeout=600)[0]
    assert [node.wait(60) for node in nodes] == [0, 0], logs[-4000:]
    across = torch.load(nodes_out / "model.pt", weights_only=True)["state_dict"]
    alone = torch.load(out / "model.pt", weights_only=True)["state_dict"]
    assert across.keys() == alone.keys()
    assert all(torch.equal(across[name], alone[name]) for name in alone)
