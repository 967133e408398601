"""The HTTP API's response bodies, as the OpenAPI document (/openapi.json) describes them."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ModelRef(BaseModel):
    """Which model answered: a changed `hash` means other weights (e.g. after a hot swap)."""

    name: str
    version: str
    hash: str = Field(description="SHA-256 of the package's model.safetensors")


class Prediction(BaseModel):
    probabilities: dict[str, float] = Field(description="class -> probability (sums to 1)")
    predicted: str
    abstain: bool = Field(description="true: the image lies beyond the package's "
                          "out-of-distribution threshold; do not act on `predicted`")
    abstain_reason: str | None = Field(None, description="why it abstains (score and threshold)")
    ood_score: float | None = Field(None, description="distance from the validation images' "
                                    "features (see the card's `ood`); null without calibration")
    model: ModelRef
    latency_ms: float = Field(description="time spent in the service on this request")


class Explanation(Prediction):
    method: str
    heatmap_png: str = Field(description="base64 PNG: the heatmap over the image")
    heatmap_size: tuple[int, int] = Field(description="(width, height) of heatmap_png")


class ReloadStatus(BaseModel):
    """The last package change asked of this replica and how it went."""

    package: str
    ok: bool
    error: str | None = None
    at: float = Field(description="Unix time of the attempt")


class ModelInfo(BaseModel):
    model: ModelRef
    package: str = Field(description="the URI the served package was loaded from")
    backbone: str
    classes: list[str]
    image_size: int
    runtime: str
    frozen: bool = Field(False, description="the eager model served as a frozen TorchScript "
                         "graph (CPU)")
    device: str
    loaded_at: float
    last_reload: ReloadStatus | None = None
    replica: str = Field(description="the Model replica that answered (ids change on restart)")
    streams: int = Field(description="batches the replica's model runs at once")
    card: dict = Field(description="the package's card.json")


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    model: ModelRef | None = Field(None, description="given to callers /v1 would admit")


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable code, e.g. not_an_image, overloaded")
    detail: str = Field(description="what was wrong, naming the part or file at fault")
