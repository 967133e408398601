"""Tests for fedray.explain: shapes and ranges, every backbone, sanity checks, files end to end.

The sanity checks follow Adebayo et al. 2018 (an explanation must change when the weights are
randomised) and the synthetic data's ground truth (the class lives in the main white cell, whose
box the generator records). They need a model that has learned something, so one smallcnn is
trained once for the module on 48 px smears (~20 s on one thread).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr
from torch import nn

from fedray.artifacts import checkpoint
from fedray.config import load_config
from fedray.data import synth
from fedray.data.labels import CLASS_INDEX
from fedray.data.shards import decode_image
from fedray.data.transforms import eval_preset
from fedray.explain import (
    METHODS,
    explain,
    explain_files,
    load_model,
    overlay,
    superpixels,
)
from fedray.federation.messages import to_numpy
from fedray.models import BACKBONES, available_backbones, build_model

SIZE = 48  # training/evaluation size of the sanity-check model
CHEAP: dict[str, dict[str, int]] = {"lime": {"n_samples": 16},
                                    "integrated_gradients": {"n_steps": 8}}

# Opacus's chatter when the dp_safe variants are built.
pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for this module, restored after: on a shared 2-core box spinning
    OpenMP threads cost more than they give for tensors this small (see test_models)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


Smears = tuple[torch.Tensor, torch.Tensor, np.ndarray]


def _smears(n: int, size: int, seed: int, patients: int) -> Smears:
    """(normalised images, labels, cell boxes) of n synthetic smears."""
    table = synth.generate(n, size=size, seed=seed, patients_per_class=patients)
    raw = np.stack([decode_image(b, size) for b in table.column("image").to_pylist()])
    images = eval_preset(size)(torch.from_numpy(raw).permute(0, 3, 1, 2).contiguous())
    labels = torch.tensor([CLASS_INDEX[c] for c in table.column("label").to_pylist()])
    return images, labels, np.asarray(table.column("cell_box").to_pylist())


@pytest.fixture(scope="module")
def held_out() -> Smears:
    """48 smears from other patients (another seed) than the training ones."""
    return _smears(48, SIZE, seed=99, patients=4)


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    """smallcnn trained 5 epochs on 600 smears: AdamW + one-cycle LR, horizontal flips.

    The one-cycle decay matters: at a constant LR the BatchNorm running statistics lag the
    weights and eval-mode accuracy swings between epochs (measured 0.56-0.94).
    """
    images, labels, _ = _smears(600, SIZE, seed=1, patients=10)
    torch.manual_seed(0)
    model = build_model("smallcnn", dropout=0.0)
    epochs, batch = 5, 32
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, 3e-3, total_steps=epochs * -(-len(labels) // batch), pct_start=0.25)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels))
        for i in range(0, len(labels), batch):
            idx = order[i : i + batch]
            x = images[idx]
            flip = torch.rand(len(idx)) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = nn.functional.cross_entropy(model(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(m._backward_pre_hooks) for m in model.modules())


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("method", METHODS)
def test_methods_return_unit_maps_and_leave_the_model_alone(method: str) -> None:
    torch.manual_seed(0)
    model = build_model("smallcnn").train()
    images = torch.randn(2, 3, 32, 32)
    before = images.clone()
    hooks = _hook_count(model)
    grads = [p.requires_grad for p in model.parameters()]

    heat = explain(model, images, method=method, backbone="smallcnn")

    assert heat.shape == (2, 32, 32) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0
    assert heat.reshape(2, -1).max(axis=1).tolist() == [1.0, 1.0]  # scaled per image
    assert model.training and all(m.training for m in model.modules())
    assert _hook_count(model) == hooks
    assert [p.requires_grad for p in model.parameters()] == grads
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(images, before) and not images.requires_grad


def test_unknown_method_and_option_are_named() -> None:
    model, images = build_model("smallcnn"), torch.randn(1, 3, 16, 16)
    with pytest.raises(ValueError, match="'occlusion'"):
        explain(model, images, method="occlusion")
    with pytest.raises(ValueError, match="n_step"):
        explain(model, images, method="integrated_gradients", n_step=4)


def test_lime_is_reproducible_for_a_seed() -> None:
    torch.manual_seed(2)
    model, images = build_model("smallcnn"), torch.randn(1, 3, 32, 32)
    first = explain(model, images, method="lime", n_samples=16)
    assert np.array_equal(first, explain(model, images, method="lime", n_samples=16))
    assert not np.array_equal(first, explain(model, images, method="lime", n_samples=16, seed=1))


def test_chunking_does_not_change_the_maps() -> None:
    """Eval mode makes each image's map independent of its batch mates."""
    torch.manual_seed(3)
    model, images = build_model("smallcnn"), torch.randn(3, 3, 32, 32)
    whole = explain(model, images, method="gradcam", backbone="smallcnn")
    one_by_one = explain(model, images, method="gradcam", backbone="smallcnn", batch_size=1)
    np.testing.assert_allclose(whole, one_by_one, atol=1e-5)


