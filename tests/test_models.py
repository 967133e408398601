"""Tests for fedray.models: every backbone builds, gives logits, and survives one DP-SGD step.

Inputs are the smallest legal size (32 px, inception 75 px) and batches of 2, so the whole
file stays cheap on a shared 2-core machine; plain models are built once and cached.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pickle
import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import fedray.models as models
from fedray.models import BACKBONES, ModelError, available_backbones, backbone_spec, build_model

NAMES = available_backbones()
HAS_TIMM = models._timm() is not None
ALL_NAMES = {
    "smallcnn", "resnet18", "resnet50", "resnet101", "vgg16", "vgg19", "densenet121",
    "inception_v3", "efficientnet_b0", "mobilenet_v2", "mobilenet_v3_small", "xception",
}

# Opacus's expected chatter: no secure RNG in tests; the stem's hook fires on outputs only.
pytestmark = pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook is firing")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Run this module's tiny-tensor work on one thread, then restore the setting.

    On a shared 2-core box, OpenMP threads spin-waiting on each other made these tests ~4x
    slower (105 s vs 27 s measured); batches of 2 at 32 px gain nothing from a second thread.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _size(name: str) -> int:
    """Smallest input the tests use: cheap, but legal for the architecture."""
    return max(BACKBONES[name].min_input_size, 32)


@functools.cache
def _plain(name: str) -> nn.Module:
    """One seeded plain (non-DP) build per backbone, shared by the read-only tests."""
    torch.manual_seed(0)
    return build_model(name)


def _has_inplace(model: nn.Module) -> bool:
    return any(getattr(m, "inplace", False) is True for m in model.modules())


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# ---------------------------------------------------------------- registry


def test_registry_lists_every_backbone() -> None:
    assert set(BACKBONES) == ALL_NAMES
    assert set(NAMES) == ALL_NAMES - (set() if HAS_TIMM else {"xception"})
    for name, spec in BACKBONES.items():
        assert spec.name == name
        assert spec.source in {"torchvision", "timm", "fedray"}
        assert spec.min_input_size <= spec.input_size


@pytest.mark.parametrize("name", [n for n in NAMES if BACKBONES[n].source == "torchvision"])
def test_torchvision_weights_file_and_min_size_come_from_the_weights_enum(name: str) -> None:
    spec = BACKBONES[name]
    weights = torchvision.models.get_model_weights(spec.arch).DEFAULT
    assert spec.weights_url == weights.url
    assert spec.weights_file == Path(weights.url).name
    assert spec.min_input_size >= max(weights.meta["min_size"])


def test_input_sizes() -> None:
    assert BACKBONES["inception_v3"].input_size == 299 and BACKBONES["inception_v3"].min_input_size == 75
    assert BACKBONES["smallcnn"].input_size == 64 and BACKBONES["smallcnn"].min_input_size == 16
    assert BACKBONES["resnet50"].weights_file == "resnet50-11ad3fa6.pth"


def test_xception_needs_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_timm", lambda: None)
    assert "xception" not in available_backbones()
    with pytest.raises(ModelError, match="timm"):
        build_model("xception")


# ---------------------------------------------------------------- plain models


@pytest.mark.parametrize("name", NAMES)
def test_forward_gives_logits_and_target_layer_is_a_feature_map(name: str) -> None:
    model, size = _plain(name), _size(name)
    seen: list[torch.Tensor] = []
    hook = model.get_submodule(BACKBONES[name].target_layer).register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        model.train()
        logits = model(torch.randn(2, 3, size, size))
        model.eval()
        with torch.no_grad():
            eval_logits = model(torch.randn(2, 3, size, size))
    finally:
        hook.remove()
        model.train()
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 4)
    assert eval_logits.shape == (2, 4) and torch.isfinite(eval_logits).all()
    assert seen[0].dim() == 4 and seen[0].shape[0] == 2


@pytest.mark.parametrize("name", NAMES)
def test_head_is_dropout_plus_xavier_linear(name: str) -> None:
    head = _plain(name).get_submodule(BACKBONES[name].head)
    assert isinstance(head, nn.Sequential) and len(head) == 2
    dropout, fc = head
    assert isinstance(dropout, nn.Dropout) and dropout.p == 0.2 and not dropout.inplace
    assert isinstance(fc, nn.Linear) and fc.out_features == 4
    assert torch.count_nonzero(fc.bias) == 0
    bound = math.sqrt(6.0 / (fc.in_features + fc.out_features))  # xavier_uniform range
    assert fc.weight.abs().max() <= bound
    assert fc.weight.abs().max() > 0.5 * bound


def test_num_classes_and_dropout_are_honoured() -> None:
    model = build_model("smallcnn", num_classes=2, dropout=0.5)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 2)
    assert model.classifier[0].p == 0.5


@pytest.mark.parametrize("kwargs", [dict(num_classes=0), dict(num_classes=2.0), dict(dropout=1.0), dict(dropout=-0.1)])
def test_bad_arguments_raise_model_error(kwargs: dict) -> None:
    with pytest.raises(ModelError):
        build_model("smallcnn", **kwargs)


def test_smallcnn_is_small() -> None:
    n_params = sum(p.numel() for p in _plain("smallcnn").parameters())
    assert 100_000 < n_params < 1_000_000


def test_unknown_backbone_lists_known_names() -> None:
    with pytest.raises(ModelError) as info:
        build_model("resnet9000")
    assert "resnet9000" in str(info.value)
    for name in BACKBONES:
        assert name in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["smallcnn", "resnet18", "efficientnet_b0", "mobilenet_v3_small"])
def test_same_seed_builds_identical_weights(name: str) -> None:
    def build(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return build_model(name).state_dict()

    first, second, other = build(7), build(7), build(8)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


# ---------------------------------------------------------------- freezing


@pytest.mark.parametrize("name", NAMES)
def test_trainable_prefixes_name_the_last_stage_and_head(name: str) -> None:
    spec = BACKBONES[name]
    names = [n for n, _ in _plain(name).named_parameters()]
    for prefix in spec.trainable:  # every prefix names real parameters
        assert any(_matches(n, (prefix,)) for n in names), prefix
    assert _matches(f"{spec.head}.1.weight", spec.trainable)
    assert not _matches(names[0], spec.trainable)  # the stem is frozen
    frozen = sum(not _matches(n, spec.trainable) for n in names)
    assert frozen > len(names) // 2, "freeze should freeze the early stages, most of the network"


# The big ones (vgg, inception, resnet101) only cost build time here; their prefixes are checked above.
@pytest.mark.parametrize("name", [n for n in NAMES if n in {
    "smallcnn", "resnet18", "resnet50", "densenet121", "efficientnet_b0", "mobilenet_v2", "mobilenet_v3_small", "xception"}])
def test_freeze_leaves_only_last_stage_and_head_trainable(name: str) -> None:
    spec = BACKBONES[name]
    model = build_model(name, freeze=True, dp_safe=True)  # GroupNorm must be frozen too
    for n, p in model.named_parameters():
        assert p.requires_grad == _matches(n, spec.trainable), n
    assert all(p.requires_grad for p in model.get_submodule(spec.head).parameters())


# ---------------------------------------------------------------- pretrained weights


def test_missing_weights_file_names_path_and_url(tmp_path: Path) -> None:
    spec = BACKBONES["resnet18"]
    with pytest.raises(ModelError) as info:
        build_model("resnet18", pretrained=True, weights_dir=tmp_path)
    assert str(tmp_path / spec.weights_file) in str(info.value)
    assert spec.weights_url in str(info.value)


def test_default_weights_dir_is_torch_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    with pytest.raises(ModelError, match=str(tmp_path / "hub" / "checkpoints" / BACKBONES["vgg16"].weights_file)):
        build_model("vgg16", pretrained=True)


def test_smallcnn_has_no_pretrained_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no pretrained weights"):
        build_model("smallcnn", pretrained=True, weights_dir=tmp_path)


def test_wrong_weights_file_is_rejected(tmp_path: Path) -> None:
    torch.save(build_model("smallcnn").state_dict(), tmp_path / BACKBONES["resnet18"].weights_file)
    with pytest.raises(ModelError, match="lacks"):
        build_model("resnet18", pretrained=True, weights_dir=tmp_path)


def _library_state_dict(name: str) -> dict[str, torch.Tensor]:
    """A random state_dict shaped like the published checkpoint (1000-class head, aux branch)."""
    spec = BACKBONES[name]
    if spec.source == "timm":
        return models._timm().create_model(spec.arch, pretrained=False).state_dict()
    kwargs = dict(aux_logits=True, init_weights=False) if name == "inception_v3" else {}
    return torchvision.models.get_model(spec.arch, weights=None, **kwargs).state_dict()


def _old_densenet_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename 'denselayer1.norm1.weight' to the published checkpoint's 'denselayer1.norm.1.weight'."""
    return {re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()}


