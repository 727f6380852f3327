"""``ran-cli``: the command-line front door to the library.

Thin on purpose: each command parses its options, calls one library function and prints
the result. Heavy imports (torch, ffcv, mlflow) happen inside the commands, so
``ran-cli --help`` answers at once. A :class:`~ran.errors.RanError` is printed as one line
on stderr with exit code 1, never as a traceback (:func:`ran.errors.user_errors`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ran import paths
from ran import stack as team_stack
from ran.cli_options import with_model_options
from ran.cluster import cells as study_cells
from ran.cluster.driver import run_study
from ran.cluster.driver import study_status as cell_states
from ran.config import (
    SOURCE_ENV,
    EvaluateParams,
    IngestParams,
    NoiseParams,
    PretrainParams,
    PriorParams,
    TrackingParams,
    TrainParams,
    ValidationParams,
    parse,
    profile_values,
    resolve_profile,
    with_source_override,
)
from ran.devices import pick_device
from ran.errors import RanError, user_errors
from ran.model_table import model_table
from ran.outbox import deliver_pending, pending_runs
from ran.outputs import atomic_write
from ran.studies import get_study
from ran.studies.report import tracked_report
from ran.tracking import http_settings, repo_root, runs_page, tracking_uri

# Options that several commands take alike.
Experiment = Annotated[str, typer.Option(help="MLflow experiment")]
DEFAULT_EXPERIMENT = TrackingParams.model_fields["experiment"].default
Resume = Annotated[bool, typer.Option("--resume", help="continue from OUT/checkpoint-last.pt")]


def _profiled(model: Any, section: str, profile: str, values: dict) -> Any:
    """``section``'s parameters: the profile's overlay (``auto``: paper with a GPU, else
    quick), then the options given on the command line."""
    import torch

    base = profile_values(section, resolve_profile(profile, torch.cuda.is_available()))
    return parse(model, {**base, **values}, section)


app = typer.Typer(
    name="ran-cli",
    help="Residual Attention Network pipeline: ingest data, inspect models, add label noise, "
    "compute a ViT attention prior, train, evaluate, report the paper's studies, predict your "
    "own images, serve a model.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Residual Attention Network (Wang et al., CVPR 2017) pipeline."""


INGEST = IngestParams.model_fields


def _option(name: str, *flags: str) -> Any:
    """A Typer option whose help text is the parameter's own description in ran.config."""
    return typer.Option(*flags, help=INGEST[name].description)


@app.command()
@user_errors
def ingest(
    dataset: Annotated[str, _option("dataset")] = INGEST["dataset"].default,
    source: Annotated[
        Path | None,
        typer.Option(
            help="CIFAR python archive/folder, or an ImageFolder tree (or .tar/.tar.gz) with "
            "train/ and val/ or test/; omit to download CIFAR (needs network). "
            f"Default: ${SOURCE_ENV}.",
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="output folder")] = paths.INGEST,
    skip_bad: Annotated[bool, _option("skip_bad", "--skip-bad")] = INGEST["skip_bad"].default,
    seed: Annotated[int, _option("seed")] = INGEST["seed"].default,
    num_workers: Annotated[int, _option("num_workers")] = INGEST["num_workers"].default,
    write_mode: Annotated[str, _option("write_mode")] = INGEST["write_mode"].default,
    max_resolution: Annotated[int, _option("max_resolution")] = INGEST["max_resolution"].default,
    jpeg_quality: Annotated[int, _option("jpeg_quality")] = INGEST["jpeg_quality"].default,
    compress_probability: Annotated[float, _option("compress_probability")] = INGEST[
        "compress_probability"
    ].default,
    max_cross_split_duplicates: Annotated[
        int, typer.Option(help="val images allowed to equal a train image exactly")
    ] = ValidationParams.model_fields["max_cross_split_duplicates"].default,
    experiment: Experiment = DEFAULT_EXPERIMENT,
) -> None:
    """Ingest a data set into FFCV files: OUT/train.beton, OUT/val.beton, OUT/meta.json.

    Images are validated with Great Expectations and the run is logged to MLflow
    (MLFLOW_TRACKING_URI, default sqlite:///mlflow.db at the repository root).
    """
    from ran.data.ingest import tracked_ingest

    values = {
        "dataset": dataset,
        "source": source,
        "skip_bad": skip_bad,
        "seed": seed,
        "num_workers": num_workers,
        "write_mode": write_mode,
        "max_resolution": max_resolution,
        "jpeg_quality": jpeg_quality,
        "compress_probability": compress_probability,
        "validation": {"max_cross_split_duplicates": max_cross_split_duplicates},
    }
    params = parse(IngestParams, values, "ingest")
    if source is None:
        params = with_source_override(params)
    meta = tracked_ingest(params, out, experiment)
    counts = {split: info["count"] for split, info in meta["splits"].items()}
    print(json.dumps({"out": str(out), "num_classes": meta["num_classes"], "counts": counts}))


