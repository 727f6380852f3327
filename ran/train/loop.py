"""The training loop: one :class:`Trainer` whose small methods build the data, the network,
the optimiser and schedule, take a step, evaluate the held-out records and checkpoint.

The loop's cadence is decided by small named predicates (``due_log``, ``due_holdout``,
``due_checkpoint``), as torchtitan's trainer does; what happens at each is the hooks' job
(:mod:`ran.train.stage`: MLflow, the progress bar, files).

Exact resume follows by construction: every piece of state is in the checkpoint
(:meth:`Trainer.state_dict`), the record order is a function of (seed, epoch)
(:mod:`ran.train.data`) and every random number an image gets is a function of
(seed, epoch, record index) (:mod:`ran.train.augment`).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ran.config import TrainParams
from ran.data.beton import LoaderSpec, make_loader, read_records
from ran.data.meta import read_meta
from ran.data.order import seeded_order
from ran.data.sources import sha256_file
from ran.data.transforms import network_side, network_view
from ran.devices import autocast_dtype
from ran.errors import RanError
from ran.inference.scoring import scored_batches
from ran.modelfile import FORMAT
from ran.models import build_model, find_variant
from ran.prior.maps import prior_batch, prior_for
from ran.train import checkpoint
from ran.train.augment import BatchTransform
from ran.train.data import holdout_split, load_labels
from ran.train.distributed import Context
from ran.train.lookahead import Lookahead
from ran.train.recipe import Recipe, make_optimizer, make_schedule, model_options

# Settings that change how a run computes, not what it computes: a run may resume with
# other values of these.
NOT_FINGERPRINTED = {"checkpoint_every", "log_every", "eval_every", "device", "num_workers"}
NOT_FINGERPRINTED |= {"compile", "register_model"}
WHITENING_IMAGES = 5000  # records a whitening stem is fitted to (airbench94's count)


@dataclass
class TrainState:
    """The counters of a run: what a checkpoint needs besides the state dicts."""

    iteration: int = 0
    epoch: int = 0
    position: int = 0  # batches of ``epoch`` this process has taken
    best_score: float = -1.0
    best_iteration: int = -1
    curves: list[dict[str, float]] = field(default_factory=list)
    holdout: list[dict[str, float]] = field(default_factory=list)


class Hooks(Protocol):
    """What the loop asks of its caller at each point of its cadence."""

    def log(self, row: dict[str, float]) -> None: ...
    def holdout(self, iteration: int, score: float, improved: bool) -> None: ...
    def checkpoint(self) -> None: ...
    def advance(self, iteration: int) -> None: ...


@dataclass
class Window:
    """Loss and correct predictions summed on the device since the last log (no host sync
    per step), and when the window started (for images/s)."""

    loss: torch.Tensor
    correct: torch.Tensor
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)

    @classmethod
    def on(cls, device: torch.device) -> Window:
        zero = torch.zeros((), device=device)
        return cls(zero, torch.zeros((), device=device, dtype=torch.long))

    def add(self, loss: torch.Tensor, correct: torch.Tensor) -> None:
        self.loss += loss
        self.correct += correct
        self.steps += 1

    def mean_loss(self) -> float:
        return self.loss.item() / self.steps

    def reset(self) -> None:
        self.loss.zero_()
        self.correct.zero_()
        self.steps, self.start = 0, time.perf_counter()


class Trainer:
    """Trains one network on one ingest output into ``out``."""

    def __init__(
        self,
        params: TrainParams,
        data: Path,
        out: Path,
        context: Context,
        labels: Path | None = None,
        prior: Path | None = None,
    ) -> None:
        self.params, self.data, self.out, self.ctx = params, data, out, context
        self.meta = read_meta(data)
        self.spec = LoaderSpec.from_meta(self.meta)
        self.network_side = network_side(self.spec, params.upsample)
        self.recipe = Recipe.resolve(params, "cifar" if self.spec.small_images else "imagenet")
        self.variant = find_variant(params.family, params.depth, self.recipe.kind)
        if params.batch_size % context.world:
            raise RanError(
                f"--batch-size {params.batch_size} must divide evenly over {context.world} "
                "processes"
            )
        clean = read_records(data / "train.beton")["label"]
        self.labels_path, self.prior_path = labels, prior
        takes_prior = getattr(self.variant.build, "takes_prior", False)
        network = f"--family {params.family}"
        self.prior_maps = prior_for(network, takes_prior, prior, "train", self.meta)
        self.labels = load_labels(labels, len(clean), self.meta["num_classes"]) if labels else clean
        self.train_indices, self.holdout_indices = holdout_split(
            self.labels, params.holdout, params.seed
        )
        self.arch = {
            "variant": self.variant.name,
            "options": model_options(params),
            "num_classes": self.meta["num_classes"],
        }
        self.fingerprint = {
            **{
                k: v
                for k, v in params.model_dump(mode="json").items()
                if k not in NOT_FINGERPRINTED
            },
            "train_sha256": self.meta["splits"]["train"]["sha256"],
            "labels_sha256": sha256_file(labels) if labels else None,
            "prior_sha256": sha256_file(prior / "train.npy") if prior else None,
            "world": context.world,
        }
        self.dtype = autocast_dtype(params.precision, context.device)

    # -- building ---------------------------------------------------------------------
    def build(self) -> None:
        p, device = self.params, self.ctx.device
        torch.manual_seed(p.seed)
        model = build_model(self.arch["variant"], self.arch["num_classes"], **self.arch["options"])
        memory = torch.channels_last if p.channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=memory)
        if getattr(model, "fits_to_data", False):
            model.fit_to_data(self.first_train_images(WHITENING_IMAGES))
        self.optimizer = make_optimizer(p, self.model)
        self.schedule = make_schedule(p, self.recipe, self.optimizer)
        self.lookahead = Lookahead(self.model, self.recipe.iterations) if p.lookahead else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.step_model: torch.nn.Module = self.model
        if self.ctx.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.step_model = DistributedDataParallel(self.model, device_ids=ids)
        if p.compile:
            self.step_model = torch.compile(self.step_model)
        self.criterion = torch.nn.CrossEntropyLoss(label_smoothing=p.label_smoothing)
        self.transform = BatchTransform(self.spec, p, p.seed)
        self.state = TrainState()

        self.per_process_batch = p.batch_size // self.ctx.world
        self.loader = make_loader(
            self.data / "train.beton",
            self.spec,
            self.per_process_batch,
            train=True,
            num_workers=p.num_workers,
            device=str(device),
            indices=self.train_indices,
            order=seeded_order(p.seed, self.ctx.rank, self.ctx.world),
            distributed=self.ctx.world > 1,
        )
        if len(self.loader) == 0:
            raise RanError(
                f"--batch-size {p.batch_size} is larger than the {len(self.train_indices)} "
                "training records; use a smaller batch"
            )
        self.holdout_loader = (
            make_loader(
                self.data / "train.beton",
                LoaderSpec.from_meta(self.meta),
                256,
                train=False,
                num_workers=p.num_workers,
                device=str(device),
                indices=self.holdout_indices,
            )
            if len(self.holdout_indices) and self.ctx.main
            else None
        )
        self.labels_on_device = torch.from_numpy(np.array(self.labels)).to(device)

    def first_train_images(self, count: int) -> torch.Tensor:
        """The first ``count`` training records, normalised, unaugmented, at the network's
        side: what a whitening stem is fitted to (the same records on every process)."""
        indices = self.train_indices[:count]
        loader = make_loader(
            self.data / "train.beton",
            self.spec,
            256,
            train=False,
            num_workers=self.params.num_workers,
            device=str(self.ctx.device),
            indices=indices,
        )
        spec = replace(self.spec, side=self.network_side)
        return torch.cat([network_view(images.to(self.ctx.device), spec) for images, *_ in loader])

    # -- state ------------------------------------------------------------------------
    def state_dict(self, run_id: str | None) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "arch": self.arch,
            "fingerprint": self.fingerprint,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": checkpoint.rng_state(),
            "lookahead": self.lookahead.state_dict() if self.lookahead else None,
            "progress": asdict(self.state),
            "run_id": run_id,
        }

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        if state.get("arch") != self.arch or "model" not in state:
            raise RanError(
                f"checkpoint {path} is of another network ({_describe(state.get('arch'))}, not "
                f"{_describe(self.arch)}); resume with the settings it was trained with, or "
                "start afresh without --resume"
            )
        changed = _differences(state.get("fingerprint", {}), self.fingerprint)
        if changed:
            raise RanError(
                f"checkpoint {path} was trained with other settings ({changed}); resume with "
                "those settings, or start afresh without --resume"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        if self.lookahead:
            self.lookahead.load_state_dict(state["lookahead"])
        checkpoint.set_rng_state(state["rng"])
        self.state = TrainState(**state["progress"])

    def finished(self) -> bool:
        return self.state.iteration >= self.recipe.iterations

    # -- one step ---------------------------------------------------------------------
    def step(self, images: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step; returns (loss, correct) as tensors (no host sync)."""
        p, device = self.params, self.ctx.device
        index_np = index.numpy()
        maps = prior_batch(self.prior_maps, index_np, device)
        x, maps = self.transform(images, index_np, self.state.epoch, maps)
        x = self.transform.resize(x, self.state.iteration / self.recipe.iterations)
        inputs = (x,) if maps is None else (x, maps)
        y = self.labels_on_device[index.to(device, non_blocking=True)]
        autocast = torch.autocast(device.type, dtype=self.dtype) if self.dtype else nullcontext()
        with autocast:
            if p.mixup > 0:
                lam, perm = self._mixup_draw(len(y))
                inputs = tuple(lam * t + (1 - lam) * t[perm] for t in inputs)
                logits = self.step_model(*inputs)
                loss = lam * self.criterion(logits, y) + (1 - lam) * self.criterion(logits, y[perm])
            else:
                logits = self.step_model(*inputs)
                loss = self.criterion(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        if self.lookahead:
            self.lookahead.after_step(self.state.iteration + 1)
        return loss.detach().float(), (logits.argmax(1) == y).sum()

    def _mixup_draw(self, n: int) -> tuple[float, torch.Tensor]:
        """Mixup's λ and partner permutation, a function of (seed, iteration, rank)."""
        rng = np.random.default_rng([self.params.seed, self.state.iteration, self.ctx.rank])
        lam = float(rng.beta(self.params.mixup, self.params.mixup))
        return lam, torch.from_numpy(rng.permutation(n)).to(self.ctx.device)

    def _weights_finite(self) -> bool:
        """A step can leave inf/NaN weights before any loss shows it: never checkpoint them."""
        norms = torch._foreach_norm([p.detach() for p in self.model.parameters()])
        return bool(torch.isfinite(torch.stack(norms)).all())

    # -- held-out evaluation ----------------------------------------------------------
    def holdout_accuracy(self) -> float:
        self.model.eval()
        correct = total = 0
        spec = replace(self.spec, side=self.network_side)
        batches = scored_batches(
            self.model, self.holdout_loader, spec, self.dtype, prior=self.prior_maps
        )
        for logits, _, index in batches:
            labels = self.labels[index.numpy()]
            correct += int((logits.argmax(1).cpu().numpy() == labels).sum())
            total += len(labels)
        self.model.train()
        return correct / max(total, 1)

    # -- the cadence ------------------------------------------------------------------
    def _every(self, period: int) -> bool:
        return self.state.iteration % period == 0 or self.finished()

    def due_log(self) -> bool:
        return self._every(self.params.log_every)

    def due_checkpoint(self) -> bool:
        return self._every(self.params.checkpoint_every)

    def due_holdout(self) -> bool:
        return self.holdout_loader is not None and self._every(self.params.eval_every)

    def _count_step(self) -> None:
        """One more iteration; an epoch ends when this process has taken all its batches."""
        s = self.state
        s.iteration += 1
        s.position += 1
        if s.position == len(self.loader):
            s.epoch, s.position = s.epoch + 1, 0

    def _check_finite(self, window: Window) -> None:
        """Stop before logging or checkpointing a diverged network (the last checkpoint
        stays the last good one)."""
        mean_loss = window.mean_loss()
        if not (math.isfinite(mean_loss) and self._weights_finite()):
            raise RanError(
                f"the loss became {mean_loss} before iteration {self.state.iteration} "
                f"(lr {self.schedule.get_last_lr()[0]:.4g}); the last good "
                f"checkpoint {self.out / checkpoint.LAST} is intact: lower --lr "
                "or use --precision fp32, then --resume"
            )

    def _log_row(self, window: Window) -> dict[str, float]:
        took = time.perf_counter() - window.start
        return {
            "iteration": self.state.iteration,
            "epoch": self.state.epoch,
            "loss": window.mean_loss(),
            "train_accuracy": window.correct.item() / (window.steps * self.per_process_batch),
            "lr": self.schedule.get_last_lr()[0],
            "images_per_s": window.steps * self.params.batch_size / took,
        }

    def _score_holdout(self, hooks: Hooks) -> None:
        s = self.state
        score = self.holdout_accuracy()
        s.holdout.append({"iteration": s.iteration, "holdout_accuracy": score})
        hooks.holdout(s.iteration, score, score > s.best_score)
        if score > s.best_score:
            s.best_score, s.best_iteration = score, s.iteration

    def _epoch_batches(self) -> Any:
        """The loader from where this run stands in its epoch (a resumed run skips what the
        checkpointed run had taken)."""
        self.loader.loader.traversal_order.skip = self.state.position * self.per_process_batch
        self.loader.loader.next_epoch = self.state.epoch
        return self.loader

    # -- the loop ---------------------------------------------------------------------
    def run(self, hooks: Hooks) -> None:
        """Train to ``recipe.iterations``; ``hooks`` logs, checkpoints and shows progress."""
        self.model.train()
        window = Window.on(self.ctx.device)
        while not self.finished():
            for images, _, index in self._epoch_batches():
                window.add(*self.step(images, index))
                self._count_step()
                if self.due_log() or self.due_checkpoint():
                    self._check_finite(window)
                if self.due_log():
                    row = self._log_row(window)
                    self.state.curves.append(row)
                    hooks.log(row)
                    window.reset()
                if self.due_holdout():
                    self._score_holdout(hooks)
                    window.start = time.perf_counter()
                if self.due_checkpoint():
                    hooks.checkpoint()
                hooks.advance(self.state.iteration)
                if self.finished() or self.state.position == 0:
                    break


def _describe(arch: Any) -> str:
    if not isinstance(arch, dict):
        return "unknown"
    options = ", ".join(f"{k}={v}" for k, v in sorted(arch.get("options", {}).items()))
    return f"{arch.get('variant')} with {arch.get('num_classes')} classes" + (
        f", {options}" if options else ""
    )


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k}: {old.get(k)} then, {new.get(k)} now" for k in keys)
