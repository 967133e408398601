"""The Ray Serve edge: the "Ingress" FastAPI deployment and the batching "Model" deployment.

Ingress does everything that needs no model (auth, body limits, multipart, decoding and
checking images) so bad input is refused before it reaches the accelerator, and it turns every
refusal, overload (Serve's BackPressureError) or Model failure into a JSON error body. Model
holds a fedray.serving.predictor.Predictor; `@serve.batch` gathers concurrent requests into
one forward pass, and `reconfigure(user_config)` swaps packages in place.

A failed swap is logged and reported (GET /v1/model, `last_reload`) but not raised: Serve
stops a replica whose in-place reconfigure raises, which would take the working model down
with the bad one. Only a replica still starting raises, so it never serves a package other
than the one its config names.
"""

import asyncio
import base64
import hmac
import io
import logging
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    RayServeException,
    ReplicaUnavailableError,
)
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from fedray import __version__
from fedray.serving import ServeArgs, parse_args
from fedray.serving.images import ACCEPTED_TYPES, Limits, RequestError, decode_upload
from fedray.serving.schemas import ErrorBody, Explanation, Health, ModelInfo, Prediction, Ready
from fedray.serving.uploads import batch_uploads, single_upload

logger = logging.getLogger("ray.serve")

EXPLAIN_METHODS: tuple[str, ...] = ("saliency", "gradcam")
DISPLAY_MAX = 512  # longest side of an explanation overlay
READY_TIMEOUT_S = 10.0


# --------------------------------------------------------------------------- Model


class ModelUserConfig(BaseModel):
    """What `user_config` may change on running Model replicas, without restarting them."""

    model_config = ConfigDict(extra="forbid")

    package: str | None = Field(None, description="serve this package (default: args.package)")
    max_batch_size: int | None = Field(None, ge=1, le=1024)
    batch_wait_timeout_s: float | None = Field(None, ge=0, le=1)


@serve.deployment(name="Model")
class Model:
    def __init__(self, args: dict) -> None:
        from fedray.serving.predictor import Predictor

        self._args = parse_args(args)
        self._predictor = Predictor(self._args.package, runtime=self._args.runtime,
                                    device=self._args.device)
        # One thread runs every forward/backward pass: batches never overlap on the model,
        # and captum's Grad-CAM hooks never see another request's forward pass.
        self._compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedray-model")
        self._starting = True
        self._set_batching(self._args.max_batch_size, self._args.batch_wait_timeout_s)

    def _set_batching(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.predict.set_max_batch_size(max_batch_size)
        self.predict.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def _run(self, fn, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._compute, fn, *args)

    def _refuse(self, package: str, message: str) -> None:
        """A user_config that cannot be applied: fatal while starting, else logged and kept."""
        self._predictor.last_reload = {"package": package, "ok": False, "error": message,
                                       "at": time.time()}
        if self._starting:
            raise ValueError(message)
        logger.error("model swap refused, still serving %s: %s", self._predictor.served.uri,
                     message)

    async def reconfigure(self, user_config: dict) -> None:
        try:
            config = ModelUserConfig.model_validate(user_config or {})
        except ValidationError as err:
            package = str((user_config or {}).get("package", self._predictor.served.uri))
            return self._refuse(package, f"invalid user_config for Model: {err}")
        args = self._args
        self._set_batching(
            args.max_batch_size if config.max_batch_size is None else config.max_batch_size,
            args.batch_wait_timeout_s if config.batch_wait_timeout_s is None
            else config.batch_wait_timeout_s)
        package = config.package or self._args.package
        if package == self._predictor.served.uri:
            return None
        try:
            # Loads (and test-runs) the new package beside the serving one, then swaps.
            await asyncio.to_thread(self._predictor.reload, package)
        except Exception as exc:  # noqa: BLE001 - any failure keeps the old model serving
            return self._refuse(package, f"cannot load {package}: {exc}")
        return None

    def check_health(self) -> None:
        # Serve calls this once after __init__ and the first reconfigure: from here on the
        # replica serves traffic, and a bad user_config must not take it down.
        self._starting = False

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def predict(self, images: list[np.ndarray]) -> list[dict]:
        return await self._run(self._predictor.predict, images)

    async def explain(self, image: np.ndarray, method: str) -> dict:
        return await self._run(self._predictor.explain, image, method)

    async def ready(self) -> dict:
        return await self._run(self._predictor.ready)

    async def info(self) -> dict:
        replica = serve.get_replica_context().replica_id.unique_id
        return {**self._predictor.info(), "replica": replica}


# --------------------------------------------------------------------------- HTTP API

api = FastAPI(
    title="fedray",
    version=__version__,
    description="Blood-smear classification (ALL subtypes) from a fedray model package. "
                "Every error is JSON: {\"error\": code, \"detail\": message}.",
)

_ERRORS = {status: {"model": ErrorBody, "description": text} for status, text in {
    400: "unreadable, empty or truncated image; malformed multipart; missing file",
    401: "missing or wrong bearer token (when the service requires one)",
    413: "image, pixel count or batch over the limit; decompression bomb",
    415: "Content-Type that is not an accepted image type or multipart",
    503: "overloaded (retry later) or model unavailable",
}.items()}

_BINARY = {"type": "string", "format": "binary"}


def _body(multipart: dict, raw: bool) -> dict:
    content = {"multipart/form-data": {"schema": {"type": "object", **multipart}}}
    if raw:
        content.update({t: {"schema": _BINARY} for t in ACCEPTED_TYPES})
    return {"requestBody": {"required": True, "content": content}}


_ONE_IMAGE = _body({"required": ["file"], "properties": {"file": _BINARY}}, raw=True)
_IMAGES = _body({"required": ["files"],
                 "properties": {"files": {"type": "array", "items": _BINARY}}}, raw=False)


def _error(status: int, code: str, detail: str) -> JSONResponse:
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status == 503:
        headers["Retry-After"] = "1"
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


@api.exception_handler(RequestError)
async def _refused(request: Request, exc: RequestError) -> JSONResponse:
    return _error(exc.status, exc.code, exc.detail)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
    return _error(422, "invalid_request", problems)


@api.exception_handler(StarletteHTTPException)
async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {404: "not_found", 405: "method_not_allowed"}
    return _error(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))