PRETRAINED = ["resnet18", "densenet121", "inception_v3", "mobilenet_v3_small"] + (["xception"] if HAS_TIMM else [])


@pytest.mark.parametrize("name", PRETRAINED)
def test_pretrained_weights_load_from_local_file(name: str, tmp_path: Path) -> None:
    spec = backbone_spec(name)
    torch.manual_seed(1)
    source = _library_state_dict(name)
    on_disk = _old_densenet_keys(source) if name == "densenet121" else source
    assert name != "densenet121" or any(".norm.1." in k for k in on_disk)
    torch.save(on_disk, tmp_path / spec.weights_file)
    loaded = build_model(name, pretrained=True, weights_dir=tmp_path).state_dict()
    backbone_keys = [k for k in loaded if not k.startswith(spec.head + ".")]
    assert backbone_keys and all(torch.equal(loaded[k], source[k]) for k in backbone_keys)


def test_pretrained_weights_survive_dp_conversion(tmp_path: Path) -> None:
    torch.manual_seed(2)
    source = torchvision.models.resnet18(weights=None).state_dict()
    with torch.no_grad():  # make BN affine weights distinguishable from GroupNorm's defaults
        for k in source:
            if k.endswith((".weight", ".bias")) and (k.startswith("bn1.") or ".bn" in k):
                source[k].uniform_(0.5, 1.5)
    torch.save(source, tmp_path / BACKBONES["resnet18"].weights_file)
    model = build_model("resnet18", pretrained=True, dp_safe=True, weights_dir=tmp_path)
    assert isinstance(model.layer1[0].bn1, nn.GroupNorm)
    for k, v in model.state_dict().items():
        if not k.startswith("fc."):
            assert torch.equal(v, source[k]), k


