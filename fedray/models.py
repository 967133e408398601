"""Backbone registry and one `build_model` for every classifier fedray trains.

Every backbone gets the same head (Dropout + Xavier-initialised Linear) and returns plain
logits, so training, aggregation and Grad-CAM code never special-case an architecture.
Pretrained weights are read from the local cache only: federated sites are often offline,
and a silent download inside a Ray worker would be both slow and surprising.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import re
import sys
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

# torchvision (its model zoo, and the torch._dynamo it pulls in) is imported by the functions
# that need it: a torchvision entry of BACKBONES reads its weights file name on first access,
# _construct builds the model, make_dp_safe swaps in the DP-safe blocks.

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "ModelError",
    "SmallCNN",
    "available_backbones",
    "backbone_spec",
    "build_model",
    "make_dp_safe",
]


class ModelError(ValueError):
    """A model cannot be built as asked: unknown name, missing weights file, bad argument."""


@dataclass(frozen=True)
class BackboneSpec:
    """Everything build_model, freezing and Grad-CAM need to know about one backbone.

    `trainable` lists the module prefixes left trainable by `freeze=True` (last stage + head);
    `head` is the attribute whose classifier build_model replaces.
    """

    name: str
    input_size: int
    min_input_size: int
    target_layer: str
    weights_file: str | None
    source: str
    arch: str
    head: str
    trainable: tuple[str, ...]
    weights_url: str | None = None
    hf_hub_id: str | None = None


@functools.cache
def _timm() -> ModuleType | None:
    """timm if importable; it is optional and only xception needs it."""
    try:
        return importlib.import_module("timm")
    except ImportError:
        return None


def _weights_source(source: str, arch: str) -> tuple[str | None, str | None]:
    """(download url, Hugging Face repo) of the default pretrained weights, from the library itself.

    Reading them from torchvision's Weights enum / timm's pretrained cfg keeps file names exact
    instead of guessed; they change between library versions.
    """
    if source == "torchvision":
        from torchvision.models import get_model_weights

        return get_model_weights(arch).DEFAULT.url, None
    timm = _timm() if source == "timm" else None
    if timm is not None:
        cfg = timm.models.get_pretrained_cfg(arch)
        if cfg is not None:
            return cfg.url or None, cfg.hf_hub_id or None
    return None, None


def _spec(
    name: str,
    *,
    source: str,
    target_layer: str,
    head: str,
    trainable: tuple[str, ...],
    arch: str | None = None,
    input_size: int = 224,
    min_input_size: int = 32,
) -> BackboneSpec:
    """A registry entry, with the weights file name derived from the library's own url."""
    # The weights file is not known yet: torchvision's is read when the entry is first looked
    # up (_Registry), timm's when a timm backbone is used (_lookup); importing either library
    # here would cost every process that imports this module seconds of start-up.
    return BackboneSpec(
        name=name,
        input_size=input_size,
        min_input_size=min_input_size,
        target_layer=target_layer,
        weights_file=None,
        source=source,
        arch=arch or name,
        head=head,
        trainable=trainable,
    )


