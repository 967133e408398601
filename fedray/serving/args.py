"""The serving application's arguments (serve config file, RayService, or `fedray serve` flags)
and the bearer token they name; pydantic only, so the CLI parser pulls in neither Ray nor torch."""

from __future__ import annotations

import os
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedray.config import ConfigError, format_validation_error

ExplainMethod = Literal["saliency", "gradcam"]  # the fast ones; fedray explain has more
EXPLAIN_METHODS: tuple[str, ...] = get_args(ExplainMethod)


class ServeArgs(BaseModel):
    """The application's `args` (serve config file, RayService, or `fedray serve` flags)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    package: str = Field(description="model package: folder, file:// or pyarrow URI (s3://...)")
    device: Literal["cpu", "cuda", "auto"] = "auto"
    runtime: Literal["pytorch", "torchscript"] = "pytorch"
    max_batch_size: int = Field(16, ge=1, le=1024, description="most images per forward pass")
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=1, description="longest batch fill wait")
    batch_quiet_s: float | None = Field(
        0.002, ge=0, le=1, description="a partial batch goes once no request has arrived for "
                                       "this long (null: it waits all of batch_wait_timeout_s)")
    streams: int | None = Field(None, ge=1, le=64, description="batches the model runs at once: "
                                "another starts while one runs only when a full batch waits, "
                                "and each gets an equal share of the replica's threads among "
                                "those running (default: 2 on a CPU replica with 2 or more "
                                "threads, else 1)")
    max_image_bytes: int = Field(10 * 1024 * 1024, ge=1, description="largest accepted upload")
    max_pixels: int = Field(4096 * 4096, ge=1, description="largest width x height (bomb guard)")
    max_batch_images: int = Field(32, ge=1, description="most images in one batch request")
    min_image_side: int = Field(32, ge=1, description="images with a shorter side get 422 "
                                "image_too_small: too little to classify")
    request_timeout_s: float = Field(30.0, gt=0, le=3600, description="a request not answered "
                                     "within this gets 504 request_timeout (body, decoding and "
                                     "model together); the Serve proxy's request_timeout_s "
                                     "should be a little longer")
    auth_token_env: str | None = Field(
        None, description="env var holding the bearer token /v1 requires; the Ingress refuses "
                          "to start while it is unset or empty (see allow_unauthenticated)")
    allow_unauthenticated: bool = Field(
        False, description="serve /v1 without a token when auth_token_env's variable is unset "
                           "or empty, instead of refusing to start (loopback use only)")
    explain_method: ExplainMethod = "gradcam"
    topology: Literal["split", "combined"] = Field(
        "split", description="split: an Ingress and a Model deployment (GPU, scaling apart); "
                             "combined: one Service deployment that checks, decodes and runs "
                             "the model in one replica, no handle hop (fastest on CPU)")


def parse_args(args: dict | ServeArgs) -> ServeArgs:
    """Validated ServeArgs, or a ConfigError naming each bad or unknown key."""
    if isinstance(args, ServeArgs):
        return args
    try:
        return ServeArgs.model_validate(args or {})
    except ValidationError as err:
        raise ConfigError(format_validation_error(
            err, "invalid serve args", f"known: {', '.join(ServeArgs.model_fields)}")) from None


def auth_token(args: ServeArgs, environ: dict[str, str] | None = None) -> str | None:
    """The bearer token /v1 requires, or None when it requires none.

    Fails closed: a service told to read its token from a variable that is unset or empty (a
    Secret that was never created) refuses to start rather than serve /v1 to anyone, unless
    `allow_unauthenticated` says that is meant.
    """
    variable = args.auth_token_env
    if not variable:
        return None
    token = (os.environ if environ is None else environ).get(variable, "").strip()
    if token or args.allow_unauthenticated:
        return token or None
    raise ConfigError(f"auth_token_env names {variable}, which is unset or empty in this "
                      f"process: set {variable} to the bearer token, or set "
                      "allow_unauthenticated: true (--allow-unauthenticated) to serve /v1 "
                      "without one")
