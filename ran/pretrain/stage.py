"""The pretrain stage: DINO on an ingest output's train images (labels unread) → the prior's
ViT, tracked.

``OUT/vit.safetensors`` is the teacher's backbone, loadable by timm under its name
(``ran-cli prior --vit NAME --vit-weights OUT/vit.safetensors``, or ``init: trained`` in the
vitmask study); the name is also in the file's metadata. ``report.json`` holds the k-NN
top-1 of the trained ViT and of the same ViT at its random initialisation (measured in the
same run), the maps' peakedness of both, and what made it; ``curves.csv`` the loss and
schedules, ``knn.csv`` the k-NN top-1 against steps and minutes of training, ``knn.png``
and ``maps.png`` draw them and both ViTs' maps (:mod:`.figures`).

Like training, the stage checkpoints (``checkpoint-last.pt``: networks, optimiser, loss
centre, step, curves, MLflow run id) and resumes exactly: the record order is a function
of (seed, epoch) and a step's views of (seed, step), so a resumed run computes what an
uninterrupted one would. The results are written only once training has ended, each file
all or nothing.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import torch

from ran.config import PretrainParams
from ran.data.beton import LoaderSpec, make_loader
from ran.data.meta import read_meta
from ran.data.order import seeded_order
from ran.devices import autocast_dtype, pick_device
from ran.errors import RanError
from ran.modelfile import FORMAT, load, save
from ran.outputs import atomic_write, write_csv
from ran.paths import VIT_WEIGHTS
from ran.pretrain.dino import Dino, schedule
from ran.pretrain.figures import knn_curve, maps_figure
from ran.pretrain.knn import evaluate_backbone
from ran.pretrain.views import Views, step_seed
from ran.prior.vit import PriorSource, load_vit
from ran.progress import progress_bar
from ran.tracking import describe, log_file_dataset, log_metrics, log_outputs, tracked_stage

Resume = Literal["no", "yes", "auto"]
LAST = "checkpoint-last.pt"
REPORT = "report.json"
CURVES = "curves.csv"
KNN = "knn.csv"
KNN_FIGURE = "knn.png"
MAPS_FIGURE = "maps.png"
# Settings that change how a run computes, not what: a run may resume with other values.
NOT_FINGERPRINTED = {"checkpoint_every", "log_every", "knn_every", "device", "num_workers"}


def pretrain_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Training's rule (:func:`ran.devices.autocast_dtype`), but fp32 for ``auto`` on a CPU:
    there bf16 autocast slowed a ViT's DINO step 5-9× once the weights had moved (measured
    on an AVX-512 BF16 CPU, docs/vitmask.md), while the convolutions of training gain 2×."""
    if precision == "auto" and device.type != "cuda":
        return None
    return autocast_dtype(precision, device)