def test_explicit_targets_change_the_map() -> None:
    torch.manual_seed(1)
    model, images = build_model("smallcnn"), torch.randn(1, 3, 32, 32)
    maps = [explain(model, images, torch.tensor([c]), "saliency") for c in range(4)]
    assert not all(np.array_equal(maps[0], m) for m in maps[1:])


def _gradcam_size(name: str) -> int:
    """64 px, or twice the minimum for nets whose minimum leaves a 1x1 map (inception at 75
    px), since an upsampled 1x1 map is constant by construction."""
    return max(64, 2 * BACKBONES[name].min_input_size)


@pytest.mark.parametrize("name", available_backbones())
def test_gradcam_runs_on_every_backbone(name: str) -> None:
    size = _gradcam_size(name)
    images, _, _ = _smears(1, size, seed=3, patients=1)
    torch.manual_seed(0)
    model = build_model(name)
    heat = explain(model, images, method="gradcam", backbone=name)
    assert heat.shape == (1, size, size) and np.isfinite(heat).all()
    assert heat.max() == 1.0 and heat.std() > 0.01  # not constant


@pytest.mark.parametrize("name", ["smallcnn", "resnet18"])
def test_dp_safe_models_explain_with_every_method(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, dp_safe=True)
    images, _, _ = _smears(1, 64, seed=3, patients=1)
    for method in METHODS:
        heat = explain(model, images, method=method, backbone=name, **CHEAP.get(method, {}))
        assert heat.shape == (1, 64, 64) and np.isfinite(heat).all() and heat.std() > 0, method
    assert model.training


def test_superpixels_partition_the_image() -> None:
    images, _, _ = _smears(1, 48, seed=3, patients=1)
    for method in ("slic", "grid"):
        seg = superpixels(images[0], 64, method=method)
        assert seg.shape == (48, 48) and seg.dtype == torch.int64
        ids = seg.unique()
        assert ids.tolist() == list(range(len(ids))) and 32 <= len(ids) <= 64


# --------------------------------------------------------------------------- sanity checks


