"""The training stage around :class:`~ran.train.loop.Trainer`: the resume decision, the
tracked stage (output folder and MLflow run), the progress bar, checkpoints and the final
model.

Only the main process (rank 0) writes files and talks to MLflow; the others train.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from ran.config import TrainParams
from ran.errors import RanError
from ran.modelfile import BEST, MODEL, load, model_record, save
from ran.outputs import atomic_write, write_csv
from ran.progress import progress_bar
from ran.tracking import (
    check_store,
    describe,
    log_artifact,
    log_file_dataset,
    log_later,
    log_metrics,
    log_outputs,
    tracked_stage,
)
from ran.train import checkpoint, distributed
from ran.train.loop import Trainer

Resume = Literal["no", "yes", "auto"]
CURVES = "curves.csv"
HOLDOUT = "holdout.csv"
SUMMARY = "summary.json"


def _model_record(trainer: Trainer, run_id: str) -> dict[str, Any]:
    """What ``model.pt`` holds for this trainer's network (:mod:`ran.modelfile`)."""
    return model_record(
        trainer.arch,
        trainer.model.state_dict(),
        trainer.meta,
        trainer.spec,
        trainer.network_side,
        trainer.state.iteration,
        run_id,
        _prior_record(trainer),
    )


def _prior_record(trainer: Trainer) -> dict[str, Any] | None:
    """What made the prior maps the network was trained with (``None``: it takes none)."""
    if trainer.prior_path is None:
        return None
    report = json.loads((trainer.prior_path / "report.json").read_text())
    keys = ("vit", "init", "weights", "weights_sha256", "size", "grid", "aggregate", "seed")
    return {k: report.get(k) for k in keys}  # what rebuilds the ViT (ran.inference.vitprior)


class _Hooks:
    """What the loop does besides training, on the main process: MLflow metrics, the progress
    bar, checkpoints, the best held-out model."""

    def __init__(self, trainer: Trainer, run_id: str, bar: Any, task: Any) -> None:
        self.trainer, self.run_id, self.bar, self.task = trainer, run_id, bar, task

    def log(self, row: dict[str, float]) -> None:
        metrics = {k: v for k, v in row.items() if k != "iteration"}
        log_metrics(metrics, step=int(row["iteration"]))
        self.bar.update(
            self.task,
            loss=row["loss"],
            acc=row["train_accuracy"],
            lr=row["lr"],
            ips=row["images_per_s"],
        )

    def holdout(self, iteration: int, score: float, improved: bool) -> None:
        log_metrics({"holdout_accuracy": score}, step=iteration)
        if improved:
            trainer = self.trainer
            save(trainer.out / BEST, _model_record(trainer, self.run_id))

    def checkpoint(self) -> None:
        trainer = self.trainer
        save(trainer.out / checkpoint.LAST, trainer.state_dict(self.run_id))
        write_csv(trainer.out / CURVES, trainer.state.curves, "iteration")
        if trainer.state.holdout:
            write_csv(trainer.out / HOLDOUT, trainer.state.holdout, "iteration")

    def advance(self, iteration: int) -> None:
        self.bar.update(self.task, completed=iteration)


class _Silent:
    """The hooks of the other processes under DDP: they train, nothing else."""

    def log(self, row: dict[str, float]) -> None: ...
    def holdout(self, iteration: int, score: float, improved: bool) -> None: ...
    def checkpoint(self) -> None: ...
    def advance(self, iteration: int) -> None: ...


def _resume_state(trainer: Trainer, resume: Resume) -> dict[str, Any] | None:
    """The checkpoint to continue from. ``yes``: it must exist and match; ``auto`` (the DVC
    stage): an unfinished checkpoint of the same settings, else a fresh start."""
    path = trainer.out / checkpoint.LAST
    if resume == "no" or (resume == "auto" and not path.is_file()):
        return None
    state = load(path, "checkpoint", "start afresh without --resume")
    if resume == "auto":
        progress = state.get("progress", {})
        same = state.get("arch") == trainer.arch and state.get("fingerprint") == trainer.fingerprint
        if not same or progress.get("iteration", 0) >= trainer.recipe.iterations:
            return None
    return state