class Pretrainer:
    """DINO of one ViT on one ingest output into ``out``."""

    def __init__(self, params: PretrainParams, data: Path, out: Path) -> None:
        self.params, self.data, self.out = params, data, out
        self.meta = read_meta(data)
        self.spec = LoaderSpec.from_meta(self.meta)
        count = self.meta["splits"]["train"]["count"]
        self.steps_per_epoch = count // params.batch_size
        if self.steps_per_epoch == 0:
            raise RanError(
                f"--batch-size {params.batch_size} is larger than the {count} train images of "
                f"{data}: lower it"
            )
        self.steps = max(1, round(params.epochs * self.steps_per_epoch))
        self.device = pick_device(params.device)
        self.dtype = pretrain_dtype(params.precision, self.device)
        torch.set_flush_denormal(True)  # DINO's sharpened softmax makes tiny gradients
        self.dino = Dino(params).to(self.device)
        self.optimizer = torch.optim.AdamW(self.dino.parameter_groups(), lr=0.0)
        self.views = Views(params)
        self.step, self.seconds = 0, 0.0
        self.curves: list[dict[str, float]] = []
        self.knn: list[dict[str, float]] = []
        self.random: dict[str, float] = {}
        settings = {
            k: v for k, v in params.model_dump(mode="json").items() if k not in NOT_FINGERPRINTED
        }
        self.fingerprint = {**settings, "data_sha256": self.meta["splits"]["train"]["sha256"]}
        self.loader = make_loader(
            data / "train.beton",
            self.spec,
            params.batch_size,
            train=True,
            num_workers=params.num_workers,
            order=seeded_order(params.seed),
        )

    # -- state -------------------------------------------------------------------------
    def state_dict(self, run_id: str) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": "pretrain",
            "dino": self.dino.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "progress": {"step": self.step, "seconds": self.seconds},
            "curves": self.curves,
            "knn": self.knn,
            "random": self.random,
            "fingerprint": self.fingerprint,
            "run_id": run_id,
        }

    def load_state_dict(self, state: dict[str, Any], path: Path) -> None:
        if state.get("kind") != "pretrain" or state.get("fingerprint") != self.fingerprint:
            raise RanError(
                f"checkpoint {path} was pretrained with other settings or data; resume with "
                "those settings, or start afresh without --resume"
            )
        self.dino.load_state_dict(state["dino"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["progress"]["step"])
        self.seconds = float(state["progress"]["seconds"])
        self.curves, self.knn, self.random = state["curves"], state["knn"], state["random"]

    # -- the loop ----------------------------------------------------------------------
    def train_step(self, images: torch.Tensor) -> dict[str, float]:
        p = self.params
        settings = schedule(p, self.step, self.steps_per_epoch, self.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = settings.lr
        self.optimizer.param_groups[0]["weight_decay"] = settings.weight_decay  # weights only
        views = [v.to(self.device, non_blocking=True) for v in self.views(images, self.step)]
        torch.manual_seed(step_seed(p.seed, self.step, "drop_path"))
        with torch.autocast(self.device.type, self.dtype, enabled=self.dtype is not None):
            loss = self.dino(views, settings.teacher_temp)
        if not torch.isfinite(loss):
            raise RanError(
                f"the DINO loss became {loss.item()} at step {self.step}: lower --lr, then "
                f"--resume from {self.out / LAST}"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if p.clip_grad:
            torch.nn.utils.clip_grad_norm_(self.dino.student.parameters(), p.clip_grad)
            torch.nn.utils.clip_grad_norm_(self.dino.student_head.parameters(), p.clip_grad)
        if settings.freeze_last_layer:
            self.dino.cancel_last_layer_gradients()
        self.optimizer.step()
        self.dino.update_teacher(settings.momentum)
        self.step += 1
        return {
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "loss": loss.item(),
            "lr": settings.lr,
            "weight_decay": settings.weight_decay,
            "teacher_temp": settings.teacher_temp,
            "teacher_momentum": settings.momentum,
        }

    def random_vit(self) -> Any:
        """The ViT at its random initialisation: the teacher's starting weights (built from
        the same seed), whatever step this run resumed at."""
        p = self.params
        return load_vit(p.vit, None, p.size, random_init=True, seed=p.seed).to(self.device)

    def evaluate(self, backbone: Any, bar: Any) -> dict[str, float]:
        p = self.params
        return evaluate_backbone(
            backbone, self.data, self.meta, p.size, p.knn_k, p.knn_temperature, bar
        )

    def run(self, hooks: _Hooks) -> None:
        """Train to ``self.steps``; ``hooks`` logs, evaluates, checkpoints and shows progress."""
        p = self.params
        if not self.random:
            self.random = self.evaluate(self.random_vit(), hooks.bar)
            self.knn.insert(0, {"step": 0, "minutes": 0.0, **self.random})
            hooks.evaluated(0, self.random)
        while self.step < self.steps:
            position = self.step % self.steps_per_epoch
            self.loader.loader.traversal_order.skip = position * p.batch_size
            self.loader.loader.next_epoch = self.step // self.steps_per_epoch
            started, images_seen = time.perf_counter(), 0
            for images, _, _ in self.loader:
                row = self.train_step(images)
                images_seen += len(images)
                if self.step % p.log_every == 0 or self.step == self.steps:
                    took = time.perf_counter() - started
                    self.seconds += took
                    row |= {"minutes": self.seconds / 60, "images_per_s": images_seen / took}
                    self.curves.append(row)
                    hooks.log(row)
                    started, images_seen = time.perf_counter(), 0
                if p.knn_every and self.step % p.knn_every == 0 and self.step < self.steps:
                    self.seconds += time.perf_counter() - started
                    self._knn_point(hooks)
                    started, images_seen = time.perf_counter(), 0
                if self.step % p.checkpoint_every == 0 and self.step < self.steps:
                    self.seconds += time.perf_counter() - started
                    hooks.checkpoint()
                    started, images_seen = time.perf_counter(), 0
                hooks.advance(self.step)
                if self.step >= self.steps or self.step % self.steps_per_epoch == 0:
                    break
            self.seconds += time.perf_counter() - started

    def _knn_point(self, hooks: _Hooks) -> dict[str, float]:
        scores = self.evaluate(self.dino.teacher, hooks.bar)
        self.knn = [row for row in self.knn if row["step"] != self.step]  # a re-run's last
        self.knn.append({"step": self.step, "minutes": self.seconds / 60, **scores})
        hooks.evaluated(self.step, scores)
        return scores


class _Hooks:
    """What the loop does besides training: MLflow metrics, the bar, checkpoints."""

    def __init__(self, trainer: Pretrainer, run_id: str, bar: Any, task: Any) -> None:
        self.trainer, self.run_id, self.bar, self.task = trainer, run_id, bar, task

    def log(self, row: dict[str, float]) -> None:
        log_metrics({k: v for k, v in row.items() if k != "step"}, step=int(row["step"]))
        self.bar.update(
            self.task, loss=row["loss"], temp=row["teacher_temp"], ips=row["images_per_s"]
        )

    def evaluated(self, step: int, scores: dict[str, float]) -> None:
        log_metrics(scores, step=step)

    def checkpoint(self) -> None:
        t = self.trainer
        save(t.out / LAST, t.state_dict(self.run_id))
        write_csv(t.out / CURVES, t.curves, "step")

    def advance(self, step: int) -> None:
        self.bar.update(self.task, completed=step)


def _save_backbone(trainer: Pretrainer, path: Path) -> None:
    """The teacher's backbone as safetensors (no pickle), its timm name in the metadata."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in trainer.dino.teacher.state_dict().items()}
    metadata = {"timm_name": trainer.params.vit, "size": str(trainer.params.size)}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def _resume_state(trainer: Pretrainer, resume: Resume) -> dict[str, Any] | None:
    """``yes``: the checkpoint must exist and match; ``auto`` (DVC): one of the same
    settings and data, else a fresh start. A finished one is taken too: the run then only
    evaluates and writes, which is what a run killed after its last step had left to do."""
    path = trainer.out / LAST
    if resume == "no" or (resume == "auto" and not path.is_file()):
        return None
    state = load(path, "checkpoint", "start afresh without --resume")
    if resume == "auto" and state.get("fingerprint") != trainer.fingerprint:
        return None
    return state


def pretrain(
    params: PretrainParams,
    data: Path,
    out: Path,
    experiment: str,
    resume: Resume = "no",
    tags: dict[str, str] | None = None,
) -> dict[str, Any]:
    """DINO into ``out`` (``vit.safetensors``, ``report.json``, ``curves.csv``, ``knn.csv``;
    ``checkpoint-last.pt`` while it runs); one MLflow run; returns the report."""
    trainer = Pretrainer(params, data, out)
    out.mkdir(parents=True, exist_ok=True)
    state = _resume_state(trainer, resume)
    if state:
        trainer.load_state_dict(state, out / LAST)
    logged = {
        **params.model_dump(mode="json"),
        "data": str(data),
        "steps": trainer.steps,
        "steps_per_epoch": trainer.steps_per_epoch,
        "device_type": trainer.device.type,
        "autocast": str(trainer.dtype).replace("torch.", "") if trainer.dtype else "fp32",
    }
    run_id = state.get("run_id") if state else None
    with tracked_stage("pretrain", experiment, logged, out, run_id=run_id, tags=tags) as run:
        if state is None:
            train = trainer.meta["splits"]["train"]
            log_file_dataset(
                data / "train.beton", f"{trainer.meta['dataset']}-train", train["sha256"], "train"
            )
        fields = (
            "loss {task.fields[loss]:.3f} temp {task.fields[temp]:.3f} {task.fields[ips]:.0f} img/s"
        )
        with progress_bar(fields) as bar:
            task = bar.add_task(
                "pretrain",
                total=trainer.steps,
                completed=trainer.step,
                loss=float("nan"),
                temp=params.teacher_temp[0],
                ips=0.0,
            )
            hooks = _Hooks(trainer, run.info.run_id, bar, task)
            trainer.run(hooks)
            hooks.checkpoint()
            final = trainer._knn_point(hooks)
        report = _report(trainer, final)
        _save_backbone(trainer, out / VIT_WEIGHTS)
        write_csv(out / KNN, trainer.knn, "step")
        _figures(trainer, report)
        atomic_write(out / REPORT, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
        summary = {k: v for k, v in report.items() if isinstance(v, float) and k not in final}
        log_metrics(summary, step=trainer.steps)  # the final scores are there already
        log_outputs(out, (VIT_WEIGHTS, REPORT, CURVES, KNN, KNN_FIGURE, MAPS_FIGURE))
        describe(
            f"DINO of {params.vit} on the train images of `{data}` ({trainer.steps} steps of "
            f"{params.batch_size}, {report['epochs']:.1f} epochs, {report['minutes']:.1f} min): "
            f"k-NN top-1 {report['knn_top1']:.1f} % against {report['knn_top1_random']:.1f} % "
            "for the same ViT at its random initialisation."
        )
    return report


def _figures(trainer: Pretrainer, report: dict[str, Any]) -> None:
    p = trainer.params
    title = (
        f"DINO of {p.vit} on {trainer.meta['dataset']}, batch {p.batch_size}, "
        f"{report['epochs']:.1f} epochs"
    )
    knn_curve(trainer.knn, title, trainer.out / KNN_FIGURE)
    sources = {
        "random ViT": PriorSource(trainer.random_vit(), p.size, "mean"),
        "trained ViT": PriorSource(trainer.dino.teacher.eval(), p.size, "mean"),
    }
    maps_figure(sources, trainer.data, trainer.meta, trainer.out / MAPS_FIGURE)


def _report(trainer: Pretrainer, final: dict[str, float]) -> dict[str, Any]:
    p, meta = trainer.params, trainer.meta
    return {
        "vit": p.vit,
        "size": p.size,
        "dataset": meta["dataset"],
        "data_sha256": meta["splits"]["train"]["sha256"],
        "steps": trainer.steps,
        "epochs": trainer.steps / trainer.steps_per_epoch,
        "minutes": trainer.seconds / 60,
        "knn_k": p.knn_k,
        "knn_temperature": p.knn_temperature,
        "knn_top1": final["knn_top1"],
        "knn_top1_random": trainer.random["knn_top1"],
        "knn_gain": final["knn_top1"] - trainer.random["knn_top1"],
        **{k: v for k, v in final.items() if k.startswith("map_")},
        **{f"{k}_random": v for k, v in trainer.random.items() if k.startswith("map_")},
        "final_loss": trainer.curves[-1]["loss"] if trainer.curves else float("nan"),
    }