@app.command()
def models(
    json_output: Annotated[
        bool, typer.Option("--json", help="print a JSON list instead of a table")
    ] = False,
) -> None:
    """List every registered model variant: input size, depth, params and MACs vs the paper."""
    rows = model_table()
    if json_output:
        print(json.dumps(rows, indent=2))
        return

    from rich.console import Console
    from rich.table import Table

    table = Table(title="Registered models (MACs at the listed input size, batch 1)")
    for column in ("name", "input", "depth", "params (M)", "paper", "GMACs", "paper"):
        table.add_column(column, justify="left" if column == "name" else "right", no_wrap=True)
    for row in rows:
        table.add_row(
            row["name"],
            str(row["input_size"]),
            str(row["depth"]),
            f"{row['params'] / 1e6:.2f}",
            "-" if row["ref_params_m"] is None else f"{row['ref_params_m']:.1f}",
            f"{row['macs'] / 1e9:.3f}",
            "-" if row["ref_macs_g"] is None else f"{row['ref_macs_g']:.1f}",
        )
    console = Console()
    Console(width=max(console.width, 100)).print(table)  # seven columns need 100


@app.command()
@user_errors
@with_model_options(NoiseParams)
def noise(
    values: dict,
    data: Annotated[Path, typer.Option(help="ingest output whose train labels are made noisy")] = (
        paths.INGEST
    ),
    out: Annotated[Path, typer.Option(help="output folder")] = paths.NOISE,
    experiment: Experiment = DEFAULT_EXPERIMENT,
) -> None:
    """Make the train split's labels noisy, for `ran-cli train --labels`.

    Writes OUT/labels.npy (int64, one label per train record, in record-index order),
    OUT/report.json (requested and achieved rate, transition matrix, per-class flips) and
    OUT/transition.png; validated with Great Expectations and logged to MLflow. The images
    are not copied."""
    from ran.noise.stage import tracked_noise

    params = parse(NoiseParams, values, "noise")
    report = tracked_noise(params, data, out, experiment)
    keys = ("kind", "requested_rate", "achieved_rate", "flipped_records", "records")
    print(json.dumps({"out": str(out), **{k: report[k] for k in keys}}))


PRETRAIN_HELP = """Train the prior's ViT here: DINO self-distillation on an ingest output's train images, labels unread.

lightly's DINO (loss, projection head, multi-crop views, momentum teacher) on a timm ViT; the defaults are the DINO paper's ViT-S/16 recipe (a GPU job), --profile quick the 2-core CPU one (params.yaml's quick.pretrain: a 6-block ViT-Tiny/8 at 32 px). Its quality is measured as self-supervised features are: a weighted k-NN (k 20, cosine, T 0.07) on the frozen [CLS] features, train split → val split, for the trained ViT and for the same ViT at its random initialisation.

Writes OUT/vit.safetensors (the teacher's backbone: `ran-cli prior --vit NAME --vit-weights OUT/vit.safetensors`), OUT/report.json (knn_top1, knn_top1_random, the maps' peakedness), OUT/curves.csv and OUT/knn.csv (k-NN against minutes, with --knn-every); checkpoints OUT/checkpoint-last.pt and continues from it with --resume, exactly; logged to MLflow.
"""  # noqa: E501 - one line per paragraph: the help formatter wraps them