def _log_inputs(trainer: Trainer) -> None:
    train = trainer.meta["splits"]["train"]
    log_file_dataset(
        trainer.data / "train.beton", f"{trainer.meta['dataset']}-train", train["sha256"], "train"
    )
    if trainer.labels_path is not None:
        digest = trainer.fingerprint["labels_sha256"]
        log_file_dataset(trainer.labels_path, "labels", digest, "labels")
    if trainer.prior_path is not None:
        digest = trainer.fingerprint["prior_sha256"]
        log_file_dataset(trainer.prior_path / "train.npy", "prior-train", digest, "prior")


def registered_name(trainer: Trainer) -> str:
    """The registry name: one per dataset and network (``cifar10-attention92``)."""
    return f"{trainer.meta['dataset']}-{trainer.params.family}{trainer.params.depth}"


def _log_model(trainer: Trainer, register: bool) -> None:
    """``model.pt`` as the run's MLflow image model (bytes in, top-5 classes out; loads
    without unpickling), registered under :func:`registered_name` when ``register``, with
    the first test image as its input example.

    A vitmask network's model carries the ViT weights its prior was made from: if that file
    is no longer where the prior stage read it, ``model.pt`` is logged as a plain artifact
    instead, and the line says so."""
    import tempfile

    from ran.inference.predictor import input_example
    from ran.inference.vitprior import prior_weights

    files = {"model": trainer.out / MODEL}
    prior = _prior_record(trainer)
    if prior is not None:
        try:
            vit = prior_weights(prior, None, str(trainer.out / MODEL))
        except RanError:  # moved or changed since the prior stage read it
            log_artifact(trainer.out / MODEL, "model")
            print(
                "model.pt logged as an artifact, not as an MLflow image model: the ViT weights "
                f"its prior was made from are not at {prior['weights']} any more (or differ)",
                file=sys.stderr,
            )
            return
        if vit is not None:
            files["vit"] = vit
    name = registered_name(trainer) if register else None
    with tempfile.TemporaryDirectory(prefix="ran-example-") as folder:
        files["example"] = Path(folder) / "example.png"
        files["example"].write_bytes(input_example(trainer.data))
        log_later(  # copies the files now
            "ran.inference.predictor:log_image_model_once",
            f"the image model (registered as {name})" if name else "the image model",
            files,
            registered_name=name,
        )


def train_model(
    params: TrainParams,
    data: Path,
    out: Path,
    experiment: str,
    labels: Path | None = None,
    resume: Resume = "no",
    tags: dict[str, str] | None = None,
    prior: Path | None = None,
) -> dict[str, Any]:
    """Train into ``out``: ``checkpoint-last.pt``, ``model.pt`` (+ ``model-best.pt`` with a
    hold-out), ``curves.csv``, ``summary.json``; one MLflow run; returns the summary (an
    empty one on the other processes of a DDP run)."""
    context = distributed.setup(params.device)
    if context.main:
        check_store()  # a server that is away or refuses the login: before any work
    try:
        trainer = Trainer(params, data, out, context, labels, prior)
        if context.main:
            out.mkdir(parents=True, exist_ok=True)
        distributed.barrier(context)
        trainer.build()
        state = _resume_state(trainer, resume)
        if state:
            trainer.load_state_dict(state, out / checkpoint.LAST)
        if context.main:
            return _main_process(trainer, experiment, state, tags)
        trainer.run(_Silent())
        distributed.barrier(context)
        return {}
    finally:
        distributed.teardown(context)


