"""Training checkpoints: the whole training state, so that a resumed run continues as if it
had never stopped.

A checkpoint is a dict of ``state_dict()``s (model, optimiser, scheduler, grad scaler), the
RNG states, the counters (epoch, position in it, iteration, best held-out score), the
curves so far and the MLflow run id, saved through :mod:`ran.modelfile` (all or nothing,
loadable with ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

from typing import Any

import torch

LAST = "checkpoint-last.pt"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
