"""Visual explanations of a trained classifier: four captum methods over one model interface.

Every fedray model takes (N, 3, H, W) normalised images and returns (N, classes) logits, so one
function per method is enough: nothing here knows an architecture beyond the registry's Grad-CAM
`target_layer`. Each method returns one (H, W) map per image scaled to [0, 1], which is what
overlays, contact sheets and sanity checks (randomisation, mass inside the cell) compare.

Explaining must not change the model: it runs in eval mode (dropout off, BatchNorm on running
statistics, so maps are deterministic), restores every module's previous mode afterwards and
works on a detached copy of the inputs; captum removes its own hooks, and no parameter's
`requires_grad` is touched.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from captum._utils.models.linear_model import SkLearnRidge
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Lime, Saliency
from PIL import Image
from torch import Tensor, nn

from fedray.artifacts import run_folder
from fedray.artifacts.model import LoadedModel
from fedray.data.labels import CLASSES
from fedray.models import BACKBONES

__all__ = [
    "METHODS",
    "MODEL_SOURCES",
    "ExplainError",
    "LoadedModel",
    "contact_sheet",
    "explain",
    "explain_files",
    "load_model",
    "method_options",
    "overlay",
    "predict_proba",
    "resolve_target_layer",
    "superpixels",
]

METHODS: tuple[str, ...] = ("saliency", "gradcam", "integrated_gradients", "lime")


class ExplainError(ValueError):
    """A request that cannot be explained as asked: unknown method or option, unreadable image
    or model source. The message names the offending method, option or path."""


# --------------------------------------------------------------------------- model state


@contextlib.contextmanager
def _explaining(model: nn.Module) -> Iterator[None]:
    """Eval mode and autograd on for the duration, then every module's own mode restored.

    Per-module restore (not `model.train(was)`) keeps deliberately mixed states intact, e.g.
    a fine-tuning setup that holds frozen BatchNorm layers in eval mode inside a training model.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _device(model: nn.Module) -> torch.device:
    """Where the model's parameters live (CPU for a parameter-less model)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def predict_proba(model: nn.Module, images: Tensor) -> Tensor:
    """Softmax probabilities (N, classes) in eval mode; the model's mode is restored after."""
    with _explaining(model), torch.no_grad():
        return torch.softmax(model(images.to(_device(model))).float(), dim=1)


def resolve_target_layer(
    model: nn.Module, target_layer: str | nn.Module | None = None, backbone: str | None = None
) -> nn.Module:
    """The module Grad-CAM reads: given module, dotted name, the registry's layer, or last conv.

    The registry names the last convolutional *stage* (e.g. resnet `layer4`), whose output keeps
    the residual sum and activation; the last Conv2d is only a fallback for models built
    outside the registry, as in the original Grad-CAM paper.
    """
    if isinstance(target_layer, nn.Module):
        return target_layer
    if target_layer is None and backbone is not None:
        spec = BACKBONES.get(backbone.strip().lower())
        if spec is None:
            raise ExplainError(f"unknown backbone {backbone!r}; known: {', '.join(BACKBONES)}")
        target_layer = spec.target_layer
    if target_layer is None:
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        if not convs:
            raise ExplainError("model has no Conv2d layer; pass target_layer for Grad-CAM")
        return convs[-1]
    try:
        return model.get_submodule(target_layer)
    except AttributeError as exc:
        raise ExplainError(f"model has no layer {target_layer!r} for Grad-CAM ({exc})") from exc


# --------------------------------------------------------------------------- methods
# Each returns raw (n, H, W) maps for one chunk; `explain` normalises them. Options are
# keyword-only so `explain` can reject a misspelt option by name.


def _saliency(model: nn.Module, inputs: Tensor, targets: Tensor) -> Tensor:
    """|d logit / d input|, max over colour channels (Simonyan et al. 2014)."""
    inputs = inputs.detach().requires_grad_()  # our own copy: spares captum's warning
    attr = Saliency(model).attribute(inputs, target=targets, abs=True)
    return attr.amax(dim=1)


def _gradcam(model: nn.Module, inputs: Tensor, targets: Tensor, *, layer: nn.Module) -> Tensor:
    """ReLU(sum_k mean-gradient_k * activation_k) at `layer`, bilinearly upsampled to the input."""
    cam = LayerGradCam(model, layer).attribute(inputs, target=targets, relu_attributions=True)
    if cam.ndim != 4:
        raise ExplainError(
            f"Grad-CAM layer {type(layer).__name__} gives {tuple(cam.shape)}; it must output "
            "a (N, C, h, w) feature map (pick a convolutional stage as target_layer)")
    up = LayerAttribution.interpolate(cam, tuple(inputs.shape[-2:]), interpolate_mode="bilinear")
    return up[:, 0]


