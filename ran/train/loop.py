"""The training loop: one :class:`Trainer` whose small methods build the data, the network,
the optimiser and schedule, take a step, evaluate the held-out records and checkpoint.

Exact resume follows by construction: every piece of state is in the checkpoint
(:mod:`ran.train.checkpoint`), the record order is a function of (seed, epoch)
(:mod:`ran.train.data`) and every random number an image gets is a function of
(seed, epoch, record index) (:mod:`ran.train.augment`).
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ran.config import TrainParams
from ran.data.beton import LoaderSpec, make_loader, normalize, read_records
from ran.data.sources import sha256_file
from ran.errors import RanError
from ran.train import checkpoint
from ran.train.augment import (
    PadCropFlip,
    ResizedCropFlip,
    colour_jitter,
    random_erasing,
    record_uniforms,
)
from ran.train.data import holdout_split, load_labels, seeded_order
from ran.train.distributed import Context
from ran.train.recipe import Recipe, make_optimizer, make_schedule, model_options

# Settings that change how a run computes, not what it computes: a run may resume with
# other values of these.
NOT_FINGERPRINTED = {"checkpoint_every", "log_every", "eval_every", "device", "num_workers"}
NOT_FINGERPRINTED |= {"compile", "register_model"}


def read_meta(data: Path) -> dict[str, Any]:
    path = data / "meta.json"
    if not path.is_file():
        raise RanError(f"{path} not found: --data must be an ingest output (run `ran-cli ingest`)")
    return json.loads(path.read_text())


def network_side(spec: LoaderSpec, params: TrainParams) -> int:
    """The side the network sees: ``upsample`` for small images when set, else the data's."""
    return params.upsample if params.upsample and spec.small_images else spec.resolution


def _prior_maps(variant: Any, prior: Path | None, meta: dict[str, Any]) -> Any:
    """The train split's prior maps (memory-mapped) when the network takes them (its class
    says so: ``takes_prior``)."""
    from ran.prior import load_prior

    takes = getattr(variant.build, "takes_prior", False)
    if takes and prior is None:
        raise RanError(
            f"--family {variant.family} needs the ViT attention prior: run `ran-cli prior` and "
            "pass its output with --prior"
        )
    if prior is not None and not takes:
        raise RanError(f"--prior is for --family vitmask; {variant.family} takes no prior")
    return load_prior(prior, "train", meta) if prior else None


def prior_batch(maps: Any, index: np.ndarray, device: torch.device) -> torch.Tensor | None:
    """The maps of records ``index`` as N×1×h×w float32 on ``device`` (``None``: no prior)."""
    if maps is None:
        return None
    batch = torch.from_numpy(np.asarray(maps[np.asarray(index)], dtype=np.float32))
    return batch[:, None].to(device, non_blocking=True)


