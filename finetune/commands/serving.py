"""The HTTP side of serve.py: a FastAPI app around a loaded classifier and its batcher.

    POST /predict   images (multipart field ``files``, repeated; or JSON ``{"images": [base64, ...]}``)
                    -> the top classes of each, best first
    GET  /info      classes, preprocessing, model and metrics from the checkpoint
    GET  /health    liveness, and the /predict requests in flight
    GET  /          a page to drop images on (``serve_page.html``, no CDN)
    GET  /docs      the OpenAPI page FastAPI generates (/openapi.json is the document itself)

Every error is a 4xx (or 500) with a one-line JSON body ``{"error": "..."}``. Request bodies are
bounded in size and in the time they take to arrive, images in pixels (checked from the header,
before anything is decoded); uploads are decoded in a few worker threads and classified in
batches by ``finetune.models.batching.Batcher``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import math
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, AsyncIterator, Callable

import anyio
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from finetune.data.decoding import Encoded, decode_crop, stack_channels_last
from finetune.data.images import BadImageError, read_header
from finetune.data.presets import EvalPreset
from finetune.errors import one_line
from finetune.models.batching import Batcher
from finetune.models.inference import LoadedClassifier


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server.

    Attributes:
        max_body_bytes: the largest request body; a larger one gets 413 (from its Content-Length
            header before it is read, or once that many bytes have arrived).
        body_seconds: the longest a request body may take to arrive (a slow or stalled client
            gets 408 and its connection is freed).
        max_images: images in one request.
        max_pixels: pixels of one image (width x height, from its header): decompression bombs
            and huge scans get 413 before they are decoded.
        decode_threads: images decoded at once (each takes an image's pixels in memory).
    """

    max_body_bytes: int = 32 * 2**20
    body_seconds: float = 30.0
    max_images: int = 64
    max_pixels: int = 64_000_000
    decode_threads: int = 2


class ImagePrediction(BaseModel):
    name: str = Field(description="the uploaded file's name, or images[N] for a base64 image")
    classes: list[str] = Field(description="the top classes, best first")
    probabilities: list[float] = Field(description="their softmax probabilities")


class Predictions(BaseModel):
    predictions: list[ImagePrediction]


class Base64Images(BaseModel):
    """The JSON form of a /predict request."""

    images: list[str] = Field(min_length=1, description="images as base64 (a data: URL prefix is allowed)")
    top_k: int | None = Field(None, ge=1, description="classes per image (default: the server's --top-k)")


class ErrorBody(BaseModel):
    error: str = Field(description="what was wrong, on one line")


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": why} for code, why in (
        (400, "an upload that is not an image or cannot be decoded, or more images than the server takes at once"),
        (408, "the request body did not arrive in time"),
        (413, "the body or an image's pixels over the server's limits"),
        (415, "neither multipart/form-data nor application/json"),
        (422, "a malformed JSON body or parameter"))}

# /predict reads its body itself (multipart or JSON), so the OpenAPI document is told both forms.
PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["files"],
        "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"},
                                 "description": "one or more images (repeat the field)"}}}},
    "application/json": {"schema": Base64Images.model_json_schema()},
}}}


def batch_runner(clf: LoadedClassifier) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """The model on a list of uint8 crops: each crop's class probabilities (fp32, on the CPU), in
    the classifier's precision (``LoadedClassifier.logits``)."""
    def run(images: list[torch.Tensor]) -> list[torch.Tensor]:
        probs = clf.logits(stack_channels_last(images)).softmax(dim=1)
        return list(probs.cpu().unbind(0))

    return run


