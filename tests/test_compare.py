"""Arms over the same sites, over seeds: strategies, pooled Ray Train, local-only, intervals."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedray.cli import main as cli_main
from fedray.config import load_config
from fedray.experiments.compare import seeded, t_interval, variants

from conftest import tiny_config

T_975 = {1: 12.706204736, 2: 4.302652730}  # Student t quantiles, from tables


def test_variants_differ_only_where_asked(tmp_path: Path) -> None:
    base = tiny_config(tmp_path)
    out = variants(base, ["fedavg", "fedprox"], dp=True)
    assert list(out) == ["fedavg", "fedprox", "fedavg+dp"]
    assert out["fedprox"].federation.strategy.name == "fedprox"
    dp = out["fedavg+dp"]
    assert dp.privacy.enabled and dp.model.dp_safe and dp.privacy.target_epsilon == 8.0
    assert out["fedprox"].data == base.data and out["fedprox"].training == base.training
    assert variants(base, [], dp=True, dp_epsilon=3.0)["fedavg+dp"].privacy.target_epsilon == 3.0


def test_each_arm_keeps_only_its_strategys_parameters(tmp_path: Path) -> None:
    from fedray.experiments.compare import local_config

    base = tiny_config(tmp_path, **{"federation.strategy.mu": 0.1,
                                    "federation.strategy.server_lr": 0.003})
    out = variants(base, ["fedavg", "fedprox", "fedadam"], dp=True)
    assert out["fedavg"].federation.strategy.params() == {}
    assert out["fedprox"].federation.strategy.params() == {"mu": 0.1}
    assert out["fedadam"].federation.strategy.params() == {"server_lr": 0.003}
    assert out["fedavg+dp"].federation.strategy.params() == {}
    sites = tiny_config(tmp_path, **{"data.source": "sites", "federation.hospitals": 1,
                                     "federation.strategy.mu": 0.1,
                                     "data.sites": "{a: {path: /nowhere}}"})
    assert local_config(sites, "a").federation.strategy.params() == {}


def test_seeds_keep_the_split_unless_resplit(tmp_path: Path) -> None:
    base = tiny_config(tmp_path, seed=3)
    for seed in (3, 4, 9):
        arm = seeded(base, seed)
        assert arm.seed == seed and arm.data.split.seed == 3
        assert seeded(base, seed, resplit=True).data.split.seed == seed
    pinned = load_config(base.model_dump(mode="json"), ["data.split.seed=11"])
    assert seeded(pinned, 5).data.split.seed == 11 and seeded(pinned, 5).seed == 5


@pytest.mark.parametrize("values", [[0.5, 0.7], [0.61, 0.64, 0.7]])
def test_t_interval_is_mean_plus_minus_t_s_over_root_n(values: list[float]) -> None:
    n = len(values)
    half = T_975[n - 1] * np.std(values, ddof=1) / math.sqrt(n)
    out = t_interval(values)
    assert out["mean"] == pytest.approx(np.mean(values))
    assert out["ci95"] == pytest.approx([np.mean(values) - half, np.mean(values) + half])


def test_t_interval_of_one_seed_is_the_value_and_flagged() -> None:
    assert t_interval([0.6]) == {"mean": 0.6, "ci95": [0.6, 0.6], "values": [0.6], "n": 1,
                                 "single_seed": True}


@pytest.fixture(scope="module")
def site_dirs(tmp_path_factory) -> dict[str, Path]:
    from fedray.data import synth

    out = tmp_path_factory.mktemp("sites")
    table = synth.generate_sites(n=96, size=32, seed=0, sites=2, patients_per_class=4)
    synth.write_sites(table, out)
    return {name: out / name for name in ("site_a", "site_b")}


def _check_interval(summary: dict, seeds: int) -> None:
    """The t interval by hand (ci95, or ci95_t beside a bootstrap ci95 within [0, 1])."""
    values = summary["values"]
    assert len(values) == seeds and all(0 <= v <= 1 for v in values)
    half = T_975[seeds - 1] * np.std(values, ddof=1) / math.sqrt(seeds)
    assert summary["mean"] == pytest.approx(np.mean(values))
    key = "ci95_t" if summary["interval"] == "bootstrap" else "ci95"
    assert summary[key] == pytest.approx([np.mean(values) - half, np.mean(values) + half])
    if summary["interval"] == "bootstrap":
        lo, hi = summary["ci95"]
        assert 0 <= lo <= hi <= 1


@pytest.mark.ray
def test_site_compare_arms_over_seeds(ray_session, site_dirs, tmp_path: Path) -> None:
    sets = ["name=tiny", "data.source=sites", "data.image_size=32", "federation.hospitals=2",
            "federation.rounds=1", "federation.min_clients=1", "runtime.hospital_num_cpus=1",
            "training.batch_size=16"]
    sets += [f"data.sites.{name}.path={path}" for name, path in site_dirs.items()]
    args = ["compare", "--strategies", "fedavg", "fedbn", "--local-only", "--seeds", "2",
            "--output-dir", str(tmp_path / "cmp")]
    for s in sets:
        args += ["--set", s]
    assert cli_main(args) == 0
    folder = next((tmp_path / "cmp").iterdir())
    comparison = json.loads((folder / "comparison.json").read_text())
    assert list(comparison["arms"]) == ["fedavg", "fedbn", "local-only"]
    assert comparison["privacy_total"] is None  # no DP arm: nothing spent
    assert comparison["failed"] == {}
    assert comparison["interval"].startswith("95% percentile bootstrap over seeds and test")
    assert comparison["budget"]["seeds"] == [0, 1] and comparison["budget"]["optimizer"] == "AdamW"
    assert comparison["budget"]["split_seed"] == 0  # every seed scored on the same test patients
    run_s1 = next((folder / "runs" / "fedbn").glob("*-s1-*"))
    recorded = load_config(run_s1 / "config.yaml")
    assert recorded.seed == 1 and recorded.data.split.seed == 0
    for name, arm in comparison["arms"].items():
        for key in ("test_balanced_accuracy", "worst_site_balanced_accuracy", "test_macro_f1"):
            _check_interval(arm[key], 2)
        assert set(arm["sites"]) == {"site_a", "site_b"}
        assert arm["worst_site_balanced_accuracy"]["mean"] <= max(arm["sites"].values()) + 1e-9
    local = comparison["arms"]["local-only"]
    _check_interval(local["own_site_balanced_accuracy"], 2)
    _check_interval(local["other_site_balanced_accuracy"], 2)
    by = local["by_hospital"]
    assert local["own_site_balanced_accuracy"]["mean"] == pytest.approx(
        np.mean([by["site_a"]["site_a"], by["site_b"]["site_b"]]))
    assert local["other_site_balanced_accuracy"]["mean"] == pytest.approx(
        np.mean([by["site_a"]["site_b"], by["site_b"]["site_a"]]))
    # each hospital alone trained on its own site only, and was scored at both
    for seed in (0, 1):
        for h in ("site_a", "site_b"):
            run = next((folder / "runs" / "local-only" / f"s{seed}").glob(f"local-{h}-*"))
            assert json.loads((run / "data" / "sites.json").read_text())["sites"].keys() == {h}
            assert {"site_a", "site_b", "pooled"} <= set(json.loads(
                (run / "at_sites.json").read_text()))
    for arm in comparison["arms"].values():
        assert arm["test_balanced_accuracy"]["interval"] == "bootstrap"
        assert arm["worst_site_balanced_accuracy"]["interval"] == "bootstrap"
        assert arm["roc_auc_macro"]["interval"] == "t"  # not a function of the counts
    text = (folder / "comparison.md").read_text()
    assert "| local-only |" in text and "AdamW" in text and "Student t" in text
    assert (folder / "comparison.png").stat().st_size > 0
    # the same comparison summarized again: with t intervals, then rebuilt from the runs alone
    assert cli_main(["compare", "--summarize", str(folder), "--interval", "t"]) == 0
    as_t = json.loads((folder / "comparison.json").read_text())
    assert as_t["interval"].startswith("t-based")
    for name, arm in comparison["arms"].items():
        for key in ("test_balanced_accuracy", "worst_site_balanced_accuracy"):
            assert as_t["arms"][name][key]["ci95"] == pytest.approx(arm[key]["ci95_t"])
            assert as_t["arms"][name][key]["mean"] == pytest.approx(arm[key]["mean"])
    (folder / "seeds.json").unlink()
    assert cli_main(["compare", "--summarize", str(folder)]) == 0
    rebuilt = json.loads((folder / "comparison.json").read_text())
    assert list(rebuilt["arms"]) == list(comparison["arms"])
    for name, arm in comparison["arms"].items():
        for key in ("test_balanced_accuracy", "worst_site_balanced_accuracy", "test_macro_f1"):
            assert rebuilt["arms"][name][key]["ci95"] == pytest.approx(arm[key]["ci95"])


@pytest.mark.ray
def test_non_site_config_is_divided_into_sites(ray_session, tmp_path: Path) -> None:
    """A pooled source is divided into site folders first; the pooled baseline (Ray Train,
    two data-parallel workers) then scores each site's local test split, the federation's."""
    sets = ["name=tiny", "data.synth.n=160", "data.synth.size=32",
            "data.synth.patients_per_class=6", "data.image_size=32",
            "data.partition.min_per_hospital=10", "federation.hospitals=2", "federation.rounds=1",
            "federation.min_clients=1", "runtime.hospital_num_cpus=1"]
    args = ["compare", "--strategies", "fedavg", "--centralized", "--workers", "2",
            "--output-dir", str(tmp_path / "cmp")]
    for s in sets:
        args += ["--set", s]
    assert cli_main(args) == 0
    folder = next((tmp_path / "cmp").iterdir())
    comparison = json.loads((folder / "comparison.json").read_text())
    assert list(comparison["arms"]) == ["fedavg", "centralized"] and comparison["failed"] == {}
    for arm in comparison["arms"].values():
        assert arm["test_balanced_accuracy"]["single_seed"]
    sites = comparison["budget"]["sites"]
    assert sorted(p.name for p in (folder / "sites").iterdir()) == sites and len(sites) == 2
    central = json.loads((folder / "runs" / "centralized" / "s0" / "metrics.json").read_text())
    fed = json.loads(next((folder / "runs" / "fedavg").glob("*-s0-*/metrics.json")).read_text())
    assert set(central["sites"]) == set(fed["sites"]) == set(sites)
    for h in sites:
        assert (sum(map(sum, central["sites"][h]["test"]["confusion_matrix"]))
                == sum(map(sum, fed["sites"][h]["test"]["confusion_matrix"])) > 0)
    assert central["worst_site"]["hospital"] in sites