def _logged_params(trainer: Trainer) -> dict[str, Any]:
    """The run's params: the settings, the inputs and what the recipe resolved them to."""
    return {
        **trainer.params.model_dump(mode="json"),
        "data": str(trainer.data),
        "labels": str(trainer.labels_path) if trainer.labels_path else None,
        "prior": str(trainer.prior_path) if trainer.prior_path else None,
        "variant": trainer.variant.name,
        "resolved_iterations": trainer.recipe.iterations,
        "resolved_milestones": trainer.recipe.milestones,
        "num_classes": trainer.meta["num_classes"],
        "world_size": trainer.ctx.world,
        "device_type": trainer.ctx.device.type,
        "autocast": str(trainer.dtype).replace("torch.", "") if trainer.dtype else "fp32",
    }


def _main_process(
    trainer: Trainer, experiment: str, state: dict[str, Any] | None, tags: dict[str, str] | None
) -> dict[str, Any]:
    run_id = state.get("run_id") if state else None
    logged = _logged_params(trainer)
    with tracked_stage(
        "train", experiment, logged, trainer.out, run_id=run_id, tags=tags, system_metrics=True
    ) as run:
        if state is None:
            _log_inputs(trainer)
        fields = (
            "loss {task.fields[loss]:.3f} acc {task.fields[acc]:.3f} lr {task.fields[lr]:.3g} "
            "{task.fields[ips]:.0f} img/s"
        )
        with progress_bar(fields) as bar:
            task = bar.add_task(
                "train",
                total=trainer.recipe.iterations,
                completed=trainer.state.iteration,
                loss=float("nan"),
                acc=float("nan"),
                lr=trainer.schedule.get_last_lr()[0],
                ips=0.0,
            )
            trainer.run(_Hooks(trainer, run.info.run_id, bar, task))
        distributed.barrier(trainer.ctx)
        save(trainer.out / MODEL, _model_record(trainer, run.info.run_id))
        summary = _summary(trainer, run.info.run_id)
        atomic_write(
            trainer.out / SUMMARY, lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n")
        )
        log_metrics({k: v for k, v in summary.items() if isinstance(v, float)})
        log_outputs(trainer.out, (CURVES, HOLDOUT, SUMMARY))
        describe(_description(trainer, summary))
        if trainer.params.log_model:
            _log_model(trainer, trainer.params.register_model)
    return summary


def _description(trainer: Trainer, summary: dict[str, Any]) -> str:
    """The run's note: the network, the data, the recipe, the length, the outcome."""
    p = trainer.params
    options = ", ".join(f"{k} {v}" for k, v in sorted(trainer.arch["options"].items()))
    inputs = f"`{trainer.data}`"
    if trainer.labels_path is not None:
        inputs += f" with the labels of `{trainer.labels_path}`"
    if trainer.prior_path is not None:
        inputs += f" and the prior maps of `{trainer.prior_path}`"
    text = (
        f"Trains {trainer.variant.name}{f' ({options})' if options else ''} on {inputs}: "
        f"{summary['iterations']} iterations of batch {p.batch_size} ({summary['epochs']:.1f} "
        f"epochs), {p.optimizer} with a {p.schedule} schedule to lr {p.lr}, seed {p.seed}. "
        f"Final training loss {summary['final_loss']:.3f}, accuracy on the augmented "
        f"batches {summary['final_train_accuracy']:.1%}"
    )
    if "best_holdout_accuracy" in summary:
        text += f"; best hold-out accuracy {summary['best_holdout_accuracy']:.1%}"
    return text + ". Its test score is in the evaluate run that names it."


def _summary(trainer: Trainer, run_id: str) -> dict[str, Any]:
    prog = trainer.state
    last = prog.curves[-1] if prog.curves else {}
    summary: dict[str, Any] = {
        "run_id": run_id,
        "variant": trainer.variant.name,
        "iterations": prog.iteration,
        "epochs": float(prog.iteration * trainer.params.batch_size / len(trainer.train_indices)),
        "final_loss": float(last.get("loss", float("nan"))),
        "final_train_accuracy": float(last.get("train_accuracy", float("nan"))),
    }
    if prog.best_iteration >= 0:
        summary |= {"best_holdout_accuracy": prog.best_score, "best_iteration": prog.best_iteration}
    return summary
