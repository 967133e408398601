"""The numbers the report checks (public: tests and scripts call them): images leaked between
splits, a mean-colour shortcut baseline, and the cross-site matrix."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from fedray.artifacts.run_folder import LOCAL_MODEL, hospital_dir, run_weights
from fedray.data.labels import CLASS_INDEX
from fedray.data.shards import ShardSet
from fedray.metrics import _balanced_accuracy
from fedray.report.run import Evaluator, Run


SHORTCUT_MARGIN = 0.10  # the model must beat the mean-colour baseline by this much (balanced acc.)


@dataclass
class Leakage:
    """Byte-identical images (recomputed sha256 of the stored bytes) found in several splits."""

    pairs: dict[str, int]  # "train/val", "train/test", "val/test" -> shared hashes
    shared: int  # distinct hashes present in two or more splits: must be 0
    between_hospitals: int  # hashes in two hospitals' training shards (not a split leak)
    stale_hashes: int  # rows whose stored sha256 differs from the bytes (corrupt shard)
    recorded: dict[str, int]  # what data/leakage.json said at preparation time


def split_files(shards: ShardSet) -> dict[str, list[str]]:
    """Train is the union of the hospital shards; local validation slices are part of val."""
    out = {"train": [shards.hospitals[h] for h in sorted(shards.hospitals)]}
    if shards.val:
        out["val"] = [shards.val]
    out["test"] = [shards.test]
    return out


def _file_hashes(path: Path) -> tuple[list[str], int]:
    """sha256 of each stored image and how many disagree with the shard's own sha256 column."""
    table = pq.read_table(path, columns=["sha256", "image"])
    digests = [hashlib.sha256(b).hexdigest() for b in table.column("image").to_pylist()]
    stale = sum(a != b for a, b in zip(digests, table.column("sha256").to_pylist()))
    return digests, stale


def leakage_check(shards: ShardSet) -> Leakage:
    """Recompute hashes from the shard bytes: leakage.json describes the data as prepared, this
    describes it as it is now (shards can be edited, merged or copied after preparation)."""
    per_split: dict[str, set[str]] = {}
    per_hospital: list[set[str]] = []
    stale = 0
    for split, files in split_files(shards).items():
        digests: set[str] = set()
        for file in files:
            values, bad = _file_hashes(shards.path(file))
            stale += bad
            digests.update(values)
            if split == "train":
                per_hospital.append(set(values))
        per_split[split] = digests
    names = list(per_split)
    pairs = {f"{a}/{b}": len(per_split[a] & per_split[b])
             for i, a in enumerate(names) for b in names[i + 1:]}
    seen: dict[str, int] = {}
    for digests in per_split.values():
        for d in digests:
            seen[d] = seen.get(d, 0) + 1
    hospital_seen: dict[str, int] = {}
    for digests in per_hospital:
        for d in digests:
            hospital_seen[d] = hospital_seen.get(d, 0) + 1
    recorded_path = shards.root / "leakage.json"
    recorded = (json.loads(recorded_path.read_text()).get("spanning_splits", {})
                if recorded_path.is_file() else {})
    return Leakage(pairs, sum(1 for n in seen.values() if n > 1),
                   sum(1 for n in hospital_seen.values() if n > 1), stale, recorded)


def _mean_rgb(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per-image mean R, G, B in [0, 1] at native resolution, and the class indices."""
    table = pq.read_table(path, columns=["label", "image"])
    features = []
    for blob in table.column("image").to_pylist():
        with Image.open(io.BytesIO(blob)) as img:
            features.append(np.asarray(img.convert("RGB"), dtype=np.float32).mean((0, 1)) / 255)
    labels = np.array([CLASS_INDEX[x] for x in table.column("label").to_pylist()])
    return np.array(features).reshape(-1, 3), labels


def mean_colour_baseline(shards: ShardSet) -> dict[str, float]:
    """Logistic regression on mean RGB, pooled hospital training shards -> test.

    Why: stain colour differs between slides and labs; if three numbers per image classify as
    well as the network, the network may be reading the stain (a shortcut), not the cells.
    Pooling is fine here: it is an offline diagnostic, not part of the federated training.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    parts = [_mean_rgb(shards.path(f)) for f in split_files(shards)["train"]]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    x_test, y_test = _mean_rgb(shards.path(shards.test))
    if len(np.unique(y_train)) < 2:
        pred = np.full(len(y_test), y_train[0] if len(y_train) else 0)
    else:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        pred = clf.fit(x_train, y_train).predict(x_test)
    return {"accuracy": float((pred == y_test).mean()) if len(y_test) else 0.0,
            "balanced_accuracy": _balanced_accuracy(y_test, pred), "n_train": int(len(y_train)),
            "n_test": int(len(y_test))}


def shortcut_flag(model_bacc: float, baseline_bacc: float, margin: float = SHORTCUT_MARGIN) -> bool:
    """True when the model is not at least `margin` balanced accuracy above the baseline."""
    return not model_bacc >= baseline_bacc + margin - 1e-12


@dataclass
class CrossSite:
    """Rows: the global model then each hospital's local model; columns: validation sets."""

    rows: list[str]
    columns: list[str]
    accuracy: np.ndarray  # (rows, columns), NaN where a model or a set is missing
    balanced_accuracy: np.ndarray
    sizes: list[int]  # images per column: a 4-image slice makes a noisy cell

    @property
    def labels(self) -> list[str]:
        return [f"{c} (n={n})" for c, n in zip(self.columns, self.sizes)]


def cross_site_matrix(run: Run, ev: Evaluator) -> CrossSite:
    """How each model does on every hospital's own validation slice and on the global val.

    Why: a global accuracy can hide a hospital whose data the federation does not serve, and a
    local model that beats the global one at home but fails elsewhere shows non-IID drift.
    """
    columns = [h for h in run.hospitals if h in run.shards.local_val]
    files = [run.shards.local_val[h] for h in columns]
    if run.shards.val:
        columns, files = [*columns, "global val"], [*files, run.shards.val]
    weights = {"global": run_weights(run.dir)}
    for h in run.hospitals:
        weights[f"local {h}"] = hospital_dir(run.dir, h) / LOCAL_MODEL
    rows = list(weights)
    sizes = [len(ev.dataset(f)) for f in files]
    acc = np.full((len(rows), len(columns)), np.nan)
    bacc = acc.copy()
    for i, path in enumerate(weights.values()):
        if not Path(path).is_file():
            continue
        model = ev.model(Path(path))
        for j, file in enumerate(files):
            pred = ev.predict(model, file)
            labels = pred.probs.argmax(1)
            acc[i, j] = float((labels == pred.labels).mean())
            bacc[i, j] = _balanced_accuracy(pred.labels, labels)
    return CrossSite(rows, columns, acc, bacc, sizes)
