from collections import OrderedDict

import numpy as np
import pytest
import torch

from fedray.artifacts import checkpoint
from fedray.metrics import classification_metrics, format_table

CLASSES = ["Benign", "Early", "Pre", "Pro"]


def test_optimizer_state_round_trips_exactly(tmp_path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 3)).sum().backward()
        opt.step()
    checkpoint.save_tree(opt.state_dict(), tmp_path / "opt")
    assert not list(tmp_path.glob("*.pt")) and (tmp_path / "opt.safetensors").is_file()
    restored = checkpoint.load_tree(tmp_path / "opt")
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(restored)
    for key, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(fresh.state_dict()["state"][key][name], value)
    assert fresh.state_dict()["param_groups"] == opt.state_dict()["param_groups"]


def test_round_checkpoints_prune_but_protect_best(tmp_path) -> None:
    w = OrderedDict(x=np.arange(4, dtype=np.float32))
    for r in range(1, 6):
        checkpoint.save_round(tmp_path, r, w, {"round": r}, keep=2, protect=2)
    assert checkpoint.completed_rounds(tmp_path) == [2, 4, 5]
    weights, state = checkpoint.load_round(tmp_path, 5)
    assert state == {"round": 5} and np.array_equal(weights["x"], w["x"])
    assert not list(tmp_path.glob(".tmp_*"))


def test_half_written_round_is_ignored(tmp_path) -> None:
    (tmp_path / "round_0007").mkdir()  # no state.json: a crash mid-write
    assert checkpoint.completed_rounds(tmp_path) == []


def test_metrics_on_known_predictions() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    probs = np.eye(4)[[0, 0, 1, 2, 2, 2, 3, 3]] * 0.9 + 0.025
    m = classification_metrics(labels, probs, CLASSES)
    assert m["accuracy"] == pytest.approx(7 / 8)
    assert m["balanced_accuracy"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    assert m["confusion_matrix"][1] == [0, 1, 1, 0]
    assert m["per_class"]["Early"]["recall"] == pytest.approx(0.5)
    assert m["per_class"]["Pre"]["precision"] == pytest.approx(2 / 3)
    assert 0 < m["kappa"] < 1 and 0.5 < m["roc_auc_macro"] <= 1
    for key in ("macro_f1", "weighted_f1", "macro_precision", "weighted_recall"):
        assert 0 < m[key] < 1


def test_perfect_and_absent_class() -> None:
    labels = np.array([0, 1, 2, 0, 1, 2])
    m = classification_metrics(labels, np.eye(4)[labels], CLASSES)
    assert m["accuracy"] == m["kappa"] == 1.0
    assert m["macro_f1"] == pytest.approx(0.75)  # an absent class scores zero, visibly
    assert m["per_class"]["Pro"]["roc_auc"] is None and m["roc_auc_macro"] == 1.0
    table = format_table({"test": m})
    assert "balanced_accuracy" in table and "1.0000" in table