def test_trained_model_learned(trained: nn.Module, held_out: Smears) -> None:
    """Precondition of the checks below: the model reads the smears (chance is ~0.3)."""
    images, labels, _ = held_out
    with torch.no_grad():
        accuracy = (trained(images).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.7


@pytest.mark.parametrize("method", ["saliency", "gradcam"])
def test_model_randomisation_changes_the_explanation(
    method: str, trained: nn.Module, held_out: Smears
) -> None:
    """Adebayo et al. 2018: re-initialised weights must give different maps (rank corr < 0.5).

    A random net's Grad-CAM for a fixed class is often all zero (the ReLU cuts it), where rank
    correlation is undefined; those pairs are skipped, but most pairs must remain.
    """
    images, labels, _ = held_out
    torch.manual_seed(100)
    randomised = build_model("smallcnn", dropout=0.0).eval()
    ours = explain(trained, images, labels, method, backbone="smallcnn")
    theirs = explain(randomised, images, labels, method, backbone="smallcnn")
    pairs = [(a, b) for a, b in zip(ours, theirs) if a.std() > 0 and b.std() > 0]
    assert len(pairs) >= len(images) // 2
    rho = float(np.mean([spearmanr(a.ravel(), b.ravel())[0] for a, b in pairs]))
    assert rho < 0.5
    again = explain(trained, images, labels, method, backbone="smallcnn")
    assert np.array_equal(ours, again)


def test_gradcam_mass_lies_on_the_white_cell(trained: nn.Module, held_out: Smears) -> None:
    """Heat fraction inside the main cell's box (grown 10% per side) over the box's area fraction.

    Measured 2.26 on average for this model (2.5 with the exact box) against 0.97 for a
    re-initialised one; other white cells of the same class in the image legitimately draw heat.
    """
    images, labels, boxes = held_out
    heat = explain(trained, images, labels, "gradcam", backbone="smallcnn")
    ratios = []
    for h, (x0, y0, x1, y1) in zip(heat, boxes):
        dx, dy = round(0.1 * (x1 - x0)), round(0.1 * (y1 - y0))
        inside = np.zeros_like(h, dtype=bool)
        inside[max(0, y0 - dy) : y1 + dy, max(0, x0 - dx) : x1 + dx] = True
        ratios.append((h[inside].sum() / max(h.sum(), 1e-12)) / inside.mean())
    assert np.mean(ratios) > 1.5
    assert np.mean(np.asarray(ratios) > 1.0) > 0.8  # most images, not a few outliers


# --------------------------------------------------------------------------- files


def test_overlay_keeps_shape_and_changes_the_image() -> None:
    image = np.full((20, 30, 3), 128, np.uint8)
    heat = np.linspace(0, 1, 10 * 15, dtype=np.float32).reshape(10, 15)  # other size: resized
    out = overlay(image, heat)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out, image) and out.std() > 0
    with pytest.raises(ValueError):
        overlay(image.astype(np.float32), heat)


@pytest.fixture
def run_dir(tmp_path):
    """A minimal run folder: resolved config (smallcnn, 32 px) and random weights."""
    run = tmp_path / "run"
    run.mkdir()
    config = load_config(None, ["model.backbone=smallcnn", "data.image_size=32"])
    (run / "config.yaml").write_text(config.to_yaml())
    torch.manual_seed(0)
    model = build_model("smallcnn")
    checkpoint.save_weights(to_numpy(model.state_dict()), run / "model.safetensors")
    return run, model


def test_load_model_reads_a_run_folder(run_dir, tmp_path) -> None:
    run, model = run_dir
    loaded = load_model(run)
    assert (loaded.backbone, loaded.image_size, len(loaded.classes)) == ("smallcnn", 32, 4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), model.eval()(x))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        load_model(empty)
    (run / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights"):
        load_model(run)


def test_explain_files_writes_overlays_and_a_sheet(run_dir, tmp_path) -> None:
    run, _ = run_dir
    table = synth.generate(2, size=40, seed=5, patients_per_class=1)
    a = tmp_path / "a.png"
    a.write_bytes(table.column("image")[0].as_py())
    b = tmp_path / "b.jpg"  # another format and a non-square size
    Image.open(a).resize((50, 36)).save(b)
    out = tmp_path / "out"

    paths = explain_files(run, [a, b], "gradcam", out)

    assert [p.name for p in paths] == ["a_gradcam.png", "b_gradcam.png", "contact_sheet.png"]
    for path, size in zip(paths, [(40, 40), (50, 36), None]):
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
            if size is not None:
                assert img.size == size  # drawn on the original image
        assert pixels.std() > 0

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        explain_files(run, [a, bad], "gradcam", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()  # nothing written before every image was read
