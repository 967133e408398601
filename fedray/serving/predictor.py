"""The served model and its hot swap, as a plain class the Model deployment wraps (no Ray here).

A swap loads the new package completely and runs a forward pass on it before one reference
assignment makes it current; a batch reads that reference once, so every request is answered
wholly by the old model or wholly by the new, and a package that fails to load never replaces
the one being served. Readiness is that state (a package loaded and test-run at load), read
without another forward pass.

Every prediction carries the package's out-of-distribution score; beyond the card's threshold
it abstains (`abstain: true` and why), its probabilities still given.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from fedray.artifacts.package import ModelPackage, PackageError, freeze_for_cpu, load_package

logger = logging.getLogger(__name__)


@dataclass
class Served:
    """One loaded package and the URI it came from."""

    uri: str
    package: ModelPackage
    loaded_at: float = field(default_factory=time.time)
    _explainable: object | None = field(default=None, repr=False)

    def ref(self) -> dict:
        p = self.package
        return {"name": p.name, "version": p.version, "hash": p.model_hash}

    def check(self) -> None:
        """A one-image forward pass: PackageError unless it gives finite class probabilities."""
        size = self.package.image_size
        probs = self.package.predict_proba(
            self.package.preprocess([np.zeros((size, size, 3), np.uint8)]))
        if tuple(probs.shape) != (1, len(self.package.classes)) or not torch.isfinite(probs).all():
            raise PackageError(f"{self.uri}: forward pass gives {tuple(probs.shape)} outputs for "
                               f"{len(self.package.classes)} classes (or non-finite values)")

    def prediction(self, probs: np.ndarray, score: float | None = None) -> dict:
        classes = self.package.classes
        threshold = self.package.ood_threshold
        abstain = threshold is not None and score is not None and not score <= threshold
        reason = None
        if abstain:
            quantile = self.package.card["ood"]["quantile"]
            reason = (f"out of distribution: score {score:.4f} is above the package's threshold "
                      f"{threshold:.4f} (the {quantile:g} quantile of its validation images' "
                      "scores); the image is unlike the smears the model was validated on")
        return {"probabilities": {c: float(p) for c, p in zip(classes, probs)},
                "predicted": classes[int(np.argmax(probs))], "abstain": abstain,
                "abstain_reason": reason, "ood_score": None if score is None else float(score),
                "model": self.ref(), "image_size": self.package.image_size}

    def explainable(self):
        """fedray.explain's LoadedModel of this package, built on first use, on a module of
        its own: attribution hooks and autograd never touch the module predictions run on,
        which may be running other batches at the same time."""
        if self._explainable is None:
            loaded = self.package.explainable()
            if loaded.model is self.package.model:  # built afresh: a copy of the live module
                # would copy the hooks of passes running on it
                loaded = dataclasses.replace(loaded, model=self.package.fresh_eager_model())
            self._explainable = loaded
        return self._explainable


Loader = Callable[..., ModelPackage]


def compute_streams(requested: int | None, device: str, threads: int | None = None) -> int:
    """How many batches a model replica runs at once: `requested`, else 2 on a CPU with 2 or
    more threads (`threads`, default torch's), else 1."""
    threads = torch.get_num_threads() if threads is None else int(threads)
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return requested if requested is not None else 2 if on_cpu and threads >= 2 else 1


class Predictor:
    """Predictions and explanations from the current package; `reload` swaps packages."""

    def __init__(self, uri: str, *, runtime: str = "pytorch", device: str = "cpu",
                 loader: Loader = load_package, freeze: bool = True) -> None:
        """`freeze`: on CPU, serve the eager model as a frozen graph (freeze_for_cpu)."""
        self.runtime = runtime
        self.freeze = freeze
        self.device = device
        self._loader = loader
        self._served = self.load(uri)
        self.last_reload: dict | None = None

    @property
    def served(self) -> Served:
        return self._served

    @property
    def refused(self) -> dict | None:
        """The last reload if it failed: the replica serves another package than asked."""
        last = self.last_reload
        return last if last is not None and not last["ok"] else None

    def keep(self) -> None:
        """The served package was asked for again: an earlier refusal no longer stands."""
        if self.refused is not None:
            self.last_reload = {"package": self._served.uri, "ok": True, "error": None,
                                "at": time.time()}

    def load(self, uri: str) -> Served:
        """A checked, ready package (not yet served); PackageError naming what is wrong."""
        package = self._loader(uri, runtime=self.runtime, device=self.device)
        if self.freeze:
            package = freeze_for_cpu(package)
        served = Served(uri=str(uri), package=package)
        served.check()
        return served

    def reload(self, uri: str) -> Served:
        """Serve `uri` from now on; on any failure keep the current package and re-raise."""
        try:
            served = self.load(uri)
        except Exception as exc:
            self.last_reload = {"package": str(uri), "ok": False, "error": str(exc),
                                "at": time.time()}
            raise
        old, self._served = self._served, served
        self.last_reload = {"package": str(uri), "ok": True, "error": None, "at": time.time()}
        logger.info("model swapped: %s (%s) -> %s (%s)", old.uri, old.ref()["hash"][:12],
                    served.uri, served.ref()["hash"][:12])
        return served

    def predict(self, images: list[np.ndarray]) -> list[dict]:
        """One forward pass for the batch; each dict names the model that answered."""
        served = self._served
        probs, scores = served.package.score(served.package.preprocess(images))
        probs = probs.float().cpu().numpy()
        scores = [None] * len(probs) if scores is None else scores.cpu().tolist()
        return [served.prediction(row, score) for row, score in zip(probs, scores)]

    def explain(self, image: np.ndarray, method: str) -> dict:
        """The prediction plus an (S, S) heatmap in [0, 1] for its predicted class."""
        from fedray.explain import explain

        served = self._served
        loaded = served.explainable()
        inputs = served.package.preprocess([image])
        probs, scores = served.package.score(inputs)
        probs = probs.float().cpu().numpy()[0]
        score = None if scores is None else float(scores[0])
        target = torch.tensor([int(np.argmax(probs))])
        heat = explain(loaded.model, inputs, target, method, backbone=loaded.backbone)[0]
        return {**served.prediction(probs, score), "heatmap": heat}

    def ready(self) -> dict:
        """The served model: checked when it was loaded, so no forward pass here."""
        return self._served.ref()

    def info(self) -> dict:
        served = self._served
        p = served.package
        return {"model": served.ref(), "package": served.uri, "backbone": p.backbone,
                "classes": list(p.classes), "image_size": p.image_size, "runtime": p.runtime,
                "frozen": p.frozen,
                "device": str(p.device), "loaded_at": served.loaded_at,
                "last_reload": self.last_reload, "card": p.card}
