"""``ran-cli serve``: the image model over HTTP, batching concurrent requests (LitServe).

It speaks MLflow's scoring protocol, so a client written for ``mlflow models serve`` works
unchanged: ``POST /invocations`` with ``{"inputs": ["<base64 image>", ...]}`` answers
``{"predictions": [{"labels": [...], "probs": [...]}, ...]}``. Unlike MLflow's scoring
server, which runs one request at a time through the model, LitServe's inference worker
scores the requests that are waiting together, as one batch (up to ``max_batch_size``); it
waits up to ``batch_timeout`` for more only while requests keep arriving, so a lone client is
answered as fast as without batching (:class:`ArrivalBatchLoop`). The model is MLflow's (a
registry URI, a run's model, a model folder) or a ``model.pt``, loaded with pickle refused;
a vitmask network's requests are scored the same way, its predictor computing each image's
ViT prior map in the same batch (:mod:`ran.inference.vitprior`).

A request that is not ``{"inputs": [str, ...]}``, or whose strings are not base64 images,
gets HTTP 400 with ``{"error": "..."}`` naming the problem; the other requests of its batch
are answered as usual.
"""

# No `from __future__ import annotations`: LitServe reads decode_request's annotation (the
# request body model) at run time, and a string there would not resolve.

import base64
import binascii
import os
import signal
import time
from pathlib import Path
from typing import Any

import litserve as ls
from litserve.loops import BatchedLoop
from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError, collate_requests
from litserve.utils import LitAPIStatus, LoopResponseType
from pydantic import BaseModel, ConfigDict

from ran import lifetime
from ran.errors import RanError
from ran.inference.images import read_image


class ScoringRequest(BaseModel):
    """MLflow's ``inputs`` form: base64-encoded images (JPEG, PNG, WebP, …)."""

    model_config = ConfigDict(extra="forbid")
    inputs: list[str]


# A request that waited in the queue less than this was taken as it arrived (the worker was
# idle): no other can be queued behind it, so the worker does not ask the queue (a round trip
# to LitServe's manager process, about what a c=1 client otherwise loses per request).
QUEUED_S = 0.002


class ArrivalBatchLoop(BatchedLoop):
    """LitServe's batched loop (decode, batch, predict, unbatch, encode each), with a batch
    that waits for more requests only while they are arriving.

    LitServe's own collection (``collate_requests``) holds the first request for the whole
    ``batch_timeout`` in case others come: with one client, every request pays the window.
    Here a batch after a batch of one (the server was idle, or served one client) takes the
    next request and whatever is already queued behind it, and runs at once; after a batch of
    several, requests are arriving, and the next batch is collected by ``collate_requests``,
    waiting up to ``batch_timeout`` for more, as LitServe batches. The loop runs in the
    inference worker; ``arriving`` is that worker's state."""

    def __init__(self) -> None:
        super().__init__()
        self.arriving = False  # the last batch held several requests

    def get_batch_requests(self, lit_api: ls.LitAPI, request_queue: Any, transport: Any) -> Any:
        if self.arriving:
            payloads, timed_out = collate_requests(self, lit_api, request_queue, transport)
        else:
            payloads, timed_out = [], []
            item = self.get_request(request_queue, timeout=1.0)  # idle: block, do not poll
            while item is not None:
                waited = self._admit(item, lit_api, transport, payloads, timed_out)
                if len(payloads) + len(timed_out) >= lit_api.max_batch_size:
                    break
                if len(payloads) + len(timed_out) == 1 and waited < QUEUED_S:
                    break  # taken as it arrived: nothing can be queued behind it
                item = self.get_request(request_queue, block=False)  # only what is queued
        self.arriving = len(payloads) + len(timed_out) > 1
        return payloads, timed_out

    def _admit(
        self, item: Any, lit_api: ls.LitAPI, transport: Any, payloads: list, timed_out: list
    ) -> float:
        """One request off the queue, taken as ``collate_requests`` takes it; returns how long
        it waited in the queue (seconds)."""
        if item == _SENTINEL_VALUE:
            raise _StopLoopError()
        response_queue_id, uid, timestamp, x_enc = item
        self.put_response(
            transport, response_queue_id, uid, (), LitAPIStatus.START, LoopResponseType.REGULAR
        )
        waited = time.monotonic() - timestamp  # the API server's clock: one per machine
        expired = lit_api.request_timeout not in (-1, False, None) and (
            waited > lit_api.request_timeout
        )
        if expired:
            timed_out.append((response_queue_id, uid))
        else:
            payloads.append((response_queue_id, uid, x_enc))
        return waited