@app.command(help=PRETRAIN_HELP)
@user_errors
@with_model_options(PretrainParams)
def pretrain(
    values: dict,
    data: Annotated[
        Path, typer.Option(help="ingest output (meta.json, train/val.beton)")
    ] = paths.INGEST,
    out: Annotated[Path, typer.Option(help="output folder")] = paths.pretrain_folder(
        paths.MAIN_DATASET
    ),
    profile: Annotated[
        str,
        typer.Option(
            help="paper (the DINO paper's ViT-S recipe, a GPU job) | quick (params.yaml's "
            "quick.pretrain: the 2-core CPU recipe) | auto (paper with a GPU, else quick); "
            "options given here win over the profile"
        ),
    ] = "paper",
    resume: Resume = False,
    experiment: Experiment = DEFAULT_EXPERIMENT,
) -> None:
    from ran.pretrain.stage import pretrain as run_pretrain

    params = _profiled(PretrainParams, "pretrain", profile, values)
    report = run_pretrain(params, data, out, experiment, resume="yes" if resume else "no")
    keys = ("vit", "steps", "epochs", "minutes", "knn_top1", "knn_top1_random")
    print(json.dumps({"out": str(out), **{k: report[k] for k in keys}}))


PRIOR_HELP = """Compute the ViT attention prior of an ingest output, for `ran-cli train --family vitmask`.

A frozen self-supervised ViT (timm; DINO ViT-S/8 by default) runs once over the train and val splits; each record's map is the softmax attention of the [CLS] query over the patch tokens in the ViT's last block, its heads aggregated (--aggregate mean | max). Images are upsampled (bicubic) to --size, a multiple of the patch; the position embeddings are interpolated to it.

Writes OUT/train.npy and OUT/val.npy (float16, records × h × w, indexed by record, memory-mappable), OUT/report.json, OUT/sample.png (images beside their maps) and OUT/validation.json (Great Expectations); logged to MLflow.

Without network: download the weights elsewhere (docs/vitmask.md, "ViT weights") and pass --vit-weights FILE. --init random uses seeded random weights instead: it runs anywhere, but such a prior carries no information. --init constant writes the control: every weight 1/(h*w) on the ViT's grid, no ViT run.
"""  # noqa: E501 - one line per paragraph: the help formatter wraps them


@app.command(help=PRIOR_HELP)
@user_errors
@with_model_options(PriorParams)
def prior(
    values: dict,
    data: Annotated[
        Path, typer.Option(help="ingest output (meta.json, train/val.beton)")
    ] = paths.INGEST,
    out: Annotated[Path, typer.Option(help="output folder")] = paths.PRIORS,
    experiment: Experiment = DEFAULT_EXPERIMENT,
) -> None:
    from ran.prior.stage import tracked_prior

    params = parse(PriorParams, values, "prior")
    report = tracked_prior(params, data, out, experiment)
    keys = ("vit", "init", "size", "grid", "aggregate", "records")
    print(json.dumps({"out": str(out), **{k: report[k] for k in keys}}))


TRAIN_HELP = """Train a Residual Attention Network (or the ResNet baseline) on an ingest output.

Defaults are the paper's recipe (CIFAR: SGD with Nesterov momentum, batch 64, lr 0.1 divided by 10 at 64k and 96k iterations, 160k in all; ImageNet: divided at 200k, 400k and 500k, 530k in all). The variant and the number of classes follow the data (meta.json). --family vitmask (ResNet-8 refined by a ViT's attention) needs --prior, the output of `ran-cli prior`. --profile quick lays params.yaml's quick.train over them (the 2-core CPU profile).

Writes OUT/checkpoint-last.pt, OUT/model.pt, OUT/curves.csv and OUT/summary.json, and logs one MLflow run. Several GPUs: torchrun --nproc-per-node N -m ran.cli train ...
"""  # noqa: E501 - one line per paragraph: the help formatter wraps them


