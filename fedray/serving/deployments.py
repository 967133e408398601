"""The Ray Serve edge: the "Ingress" FastAPI deployment and the batching "Model" deployment.

Ingress does everything that needs no model (auth, body limits, multipart, decoding and
checking images) so bad input is refused before it reaches the accelerator, and it turns every
refusal, overload (Serve's BackPressureError) or Model failure into a JSON error body. Each /v1
request has a deadline (args.request_timeout_s): past it the Ingress answers 504
request_timeout and cancels the Model call; Serve's proxy timeout (http_options
request_timeout_s, which a client's header can change) is only the backstop. Model
holds a fedray.serving.predictor.Predictor; a fedray.serving.batching.Batcher gathers
concurrent requests into one forward pass, each batch formed when the model is free (Serve's
`@serve.batch` forms them ahead and ran mostly one-image passes on a busy CPU), and
`reconfigure(user_config)` swaps packages in place.

On CPU the two can be one deployment, "Service" (args.topology: combined): the Ingress holds a
Model object in its own replica and calls it in-process, with the same batching, checks and
hot swap, but no handle hop between replicas (a serialised call per request, which on a small
CPU machine costs more than the model). Overload is then Serve's own 503 for the Service's
queue (max_queued_requests), in plain text.

POST /v1/predict with a raw image body, the route of one-image clients, is answered by
OneImageFastPath, a middleware in front of FastAPI's router that calls the same
Ingress.predict: the same checks, errors and deadline, without routing, dependency solving
and response validation per request.

A Model loads no package in __init__: the application always gives it a user_config (`{}` at
least), so Serve calls reconfigure before the replica takes traffic, and that first call loads
the package the config names (user_config.package, else args.package), or raises. A new
replica thus never serves a package other than its config's, and args.package need not exist
once user_config names another.

A failed swap on a running replica is logged and reported but not raised: Serve stops a replica
whose in-place reconfigure raises, which would take the working model down with the bad one.
The replica keeps answering with its old model, and GET /readyz answers 503 `swap_refused`
(GET /v1/model: `last_reload`) until a config naming a loadable package, or the served one,
arrives.
"""

import asyncio
import base64
import hmac
import inspect
import io
import logging
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
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
from fedray.config import format_validation_error
from fedray.serving.args import EXPLAIN_METHODS, ServeArgs, auth_token, parse_args
from fedray.serving.batching import Batcher
from fedray.serving.images import (
    ACCEPTED_TYPES,
    Limits,
    RequestError,
    Upload,
    decode_small,
    decode_upload,
    media_type,
)
from fedray.serving.schemas import ErrorBody, Explanation, Health, ModelInfo, Prediction, Ready
from fedray.serving.uploads import batch_parts, single_upload

if TYPE_CHECKING:  # torch stays out of the Ingress replicas
    from fedray.serving.predictor import Predictor

logger = logging.getLogger("ray.serve")

DISPLAY_MAX = 512  # longest side of an explanation overlay
READY_TIMEOUT_S = 10.0


# --------------------------------------------------------------------------- Model


def _in_replica() -> bool:
    """Whether this code runs in a Serve replica (not a script or a test using the class)."""
    try:
        serve.get_replica_context()
    except RayServeException:
        return False
    return True


class ModelUserConfig(BaseModel):
    """What `user_config` may change on running Model replicas, without restarting them."""

    model_config = ConfigDict(extra="forbid")

    package: str | None = Field(None, description="serve this package (default: args.package)")
    max_batch_size: int | None = Field(None, ge=1, le=1024)
    batch_wait_timeout_s: float | None = Field(None, ge=0, le=1)
    batch_quiet_s: float | None = Field(None, ge=0, le=1)