def _baseline_tensor(baseline: float | Tensor | None, inputs: Tensor) -> Tensor:
    """IG baseline as a tensor shaped like `inputs`; zeros = the dataset-mean colour after
    ImageNet normalisation, a neutral grey-ish image rather than black."""
    if baseline is None:
        return torch.zeros_like(inputs)
    if isinstance(baseline, (int, float)):
        return torch.full_like(inputs, float(baseline))
    base = torch.as_tensor(baseline, dtype=inputs.dtype, device=inputs.device)
    try:
        return base.expand_as(inputs).contiguous()
    except RuntimeError as exc:
        raise ExplainError(
            f"baseline of shape {tuple(base.shape)} does not broadcast to {tuple(inputs.shape)}"
        ) from exc


def _integrated_gradients(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    n_steps: int = 32,
    baseline: float | Tensor | None = None,
    internal_batch_size: int | None = 32,
) -> Tensor:
    """|IG| along the straight path baseline -> image, max over channels (Sundararajan 2017).

    internal_batch_size bounds memory: n_steps copies of each image would otherwise go through
    the model at once.
    """
    if n_steps < 1:
        raise ExplainError(f"n_steps must be >= 1, got {n_steps}")
    inputs = inputs.detach().requires_grad_()  # our own copy: spares captum's warning
    attr = IntegratedGradients(model).attribute(
        inputs,
        baselines=_baseline_tensor(baseline, inputs),
        target=targets,
        n_steps=n_steps,
        internal_batch_size=internal_batch_size,
    )
    return attr.abs().amax(dim=1)


def _lime(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    *,
    n_samples: int = 64,
    n_segments: int = 64,
    segmentation: str = "slic",
    compactness: float = 1.0,
    baseline: float | str = "mean",
    ridge_alpha: float = 1.0,
    perturbations_per_eval: int = 16,
    seed: int = 0,
) -> Tensor:
    """LIME over superpixels: a ridge fit of the class probability on which segments are kept.

    Probabilities (not logits) are explained, as in Ribeiro et al. 2016. Ridge instead of
    captum's default Lasso(0.01): at 64 samples over ~64 segments Lasso kept 0-19 segments
    per smear (one map of 12 all zero), too sparse to show a cell's outline.
    A fixed seed makes the random segment masks, hence the map, reproducible. The positive
    weights are painted back onto each segment's pixels.
    """
    if n_samples < 2:
        raise ExplainError(f"n_samples must be >= 2, got {n_samples}")

    def proba(x: Tensor) -> Tensor:
        return torch.softmax(model(x).float(), dim=1)

    lime = Lime(proba, interpretable_model=SkLearnRidge(alpha=ridge_alpha))
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    maps = []
    for image, target in zip(inputs, targets):
        mask = superpixels(image, n_segments, method=segmentation, compactness=compactness)
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            attr = lime.attribute(
                image[None],
                baselines=_lime_baseline(baseline, image),
                target=int(target),
                feature_mask=mask.to(inputs.device)[None, None].expand(1, image.shape[0], -1, -1),
                n_samples=n_samples,
                perturbations_per_eval=max(1, min(perturbations_per_eval, n_samples)),
            )
        maps.append(attr[0, 0].clamp(min=0))
    return torch.stack(maps)


def _lime_baseline(baseline: float | str, image: Tensor) -> float | Tensor:
    """What a switched-off superpixel shows: "mean" = the image's own mean colour.

    The image mean (mostly plasma background) keeps perturbed smears close to real ones; a
    constant such as 0 (the ImageNet mean colour) paints grey patches the model never saw.
    """
    if baseline == "mean":
        return image.mean(dim=(-2, -1), keepdim=True)[None]
    if isinstance(baseline, (int, float)):
        return float(baseline)
    raise ExplainError(f"lime baseline must be 'mean' or a number, got {baseline!r}")


_METHODS: dict[str, Callable[..., Tensor]] = {
    "saliency": _saliency,
    "gradcam": _gradcam,
    "integrated_gradients": _integrated_gradients,
    "lime": _lime,
}


def _method(name: str) -> Callable[..., Tensor]:
    """The implementation of `name`, or an ExplainError listing the known methods."""
    fn = _METHODS.get(name) if isinstance(name, str) else None
    if fn is None:
        raise ExplainError(
            f"unknown explanation method {name!r}; choose one of {', '.join(METHODS)}")
    return fn