@app.command(help=TRAIN_HELP)
@user_errors
@with_model_options(TrainParams)
def train(
    values: dict,
    data: Annotated[
        Path, typer.Option(help="ingest output (meta.json, train.beton)")
    ] = paths.INGEST,
    out: Annotated[Path, typer.Option(help="output folder")] = paths.TRAIN,
    labels: Annotated[
        Path | None,
        typer.Option(help="labels.npy (int64, one per train record) to train on instead"),
    ] = None,
    prior: Annotated[
        Path | None,
        typer.Option(help="`ran-cli prior` output: the ViT attention maps (--family vitmask)"),
    ] = None,
    profile: Annotated[
        str,
        typer.Option(
            help="paper | quick (params.yaml's quick.train laid over the paper's recipe) | "
            "auto (paper with a GPU, else quick); options given here win over the profile"
        ),
    ] = "paper",
    resume: Resume = False,
    experiment: Experiment = DEFAULT_EXPERIMENT,
) -> None:
    from ran.train.stage import train_model

    params = _profiled(TrainParams, "train", profile, values)
    summary = train_model(
        params, data, out, experiment, labels=labels, resume="yes" if resume else "no", prior=prior
    )
    if summary:
        print(json.dumps(summary))


@app.command()
@user_errors
@with_model_options(EvaluateParams)
def evaluate(
    values: dict,
    model: Annotated[Path, typer.Option(help="model.pt written by `ran-cli train`")] = paths.MODEL,
    data: Annotated[
        Path, typer.Option(help="ingest output whose val.beton is scored")
    ] = paths.INGEST,
    out: Annotated[Path, typer.Option(help="output folder")] = paths.EVALUATE,
    prior: Annotated[
        Path | None,
        typer.Option(help="`ran-cli prior` output for this data (models trained with a prior)"),
    ] = None,
    experiment: Experiment = DEFAULT_EXPERIMENT,
) -> None:
    """Score a trained model on the test split (val.beton).

    Writes top-1/top-5, per-class accuracy, the confusion matrix and attention-mask figures
    into OUT, logged to MLflow beside the training run."""
    from ran.evaluate import tracked_evaluate

    params = parse(EvaluateParams, values, "evaluate")
    metrics = tracked_evaluate(model, data, out, params, experiment, prior=prior)
    print(json.dumps(metrics))


MODEL_HELP = (
    "a model.pt, a `ran-cli train` output folder, or an MLflow model: models:/NAME/VERSION, "
    "models:/NAME@alias, runs:/RUN_ID/model"
)
VIT_WEIGHTS_HELP = (
    "a vitmask model.pt's ViT weights file, if not where `ran-cli prior` read it (checked by "
    "its sha256; an MLflow model carries its own)"
)
PREDICT_HELP = """Top-k classes of your own images, and where the network looked.

PATH is an image or a folder of images (searched recursively). Images are cut to the network's input the way evaluation's loader does (CIFAR-size networks: the central square resized to 32 px; ImageNet-size: the central 224/256 of the short side), so a test image gets the probabilities evaluation computed for it. Any image PIL reads works: JPEG, PNG, WebP, greyscale, CMYK, palette, 16-bit; EXIF rotation is applied. A vitmask network's prior map is computed per image by the ViT its prior was made from, as `ran-cli prior` computes it for a record.

--masks DIR writes, per image, each attention module's mask (mean over channels) blended over the image (IMAGE.module-N.png) and all modules side by side (IMAGE.strip.png).
"""  # noqa: E501 - one line per paragraph: the help formatter wraps them