def decode_upload(data: bytes, name: str, preset: EvalPreset, max_pixels: int) -> torch.Tensor:
    """An uploaded file's bytes to the model's uint8 crop, decoded as eval.py decodes a file.

    Raises:
        HTTPException: 400 for a file that is not an image or cannot be decoded, 413 for an
            image of more than ``max_pixels`` pixels (found from its header, nothing decoded).
    """
    if not data:
        raise HTTPException(400, f"{name} is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError:
        raise HTTPException(413, f"{name} has more pixels than Pillow's limit of {Image.MAX_IMAGE_PIXELS}") from None
    except (OSError, ValueError, SyntaxError):
        raise HTTPException(400, f"{name} is not an image (or not in a format Pillow reads)") from None
    if width * height > max_pixels:
        raise HTTPException(413, f"{name} is {width} x {height} pixels, over the limit of {max_pixels}")
    try:
        header = read_header(data, name)
        return decode_crop(Encoded(data, header, preset.plan(header), name))
    except BadImageError as err:
        raise HTTPException(400, one_line(err)) from None


def _base64(text: str, position: int) -> bytes:
    if text.startswith("data:"):  # a data URL, as a browser's FileReader gives it
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise HTTPException(422, f"images[{position}] is not valid base64") from None


@dataclass
class InFlight:
    """The /predict requests that have arrived and not yet been answered."""

    count: int = 0


class RequestGuard:
    """ASGI middleware: bounds each request body in size and in arrival time, and counts the
    /predict requests in flight (for /health, and so that a test can see one has arrived)."""

    def __init__(self, app: ASGIApp, limits: Limits, in_flight: InFlight):
        self.app = app
        self.limits = limits
        self.in_flight = in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_body_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1").strip()
        if declared.isdigit() and int(declared) > limit:
            await _error(413, f"request body of {int(declared)} bytes is over the limit of {limit}")(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_seconds
        received, complete = 0, False

        async def bounded_receive() -> Message:
            nonlocal received, complete
            if complete:  # the body is in: what follows is a disconnect, whenever it comes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"the request body did not arrive within {self.limits.body_seconds:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > limit:
                    raise HTTPException(413, f"request body is over the limit of {limit} bytes")
            return message

        counted = scope["path"] == "/predict"
        self.in_flight.count += counted
        try:
            await self.app(scope, bounded_receive, send)
        finally:
            self.in_flight.count -= counted


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)


def _finite(value: Any) -> Any:
    """JSON-safe metadata: NaN and infinities (a metric never measured) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def describe(clf: LoadedClassifier, precision: str, device: torch.device, batcher: Batcher) -> dict[str, Any]:
    """What /info answers: the checkpoint's classes, preprocessing, model and metrics, and how it is served."""
    meta, pre = clf.meta, clf.preprocessing
    return _finite({
        "checkpoint": clf.path.name,
        "classes": clf.classes,
        "preprocessing": {"image_size": pre.image_size, "resize_size": pre.resize_size, "mean": list(pre.mean),
                          "std": list(pre.std), "interpolation": pre.interpolation},
        "model": {"arch": meta.get("arch"), "weights": meta.get("weights"), "head": meta.get("head"),
                  "trained_precision": meta.get("precision")},
        "metrics": meta.get("metrics", {}),
        "serving": {"device": str(device), "precision": precision, "max_batch": batcher.max_batch,
                    "max_wait_ms": batcher.max_wait * 1000, "batches": batcher.batches, "images": batcher.items,
                    "model_seconds": round(batcher.busy_seconds, 3)},
    })


def create_app(clf: LoadedClassifier, *, top_k: int = 5, max_batch: int = 32,
               max_wait_ms: float = 5.0, limits: Limits = Limits()) -> FastAPI:
    """The app serving ``clf``.

    Args:
        clf: the classifier, on the device it runs on.
        top_k: classes per image when a request does not say.
        max_batch: the most images the model runs at once.
        max_wait_ms: how long a batch waits for more images after its first arrived.
        limits: what one request may ask.
    """
    device = next(clf.model.parameters()).device
    server_k = top_k  # the endpoint's own top_k is the request's
    batcher: Batcher[torch.Tensor, torch.Tensor] = Batcher(batch_runner(clf),
                                                           max_batch=max_batch, max_wait=max_wait_ms / 1000)
    preset = clf.preprocessing.eval_preset()
    decoders = anyio.CapacityLimiter(limits.decode_threads)
    page = resources.files("finetune.commands").joinpath("serve_page.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        try:
            yield
        finally:  # after uvicorn has drained the requests in flight
            await batcher.stop()

    app = FastAPI(title="finetune serve", lifespan=lifespan,
                  description=f"{meta_line(clf)}. Errors are JSON objects with one field, `error`.")
    in_flight = InFlight()
    app.add_middleware(RequestGuard, limits=limits, in_flight=in_flight)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:
        return _error(err.status_code, err.detail)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        return _error(422, _first_problem(err.errors()))

    @app.exception_handler(Exception)
    async def internal_error(_: Request, err: Exception) -> JSONResponse:
        return _error(500, f"internal error: {one_line(err) or type(err).__name__}")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health", summary="Liveness, and the /predict requests in flight")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "in_flight": in_flight.count}

    @app.get("/info", summary="The checkpoint's classes, preprocessing, model and metrics")
    async def info() -> dict[str, Any]:
        return describe(clf, clf.precision, device, batcher)

    @app.post("/predict", response_model=Predictions, responses=ERRORS, openapi_extra=PREDICT_BODY,
              summary="Classify one or more images",
              description="multipart/form-data with the field `files` (repeated for several images), or "
                          "JSON `{\"images\": [base64, ...], \"top_k\": 3}`. Images of one request and of "
                          "requests arriving together run as one batch.")
    async def predict(request: Request, top_k: int | None = Query(None, ge=1, description="classes per image")
                      ) -> Predictions | Response:
        named, asked_k = await _read_images(request, limits)
        k = min(asked_k or top_k or server_k, len(clf.classes))
        crops = await asyncio.gather(*(anyio.to_thread.run_sync(decode_upload, data, name, preset, limits.max_pixels,
                                                                limiter=decoders) for name, data in named))
        if await request.is_disconnected():  # the client has gone: spare the model (499: nginx's name for it)
            return Response(status_code=499)
        probs = await batcher.submit(list(crops))
        results = []
        for (name, _), p in zip(named, probs):
            top_p, top_i = p.topk(k)
            results.append(ImagePrediction(name=name, classes=[clf.classes[i] for i in top_i.tolist()],
                                           probabilities=[round(v, 6) for v in top_p.tolist()]))
        return Predictions(predictions=results)

    return app


def meta_line(clf: LoadedClassifier) -> str:
    """One line naming the model: its architecture, classes and test accuracy where recorded."""
    accuracy = clf.meta.get("metrics", {}).get("test_accuracy")
    acc = f", test accuracy {accuracy:.3f}" if isinstance(accuracy, float) and math.isfinite(accuracy) else ""
    return f"{clf.meta.get('arch')} on {len(clf.classes)} classes{acc}"


async def _read_images(request: Request, limits: Limits) -> tuple[list[tuple[str, bytes]], int | None]:
    """The (name, bytes) of each image in a /predict request, and the JSON body's top_k if it gave one."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        # Starlette stops parsing at the first file over max_files: a 400 "Too many files".
        async with request.form(max_files=limits.max_images, max_fields=limits.max_images + 16) as form:
            parts = form.getlist("files")  # the form's spooled files are closed on leaving
            if any(not isinstance(part, UploadFile) for part in parts):
                raise HTTPException(422, "the field 'files' must hold files, not text")
            named = [(part.filename or f"files[{i}]", await part.read()) for i, part in enumerate(parts)]
        asked = None
    elif kind == "application/json":
        try:
            body = Base64Images.model_validate_json(await request.body())
        except ValidationError as err:
            raise HTTPException(422, _first_problem(err.errors())) from None
        if len(body.images) > limits.max_images:
            raise HTTPException(400, f"{len(body.images)} images in one request, over the limit of {limits.max_images}")
        named = [(f"images[{i}]", _base64(text, i)) for i, text in enumerate(body.images)]
        asked = body.top_k
    else:
        raise HTTPException(415, "send images as multipart/form-data (field 'files') or as JSON "
                                 "{\"images\": [base64, ...]}")
    if not named:
        raise HTTPException(422, "no images: send one or more in the multipart field 'files'")
    return named, asked


def _first_problem(errors: Any) -> str:
    """One line from pydantic's list of validation errors: where, and what, of the first."""
    errors = list(errors)
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query"))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where + ': ' if where else ''}{first.get('msg', 'invalid')}{more}"