def method_options(method: str) -> dict[str, object]:
    """The options `method` accepts and their defaults (what a CLI may expose)."""
    params = inspect.signature(_method(method)).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name != "layer"}


def _check_options(method: str, options: dict[str, object]) -> None:
    """Reject options the method does not take, naming them, instead of a bare TypeError."""
    unknown = sorted(set(options) - set(method_options(method)))
    if unknown:
        accepted = ", ".join(method_options(method)) or "none"
        raise ExplainError(
            f"method {method!r} has no option(s) {', '.join(unknown)}; accepted: {accepted}")


# --------------------------------------------------------------------------- superpixels


def _grid_segments(height: int, width: int, n_segments: int) -> Tensor:
    """Square-ish cells, about n_segments of them: the baseline segmentation."""
    per_side = max(1, round(math.sqrt(n_segments)))
    rows = torch.arange(height) * per_side // height
    cols = torch.arange(width) * per_side // width
    return rows[:, None] * per_side + cols[None, :]


def superpixels(
    image: Tensor, n_segments: int = 64, *, method: str = "slic", compactness: float = 1.0,
    iterations: int = 5,
) -> Tensor:
    """(H, W) int64 segment ids 0..K-1 for one (C, H, W) image, with no extra dependency.

    "grid": square cells. "slic": k-means on colour + position seeded on that grid (a plain
    SLIC without the connectivity step), so segments follow cell and nucleus borders and LIME
    switches whole structures on and off. Colour is measured in units of the image's own
    colour spread; `compactness` is the colour distance one grid step of distance is worth.
    Deterministic: no random initialisation.
    """
    channels, height, width = image.shape
    grid = _grid_segments(height, width, n_segments)
    if method == "grid":
        return grid
    if method != "slic":
        raise ExplainError(f"unknown segmentation {method!r}; choose 'slic' or 'grid'")
    step = math.sqrt(height * width / max(int(grid.max()) + 1, 1))
    colour = image.detach().float().cpu().reshape(channels, -1).T
    colour = (colour - colour.mean(0)) / colour.std(0).clamp(min=1e-6)
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32),
                            torch.arange(width, dtype=torch.float32), indexing="ij")
    position = torch.stack([ys.reshape(-1), xs.reshape(-1)], dim=1) * (compactness / step)
    feats = torch.cat([colour, position], dim=1)  # (P, C + 2)
    labels = grid.reshape(-1)
    for _ in range(iterations):
        k = int(labels.max()) + 1
        sums = torch.zeros(k, feats.shape[1]).index_add_(0, labels, feats)
        counts = torch.bincount(labels, minlength=k).clamp(min=1)[:, None]
        labels = torch.cdist(feats, sums / counts).argmin(dim=1)
        labels = torch.unique(labels, return_inverse=True)[1]  # drop emptied clusters
    return labels.reshape(height, width)


# --------------------------------------------------------------------------- public API