@app.command(help=PREDICT_HELP)
@user_errors
def predict(
    paths: Annotated[list[Path], typer.Argument(help="image files and folders", metavar="PATH...")],
    model: Annotated[str, typer.Option(help=MODEL_HELP)] = str(paths.TRAIN),
    top: Annotated[int, typer.Option(min=1, help="classes shown per image")] = 5,
    as_json: Annotated[
        bool,
        typer.Option("--json", help='print [{"file", "labels", "probs"}, ...] instead of a table'),
    ] = False,
    masks: Annotated[
        Path | None, typer.Option(help="folder for the attention-mask overlays (replaced)")
    ] = None,
    skip_bad: Annotated[
        bool, typer.Option(help="go on past missing or unreadable images, listing them")
    ] = False,
    flip: Annotated[
        bool, typer.Option(help="average each image's and its mirror's prediction")
    ] = False,
    translate: Annotated[
        bool,
        typer.Option(
            help="also average over the image shifted a pixel up-left and down-right "
            "(evaluate.translate; the quick profile's test-time averaging with --flip)"
        ),
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="images per forward pass")] = 64,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N]")] = "auto",
    vit_weights: Annotated[Path | None, typer.Option(help=VIT_WEIGHTS_HELP)] = None,
) -> None:
    import sys

    from ran.inference.predict import predict_files
    from ran.inference.predictor import load_predictor

    predictor = load_predictor(model, str(pick_device(device)), flip, translate, vit_weights)
    result = predict_files(predictor, paths, top, batch_size, skip_bad, masks)
    if as_json:
        print(json.dumps(result.rows))
    else:
        _print_predictions(result.rows)
    if result.skipped:
        print(f"skipped {len(result.skipped)}:", *result.skipped, sep="\n  ", file=sys.stderr)


def _print_predictions(rows: list[dict[str, Any]]) -> None:
    """One row per image: the file (whole), the likeliest class, then the runners-up."""
    from rich.console import Console
    from rich.table import Table

    table = Table("file", "class", "prob", "next")
    table.columns[0].no_wrap = True
    for row in rows:
        rest = zip(row["labels"][1:], row["probs"][1:], strict=True)
        others = " · ".join(f"{label} {prob:.0%}" for label, prob in rest)
        table.add_row(row["file"], row["labels"][0], f"{row['probs'][0]:.1%}", others)
    Console().print(table)


SERVE_HELP = """Serve a model over HTTP on MLflow's scoring protocol, batching concurrent requests.

POST /invocations with {"inputs": ["<base64 image>", ...]} answers {"predictions": [{"labels": [...], "probs": [...]}, ...]}, as `ran-cli predict --json` does for the same files; a body that is not that gets HTTP 400 with {"error": ...}. GET /health answers once the model is loaded. The model is loaded with MLflow's pickle deserialisation refused. Requests waiting together are scored as one batch (up to --max-batch-size requests): a request that finds the server idle is scored at once, with whatever is queued behind it; while requests keep arriving (the last batch held several), a batch waits up to --batch-timeout seconds for more. LitServe, one inference worker.

Example: curl -s localhost:8080/invocations -H 'Content-Type: application/json' -d "{\"inputs\": [\"$(base64 -w0 cat.jpg)\"]}"
"""  # noqa: E501 - one line per paragraph: the help formatter wraps them


@app.command(help=SERVE_HELP)
@user_errors
def serve(
    model: Annotated[str, typer.Option(help=MODEL_HELP)],
    port: Annotated[int, typer.Option(help="port to listen on")] = 8080,
    host: Annotated[
        str, typer.Option(help="interface to bind (0.0.0.0 opens it to the network)")
    ] = "127.0.0.1",
    max_batch_size: Annotated[int, typer.Option(min=1, help="requests per batch, at most")] = 64,
    batch_timeout: Annotated[
        float,
        typer.Option(
            min=0, help="seconds a batch waits for more requests, only while they keep arriving"
        ),
    ] = 0.005,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    vit_weights: Annotated[Path | None, typer.Option(help=VIT_WEIGHTS_HELP)] = None,
) -> None:
    from ran.serving import serve as run_server

    run_server(model, host, port, device, max_batch_size, batch_timeout, vit_weights)