@api.exception_handler(Exception)
async def _internal(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s", request.url.path)
    return _error(500, "internal_error", f"{type(exc).__name__}: {exc}"[:500])


def _overlay_png(display: np.ndarray, heat: np.ndarray) -> tuple[str, tuple[int, int]]:
    """The heatmap over the (display-size) image as base64 PNG, and its (width, height)."""
    from fedray.explain import overlay

    tile = overlay(display, heat)
    buffer = io.BytesIO()
    Image.fromarray(tile).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii"), (tile.shape[1], tile.shape[0])


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, model: DeploymentHandle, args: dict) -> None:
        self._args = parse_args(args)
        self._limits = Limits(self._args.max_image_bytes, self._args.max_pixels,
                              self._args.max_batch_images)
        # PIL's own bomb guard at our limit: it raises past twice the limit at Image.open; up
        # to that, decode_upload's header check refuses first, so its warning is noise here.
        Image.MAX_IMAGE_PIXELS = self._args.max_pixels
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        variable = self._args.auth_token_env
        self._token = os.environ.get(variable, "").strip() if variable else ""
        if variable and not self._token:
            logger.warning("%s is not set or empty: /v1 endpoints are open (no bearer token)",
                           variable)
        self._model = model
        self._image_size: int | None = None

    # ---- helpers

    def _authorize(self, request: Request) -> None:
        if not self._token:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self._token.encode()):
            raise RequestError("unauthorized", "missing or wrong bearer token; send "
                               "'Authorization: Bearer <token>'", 401)

    async def _ask(self, response) -> Any:
        """A Model call's result; overload and unavailability become 503 RequestErrors."""
        try:
            return await response
        except BackPressureError as exc:
            raise RequestError("overloaded", f"the model's queue is full ({exc}); retry shortly",
                               503) from None
        except (DeploymentUnavailableError, ReplicaUnavailableError, RayServeException) as exc:
            raise RequestError("model_unavailable", f"no model replica can answer ({exc})",
                               503) from None

    async def _size(self) -> int:
        if self._image_size is None:
            self._image_size = int((await self._ask(self._model.info.remote()))["image_size"])
        return self._image_size

    def _prediction(self, result: dict, start: float) -> dict:
        # Model answers with the size it was built for; after a swap to another input size
        # the next decode follows it (the package's preprocess resizes this one).
        self._image_size = int(result.pop("image_size"))
        return {**result, "latency_ms": _ms(start)}

    # ---- routes

    @api.post("/v1/predict", response_model=Prediction, responses=_ERRORS,
              openapi_extra=_ONE_IMAGE, summary="classify one image")
    async def predict(self, request: Request) -> dict:
        start = time.perf_counter()
        self._authorize(request)
        upload = await single_upload(request, self._limits)
        image = await asyncio.to_thread(decode_upload, upload, self._limits, await self._size())
        result = await self._ask(self._model.predict.remote(image.model_input))
        return self._prediction(result, start)

    @api.post("/v1/predict/batch", response_model=list[Prediction], responses=_ERRORS,
              openapi_extra=_IMAGES, summary="classify several images (multipart 'files')")
    async def predict_batch(self, request: Request) -> list[dict]:
        start = time.perf_counter()
        self._authorize(request)
        uploads = await batch_uploads(request, self._limits)
        size = await self._size()
        images = await asyncio.to_thread(
            lambda: [decode_upload(u, self._limits, size) for u in uploads])
        results = await asyncio.gather(
            *(self._ask(self._model.predict.remote(im.model_input)) for im in images))
        return [self._prediction(r, start) for r in results]

    @api.post("/v1/explain", response_model=Explanation, responses=_ERRORS,
              openapi_extra=_ONE_IMAGE, summary="classify one image and show why (heatmap)")
    async def explain(self, request: Request,
                      method: str | None = Query(None, description="saliency or gradcam "
                                                 "(default: the service's explain_method)")
                      ) -> dict:
        start = time.perf_counter()
        self._authorize(request)
        method = method or self._args.explain_method
        if method not in EXPLAIN_METHODS:
            raise RequestError("unknown_method", f"method {method!r}: choose one of "
                               f"{', '.join(EXPLAIN_METHODS)}")
        upload = await single_upload(request, self._limits)
        image = await asyncio.to_thread(decode_upload, upload, self._limits, await self._size(),
                                        DISPLAY_MAX)
        result = await self._ask(self._model.explain.remote(image.model_input, method))
        png, size = await asyncio.to_thread(_overlay_png, image.display, result.pop("heatmap"))
        return {**self._prediction(result, start), "method": method, "heatmap_png": png,
                "heatmap_size": size}

    @api.get("/v1/model", response_model=ModelInfo, responses=_ERRORS,
             summary="the served model's card and where it came from")
    async def model(self, request: Request) -> dict:
        self._authorize(request)
        return await self._ask(self._model.info.remote())

    @api.get("/healthz", response_model=Health, summary="liveness: the HTTP process is up")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz", response_model=Ready, responses={503: _ERRORS[503]},
             summary="readiness: a model is loaded and a one-image forward pass works")
    async def readyz(self):
        try:
            ref = await asyncio.wait_for(self._ask(self._model.ready.remote()), READY_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            return _error(503, "not_ready", f"{type(exc).__name__}: {exc}"[:500])
        return {"status": "ready", "model": ref}


# --------------------------------------------------------------------------- application


def application(args: ServeArgs, *, model_options: dict | None = None,
                ingress_options: dict | None = None):
    """Ingress bound to Model for `args`; options override the deployments' defaults (a serve
    config file's `deployments:` entries override both)."""
    model_defaults = {
        "max_ongoing_requests": max(32, 2 * args.max_batch_size),  # room to fill a batch
        "max_queued_requests": 256,  # beyond this, callers get 503 at once instead of waiting
        "ray_actor_options": {"num_cpus": 1, "num_gpus": 1 if args.device == "cuda" else 0},
    }
    ingress_defaults = {"max_ongoing_requests": 64, "max_queued_requests": 512,
                        "ray_actor_options": {"num_cpus": 0.5}}
    plain = args.model_dump()
    model = Model.options(**{**model_defaults, **(model_options or {})}).bind(plain)
    return Ingress.options(**{**ingress_defaults, **(ingress_options or {})}).bind(model, plain)