def _normalise(maps: np.ndarray) -> np.ndarray:
    """Per-image min-max scaling to [0, 1]; a constant map becomes all zeros (no evidence).

    Per image, because the methods' raw units differ (gradients, logit shares, probabilities)
    and only the within-image ranking is comparable between methods and models.
    """
    maps = np.nan_to_num(maps.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    if maps.size == 0:
        return maps
    lo = maps.min(axis=(1, 2), keepdims=True)
    span = maps.max(axis=(1, 2), keepdims=True) - lo
    return np.where(span > 0, (maps - lo) / np.where(span > 0, span, 1.0), 0.0).astype(np.float32)


def _given_targets(targets: Tensor | Sequence[int] | int, n: int, device: torch.device) -> Tensor:
    """Class indices (N,) on `device`; a single index applies to every image."""
    t = torch.as_tensor(targets, dtype=torch.long, device=device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(n)
    if t.numel() != n:
        raise ExplainError(f"got {t.numel()} targets for {n} images")
    return t


def _predicted(model: nn.Module, inputs: Tensor) -> Tensor:
    """The model's top class per image (the default target: explain what it decided)."""
    with torch.no_grad():
        return model(inputs).argmax(dim=1)


def explain(
    model: nn.Module,
    images: Tensor,
    targets: Tensor | None = None,
    method: str = "gradcam",
    *,
    target_layer: str | nn.Module | None = None,
    backbone: str | None = None,
    batch_size: int = 16,
    **options: object,
) -> np.ndarray:
    """(N, H, W) float32 heatmaps in [0, 1] explaining `targets` (None: predicted) classes.

    images: (N, 3, H, W) normalised model inputs. Grad-CAM reads `target_layer` (module or
    dotted name), else the registry's layer for `backbone`, else the last Conv2d. Other
    `options` go to the method (see `method_options`), e.g. n_steps for integrated_gradients,
    n_samples for lime. Images go through in chunks of `batch_size` to bound memory.
    Raises ExplainError (a ValueError) naming an unknown method or option.
    """
    fn = _method(method)
    _check_options(method, options)
    if not isinstance(images, Tensor) or images.ndim != 4:
        got = getattr(images, "shape", type(images))
        raise ExplainError(f"images must be a (N, C, H, W) tensor, got {got}")
    if batch_size < 1:
        raise ExplainError(f"batch_size must be >= 1, got {batch_size}")
    if method == "gradcam":
        options = {**options, "layer": resolve_target_layer(model, target_layer, backbone)}
    x = images.detach().to(_device(model), torch.float32).clone()
    given = None if targets is None else _given_targets(targets, x.shape[0], x.device)
    chunks = []
    with _explaining(model):
        for i in range(0, x.shape[0], batch_size):
            chunk = x[i : i + batch_size]
            t = _predicted(model, chunk) if given is None else given[i : i + batch_size]
            chunks.append(fn(model, chunk, t, **options).detach())
    if not chunks:
        return np.zeros((0, *x.shape[-2:]), np.float32)
    raw = torch.cat(chunks).float().cpu().numpy()
    return _normalise(raw)


def _resize_heat(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a float map, so a model-size map can lie over the original image."""
    if heat.shape == (height, width):
        return heat
    img = Image.fromarray(np.ascontiguousarray(heat, dtype=np.float32))
    return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def overlay(
    image: np.ndarray, heat: np.ndarray, alpha: float = 0.45, cmap: str = "jet"
) -> np.ndarray:
    """Blend a colour-mapped heatmap over an RGB uint8 image; same shape and dtype back.

    `heat` (values in [0, 1]) may have another size than the image: it is resized bilinearly,
    so a map computed at the model's input size can be shown on the full-resolution original.
    """
    import matplotlib

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ExplainError(f"image must be uint8 HxWx3, got {image.dtype} {image.shape}")
    heat = np.asarray(heat, dtype=np.float32)
    if heat.ndim != 2:
        raise ExplainError(f"heat must be a 2-D map, got shape {heat.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ExplainError(f"alpha must be in [0, 1], got {alpha}")
    heat = np.clip(np.nan_to_num(_resize_heat(heat, *image.shape[:2])), 0.0, 1.0)
    colours = matplotlib.colormaps[cmap](heat)[..., :3] * 255.0
    blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def contact_sheet(tiles: list[np.ndarray], titles: list[str], path: Path, columns: int = 4) -> Path:
    """One PNG with the tiles in a grid, each under its title; returns `path`.

    Uses a bare matplotlib Figure with the Agg canvas, never pyplot, so it changes no global
    backend state and is safe from worker threads and headless servers.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not tiles:
        raise ExplainError("contact_sheet needs at least one tile")
    if len(titles) != len(tiles):
        raise ExplainError(f"{len(tiles)} tiles but {len(titles)} titles")
    if columns < 1:
        raise ExplainError(f"columns must be >= 1, got {columns}")
    cols = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    fig = Figure(figsize=(2.6 * cols, 2.9 * rows), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, tile, title in zip(axes.flat, tiles, titles):
        ax.imshow(tile, interpolation="nearest" if max(tile.shape[:2]) < 128 else "antialiased")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


# --------------------------------------------------------------------------- model sources


def _find_run_dir(source: Path) -> Path | None:
    """The run folder `source` denotes: itself, or the run above a weights file in it."""
    if source.is_dir():
        return source if run_folder.is_run(source) else None
    if source.is_file() and source.suffix == ".safetensors":
        # model.safetensors sits in the run; global.safetensors in checkpoints/round_N/.
        for parent in list(source.parents)[:3]:
            if run_folder.is_run(parent):
                return parent
    return None


def _load_run(source: Path) -> LoadedModel:
    """Rebuild the run's architecture from config.yaml and load its weights, as evaluate does."""
    from fedray.models import input_size

    run_dir = _find_run_dir(source)
    if run_dir is None:
        raise ExplainError(f"{source}: no config.yaml found for this model")
    config = run_folder.load_run_config(run_dir)
    try:
        weights = source if source.is_file() else run_folder.run_weights(run_dir)
    except FileNotFoundError as exc:
        raise ExplainError(f"{source}: run folder has no weights ({exc})") from exc
    m = config.model
    model = run_folder.build_run_model(m)
    try:
        run_folder.load_weights_into(model, weights)
    except Exception as exc:  # wrong or corrupt file: name it
        raise ExplainError(f"{weights}: cannot load into {m.backbone!r} ({exc})") from exc
    return LoadedModel(model=model.eval(), backbone=m.backbone, image_size=input_size(config),
                       classes=CLASSES, source=source)


def _is_package(source: Path) -> bool:
    from fedray.artifacts.package import is_package

    return is_package(source)


def _load_package(source: Path) -> LoadedModel:
    from fedray.artifacts.package import load_package

    return load_package(source).explainable()


# (what it is, recogniser, loader): load_model tries them in order.
MODEL_SOURCES: list[tuple[str, Callable[[Path], bool], Callable[[Path], LoadedModel]]] = [
    ("model package (card.json + model.safetensors, see `fedray export`)", _is_package, _load_package),
    ("run folder (config.yaml + model.safetensors or round checkpoints)",
     lambda p: _find_run_dir(p) is not None, _load_run),
]


def load_model(source: Path) -> LoadedModel:
    """The model a path holds, in eval mode, via the first MODEL_SOURCES entry that accepts it."""
    source = Path(source)
    if not source.exists():
        raise ExplainError(f"{source}: no such file or folder")
    for _, accepts, load in MODEL_SOURCES:
        if accepts(source):
            return load(source)
    kinds = "; ".join(kind for kind, _, _ in MODEL_SOURCES)
    raise ExplainError(f"{source}: not a model fedray can explain (expected: {kinds})")


# --------------------------------------------------------------------------- files


def _read_image(path: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(original RGB, model-size RGB) uint8 arrays; the resize is the training decode's own."""
    from fedray.data.shards import decode_image

    try:
        data = Path(path).read_bytes()
        with Image.open(path) as img:
            original = np.asarray(img.convert("RGB"), dtype=np.uint8)
        return original, decode_image(data, size)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ExplainError(f"{path}: not a readable image ({exc})") from exc


def _unique_names(paths: Sequence[Path], method: str) -> list[str]:
    """<stem>_<method>.png per image, numbered when two inputs share a stem."""
    names, seen = [], set()
    for path in paths:
        stem, n = Path(path).stem, 1
        name = f"{stem}_{method}.png"
        while name in seen or name == "contact_sheet.png":
            name, n = f"{stem}-{n}_{method}.png", n + 1
        seen.add(name)
        names.append(name)
    return names


def explain_files(
    source: Path,
    images: list[Path],
    method: str,
    out_dir: Path,
    *,
    options: dict[str, object] | None = None,
) -> list[Path]:
    """Explain each image's predicted class; write overlays plus contact_sheet.png to out_dir.

    Each image is decoded (any PIL format) and resized exactly as training decodes it; its
    overlay is drawn on the original full-resolution image. Every image is read before
    anything is written, so a bad file (ExplainError naming it) leaves no partial output.
    Returns the overlay paths in input order, then the contact sheet's.
    """
    _method(method)
    _check_options(method, dict(options or {}))
    if not images:
        raise ExplainError("no images to explain")
    loaded = load_model(source)
    decoded = [_read_image(Path(p), loaded.image_size) for p in images]
    from fedray.data.transforms import eval_preset

    batch = torch.from_numpy(np.stack([small for _, small in decoded])).permute(0, 3, 1, 2)
    inputs = eval_preset(loaded.image_size)(batch.contiguous())
    probs = predict_proba(loaded.model, inputs).cpu()
    conf, pred = probs.max(dim=1)
    heat = explain(loaded.model, inputs, pred, method, backbone=loaded.backbone, **(options or {}))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written, tiles, titles = [], [], []
    names = _unique_names(images, method)
    for name, image, (original, _), h, c, p in zip(names, images, decoded, heat, pred, conf):
        tile = overlay(original, h)
        Image.fromarray(tile).save(out_dir / name)
        written.append(out_dir / name)
        tiles.append(tile)
        titles.append(f"{Path(image).name}\n{loaded.classes[int(c)]} ({float(p):.2f})")
    written.append(contact_sheet(tiles, titles, out_dir / "contact_sheet.png"))
    return written