STUDY_NAMES = "noise, arl-nal, attention, mask, vitmask"
REPORT_HELP = """Tabulate a study's cells beside the paper's numbers.

Reads the study's finished evaluate runs from MLflow (by their study, cell, seed and profile tags; the newest of each of the studies.<profile>.seeds seeds) and writes OUT/report.md (our mean top-1 error ± its spread over seeds beside the paper's for every cell; per row whether the paper's ordering holds, is reversed or is inconclusive, by a paired bootstrap over seeds and test images; the runs' links), OUT/report.png (with error bars) and OUT/results.json, logged to MLflow. A cell without a finished run shows as missing.

Run a study's cells with: dvc repro --keep-going studies/dvc.yaml:STUDY (which also writes this report).
"""  # noqa: E501 - one line per paragraph: the help formatter wraps them


@app.command(help=REPORT_HELP)
@user_errors
def report(
    study: Annotated[str, typer.Argument(help=f"the study: {STUDY_NAMES}")],
    profile: Annotated[
        str,
        typer.Option(help="whose cells: paper | quick | auto (paper with a GPU, else quick)"),
    ] = "auto",
    out: Annotated[Path | None, typer.Option(help="output folder (default: reports/STUDY)")] = None,
    experiment: Experiment = DEFAULT_EXPERIMENT,
) -> None:
    import torch

    chosen = get_study(study)
    resolved = resolve_profile(profile, torch.cuda.is_available())
    folder = out or paths.report_folder(chosen.name)
    tracked_report(chosen, experiment, resolved, folder)
    print((folder / "report.md").read_text(), end="")


UI_HELP = (
    "Start MLflow's web UI on the project's tracking store, at http://HOST:PORT.\n\n"
    "The store is MLFLOW_TRACKING_URI, else sqlite:///mlflow.db at the repository root. "
    "Runs' artifacts (models, files) are read from where each run logged them: MLflow's "
    "default is ./mlruns of the folder it ran in, the repository root for ran-cli and the DVC "
    "stages. Runs `mlflow server` from this environment until Ctrl-C.\n\n"
    "When MLFLOW_TRACKING_URI is an http(s) tracking server, its UI is already there: the "
    "command prints that address and exits."
)


@app.command(help=UI_HELP)
def ui(
    port: Annotated[int, typer.Option(help="port to listen on")] = 5000,
    host: Annotated[
        str, typer.Option(help="interface to bind (0.0.0.0 opens the UI to the network)")
    ] = "127.0.0.1",
    experiment: Annotated[
        str, typer.Option(help="MLflow experiment whose runs the printed link opens")
    ] = TrackingParams.model_fields["experiment"].default,
) -> None:
    import os
    import sys
    from urllib.parse import urlparse

    uri = tracking_uri()
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        page = runs_page(uri.rstrip("/"), experiment)
        print(f"MLflow UI is already at {uri} (MLFLOW_TRACKING_URI is a tracking server): {page}")
        return
    args = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    args += ["--host", host, "--port", str(port), "--workers", "1"]
    if scheme not in ("", "file"):
        # A database store: experiments created in the UI keep their artifacts where those
        # created by ran-cli and the DVC stages do (MLflow's default ./mlruns, at the root).
        args += ["--default-artifact-root", (repo_root() / "mlruns").as_uri()]
    # MLflow's job runner (GenAI judges, scheduled tasks) is eight more processes this
    # project never uses; MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true brings it back.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    page = runs_page(f"http://{host}:{port}", experiment)
    print(f"MLflow UI: {page} (store {uri}; Ctrl-C stops it)", flush=True)
    os.execve(sys.executable, args, env)


SYNC_HELP = (
    "Send the tracking server what earlier stages logged while it was away.\n\n"
    "A stage that ends while its MLflow server is down or failing keeps what it could not "
    "send (metrics, tags, artifacts, the model, the run's end) under $RAN_CACHE/outbox; each "
    "stage also sends what is pending for its own server when it starts. Exit 1 when "
    "something is still pending."
)


@app.command(help=SYNC_HELP)
@user_errors
def sync(
    grace: Annotated[
        float, typer.Option(help="seconds to keep trying a server that does not answer")
    ] = 10.0,
) -> None:
    http_settings()
    runs = pending_runs()
    if not runs:
        print("nothing pending: every run's logs reached its tracking store")
        return
    left = deliver_pending(None, grace)
    for run_id, pending in left.items():
        print(f"run {run_id}: still pending: {pending}")
    print(f"sent what {len(runs) - len(left)} of {len(runs)} runs had pending")
    if left:
        raise SystemExit(1)