class ImageAPI(ls.LitAPI):
    """Decode and cut each request's images, score a batch of requests, answer each."""

    def __init__(
        self,
        model: str,
        max_batch_size: int,
        batch_timeout: float,
        vit_weights: Path | None = None,
    ):
        super().__init__(
            max_batch_size=max_batch_size,
            batch_timeout=batch_timeout,
            api_path="/invocations",
            loop=ArrivalBatchLoop() if max_batch_size > 1 else "auto",  # 1: LitServe's single
        )
        self.model_source, self.vit_weights = model, vit_weights

    def setup(self, device: str) -> None:
        lifetime.die_with_parent()  # a spawned worker: the fork hook of install() never ran
        from ran.inference.predictor import load_predictor

        self.predictor = load_predictor(self.model_source, device, vit_weights=self.vit_weights)

    def decode_request(self, request: ScoringRequest) -> Any:
        """The request's uint8 input batch, or the reason (str) it is refused."""
        if not request.inputs:
            return "inputs is empty: send at least one base64-encoded image"
        images = []
        for n, text in enumerate(request.inputs):
            try:  # line breaks allowed: MLflow's serving example has them (base64.encodebytes)
                blob = base64.b64decode("".join(text.split()), validate=True)
            except binascii.Error as exc:
                return f"inputs[{n}] is not base64 ({exc}); base64-encode the image file"
            try:
                images.append(read_image(blob, f"inputs[{n}]"))
            except RanError as exc:
                return str(exc)
        return self.predictor.inputs(images)

    def batch(self, inputs: list[Any]) -> list[Any]:
        return inputs  # requests carry several images each: scored together in predict

    def predict(self, x: Any) -> Any:
        import torch

        requests = x if self.max_batch_size > 1 else [x]
        batches = [r for r in requests if isinstance(r, torch.Tensor)]
        probs = self.predictor.probabilities(torch.cat(batches)) if batches else None
        answers, start = [], 0
        for request in requests:
            if isinstance(request, str):
                answers.append(request)
                continue
            answers.append(self.predictor.top(probs[start : start + len(request)]))
            start += len(request)
        return answers if self.max_batch_size > 1 else answers[0]

    def unbatch(self, output: list[Any]) -> list[Any]:
        return output

    def encode_response(self, output: Any) -> Any:
        from fastapi.responses import JSONResponse

        if isinstance(output, str):
            return JSONResponse({"error": output}, status_code=400)
        return {"predictions": output}


async def _bad_body(request: Any, exc: Any) -> Any:
    """A body that is not ``{"inputs": [str, ...]}``: 400 (FastAPI would answer 422)."""
    from fastapi.responses import JSONResponse

    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    message = f'the body must be JSON {{"inputs": ["<base64 image>", ...]}} ({problems})'
    return JSONResponse({"error": message}, status_code=400)


def local_model(model: str, folder: Path, vit_weights: Path | None = None) -> str:
    """``model`` where the server's workers can load it: an MLflow URI is downloaded into
    ``folder`` once (not by every worker), and loaded here first, so a wrong name or
    version (or a vitmask ``model.pt``'s missing ViT weights) stops ``ran-cli serve`` with
    one line before a server starts."""
    from ran.inference.predictor import is_mlflow_uri, load_predictor, mlflow_errors

    if is_mlflow_uri(model):
        import mlflow

        with mlflow_errors("fetch", model):
            model = mlflow.artifacts.download_artifacts(artifact_uri=model, dst_path=str(folder))
    load_predictor(model, vit_weights=vit_weights)
    return model


def _stop_on_sigterm() -> None:
    """SIGTERM (``kill PID``, ``docker stop``) as Ctrl-C: LitServe then stops its API-server
    and inference processes and waits for them; Python's default would exit at once and
    leave them running, holding the port. A forked worker that inherits the handler keeps
    the default (uvicorn re-raises the signal once it has shut down)."""
    server = os.getpid()

    def stop(signum: int, frame: Any) -> None:
        if os.getpid() == server:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    signal.signal(signal.SIGTERM, stop)


def serve(
    model: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    device: str = "auto",
    max_batch_size: int = 64,
    batch_timeout: float = 0.005,
    vit_weights: Path | None = None,
) -> None:
    """Serve ``model`` until interrupted (``model`` and ``vit_weights``: as
    :func:`load_predictor` takes them; ``device``: auto | cpu | cuda, LitServe's
    accelerator)."""
    import tempfile

    from fastapi.exceptions import RequestValidationError

    accelerator = "cuda" if device.startswith("cuda") else device
    _stop_on_sigterm()
    lifetime.install()  # LitServe's forked API server and queue manager die with this process
    with tempfile.TemporaryDirectory(prefix="ran-serve-") as folder:
        source = local_model(model, Path(folder), vit_weights)
        api = ImageAPI(source, max_batch_size, batch_timeout, vit_weights)
        server = ls.LitServer(api, accelerator=accelerator, timeout=60, fast_queue=True)
        server.app.add_exception_handler(RequestValidationError, _bad_body)
        server.run(host=host, port=port, generate_client_file=False, num_api_servers=1)