class _Registry(MutableMapping[str, BackboneSpec]):
    """Backbone specs by name. A torchvision entry gets its weights file name and url from
    torchvision's weights enum on first access, which is when torchvision is imported."""

    def __init__(self, specs: list[BackboneSpec]) -> None:
        self._specs = {s.name: s for s in specs}
        self._unread = {s.name for s in specs if s.source == "torchvision"}

    def __getitem__(self, name: str) -> BackboneSpec:
        spec = self._specs[name]
        if name in self._unread:
            url, hf_hub_id = _weights_source(spec.source, spec.arch)
            spec = dataclasses.replace(spec, weights_file=url.rsplit("/", 1)[-1] if url else None,
                                       weights_url=url, hf_hub_id=hf_hub_id)
            self._specs[name] = spec
            self._unread.discard(name)
        return spec

    def __setitem__(self, name: str, spec: BackboneSpec) -> None:
        self._specs[name] = spec
        self._unread.discard(name)

    def __delitem__(self, name: str) -> None:
        del self._specs[name]
        self._unread.discard(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __repr__(self) -> str:
        return f"BACKBONES({', '.join(self._specs)})"


_RESNET = dict(source="torchvision", target_layer="layer4", head="fc", trainable=("layer4", "fc"))
_TORCHVISION = dict(source="torchvision", target_layer="features", head="classifier")

BACKBONES: MutableMapping[str, BackboneSpec] = _Registry(
    [
        _spec("smallcnn", source="fedray", target_layer="features", head="classifier",
              trainable=("features.3", "classifier"), input_size=64, min_input_size=16),
        _spec("resnet18", **_RESNET),
        _spec("resnet50", **_RESNET),
        _spec("resnet101", **_RESNET),
        # VGG: the last conv block (after pool4); the indices are its Conv2d layers.
        _spec("vgg16", **_TORCHVISION, trainable=("features.24", "features.26", "features.28", "classifier")),
        _spec("vgg19", **_TORCHVISION,
              trainable=("features.28", "features.30", "features.32", "features.34", "classifier")),
        _spec("densenet121", **_TORCHVISION,
              trainable=("features.denseblock4", "features.norm5", "classifier")),
        _spec("inception_v3", source="torchvision", target_layer="Mixed_7c", head="fc",
              trainable=("Mixed_7a", "Mixed_7b", "Mixed_7c", "fc"), input_size=299, min_input_size=75),
        # EfficientNet/MobileNets: the stride-32 stage plus the final 1x1 conv.
        _spec("efficientnet_b0", **_TORCHVISION, trainable=("features.6", "features.7", "features.8", "classifier")),
        _spec("mobilenet_v2", **_TORCHVISION,
              trainable=tuple(f"features.{i}" for i in range(14, 19)) + ("classifier",)),
        _spec("mobilenet_v3_small", **_TORCHVISION,
              trainable=tuple(f"features.{i}" for i in range(9, 13)) + ("classifier",)),
        _spec("xception", source="timm", arch="legacy_xception", target_layer="act4", head="fc",
              trainable=("block12", "conv3", "bn3", "conv4", "bn4", "fc"), input_size=299),
    ]
)

# Constructor arguments beyond weights=None: no aux branch and no input re-normalisation for
# inception (forward must return plain logits), no checkpointing in densenet (it re-runs
# forward, which Opacus's activation hooks would record twice).
_BUILD_KWARGS: dict[str, dict[str, Any]] = {
    "inception_v3": dict(aux_logits=False, transform_input=False, init_weights=True),
    "densenet121": dict(memory_efficient=False),
}


def available_backbones() -> list[str]:
    """Registered names whose library is importable (xception needs timm)."""
    return [n for n, s in BACKBONES.items() if s.source != "timm" or _timm() is not None]


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks and global average pooling: ~0.4M params, for tests and demos.

    The last block does not pool, so 16 px inputs still leave a 2x2 map for Grad-CAM.
    """

    def __init__(self, num_classes: int = 4, widths: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        blocks, in_ch = [], 3
        for i, width in enumerate(widths):
            layers: list[nn.Module] = [
                nn.Conv2d(in_ch, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            blocks.append(nn.Sequential(*layers))
            in_ch = width
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def backbone_spec(name: str) -> BackboneSpec:
    """The full spec of an available backbone (timm weights info resolved on demand)."""
    return _lookup(name)


def _lookup(name: str) -> BackboneSpec:
    """The spec for `name`, or a ModelError that lists what exists / how to enable it."""
    spec = BACKBONES.get(name.strip().lower()) if isinstance(name, str) else None
    if spec is None:
        raise ModelError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}")
    if spec.source == "timm":
        if _timm() is None:
            raise ModelError(
                f"backbone {spec.name!r} needs the {spec.source!r} package; pip install {spec.source}")
        return _with_timm_weights(spec)
    return spec


@functools.cache
def _with_timm_weights(spec: BackboneSpec) -> BackboneSpec:
    url, hf_hub_id = _weights_source(spec.source, spec.arch)
    return dataclasses.replace(spec, weights_file=url.rsplit("/", 1)[-1] if url else None,
                               weights_url=url, hf_hub_id=hf_hub_id)


def _construct(spec: BackboneSpec, pretrained: bool = False) -> nn.Module:
    """A randomly initialised backbone; never passes weights, so nothing can download."""
    if spec.source == "fedray":
        return SmallCNN()
    if spec.source == "timm":
        return _timm().create_model(spec.arch, pretrained=False)
    kwargs = dict(_BUILD_KWARGS.get(spec.name, {}))
    if spec.name == "inception_v3":
        # The ported weights expect inputs in [-1, 1]; transform_input maps our ImageNet-
        # normalised inputs there, as torchvision does whenever it loads those weights.
        kwargs["transform_input"] = pretrained
    from torchvision.models import get_model

    return get_model(spec.arch, weights=None, **kwargs)


def _replace_head(model: nn.Module, attr: str, num_classes: int, dropout: float) -> None:
    """Swap the classifier for Dropout + Linear on the features the old head's first Linear read.

    Dropping hidden FC layers (VGG's fc6/fc7, MobileNetV3's 1024 layer) keeps every head the
    same shape and keeps the parameter count, hence the DP noise dimension, small.
    """
    old = model.get_submodule(attr)
    linear = next((m for m in old.modules() if isinstance(m, nn.Linear)), None)
    if linear is None:
        raise ModelError(f"{type(model).__name__}.{attr} has no Linear layer to replace")
    fc = nn.Linear(linear.in_features, num_classes)
    nn.init.xavier_uniform_(fc.weight)
    nn.init.zeros_(fc.bias)
    parent, _, child = attr.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, nn.Sequential(nn.Dropout(dropout), fc))


def _torch_hub_checkpoints() -> Path:
    """Where torchvision caches weights: $TORCH_HOME/hub/checkpoints (~/.cache/torch/...)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _hf_cached_file(repo_id: str) -> Path | None:
    """The weights file of `repo_id` if the Hugging Face cache already holds it (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def _weights_path(spec: BackboneSpec, weights_dir: Path | None) -> Path:
    """The local pretrained weights file for `spec`, or a ModelError saying how to get it.

    An explicit weights_dir is the only place looked at; otherwise the torch hub cache and,
    for timm models published on the Hugging Face hub, the HF cache.
    """
    if spec.weights_file is None and spec.hf_hub_id is None:
        raise ModelError(f"backbone {spec.name!r} has no pretrained weights; build it with pretrained=False")
    directory = Path(weights_dir) if weights_dir is not None else _torch_hub_checkpoints()
    expected = directory / spec.weights_file if spec.weights_file else None
    if expected is not None and expected.is_file():
        return expected
    if spec.hf_hub_id and weights_dir is None and (cached := _hf_cached_file(spec.hf_hub_id)) is not None:
        return cached
    how = [f"download {spec.weights_url} to {expected}"] if spec.weights_url else []
    if spec.hf_hub_id:
        how.append(f"fetch the Hugging Face repo {spec.hf_hub_id} into the HF cache")
    where = expected if expected is not None else f"the Hugging Face cache ({spec.hf_hub_id})"
    raise ModelError(
        f"pretrained weights for {spec.name!r} not found at {where} (downloads are disabled); " + " or ".join(how)
    )


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """Tensors of a .pth/.bin/.safetensors checkpoint, unwrapped from {'state_dict': ...}."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt or foreign file: say which one
        raise ModelError(f"cannot read pretrained weights {path}: {exc}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ModelError(f"{path} does not hold a state_dict")
    return state


# Old DenseNet checkpoints name 'denselayer1.norm.1.weight' what the module now calls
# 'denselayer1.norm1.weight'; torchvision remaps them the same way when it loads.
_DENSENET_OLD_KEY = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _load_backbone_weights(model: nn.Module, spec: BackboneSpec, path: Path) -> None:
    """Load every non-head tensor from `path`; the head is new, branches we drop are ignored.

    Keys of modules this model does not build (inception's AuxLogits) are skipped; a key the
    backbone needs but the file lacks, or a shape mismatch, means the wrong file: ModelError.
    """
    state = {_DENSENET_OLD_KEY.sub(r"\1\2", k): v for k, v in _read_state_dict(path).items()}
    head = spec.head + "."
    wanted = {k for k in model.state_dict() if not k.startswith(head)}
    state = {k: v for k, v in state.items() if k in wanted}
    missing = sorted(k for k in wanted - state.keys() if not k.endswith("num_batches_tracked"))
    if missing:
        raise ModelError(f"{path} lacks {len(missing)} tensors of {spec.name!r} (e.g. {missing[:3]}); wrong file?")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ModelError(f"{path} does not fit {spec.name!r}: {exc}") from exc


def _dp_class_swaps() -> dict[type, type]:
    """Library class -> DP-safe subclass; timm's only when timm is installed."""
    from fedray import _torchvision_blocks as tv

    swaps = dict(tv.SWAPS)
    if "timm" in sys.modules:  # a timm model exists only once timm has been imported
        from fedray._timm_blocks import DPXceptionBlock, XceptionBlock

        swaps[XceptionBlock] = DPXceptionBlock
    return swaps


def _batchnorm_to_groupnorm(model: nn.Module) -> None:
    """Replace every BatchNorm (frozen ones too) by GroupNorm, keeping affine weights and eps.

    Opacus's own fixer starts GroupNorm from scratch and skips frozen modules; copying the
    affine parameters lets pretrained weights survive, and a frozen BN would still mix samples.
    """
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.modules.batchnorm._BatchNorm):
                continue
            gn = nn.GroupNorm(math.gcd(32, child.num_features), child.num_features, eps=child.eps, affine=child.affine)
            if child.affine:
                with torch.no_grad():
                    gn.weight.copy_(child.weight)
                    gn.bias.copy_(child.bias)
                gn.weight.requires_grad_(child.weight.requires_grad)
                gn.bias.requires_grad_(child.bias.requires_grad)
            ref = next(child.parameters(), None)
            if ref is not None:
                gn.to(device=ref.device, dtype=ref.dtype)
            setattr(parent, child_name, gn)


def make_dp_safe(model: nn.Module) -> nn.Module:
    """Return `model` rewritten so Opacus validates it and its hooks can compute per-sample grads.

    BatchNorm -> GroupNorm (weights kept), in-place activations/dropout made out-of-place,
    library blocks with in-place residual adds swapped for out-of-place twins, then Opacus's
    own fixer for anything else; raises ModelError if Opacus still rejects the model.
    """
    from opacus.validators import ModuleValidator

    model.train()
    _batchnorm_to_groupnorm(model)
    swaps = _dp_class_swaps()
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
        if type(module) in swaps:
            module.__class__ = swaps[type(module)]
    if ModuleValidator.validate(model, strict=False):
        model = ModuleValidator.fix(model)
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ModelError(f"model is still not DP-safe: {errors}")
    return model


def _freeze_early_stages(model: nn.Module, trainable: tuple[str, ...]) -> None:
    """Leave only parameters under the `trainable` prefixes (last stage + head) trainable."""
    for name, param in model.named_parameters():
        param.requires_grad_(any(name == p or name.startswith(p + ".") for p in trainable))


def build_model(
    name: str,
    num_classes: int = 4,
    *,
    pretrained: bool = False,
    freeze: bool = False,
    dp_safe: bool = False,
    dropout: float = 0.2,
    weights_dir: Path | None = None,
) -> nn.Module:
    """Build backbone `name` with a Dropout+Linear head returning logits [N, num_classes].

    pretrained: load local cached weights (weights_dir, else torch hub cache / HF cache);
    never downloads. freeze: train only the last stage and head. dp_safe: Opacus-ready
    (GroupNorm, no in-place ops). Weights load before the DP conversion, so they survive it.
    The model is returned in training mode.
    """
    spec = _lookup(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive int, got {num_classes!r}")
    if not 0.0 <= dropout < 1.0:
        raise ModelError(f"dropout must be in [0, 1), got {dropout!r}")
    path = _weights_path(spec, weights_dir) if pretrained else None  # fail before the slow build
    model = _construct(spec, pretrained)
    _replace_head(model, spec.head, num_classes, dropout)
    if path is not None:
        _load_backbone_weights(model, spec, path)
    if dp_safe:
        model = make_dp_safe(model)
    if freeze:
        _freeze_early_stages(model, spec.trainable)
    return model.train()


def input_size(config) -> int:
    """The model's input size for an experiment: data.image_size, else the backbone's own."""
    return config.data.image_size or BACKBONES[config.model.backbone].input_size