stack_app = typer.Typer(
    help="Start, check or stop a team stack on this machine (S3, PostgreSQL, MLflow).\n\n"
    "An S3 store (SeaweedFS), PostgreSQL and an MLflow server with logins, all on 127.0.0.1, "
    "their data under one folder. "
    '`eval "$(ran-cli stack up)"` starts it and sets MLFLOW_TRACKING_URI and the login; '
    "the S3 bucket becomes the repository's default DVC remote (in .dvc/config.local).",
    no_args_is_help=True,
)
app.add_typer(stack_app, name="stack")

STACK_DIR = typer.Option(
    "--dir",
    help="the stack's folder (data, logs, secrets); default $RAN_STACK_DIR, else "
    "/var/lib/ran/stack as root, else ~/.local/share/ran/stack",
)


@stack_app.command("up")
@user_errors
def stack_up(
    folder: Annotated[Path | None, STACK_DIR] = None,
    dvc_remote: Annotated[
        bool, typer.Option(help="make the bucket this repository's default DVC remote")
    ] = True,
) -> None:
    """Start the services that are not running (nothing when all are) and print the
    environment for this shell as export lines."""
    import shlex
    import sys

    stack = team_stack.up(folder or team_stack.default_folder())
    root = repo_root()
    if dvc_remote and (root / ".dvc").is_dir():
        team_stack.add_dvc_remote(stack, root)
        remote = f"; DVC remote `{team_stack.DVC_REMOTE}` in {root / '.dvc/config.local'}"
    else:
        remote = ""
    print(f"team stack up in {stack.folder}: MLflow {stack.tracking_uri()}, S3 "
          f"{stack.s3_endpoint()}{remote}", file=sys.stderr)  # fmt: skip
    for key, value in stack.environment().items():
        print(f"export {key}={shlex.quote(value)}")


@stack_app.command("status")
@user_errors
def stack_status(folder: Annotated[Path | None, STACK_DIR] = None) -> None:
    """Each service's pid, port and whether it answers; exit 1 unless all are up."""
    stack = team_stack.Stack((folder or team_stack.default_folder()).resolve())
    if not stack.state_file.is_file():
        raise RanError(f"no stack in {stack.folder}: start one with `ran-cli stack up`")
    report = team_stack.status(stack)
    for service, row in report.items():
        state = "up" if row["answers"] else "running, not answering" if row["running"] else "down"
        print(f"{service:<10} {state:<24} pid {row['pid'] or '-':<8} port {row['port']}")
    if not all(row["answers"] for row in report.values()):
        raise SystemExit(1)


@stack_app.command("down")
@user_errors
def stack_down(folder: Annotated[Path | None, STACK_DIR] = None) -> None:
    """Stop exactly the processes `up` started (their data stays for the next `up`)."""
    stack = team_stack.Stack((folder or team_stack.default_folder()).resolve())
    stopped = team_stack.down(stack)
    print(f"stopped: {', '.join(stopped) or 'nothing was running'} ({stack.folder})")


study_app = typer.Typer(
    help="Run a paper study's cells, here through DVC or on a Ray cluster, and see where "
    "each cell stands.",
    no_args_is_help=True,
)
app.add_typer(study_app, name="study")
STUDY_CELLS = typer.Option(
    help="comma-separated cells to run (default: all of the study's)", show_default=False
)
SET_PARAM = typer.Option(
    "-S",
    "--set-param",
    help="params.yaml override as `dvc exp run -S` takes it, e.g. "
    "-S studies.quick.train.iterations=20 (repeatable; written to params.yaml)",
)