def test_pretrained_weights_load_from_hugging_face_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    hf_constants = pytest.importorskip("huggingface_hub.constants")
    repo = tmp_path / "models--timm--fake_net"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    torch.manual_seed(3)
    source = models.SmallCNN().state_dict()
    safetensors.save_file(source, str(repo / "snapshots" / "abc123" / "model.safetensors"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    spec = dataclasses.replace(BACKBONES["smallcnn"], hf_hub_id="timm/fake_net")
    monkeypatch.setitem(models.BACKBONES, "smallcnn", spec)
    loaded = build_model("smallcnn", pretrained=True).state_dict()
    assert all(torch.equal(loaded[k], source[k]) for k in loaded if k.startswith("features."))


# ---------------------------------------------------------------- differential privacy


def _one_dp_sgd_step(model: nn.Module, size: int) -> None:
    """One DP-SGD step as hospitals take it (fedray.privacy, the config's default grad-sample
    mode); asserts every trainable parameter moved (clipped grad + noise)."""
    from fedray import privacy
    from fedray.config import PrivacyConfig

    data = TensorDataset(torch.randn(4, 3, size, size), torch.randint(0, 4, (4,)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    settings = privacy.PrivacySettings(
        noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, budget=None, sample_rate=0.5,
        accountant="rdp", poisson_sampling=False, secure_mode=False,
        grad_sample_mode=PrivacyConfig().grad_sample_mode)
    loss_fn = nn.CrossEntropyLoss()
    private = privacy.make_private(model, optimizer, DataLoader(data, batch_size=2), settings, loss_fn)
    before = [p.detach().clone() for p in trainable]
    x, y = next(iter(private.loader))
    loss = (private.loss_fn or loss_fn)(private.model(x), y)
    loss.backward()
    private.optimizer.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, trainable))


@pytest.mark.parametrize("name", NAMES)
def test_dp_safe_model_passes_opacus_and_takes_a_dp_sgd_step(name: str) -> None:
    from opacus.validators import ModuleValidator

    torch.manual_seed(0)
    model = build_model(name, dp_safe=True)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not _has_batchnorm(model)
    assert not _has_inplace(model)
    model.get_submodule(BACKBONES[name].target_layer)  # Grad-CAM layer survives the conversion
    # Same parameter names as the plain model: only BN running statistics are gone.
    plain_keys = {k for k in _plain(name).state_dict() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert set(model.state_dict()) == plain_keys
    _one_dp_sgd_step(model, _size(name))


def test_frozen_dp_model_takes_a_dp_sgd_step() -> None:
    torch.manual_seed(0)
    _one_dp_sgd_step(build_model("resnet18", dp_safe=True, freeze=True), 32)


def test_dp_safe_model_pickles() -> None:
    """Ray ships models by pickling; the DP-safe block classes must be importable."""
    model = build_model("mobilenet_v3_small", dp_safe=True).eval()
    clone = pickle.loads(pickle.dumps(model))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), clone(x))
