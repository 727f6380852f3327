"""airbench94's lookahead (K. Jordan, cifar10-airbench): every ``every`` steps the weights
are pulled to an exponential moving average of themselves, and the average to them.

The average's decay follows airbench's schedule, ``0.95**5 * (progress)**3``: nearly no
averaging early, when the weights move fast, and full weight on the average at the end, so
the last step leaves the network at its average. It is part of a run's state: a checkpoint
carries the average, so a resumed run continues it exactly.
"""

from __future__ import annotations

from typing import Any

import torch


class Lookahead:
    """The moving average of a model's floating-point state (weights and BN statistics)."""

    def __init__(self, model: torch.nn.Module, total: int, every: int = 5) -> None:
        self.model, self.total, self.every = model, total, every
        self.average = {k: v.detach().clone() for k, v in self._floats().items()}

    def _floats(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.model.state_dict().items() if v.is_floating_point()}

    def decay(self, iteration: int) -> float:
        return 0.95**5 * (iteration / self.total) ** 3

    @torch.no_grad()
    def after_step(self, iteration: int) -> None:
        """Call after optimizer step ``iteration`` (counted from 1)."""
        final = iteration >= self.total
        if iteration % self.every and not final:
            return
        decay = 1.0 if final else self.decay(iteration)
        for name, value in self._floats().items():
            average = self.average[name]
            average.lerp_(value, 1 - decay)
            value.copy_(average)

    def state_dict(self) -> dict[str, Any]:
        return {"average": self.average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, value in state["average"].items():
            self.average[name].copy_(value)