STUDY_RUN_HELP = f"""Run a study's cells that are not done: with --cluster on a Ray cluster, else here with `dvc repro --keep-going`.

Studies: {STUDY_NAMES}.

On a cluster every cell is one Ray task (a GPU per paper-profile cell, two CPUs per quick one), running the cell's own DVC stage on a node from this commit's code: it logs to the MLflow server in MLFLOW_TRACKING_URI and pushes its outputs to the DVC remote; its checkpoints live in the remote's storage, so a cell whose node dies is retried on another and resumes. Each finished cell's entry is written into studies/dvc.lock; at the end the outputs are pulled and, once every cell of the study is done, its report stage runs. A cell already done with the same inputs, here or on the cluster, is not run again.

The driver's MLFLOW_TRACKING_* and AWS_* variables and .dvc/config.local (the remote's settings) go to the tasks through Ray's runtime environment.
"""  # noqa: E501 - one line per paragraph: the help formatter wraps them


@study_app.command("run", help=STUDY_RUN_HELP)
@user_errors
def study_run(
    study: Annotated[str, typer.Argument(help=f"the study: {STUDY_NAMES}")],
    cluster: Annotated[
        str | None,
        typer.Option(help="the Ray head's address, HOST:PORT (e.g. 10.0.0.5:6379)"),
    ] = None,
    cells: Annotated[str | None, STUDY_CELLS] = None,
    set_param: Annotated[list[str] | None, SET_PARAM] = None,
    remote: Annotated[
        str | None, typer.Option(help="DVC remote for inputs, outputs and checkpoints")
    ] = None,
    cpus_per_cell: Annotated[
        int | None,
        typer.Option(help="CPUs a cell asks of a node (default: 2 quick, 4 with a GPU)"),
    ] = None,
) -> None:
    import subprocess
    import sys

    chosen = get_study(study)
    names = [name.strip() for name in cells.split(",") if name.strip()] if cells else None
    root = repo_root()
    if cluster is None:
        selected = study_cells.select(chosen, names)
        params = study_cells.overridden_params(root, set_param or [])
        if set_param:
            atomic_write(root / "params.yaml", lambda tmp: tmp.write_text(params))
        targets = (
            [study_cells.target(chosen, cell) for cell in selected]
            if names
            else [f"{study_cells.STUDIES_DVC}:{chosen.name}"]
        )
        args = [sys.executable, "-m", "dvc", "repro", "--keep-going", *targets]
        raise SystemExit(subprocess.run(args, cwd=root).returncode)

    outcome = run_study(root, chosen, cluster, names, set_param, remote=remote, cpus=cpus_per_cell)
    print(f"{study}: {len(outcome['done'])} cells run, {len(outcome['skipped'])} already "
          f"done, {len(outcome['failed'])} failed")  # fmt: skip
    for name, error in outcome["failed"].items():
        print(f"  {name}: {error}")
    if outcome["failed"]:
        raise SystemExit(1)


STUDY_STATUS_HELP = (
    "Each cell of a study: done, running, retried, failed (with its error) or pending, its "
    "attempt and its MLflow run; from DVC's lock files, MLflow's runs, and what `study run "
    "--cluster` recorded of each Ray task (data/cluster/STUDY.json)."
)


@study_app.command("status", help=STUDY_STATUS_HELP)
@user_errors
def study_status(
    study: Annotated[str, typer.Argument(help=f"the study: {STUDY_NAMES}")],
    experiment: Annotated[
        str, typer.Option(help="MLflow experiment of the cells' runs")
    ] = TrackingParams.model_fields["experiment"].default,
) -> None:
    rows = cell_states(repo_root(), get_study(study), experiment)
    for row in rows:
        attempt = f"attempt {row['attempt']}" if row["attempt"] else ""
        print(f"{row['cell']:<28} {row['state']:<8} {attempt:<10} {row['run'] or '-'}")
        if row["error"]:
            print(f"{'':<28} error: {row['error']}")
    counts = {state: sum(r["state"] == state for r in rows) for state in
              ("done", "running", "retried", "failed", "pending")}  # fmt: skip
    print(", ".join(f"{n} {state}" for state, n in counts.items() if n))


if __name__ == "__main__":
    app()