class BatchTransform:
    """Training augmentation of a uint8 batch: CIFAR pad-4 crop + flip on the normalised
    image; ImageNet random-resized crop + flip + colour jitter; then random erasing; then,
    with progressive resizing or upsampling, the batch at the side of this point in training.

    A per-record map travelling with the images (a ViT prior, N×1×h×w) is resized to the
    images' side and given the same crop, flip and erasing, so it stays over the pixels it
    describes; it is not resized afterwards (the network resizes it to what it needs).
    """

    def __init__(self, spec: LoaderSpec, params: TrainParams, seed: int) -> None:
        self.spec, self.seed, self.erasing = spec, seed, params.random_erasing
        self.params, self.full = params, network_side(spec, params)
        self.geometry = (
            PadCropFlip(spec.resolution) if spec.small_images else ResizedCropFlip(spec.resolution)
        )

    def side(self, progress: float) -> int:
        """Progressive resizing (as ffcv-imagenet does it): ``min_side`` until ``ramp_start``
        of training, then linearly up to the full side at ``ramp_end``, in steps of 4 px."""
        full, low = self.full, self.params.min_side
        if low is None or low >= full:
            return full
        start, end = self.params.ramp_start, max(self.params.ramp_end, self.params.ramp_start)
        share = 1.0 if end == start else min(max((progress - start) / (end - start), 0.0), 1.0)
        return min(full, int(round((low + share * (full - low)) / 4) * 4))

    def resize(self, x: torch.Tensor, progress: float) -> torch.Tensor:
        return resize_to(x, self.side(progress))

    def __call__(
        self, images: torch.Tensor, index: np.ndarray, epoch: int, maps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The augmented batch, and ``maps`` augmented alike (``None`` stays ``None``)."""
        g = self.geometry.uniforms
        u = record_uniforms(self.seed, epoch, index, g + 3 + 5)
        geometry = self.geometry.sample(u[:, :g])
        if maps is not None:
            side = images.shape[-2:]
            maps = F.interpolate(maps.float(), size=side, mode="bilinear", align_corners=False)
            maps = self.geometry.apply(maps, geometry)
        if self.spec.small_images:
            x = self.geometry.apply(normalize(images, self.spec), geometry)
        else:
            x = self.geometry.apply(images.float() / 255, geometry)
            x = colour_jitter(x, u[:, g : g + 3]) * 255
            x = normalize(x, self.spec)
        if self.erasing:
            x = random_erasing(x, u[:, g + 3 :], self.erasing)
            if maps is not None:
                maps = random_erasing(maps, u[:, g + 3 :], self.erasing)
        return x.contiguous(memory_format=torch.channels_last), maps


def resize_to(x: torch.Tensor, side: int) -> torch.Tensor:
    """``x`` at ``side``: bicubic up (the vitmask report's upsampling), area-aware bilinear
    down (progressive resizing)."""
    if side == x.shape[-1]:
        return x
    if side > x.shape[-1]:
        return F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True)


@dataclass
class Progress:
    """The counters of a run: what a checkpoint needs besides the state dicts."""

    iteration: int = 0
    epoch: int = 0
    position: int = 0  # batches of ``epoch`` this process has taken
    best_score: float = -1.0
    best_iteration: int = -1
    curves: list[dict[str, float]] = field(default_factory=list)
    holdout: list[dict[str, float]] = field(default_factory=list)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """None: fp32. ``auto``: bf16 on GPUs that have it, else fp16; fp32 on the CPU."""
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


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
        from ran.models import find_variant

        self.params, self.data, self.out, self.ctx = params, data, out, context
        self.meta = read_meta(data)
        self.spec = LoaderSpec.from_meta(self.meta)
        self.recipe = Recipe.resolve(params, "cifar" if self.spec.small_images else "imagenet")
        self.variant = find_variant(params.family, params.depth, self.recipe.kind)
        if params.batch_size % context.world:
            raise RanError(
                f"--batch-size {params.batch_size} must divide evenly over {context.world} "
                "processes"
            )
        clean = read_records(data / "train.beton")["label"]
        self.labels_path, self.prior_path = labels, prior
        self.prior_maps = _prior_maps(self.variant, prior, self.meta)
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

    # -- building ---------------------------------------------------------------------
    def build(self) -> None:
        from ran.models import build_model

        p, device = self.params, self.ctx.device
        torch.manual_seed(p.seed)
        model = build_model(self.arch["variant"], self.arch["num_classes"], **self.arch["options"])
        memory = torch.channels_last if p.channels_last else torch.contiguous_format
        self.model = model.to(device, memory_format=memory)
        self.optimizer = make_optimizer(p, self.model)
        self.schedule = make_schedule(p, self.recipe, self.optimizer)
        self.dtype = autocast_dtype(p.precision, device)
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
        self.progress = Progress()

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

    # -- state ------------------------------------------------------------------------
    def state_dict(self, run_id: str | None) -> dict[str, Any]:
        return {
            "format": checkpoint.FORMAT,
            "arch": self.arch,
            "fingerprint": self.fingerprint,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": checkpoint.rng_state(),
            "progress": asdict(self.progress),
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
        checkpoint.set_rng_state(state["rng"])
        self.progress = Progress(**state["progress"])

    def finished(self) -> bool:
        return self.progress.iteration >= self.recipe.iterations

    # -- one step ---------------------------------------------------------------------
    def step(self, images: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step; returns (loss, correct) as tensors (no host sync)."""
        p, device = self.params, self.ctx.device
        index_np = index.numpy()
        maps = prior_batch(self.prior_maps, index_np, device)
        x, maps = self.transform(images, index_np, self.progress.epoch, maps)
        x = self.transform.resize(x, self.progress.iteration / self.recipe.iterations)
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
        return loss.detach().float(), (logits.argmax(1) == y).sum()

    def _mixup_draw(self, n: int) -> tuple[float, torch.Tensor]:
        """Mixup's λ and partner permutation, a function of (seed, iteration, rank)."""
        rng = np.random.default_rng([self.params.seed, self.progress.iteration, self.ctx.rank])
        lam = float(rng.beta(self.params.mixup, self.params.mixup))
        return lam, torch.from_numpy(rng.permutation(n)).to(self.ctx.device)

    def _weights_finite(self) -> bool:
        """A step can leave inf/NaN weights before any loss shows it: never checkpoint them."""
        norms = torch._foreach_norm([p.detach() for p in self.model.parameters()])
        return bool(torch.isfinite(torch.stack(norms)).all())

    # -- held-out evaluation ----------------------------------------------------------
    def holdout_accuracy(self) -> float:
        from ran.evaluate import predict

        self.model.eval()
        correct = total = 0
        spec = replace(self.spec, resolution=network_side(self.spec, self.params))
        batches = predict(self.model, self.holdout_loader, spec, self.dtype, prior=self.prior_maps)
        for logits, _, index in batches:
            labels = self.labels[index.numpy()]
            correct += int((logits.argmax(1).cpu().numpy() == labels).sum())
            total += len(labels)
        self.model.train()
        return correct / max(total, 1)

    # -- the loop ---------------------------------------------------------------------
    def run(self, hooks: Any) -> None:
        """Train to ``recipe.iterations``; ``hooks`` logs, checkpoints and shows progress."""
        p, prog = self.params, self.progress
        loader, order = self.loader, self.loader.loader.traversal_order
        self.model.train()
        loss_sum = torch.zeros((), device=self.ctx.device)
        correct_sum = torch.zeros((), device=self.ctx.device, dtype=torch.long)
        window_steps, window_start = 0, time.perf_counter()
        while not self.finished():
            order.skip = prog.position * self.per_process_batch
            loader.loader.next_epoch = prog.epoch
            for images, _, index in loader:
                loss, correct = self.step(images, index)
                loss_sum += loss
                correct_sum += correct
                window_steps += 1
                prog.iteration += 1
                prog.position += 1
                if prog.position == len(loader):
                    prog.epoch, prog.position = prog.epoch + 1, 0
                due_log = prog.iteration % p.log_every == 0 or self.finished()
                due_ckpt = prog.iteration % p.checkpoint_every == 0 or self.finished()
                due_eval = self.holdout_loader is not None and (
                    prog.iteration % p.eval_every == 0 or self.finished()
                )
                if due_log or due_ckpt:
                    mean_loss = loss_sum.item() / window_steps
                    if not (math.isfinite(mean_loss) and self._weights_finite()):
                        raise RanError(
                            f"the loss became {mean_loss} before iteration {prog.iteration} "
                            f"(lr {self.schedule.get_last_lr()[0]:.4g}); the last good "
                            f"checkpoint {self.out / checkpoint.LAST} is intact: lower --lr "
                            "or use --precision fp32, then --resume"
                        )
                if due_log:
                    took = time.perf_counter() - window_start
                    row = {
                        "iteration": prog.iteration,
                        "epoch": prog.epoch,
                        "loss": mean_loss,
                        "train_accuracy": correct_sum.item()
                        / (window_steps * self.per_process_batch),
                        "lr": self.schedule.get_last_lr()[0],
                        "images_per_s": window_steps * p.batch_size / took,
                    }
                    prog.curves.append(row)
                    hooks.log(row)
                    loss_sum.zero_()
                    correct_sum.zero_()
                    window_steps, window_start = 0, time.perf_counter()
                if due_eval:
                    score = self.holdout_accuracy()
                    prog.holdout.append({"iteration": prog.iteration, "holdout_accuracy": score})
                    hooks.holdout(prog.iteration, score, score > prog.best_score)
                    if score > prog.best_score:
                        prog.best_score, prog.best_iteration = score, prog.iteration
                    window_start = time.perf_counter()
                if due_ckpt:
                    hooks.checkpoint()
                hooks.advance(prog.iteration)
                if self.finished() or prog.position == 0:
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