@serve.deployment(name="Model")
class Model:
    def __init__(self, args: dict) -> None:
        from fedray.serving.predictor import compute_streams

        self._args = parse_args(args)
        self._predictor: Predictor | None = None  # the first reconfigure loads it
        self.streams = compute_streams(self._args.streams, self._args.device)
        # One thread per stream runs forward passes: up to `streams` batches at once. In a
        # replica (whose process and threads are its own), each pass gets an equal share of
        # the replica's threads among the passes running when it starts: a batch alone uses
        # them all. Explanations have a thread (and, in the Predictor, a module) of their
        # own: attribution hooks never see a prediction's forward pass.
        self._threads: int | None = None
        if _in_replica():
            import torch

            self._threads = torch.get_num_threads()  # Ray's, from the replica's num_cpus
        self._computing = 0  # passes running now, counted in their threads
        self._count_lock = threading.Lock()
        self._compute = ThreadPoolExecutor(max_workers=self.streams,
                                           thread_name_prefix="fedray-model")
        self._explaining = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedray-explain")
        self._batcher = Batcher(self.predict_many, self._args.max_batch_size,
                                self._args.batch_wait_timeout_s, streams=self.streams,
                                quiet_s=self._args.batch_quiet_s)

    async def _run(self, fn, *args: Any, pool: ThreadPoolExecutor | None = None) -> Any:
        loop = asyncio.get_running_loop()
        pool = pool or self._compute
        if self._threads is None:
            return await loop.run_in_executor(pool, fn, *args)
        return await loop.run_in_executor(pool, self._pass, fn, *args)

    def _pass(self, fn, *args: Any) -> Any:
        """`fn(*args)` on this pass's share of the threads, counted while it runs (in the
        worker thread: a pass still queued, or one whose caller gave up, counts as it runs)."""
        import torch

        with self._count_lock:
            self._computing += 1
            share = max(1, self._threads // self._computing)
        try:
            torch.set_num_threads(share)  # from this thread: its own passes take it up
            return fn(*args)
        finally:
            with self._count_lock:
                self._computing -= 1

    @property
    def predictor(self) -> "Predictor":
        if self._predictor is None:
            raise RuntimeError("no package loaded yet (the replica is still starting)")
        return self._predictor

    def _refuse(self, package: str, message: str) -> None:
        """A user_config that cannot be applied: fatal while starting, else logged and kept."""
        if self._predictor is None:
            raise ValueError(message)
        self._predictor.last_reload = {"package": package, "ok": False, "error": message,
                                       "at": time.time()}
        logger.error("model swap refused, still serving %s: %s", self._predictor.served.uri,
                     message)

    async def _load(self, package: str) -> None:
        """Serve `package`: the replica's first one, or a swap; a failure goes to _refuse."""
        from fedray.serving.predictor import Predictor

        predictor = self._predictor
        try:
            if predictor is None:
                self._predictor = await asyncio.to_thread(
                    Predictor, package, runtime=self._args.runtime, device=self._args.device)
            elif package == predictor.served.uri:
                predictor.keep()  # e.g. a config put back after a refused swap: not degraded
            else:
                # Loads (and test-runs) the new package beside the serving one, then swaps.
                await asyncio.to_thread(predictor.reload, package)
        except Exception as exc:  # noqa: BLE001 - any failure keeps the old model serving
            self._refuse(package, f"cannot load {package}: {exc}")

    async def reconfigure(self, user_config: dict | None) -> None:
        try:
            config = ModelUserConfig.model_validate(user_config or {})
        except ValidationError as err:
            asked = user_config.get("package") if isinstance(user_config, dict) else None
            package = str(asked or self._args.package)
            known = f"known: {', '.join(ModelUserConfig.model_fields)}"
            return self._refuse(package, format_validation_error(
                err, "invalid user_config for Model", known))
        args = self._args
        self._batcher.configure(
            args.max_batch_size if config.max_batch_size is None else config.max_batch_size,
            args.batch_wait_timeout_s if config.batch_wait_timeout_s is None
            else config.batch_wait_timeout_s,
            args.batch_quiet_s if "batch_quiet_s" not in config.model_fields_set
            else config.batch_quiet_s)
        await self._load(config.package or args.package)
        return None

    async def check_health(self) -> None:
        # Serve calls this once after __init__ and the first reconfigure. A config that set
        # user_config: null skips reconfigure; then args.package is the config's package.
        if self._predictor is None:
            await self._load(self._args.package)

    async def predict(self, image: np.ndarray) -> dict:
        """One image's prediction, computed in a batch with concurrent requests' images."""
        return await self._batcher(image)

    async def predict_many(self, images: list[np.ndarray]) -> list[dict]:
        """A request's own batch (/v1/predict/batch): one call and one forward pass, not one
        call per image; per-call overhead, not the model, bounds throughput on small CPUs."""
        return await self._run(self.predictor.predict, images)

    async def explain(self, image: np.ndarray, method: str) -> dict:
        return await self._run(self.predictor.explain, image, method, pool=self._explaining)

    async def ready(self) -> dict:
        """The served model (test-run when loaded) and the refused swap if the last was; from
        state, so a probe never waits behind the batches on the model thread."""
        return {"model": self.predictor.ready(), "package": self.predictor.served.uri,
                "refused": self.predictor.refused}

    async def info(self) -> dict:
        try:
            replica = serve.get_replica_context().replica_id.unique_id
        except RayServeException:  # the class used outside Serve (tests, a script)
            replica = "outside Serve"
        return {**self.predictor.info(), "replica": replica, "streams": self.streams}


# --------------------------------------------------------------------------- HTTP API


class OneImageFastPath:
    """POST /v1/predict with a raw image body, answered without FastAPI's router.

    The route's own checks, decode, model call and error bodies run as they do through
    FastAPI (Ingress.predict); only routing, dependency solving and response validation are
    left out, which on a small CPU cost about as much per request as the rest of the replica's
    HTTP work. Anything else, multipart uploads to /v1/predict included, goes to the app.
    """

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or \
                _route_path(scope) != "/v1/predict" or not _raw_image(scope):
            return await self.app(scope, receive, send)
        try:
            ingress = serve.get_replica_context().servable_object
        except RayServeException:  # the app outside Serve: FastAPI's route answers
            return await self.app(scope, receive, send)
        try:
            result = await ingress.predict(Request(scope, receive))
            response = Response(Prediction.model_validate(result).model_dump_json(),
                                media_type="application/json")
        except RequestError as exc:
            response = _error(exc.status, exc.code, exc.detail)
        except Exception as exc:  # noqa: BLE001 - answered as the FastAPI routes answer it
            response = _internal_error(_route_path(scope), exc)
        await response(scope, receive, send)


def _route_path(scope) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _raw_image(scope) -> bool:
    for key, value in scope["headers"]:
        if key == b"content-type":
            return media_type(value.decode("latin-1")) in ACCEPTED_TYPES
    return False


class _Api(FastAPI):
    """fedray's FastAPI app, with OneImageFastPath in front of FastAPI's own middleware
    (server errors, telemetry, body limit: 14% of a replica's Python time per one-image
    request behind them, profiled at 16 clients)."""

    def build_middleware_stack(self):
        return OneImageFastPath(super().build_middleware_stack())


api = _Api(
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
    422: "an image it cannot judge: image_too_small, multi_frame, unsupported_pixel_format",
    503: "overloaded (retry later) or model unavailable",
    504: "request_timeout: not answered within the service's request_timeout_s",
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


def _internal_error(path: str, exc: Exception) -> JSONResponse:
    logger.error("unhandled error on %s", path, exc_info=exc)
    return _error(500, "internal_error", f"{type(exc).__name__}: {exc}"[:500])


@api.exception_handler(Exception)
async def _internal(request: Request, exc: Exception) -> JSONResponse:
    return _internal_error(request.url.path, exc)


def _overlay_png(display: np.ndarray, heat: np.ndarray) -> tuple[str, tuple[int, int]]:
    """The heatmap over the (display-size) image as base64 PNG, and its (width, height)."""
    from fedray.explain import overlay

    tile = overlay(display, heat)
    buffer = io.BytesIO()
    Image.fromarray(tile).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii"), (tile.shape[1], tile.shape[0])


def _decode_taking(box: list[Upload], limits: Limits, size: int) -> np.ndarray:
    """The model input of the upload in `box`, which it empties: the bytes are freed when the
    decode returns, not whenever the worker thread lets go of its arguments."""
    return decode_upload(box.pop(), limits, size).model_input


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 3)


class _LocalResponse:
    """A call on the Model object in this replica, awaited and cancelled as a handle's is.

    The call runs in the awaiting task (no task of its own per request), so a caller that
    stops waiting cancels it; cancel() drops a call not yet awaited.
    """

    def __init__(self, work) -> None:
        self._work = work

    def __await__(self):
        return self._work.__await__()

    def cancel(self) -> None:
        if inspect.getcoroutinestate(self._work) == inspect.CORO_CREATED:
            self._work.close()


class _LocalMethod:
    def __init__(self, method) -> None:
        self._method = method

    def remote(self, *args: Any) -> _LocalResponse:
        return _LocalResponse(self._method(*args))


class _LocalModel:
    """A Model object shaped as its DeploymentHandle (`handle.predict.remote(x)`)."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self.model, name))


@serve.deployment(name="Ingress")
@serve.ingress(api)
class Ingress:
    def __init__(self, model: DeploymentHandle | None, args: dict) -> None:
        """`model`: the Model deployment's handle, or None for a combined Service that holds
        the model itself."""
        self._args = parse_args(args)
        self._limits = Limits(self._args.max_image_bytes, self._args.max_pixels,
                              self._args.max_batch_images, self._args.min_image_side)
        # PIL's own bomb guard at our limit: it raises past twice the limit at Image.open; up
        # to that, decode_upload's header check refuses first, so its warning is noise here.
        Image.MAX_IMAGE_PIXELS = self._args.max_pixels
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        self._token = auth_token(self._args)  # fails closed: see fedray.serving.auth_token
        if self._args.auth_token_env and self._token is None:
            logger.warning("%s is not set or empty and allow_unauthenticated is true: /v1 "
                           "endpoints are open (no bearer token)", self._args.auth_token_env)
        self._local = None if model is not None else Model.func_or_class(args)
        self._model = model if model is not None else _LocalModel(self._local)
        self._image_size: int | None = None

    async def reconfigure(self, user_config: dict | None) -> None:
        """A combined Service's model config (Serve calls this only where user_config is set)."""
        if self._local is not None:
            await self._local.reconfigure(user_config)

    async def check_health(self) -> None:
        if self._local is not None:
            await self._local.check_health()

    # ---- helpers

    def _authorized(self, request: Request) -> bool:
        if self._token is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                                  self._token.encode())

    def _authorize(self, request: Request) -> None:
        if not self._authorized(request):
            raise RequestError("unauthorized", "missing or wrong bearer token; send "
                               "'Authorization: Bearer <token>'", 401)

    async def _within_deadline(self, work, route: str) -> Any:
        """`work`'s result, or 504 request_timeout once args.request_timeout_s has passed
        (the body still arriving, decoding or the model: the whole request counts)."""
        limit = self._args.request_timeout_s
        deadline = asyncio.timeout(limit)  # in this task: no task of its own per request
        try:
            async with deadline:
                return await work
        except TimeoutError:
            if not deadline.expired():
                raise
            raise RequestError("request_timeout", f"{route}: not answered within "
                               f"request_timeout_s = {limit:g} s (a slow upload counts too)",
                               504) from None

    async def _ask(self, response) -> Any:
        """A Model call's result; overload and unavailability become 503 RequestErrors, and a
        caller that stops waiting (deadline, disconnect) cancels the call."""
        try:
            return await response
        except asyncio.CancelledError:
            response.cancel()
            raise
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
        return await self._within_deadline(self._predict(request, start), "/v1/predict")

    async def _predict(self, request: Request, start: float) -> dict:
        upload = await single_upload(request, self._limits)
        size = await self._size()
        # A small image costs less to decode here than the hop to a thread and back: on a
        # busy CPU the thread waits for the event loop's GIL, about 4 ms per request measured
        # at 16 clients (64 px PNGs, 2 cores).
        image = decode_small(upload, self._limits, size)
        if image is None:
            image = await asyncio.to_thread(decode_upload, upload, self._limits, size)
        del upload  # its bytes are not needed past the decode
        result = await self._ask(self._model.predict.remote(image.model_input))
        return self._prediction(result, start)

    @api.post("/v1/predict/batch", response_model=list[Prediction], responses=_ERRORS,
              openapi_extra=_IMAGES, summary="classify several images (multipart 'files')")
    async def predict_batch(self, request: Request) -> list[dict]:
        start = time.perf_counter()
        self._authorize(request)
        return await self._within_deadline(self._predict_batch(request, start),
                                           "/v1/predict/batch")

    async def _predict_batch(self, request: Request, start: float) -> list[dict]:
        # Each part is decoded as soon as it has arrived and its bytes dropped: a request holds
        # one part's bytes (<= max_image_bytes) and the model-size arrays, never the body.
        size = await self._size()
        inputs = []
        async for upload in batch_parts(request, self._limits):
            box = [upload]
            del upload
            inputs.append(await asyncio.to_thread(_decode_taking, box, self._limits, size))
        results = await self._ask(self._model.predict_many.remote(inputs))
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
        return await self._within_deadline(self._explain(request, method, start), "/v1/explain")

    async def _explain(self, request: Request, method: str, start: float) -> dict:
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
             summary="readiness: a Model replica answers with a loaded, test-run package")
    async def readyz(self, request: Request):
        # Open to probes, and cheap: the Model answers from state (its package was test-run
        # when loaded), no forward pass. Which package, and why a swap was refused, only to a
        # caller /v1 would admit: package URIs and errors are not for anyone who can connect.
        detailed = self._authorized(request)
        try:
            ready = await asyncio.wait_for(self._ask(self._model.ready.remote()), READY_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            detail = f"{type(exc).__name__}: {exc}"[:500] if detailed else "no model replica " \
                "answered (send the bearer token for details)"
            return _error(503, "not_ready", detail)
        if ready["refused"]:
            # Predictions still work (old model), but the deployed config is not what runs.
            refused = ready["refused"]
            detail = (f"still serving {ready['package']}; the config's package "
                      f"{refused['package']} was refused: {refused['error']}"[:1000] if detailed
                      else "the deployed package was refused; an older one serves (send the "
                           "bearer token for details)")
            return _error(503, "swap_refused", detail)
        return {"status": "ready", "model": ready["model"] if detailed else None}


# --------------------------------------------------------------------------- application


def application(args: ServeArgs, *, model_options: dict | None = None,
                ingress_options: dict | None = None):
    """Ingress bound to Model for `args` (or one combined "Service" with topology: combined);
    options override the deployments' defaults (a serve config file's `deployments:` entries
    override both). A Service takes model_options, then ingress_options."""
    if args.topology == "combined":
        defaults = {"max_ongoing_requests": max(64, 2 * args.max_batch_size),
                    "max_queued_requests": 512,
                    "ray_actor_options": {"num_cpus": 1, "num_gpus": 0}}
        options = {**defaults, "user_config": {}, **(model_options or {}),
                   **(ingress_options or {}), "name": "Service"}
        return Ingress.options(**options).bind(None, args.model_dump())
    model_defaults = {
        "max_ongoing_requests": max(32, 2 * args.max_batch_size),  # room to fill a batch
        "max_queued_requests": 256,  # beyond this, callers get 503 at once instead of waiting
        "ray_actor_options": {"num_cpus": 1, "num_gpus": 1 if args.device == "cuda" else 0},
    }
    ingress_defaults = {"max_ongoing_requests": 64, "max_queued_requests": 512,
                        "ray_actor_options": {"num_cpus": 0.5}}
    plain = args.model_dump()
    # A user_config, even empty, makes Serve call reconfigure before a replica takes traffic,
    # and that first call loads the package (a config file's user_config replaces this one).
    model = Model.options(**{**model_defaults, "user_config": {},
                             **(model_options or {})}).bind(plain)
    return Ingress.options(**{**ingress_defaults, **(ingress_options or {})}).bind(model, plain)
