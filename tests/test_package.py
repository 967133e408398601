"""Model packages: export round trip, card contents, and refusal of tampered or incomplete ones."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import local_coordinator
from fedray import cli
from fedray.config import load_config
from fedray.data.shards import ShardSet
from fedray.artifacts.package import (
    REQUIRED_FIELDS,
    PackageError,
    _card_digest,
    config_hash,
    export_package,
    freeze_for_cpu,
    load_package,
    sha256_file,
    verify_package,
)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, shard_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    coordinator = local_coordinator(run_dir, shard_dir, **{"federation.rounds": 2})
    (run_dir / "config.yaml").write_text(coordinator.config.to_yaml())
    while coordinator.run_round() is not None:
        pass
    coordinator.finish()
    # A run made by `fedray train` keeps its shards (validation split included) in run/data.
    shutil.copytree(shard_dir, run_dir / "data")
    return run_dir


@pytest.fixture(scope="module")
def package(tmp_path_factory, trained_run) -> Path:
    return export_package(trained_run, tmp_path_factory.mktemp("out") / "pkg", name="smear", version="7")


def _fresh_copy(package: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(package, copy)
    return copy


def _test_images(shard_dir: Path, n: int = 12) -> list[np.ndarray]:
    from fedray.data.shards import decode_image
    import pyarrow.parquet as pq

    table = pq.read_table(ShardSet.load(shard_dir).path("test.parquet")).slice(0, n)
    return [decode_image(b, 32) for b in table.column("image").to_pylist()]


def test_package_predicts_like_the_run_model(trained_run, package, shard_dir):
    from fedray.explain import load_model

    images = _test_images(shard_dir)
    run_model = load_model(trained_run)  # the run folder, as evaluate/explain read it
    pkg = load_package(package)
    batch = pkg.preprocess(images)
    expected = torch.softmax(run_model.model(batch), dim=1)
    assert torch.allclose(pkg.predict_proba(batch), expected, atol=1e-6)
    scripted = load_package(package, runtime="torchscript")
    assert torch.allclose(scripted.predict_proba(batch), expected, atol=1e-4)
    assert pkg.card["torchscript"]["max_abs_diff"] <= 1e-4


def test_frozen_cpu_graph_scores_like_the_eager_model(package, shard_dir):
    """freeze_for_cpu (what the service runs on CPU) gives the eager model's probabilities and
    OOD scores at any batch size, and keeps the eager module for explanations."""
    eager = load_package(package)
    frozen = freeze_for_cpu(eager)
    assert frozen.frozen and not eager.frozen
    assert isinstance(frozen.model, torch.jit.ScriptModule)
    assert frozen.eager_model() is eager.model and frozen.runtime == "pytorch"
    images = _test_images(shard_dir)
    for n in (1, 5, len(images)):
        batch = eager.preprocess(images[:n])
        (p_eager, s_eager), (p_frozen, s_frozen) = eager.score(batch), frozen.score(batch)
        assert p_frozen.shape == (n, len(eager.classes))
        assert torch.allclose(p_frozen, p_eager, atol=1e-4)
        assert (s_eager is None) == (s_frozen is None)
        if s_eager is not None:
            assert torch.allclose(s_frozen, s_eager, rtol=1e-4, atol=1e-4)
    assert freeze_for_cpu(frozen) is frozen  # already frozen
    scripted = load_package(package, runtime="torchscript")
    assert freeze_for_cpu(scripted) is scripted  # a TorchScript package is served as it is


def test_preprocess_matches_the_training_eval_transform(package, shard_dir):
    from fedray.data.transforms import eval_preset

    images = _test_images(shard_dir, 3)
    pkg = load_package(package)
    reference = torch.stack([eval_preset(32)(torch.from_numpy(im.copy()).permute(2, 0, 1)) for im in images])
    batch = pkg.preprocess(images)
    assert torch.allclose(batch, reference, atol=1e-6)
    # The memory layout the model trained on: a channels_last batch makes each convolution
    # copy its input first (2-4x slower per forward pass on CPU).
    assert batch.is_contiguous()
    big = np.kron(images[0], np.ones((3, 3, 1), dtype=np.uint8))  # 96 px: resized on the way in
    assert pkg.preprocess([big]).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="image 0"):
        pkg.preprocess([images[0][..., 0]])


@pytest.mark.parametrize("side", [20, 50, 96])
def test_training_and_serving_preprocess_agree_at_other_sizes(package, side):
    """One recipe: the same PNG, at a size other than the model's, becomes the same tensor
    through the shard decoder (training) and through the package (serving)."""
    import io

    import pyarrow as pa
    from PIL import Image

    from fedray.data.decode import open_rgb
    from fedray.data.shards import ShardDataset
    from fedray.data.transforms import eval_preset

    rng = np.random.default_rng(side)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side + 7, 3), dtype=np.uint8)).save(buffer, "PNG")
    table = pa.table({"path": ["x.png"], "label": ["Pre"], "group": ["p"], "sha256": ["h"],
                      "image": [buffer.getvalue()]})
    trained = ShardDataset.from_table(table, 32, eval_preset(32))[0][0]
    served = load_package(package).preprocess([np.asarray(open_rgb(buffer.getvalue()))])[0]
    assert torch.allclose(trained, served.cpu(), atol=1e-6)


def test_card_describes_the_run(trained_run, package):
    card = verify_package(package)
    final = json.loads((trained_run / "metrics.json").read_text())
    assert card["name"] == "smear" and card["version"] == "7"
    assert card["model"]["backbone"] == "smallcnn"
    assert card["model"]["classes"] == ["Benign", "Early", "Pre", "Pro"]
    assert card["input"]["image_size"] == 32
    assert card["metrics"]["test"] == final["test"]
    assert card["training"]["best_round"] == final["best_round"]
    assert card["config_sha256"] == config_hash(load_config(trained_run / "config.yaml"))
    assert set(card["data"]) >= {"hospital_a", "hospital_b", "test"}
    assert card["files"]["model.safetensors"]["sha256"] == sha256_file(package / "model.safetensors")
    markdown = (package / "card.md").read_text()
    assert "| hospital_a |" in markdown and card["files"]["model.safetensors"]["sha256"] in markdown


def test_dp_run_card_reports_epsilon(tmp_path, shard_dir):
    run_dir = tmp_path / "dp"
    coordinator = local_coordinator(run_dir, shard_dir, **{
        "privacy.enabled": True, "privacy.noise_multiplier": 1.0, "model.dp_safe": True})
    (run_dir / "config.yaml").write_text(coordinator.config.to_yaml())
    while coordinator.run_round() is not None:
        pass
    coordinator.finish()
    card = verify_package(export_package(run_dir, tmp_path / "pkg", formats=()))
    eps = card["training"]["epsilon"]
    assert set(eps) == {"hospital_a", "hospital_b"} and all(e > 0 for e in eps.values())
    assert "model.ts" not in card["files"]


@pytest.mark.parametrize("damage, culprit", [
    ("flip_weights", "model.safetensors"),
    ("truncate_weights", "model.safetensors"),
    ("remove_script", "model.ts"),
    ("edit_card", "card.json"),
    ("remove_card", "card.json"),
    ("edit_config", "config.yaml"),
    ("edit_markdown", "card.md"),
])
def test_tampered_or_incomplete_package_is_refused(package, tmp_path, damage, culprit):
    copy = _fresh_copy(package, tmp_path)
    if damage == "flip_weights":
        data = bytearray((copy / "model.safetensors").read_bytes())
        data[-5] ^= 0xFF
        (copy / "model.safetensors").write_bytes(bytes(data))
    elif damage == "truncate_weights":
        data = (copy / "model.safetensors").read_bytes()
        (copy / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "remove_script":
        (copy / "model.ts").unlink()
    elif damage == "edit_card":
        card = json.loads((copy / "card.json").read_text())
        card["model"]["classes"] = ["Pro", "Pre", "Early", "Benign"]
        (copy / "card.json").write_text(json.dumps(card))
    elif damage == "remove_card":
        (copy / "card.json").unlink()
    elif damage == "edit_config":
        with open(copy / "config.yaml", "a") as fh:
            fh.write("# edited\n")
    elif damage == "edit_markdown":
        text = (copy / "card.md").read_text()
        (copy / "card.md").write_text(text.replace("Benign", "Malignant"))
    with pytest.raises(PackageError, match=culprit):
        load_package(copy)
    assert cli.main(["verify", str(copy)]) == 2


def test_load_by_file_uri_and_explain_reads_packages(package):
    from fedray.explain import load_model

    pkg = load_package(f"file://{package}")
    assert pkg.model_hash == verify_package(package)["files"]["model.safetensors"]["sha256"]
    loaded = load_model(package)
    assert loaded.backbone == "smallcnn" and loaded.image_size == 32


def test_remote_packages_and_runs_are_downloaded_then_deleted(trained_run, package, tmp_path,
                                                              monkeypatch):
    import gc
    import tempfile

    import pyarrow.fs as pafs

    from fedray.artifacts import package as packages

    def bucket_filesystem(uri: str):  # s3://bucket/... served from a local folder
        assert uri.startswith("s3://bucket/"), uri
        return pafs.LocalFileSystem(), str(bucket / uri.removeprefix("s3://bucket/"))

    bucket, downloads = tmp_path / "bucket", tmp_path / "downloads"
    downloads.mkdir()
    shutil.copytree(package, bucket / "models" / "pkg")
    shutil.copytree(trained_run, bucket / "sweep" / "trial_0" / "run")
    (bucket / "sweep" / "best.json").write_text(json.dumps(
        {"run_dir": "s3://bucket/sweep/trial_0/run"}))
    monkeypatch.setattr(packages, "_filesystem", bucket_filesystem)
    monkeypatch.setattr(tempfile, "tempdir", str(downloads))

    assert verify_package("s3://bucket/models/pkg")["name"] == "smear"
    assert not any(downloads.iterdir())  # verified, then deleted
    pkg = load_package("s3://bucket/models/pkg", runtime="torchscript")
    assert pkg.path.name == "pkg" and pkg.path.is_relative_to(downloads)
    assert pkg.eager_model() is not None  # reads the download again: kept while pkg lives
    del pkg
    gc.collect()
    assert not any(downloads.iterdir())
    (bucket / "models" / "pkg" / "config.yaml").write_text("edited: true\n")
    with pytest.raises(PackageError, match="config.yaml: SHA-256 differs"):
        load_package("s3://bucket/models/pkg")
    assert not any(downloads.iterdir())  # refused, and deleted all the same

    card = verify_package(export_package("s3://bucket/sweep", tmp_path / "best", formats=()))
    assert card["source_run"] == "run" and "hospital_a" in card["data"]
    assert not any(downloads.iterdir())  # only the best run was fetched, and it is gone


def test_export_errors_name_what_is_wrong(trained_run, package, tmp_path):
    with pytest.raises(PackageError, match="not empty"):
        export_package(trained_run, package)
    with pytest.raises(PackageError, match="not a run folder"):
        export_package(tmp_path, tmp_path / "pkg")
    with pytest.raises(PackageError, match="format"):
        export_package(trained_run, tmp_path / "pkg", formats=("onnx",))
    assert not (tmp_path / "pkg").exists()


def test_sweep_folder_exports_its_best_trial(trained_run, tmp_path):
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "best.json").write_text(json.dumps({"run_dir": str(trained_run)}))
    folder = export_package(sweep, tmp_path / "best", formats=())
    assert verify_package(folder)["source_run"] == trained_run.name


def test_cli_export_and_verify(trained_run, tmp_path, capsys):
    out = tmp_path / "cli-pkg"
    assert cli.main(["export", str(trained_run), "--output", str(out), "--format", "none"]) == 0
    assert cli.main(["verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    assert cli.main(["export", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 2


# --------------------------------------------------------------------------- out of distribution


def _odd_images(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"white": np.full((32, 32, 3), 255, np.uint8), "black": np.zeros((32, 32, 3), np.uint8),
            "gray": np.full((32, 32, 3), 128, np.uint8),
            "noise": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            "noise 2": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)}


def test_card_states_the_ood_threshold_and_its_false_abstain_rate(package, shard_dir):
    from fedray.data.shards import ShardDataset
    from fedray.data.transforms import eval_preset
    from fedray.artifacts.package import ood_scores

    card = verify_package(package)
    ood = card["ood"]
    assert ood["score"] == "feature_distance" and ood["quantile"] == 0.99
    assert "ood.safetensors" in card["files"] and ood["file"] == "ood.safetensors"
    # Recomputed from outside: the validation split's scores, the quantile, the share beyond.
    shards = ShardSet.load(shard_dir)
    val = ShardDataset.from_parquet(shards.path(shards.val), 32, eval_preset(32))
    pkg = load_package(package)
    _, scores = pkg.score(torch.stack([val[i][0] for i in range(len(val))]))
    scores = scores.numpy()
    assert ood["validation_images"] == len(val)
    assert ood["threshold"] == pytest.approx(np.quantile(scores, 0.99, method="higher"), abs=1e-5)
    assert ood["false_abstain_rate"] == pytest.approx(np.mean(scores > ood["threshold"]))
    assert ood["false_abstain_rate"] <= 0.02
    assert f"{ood['threshold']:.4f}" in (package / "card.md").read_text()
    centroids = pkg.centroids
    assert centroids.shape[0] == len(ood["classes"]) == 4
    assert torch.allclose(ood_scores(torch.eye(centroids.shape[1])[:1] * 5, centroids),
                          ood_scores(torch.eye(centroids.shape[1])[:1], centroids))


def test_blank_and_noise_images_score_beyond_the_threshold(package, shard_dir):
    odd = _odd_images()
    normal = _test_images(shard_dir, 12)
    for runtime in ("pytorch", "torchscript"):
        pkg = load_package(package, runtime=runtime)
        _, scores = pkg.score(pkg.preprocess(list(odd.values())))
        beyond = dict(zip(odd, (scores > pkg.ood_threshold).tolist()))
        assert all(beyond.values()), (runtime, beyond, scores, pkg.ood_threshold)
        _, held_out = pkg.score(pkg.preprocess(normal))
        assert float((held_out > pkg.ood_threshold).float().mean()) <= 0.5, held_out


def test_a_run_without_a_validation_split_exports_a_package_that_never_abstains(trained_run,
                                                                               tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("data"))
    card = verify_package(export_package(run, tmp_path / "pkg", formats=()))
    assert card["ood"]["threshold"] is None and "no validation split" in card["ood"]["note"]
    assert load_package(tmp_path / "pkg").ood_threshold is None
    with pytest.raises(PackageError, match="ood_quantile"):
        export_package(run, tmp_path / "pkg2", ood_quantile=1.5)


# --------------------------------------------------------------------------- verify hardening


def _rewrite_card(folder: Path, edit) -> None:
    """Edit card.json and re-hash it: a card that passes the digest, so only the check under
    test can refuse it."""
    card = json.loads((folder / "card.json").read_text())
    edit(card)
    card["card_sha256"] = _card_digest(card)
    (folder / "card.json").write_text(json.dumps(card))


@pytest.mark.parametrize("name, message", [
    ("../outside.bin", "contains '..'"),
    ("sub/../../outside.bin", "contains '..'"),
    ("/etc/hostname", "absolute path"),
    ("C:\\Windows\\win.ini", "absolute path"),
])
def test_verify_refuses_card_file_names_outside_the_package(package, tmp_path, name, message):
    copy = _fresh_copy(package, tmp_path)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"not part of the package")
    meta = {"sha256": sha256_file(outside), "bytes": outside.stat().st_size}
    _rewrite_card(copy, lambda card: card["files"].__setitem__(name, meta))
    with pytest.raises(PackageError, match=f"card.json: file name .*{message}"):
        verify_package(copy)
    assert cli.main(["verify", str(copy)]) == 2


def test_verify_refuses_symlinks(package, tmp_path):
    copy = _fresh_copy(package, tmp_path)
    real = tmp_path / "weights.real"
    shutil.move(copy / "model.safetensors", real)
    (copy / "model.safetensors").symlink_to(real)  # same bytes, same hash: only the link is wrong
    with pytest.raises(PackageError, match="model.safetensors: a symlink"):
        verify_package(copy)
    unlisted = _fresh_copy(package, tmp_path / "second")
    (unlisted / "notes.txt").symlink_to("/etc/hostname")
    with pytest.raises(PackageError, match="notes.txt: a symlink"):
        load_package(unlisted)


@pytest.mark.parametrize("dotted", [f for f, _ in REQUIRED_FIELDS if f != "card_sha256"])
def test_verify_names_a_missing_card_field(package, tmp_path, dotted):
    copy = _fresh_copy(package, tmp_path)

    def drop(card: dict) -> None:
        *parents, leaf = dotted.split(".")
        node = card
        for key in parents:
            node = node[key]
        del node[leaf]

    _rewrite_card(copy, drop)
    with pytest.raises(PackageError, match=f"card.json: missing field '{dotted}'"):
        verify_package(copy)


def test_verify_names_mistyped_fields(package, tmp_path):
    cases = [(lambda c: c["input"].__setitem__("image_size", "32"), "input.image_size"),
             (lambda c: c["files"]["config.yaml"].pop("sha256"), "files.config.yaml"),
             (lambda c: c["ood"].__setitem__("threshold", "high"), "ood.threshold"),
             (lambda c: c["ood"].__setitem__("file", "gone.bin"), "ood.file")]
    for i, (edit, field_name) in enumerate(cases):
        copy = _fresh_copy(package, tmp_path / str(i))
        _rewrite_card(copy, edit)
        with pytest.raises(PackageError, match=f"field '{field_name}'"):
            verify_package(copy)


def test_concurrent_passes_on_one_module_keep_their_own_features():
    """A service runs passes on one module from several threads: each pass's features are its
    own, even when another thread's pass reaches the last Linear layer while it is running."""
    import threading

    from torch import nn

    from fedray.artifacts.ood import logits_and_features

    past_linear, other_done = threading.Event(), threading.Event()

    class Gate(nn.Module):
        def forward(self, x):
            if x.shape[0] == 3:  # the first pass waits, its hook still on, past the layer
                past_linear.set()
                assert other_done.wait(10)
            return x

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2), Gate()).eval()
    out = {}

    def first():
        out["first"] = logits_and_features(model, torch.zeros(3, 4))[1]

    thread = threading.Thread(target=first)
    thread.start()
    assert past_linear.wait(10)
    out["second"] = logits_and_features(model, torch.ones(16, 4))[1]
    other_done.set()
    thread.join(10)
    assert out["first"].shape == (3, 4) and bool((out["first"] == 0).all())
    assert out["second"].shape == (16, 4) and bool((out["second"] == 1).all())
    assert not model[1]._forward_pre_hooks
