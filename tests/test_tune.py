"""Ray Tune sweeps: the sweep config and its errors, the placement group each trial reserves
and where its actors land, ASHA stopping a hopeless trial, resuming an interrupted sweep, and
the results table. The sweeps run tiny 2-hospital experiments on the session's local Ray."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fedray import cli
from fedray.federation import runtime
from fedray.experiments import tune as sweeps
from fedray.config import ConfigError

from conftest import run_job_script, tiny_config

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _write_base(folder: Path, **overrides: object) -> Path:
    config = tiny_config(folder, **{"runtime.hospital_num_cpus": 0.5, **overrides})
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


def _write_sweep(folder: Path, **fields: object) -> Path:
    _write_base(folder)
    sweep = {"name": "t", "base": "base.yaml", "space": {"training.lr": {"grid": [0.003, 0.01]}},
             **fields}
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


# ---------------------------------------------------------------- resources, pure

@pytest.mark.parametrize("hospitals", [2, 5])
def test_one_bundle_for_the_coordinator_then_one_per_hospital(tmp_path, hospitals) -> None:
    config = tiny_config(tmp_path, **{"federation.hospitals": hospitals,
                                      "runtime.hospital_num_cpus": 2})
    bundles = sweeps.trial_resources(config)
    assert len(bundles) == hospitals + 1
    assert bundles[0] == {"CPU": sweeps.COORDINATOR_MIN_CPUS}  # Ray refuses an empty bundle
    assert bundles[1:] == [{"CPU": 2.0}] * hospitals  # no GPU key without GPUs


def test_gpu_fractions_and_pinned_sites_go_into_the_bundles(tmp_path) -> None:
    config = tiny_config(tmp_path, **{
        "federation.hospitals": 3, "runtime.hospital_num_cpus": "null",
        "runtime.hospital_num_gpus": 0.25, "runtime.coordinator_num_cpus": 1,
        "runtime.coordinator_num_gpus": 0.5, "runtime.pin_hospitals_to_nodes": "true"})
    bundles = sweeps.trial_resources(config)
    assert bundles[0] == {"CPU": 1.0, "GPU": 0.5}
    assert bundles[1:] == [{"CPU": sweeps.HOSPITAL_CPUS, "GPU": 0.25, name: runtime.PIN_AMOUNT}
                           for name in ("hospital_a", "hospital_b", "hospital_c")]


def test_inside_a_placement_group_hospital_i_takes_bundle_i_plus_1() -> None:
    bundles = [{"CPU": 0.01}, {"CPU": 0.5}, {"CPU": 2.0, "GPU": 0.5, "site_b": 1.0}]
    placements = runtime.bundle_placements(["hospital_a", "hospital_b"], bundles)
    assert placements["hospital_a"].bundle == 1 and placements["hospital_a"].num_cpus == 0.5
    b = placements["hospital_b"]
    assert (b.bundle, b.num_cpus, b.num_gpus, b.threads, b.resources) == (
        2, 2.0, 0.5, 2, {"site_b": 1.0})
    with pytest.raises(runtime.StartupError, match="placement group of 2 bundles, but it needs 3"):
        runtime.bundle_placements(["hospital_a", "hospital_b"], bundles[:2])


def test_a_bundle_no_node_holds_is_refused_and_a_trial_beyond_the_cluster_warned() -> None:
    """Each bundle must fit some node's shape, or Tune waits forever; that the bundles fit the
    cluster together is only a warning, since an autoscaler adds nodes for waiting trials."""
    nodes = [{"CPU": 2.0}, {"CPU": 2.0, "GPU": 1.0}]
    fits = [{"CPU": 0.01}, {"CPU": 2.0}, {"CPU": 1.5}]
    assert sweeps.unplaceable_trial(fits, nodes) is None
    assert sweeps.trial_outgrows_cluster(fits, nodes) is None
    too_big = sweeps.unplaceable_trial([{"CPU": 0.01}, {"CPU": 3.0}], nodes)
    assert "hospital_a asks one node for {CPU: 3}, but the largest node" in too_big
    coordinator = sweeps.unplaceable_trial([{"CPU": 1.0, "GPU": 2.0}, {"CPU": 1.0}], nodes)
    assert "the coordinator's bundle {CPU: 1, GPU: 2} fits no node" in coordinator
    no_gpu = sweeps.unplaceable_trial([{"CPU": 0.01}, {"CPU": 1, "GPU": 1}, {"CPU": 3, "GPU": 1}],
                                      nodes)
    assert "hospital_b asks one node for {CPU: 3, GPU: 1}" in no_gpu
    too_many = [{"CPU": 0.01}] + [{"CPU": 1.5}] * 3
    assert sweeps.unplaceable_trial(too_many, nodes) is None  # each bundle fits a node
    warning = sweeps.trial_outgrows_cluster(too_many, nodes)
    assert "one trial reserves {CPU: 4.51}" in warning and "has {CPU: 4} now" in warning


# ---------------------------------------------------------------- the sweep config, pure

@pytest.mark.parametrize("fields, message", [
    ({"asha": {"grace_perod": 1}}, "asha.grace_perod: unknown key"),
    ({"space": {"training.lr": {"grid": [0.1], "uniform": [0.1, 1]}}},
     "space.training.lr: Value error, give exactly one of"),
    ({"space": {"training.lr": {"loguniform": [0, 0.1]}}}, "both ends must be > 0"),
    ({"space": {"training.lr": {"uniform": [0.0, 0.1]}}},
     "space.training.lr: 0.0 does not make a valid experiment"),
    ({"space": {"training.batch_size": {"grid": [16, 0]}}},
     "training.batch_size: Input should be greater than or equal to 1 (got 0)"),
    ({"space": {"training.lrr": {"grid": [0.1]}}}, "training.lrr: unknown key"),
    ({"space": {"model.backbone": {"grid": ["smallcnn", "resnet19"]}}},
     "space.model.backbone: 'resnet19' is not a usable backbone"),
    ({"space": {"runtime.hospital_num_cpus": {"grid": [1, 2]}}},
     "space.runtime.hospital_num_cpus: runtime fixes each trial's placement group"),
    ({"search": "grid", "space": {"training.lr": {"uniform": [0.001, 0.1]}}},
     "space.training.lr: search grid takes grid or choice lists, not uniform"),
    ({"metric": "val_f1"}, "metric 'val_f1' is not reported"),
    ({"metric": "train_loss"}, "metric 'train_loss' is not reported as a validation metric"),
    ({"space": {"training.local_epochs": {"uniform": [1, 3]}}},
     "space.training.local_epochs: takes whole numbers, but uniform samples fractions"),
    ({"space": {"data.image_size": {"loguniform": [32, 64]}}},
     "space.data.image_size: takes whole numbers, but loguniform samples fractions"),
    ({"asha": {"grace_period": 5}}, "asha.grace_period (5) exceeds the rounds a trial runs (1)"),
    ({"base": "missing.yaml"}, "missing.yaml not found (relative to the sweep file)"),
])
def test_a_bad_sweep_config_fails_at_load_naming_the_field(tmp_path, fields, message) -> None:
    with pytest.raises(sweeps.SweepError) as err:
        sweeps.load_sweep(_write_sweep(tmp_path, **fields))
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)  # the CLI turns it into exit status 2


def test_optuna_is_named_when_it_is_not_installed(tmp_path) -> None:
    import importlib.util

    if importlib.util.find_spec("optuna") is not None:
        pytest.skip("optuna is installed here")
    path = _write_sweep(tmp_path, search="optuna",
                        space={"training.lr": {"loguniform": [1e-4, 1e-2]}})
    with pytest.raises(sweeps.SweepError, match="optuna needs the optuna package"):
        sweeps.load_sweep(path)


def test_overrides_reach_the_base_and_relative_paths_become_absolute(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = _write_sweep(tmp_path, overrides={"federation.rounds": 3},
                        space={"model.weights_dir": {"grid": ["weights", "/abs/weights", None]}})
    sweep = sweeps.load_sweep(path, ["training.batch_size=16", "data.path=images"])
    assert sweep.base.federation.rounds == 3 and sweep.base.training.batch_size == 16
    assert sweep.base.data.path == tmp_path / "images"
    # the trial resolves them in its own folder: they are the launcher's, made absolute here
    assert sweep.config.space["model.weights_dir"].grid == [str(tmp_path / "weights"),
                                                            "/abs/weights", None]
    assert sweep.config.base == tmp_path / "base.yaml"
    assert sweep.config.overrides["training.batch_size"] == 16  # recorded in sweep.yaml
    assert sweep.max_rounds() == 3 and sweep.shares_shards()


def test_each_kind_of_dimension_becomes_its_tune_domain(tmp_path) -> None:
    from ray.tune.search.sample import Categorical, Float, Integer

    space = {"training.lr": {"loguniform": [1e-4, 1e-2]},
             "training.weight_decay": {"uniform": [0, 0.01]},
             "training.local_epochs": {"randint": [1, 3]},
             "model.backbone": {"choice": ["smallcnn", "resnet18"]},
             "federation.rounds": {"grid": [1, 2]}}
    sweep = sweeps.load_sweep(_write_sweep(tmp_path, space=space))
    tune_space = sweeps.search_space(sweep.config)
    assert isinstance(tune_space["training.lr"], Float)
    assert isinstance(tune_space["training.lr"].get_sampler(), Float._LogUniform)
    decay = tune_space["training.weight_decay"]
    assert isinstance(decay, Float) and (decay.lower, decay.upper) == (0, 0.01)
    epochs = tune_space["training.local_epochs"]
    assert isinstance(epochs, Integer) and (epochs.lower, epochs.upper) == (1, 4)  # 3 included
    assert isinstance(tune_space["model.backbone"], Categorical)
    assert tune_space["federation.rounds"] == {"grid_search": [1, 2]}
    assert sweep.max_rounds() == 2 and sweep.shares_shards()
    as_grid = sweeps.load_sweep(_write_sweep(tmp_path, search="grid", space={
        "model.backbone": {"choice": ["smallcnn", "resnet18"]}, "seed": {"grid": [0, 1]}}))
    assert sweeps.search_space(as_grid.config)["model.backbone"] == {
        "grid_search": ["smallcnn", "resnet18"]}
    assert not as_grid.shares_shards()  # another seed is another split


def test_sampled_values_go_through_load_config(tmp_path) -> None:
    base = tiny_config(tmp_path).to_yaml()
    config = sweeps.trial_config(base, {"training.lr": 1e-05, "model.backbone": "resnet18",
                                        "federation.strategy.name": "fedprox",
                                        "federation.strategy.mu": 0.01})
    assert config.training.lr == 1e-05 and isinstance(config.training.lr, float)
    assert (config.model.backbone, config.federation.strategy.mu) == ("resnet18", 0.01)
    with pytest.raises(ConfigError, match=r"training.lr: Input should be greater than 0"):
        sweeps.trial_config(base, {"training.lr": 0.0})


def test_storage_is_absolute_locally_and_uris_pass_through(tmp_path) -> None:
    assert sweeps.resolve_storage("sweeps", cwd=tmp_path) == str(tmp_path / "sweeps")
    assert sweeps.resolve_storage("/data/sweeps") == "/data/sweeps"
    assert sweeps.resolve_storage("s3://bucket/sweeps/") == "s3://bucket/sweeps"


RECORD = {"round": 2, "counted": True, "stop_reason": None,
          "hospitals": {"a": {"loss": 1.0, "epsilon": 2.5}, "b": {"loss": 3.0, "epsilon": 4.0}},
          "val": {"loss": 0.5, "accuracy": 0.9, "balanced_accuracy": 0.8, "macro_f1": 0.7,
                  "weighted_f1": 0.7, "roc_auc_macro": None, "kappa": 0.6}}


def test_a_round_reports_flat_numbers_and_its_run_folder() -> None:
    metrics = sweeps.round_metrics(RECORD, "/runs/x")
    assert {k: metrics[k] for k in ("round", "run_dir", "train_loss", "epsilon_max")} == {
        "round": 2, "run_dir": "/runs/x", "train_loss": 2.0, "epsilon_max": 4.0}
    assert metrics["val_balanced_accuracy"] == 0.8 and math.isnan(metrics["val_roc_auc_macro"])
    assert set(sweeps.METRICS) <= set(metrics)


@pytest.mark.parametrize("stop_reason, expected", [
    (None, [("report", 1, False), ("finish",), ("report", 2, True)]),
    ("early stopping", [("finish",), ("report", 1, True)]),  # the run ends at round 1
])
def test_the_last_round_reports_after_the_final_evaluation(tmp_path, monkeypatch, stop_reason,
                                                           expected) -> None:
    """So that ASHA, deciding on the last round, cannot kill a trial before it saves its model."""
    from ray import tune

    from fedray.experiments import experiment

    events: list[tuple] = []

    class Context:
        def get_trial_id(self) -> str:
            return "abc_00000"

    def fake_run(config, *, output_dir, resume, on_start, on_round, shards, **_):
        assert resume is None and shards is None and config.training.lr == 0.01
        on_start(output_dir / "run")
        for r in range(1, config.federation.rounds + 1):
            on_round({**RECORD, "round": r, "stop_reason": stop_reason})
            if stop_reason:
                break
        events.append(("finish",))
        final = {split: {"loss": 0.4, "accuracy": 0.9} for split in ("val", "test")}
        return experiment.RunResult(output_dir / "run", final, [], 1.0)

    monkeypatch.setattr(tune, "get_context", lambda: Context())
    monkeypatch.setattr(tune, "report", lambda metrics: events.append(
        ("report", metrics["round"], metrics.get("final_test_accuracy") == 0.9)))
    monkeypatch.setattr(experiment, "run", fake_run)
    base = tiny_config(tmp_path, **{"federation.rounds": 2}).to_yaml()
    sweeps.run_trial({"training.lr": 0.01}, base_yaml=base, sweep_dir=str(tmp_path),
                     shard_root=None)
    assert events == expected


# ---------------------------------------------------------------- on Ray

@pytest.mark.ray
def test_hospitals_take_their_own_bundle_of_the_trials_placement_group(
        ray_session, shard_dir, tmp_path) -> None:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from fedray.data.shards import ShardSet

    config = tiny_config(tmp_path)
    runtimes = [tiny_config(tmp_path, **o).runtime for o in (
        {}, {"runtime.coordinator_num_gpus": 0.5}, {"runtime.coordinator": "actor"})]
    group = placement_group([{"CPU": 0.01}, {"CPU": 0.5}, {"CPU": 0.25}])
    ray.get(group.ready(), timeout=60)

    @ray.remote(num_cpus=0)
    def inside_the_group() -> dict:
        pool = runtime.RayPool(config, ShardSet.load(shard_dir), tmp_path)
        info = pool.wait_ready()
        pool.kill()
        where = [runtime.coordinator_in_driver(rt) for rt in runtimes]
        return {name: (i["placement_group"], i["assigned"]) for name, i in info.items()}, where

    try:
        got = ray.get(inside_the_group.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)
        ).remote(), timeout=120)
    finally:
        remove_placement_group(group)
    placed, where = got
    assert placed == {"hospital_a": (group.id.hex(), {"CPU": 0.5}),
                      "hospital_b": (group.id.hex(), {"CPU": 0.25})}
    # in a trial the coordinator runs in the trial's process, unless it needs its bundle's GPU
    # or is asked to be an actor
    assert where == [True, False, False]


@pytest.fixture(scope="module")
def asha_sweep(ray_session, tmp_path_factory):
    """Two trials one after the other: a sane one, then one whose learning rate diverges.

    Sequential order makes ASHA deterministic: the hopeless trial meets the rung at round 1
    with the sane trial's loss already recorded, and its loss is thousands of times higher.
    """
    tmp = tmp_path_factory.mktemp("asha")
    _write_base(tmp, **{"federation.rounds": 2})
    (tmp / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "asha", "base": "base.yaml", "search": "grid",
        "space": {"training.lr": {"grid": [0.003, 1.0]}}, "max_concurrent_trials": 1,
        "metric": "val_loss", "mode": "min",
        "asha": {"grace_period": 1, "reduction_factor": 2}}))
    lines: list[str] = []
    result = sweeps.run_sweep(sweeps.load_sweep(tmp / "sweep.yaml"), output_dir=tmp / "sweeps",
                              verbose=0, log=lines.append)
    return result, lines


@pytest.mark.ray
@pytest.mark.slow
def test_asha_stops_the_hopeless_trial_at_its_first_rung(asha_sweep) -> None:
    result, _ = asha_sweep
    rows = {row["training.lr"]: row for row in result.table.to_dict("records")}
    assert (rows[0.003]["status"], rows[0.003]["rounds"]) == ("completed", 2)
    assert (rows[1.0]["status"], rows[1.0]["rounds"]) == ("stopped", 1)
    assert rows[1.0]["peak_val_loss"] > 100 * rows[0.003]["peak_val_loss"]
    assert math.isnan(rows[1.0]["final_test_accuracy"])  # stopped: no final evaluation
    assert math.isnan(rows[1.0]["final_val_loss"]) and math.isnan(rows[1.0]["saved_round"])
    assert 0 <= rows[0.003]["final_test_accuracy"] <= 1


@pytest.mark.ray
@pytest.mark.slow
def test_the_results_table_files_and_best_trial(asha_sweep) -> None:
    result, lines = asha_sweep
    folder = Path(result.folder)
    table = result.table
    # ranked on the saved model's final validation loss; the best round's value beside it
    assert list(table.columns[:8]) == ["trial_id", "status", "training.lr", "rounds",
                                       "final_val_loss", "saved_round", "peak_val_loss",
                                       "peak_round"]
    for column in ("final_val_balanced_accuracy", "final_test_accuracy", "epsilon_max",
                   "seconds", "run_dir", "error"):
        assert column in table.columns
    assert len(table) == 2 and table["trial_id"].is_unique
    assert list(table["training.lr"]) == [0.003, 1.0]  # best first (mode min on val_loss)
    for row in table.to_dict("records"):
        run = Path(row["run_dir"])  # each trial's run folder is inside its trial folder
        assert run.parent == folder / f"trial_{row['trial_id']}" and (run / "config.yaml").is_file()
        assert row["seconds"] > 0
        # the coordinator ran in the trial's process: no process of its own to start
        assert json.loads((run / "startup.json").read_text())["coordinator_in"] == "driver"
    csv = pd.read_csv(folder / "results.csv")
    parquet = pd.read_parquet(folder / "results.parquet")
    assert list(csv.columns) == list(parquet.columns) == list(table.columns)
    assert list(csv["trial_id"]) == list(parquet["trial_id"]) == list(table["trial_id"])
    assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = json.loads((folder / "best.json").read_text())
    winner = table.iloc[0]
    assert (best["trial_id"], best["run_dir"], best["metric"], best["ranked_on"]) == (
        winner["trial_id"], winner["run_dir"], "val_loss", "final_val_loss")
    assert best["params"] == {"training.lr": 0.003}
    saved = json.loads((Path(best["run_dir"]) / "metrics.json").read_text())
    assert (best["value"], best["round"]) == (saved["val"]["loss"], saved["best_round"])
    assert (Path(best["run_dir"]) / "model.safetensors").is_file()  # ready for export
    assert any(line.startswith("best: trial " + best["trial_id"]) for line in lines)
    record = yaml.safe_load((folder / "sweep.yaml").read_text())
    assert record["space"] == {"training.lr": {"grid": [0.003, 1.0]}}
    assert record["base"] == str(folder.parents[1] / "base.yaml")  # resolved, for the record


@pytest.mark.ray
@pytest.mark.slow
def test_the_best_trials_package_counts_the_sweeps_shards(asha_sweep, tmp_path) -> None:
    """The trials trained on shards the sweep made once; the exported card still has the
    images per hospital and split, and they are the sweep's shards' counts."""
    from fedray.data.shards import ShardSet
    from fedray.artifacts.package import export_package, verify_package

    result, _ = asha_sweep
    card = verify_package(export_package(result.folder, tmp_path / "pkg", formats=()))
    counts = ShardSet.load(Path(result.folder) / "data").counts
    assert card["data"] == counts and {"hospital_a", "hospital_b", "test"} <= set(counts)


@pytest.mark.ray
@pytest.mark.slow
def test_on_remote_storage_run_folders_are_uploaded_and_exported_by_uri(
        ray_session, tmp_path, monkeypatch) -> None:
    """Storage given as a URI (file:// here, s3:// on a cluster), the sweep started as a Ray
    job starts it (`python jobs/tune.py`): each trial runs in its working directory, which
    Tune uploads, so the run folders it reports (best.json's too) are URIs into the storage;
    `fedray export` takes the sweep's URI; a trial resumed on a fresh working directory
    fetches its run folder back."""
    from fedray.artifacts.package import verify_package

    _write_base(tmp_path)
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "remote", "base": "base.yaml", "space": {"training.lr": {"grid": [0.003]}},
        "asha": {"enabled": False}}))
    storage = f"file://{tmp_path / 'bucket'}"
    assert run_job_script("tune", ["--config", str(tmp_path / "sweep.yaml"),
                                   "--output-dir", storage], monkeypatch) == 0
    (local,) = (tmp_path / "bucket").iterdir()
    folder = f"{storage}/{local.name}"
    assert local.name.startswith("remote-")
    best = json.loads((local / "best.json").read_text())
    uploaded = f"{folder}/trial_{best['trial_id']}"
    assert best["status"] == "completed" and best["run_dir"].startswith(uploaded + "/")
    run = Path(best["run_dir"].removeprefix("file://"))
    assert (run / "model.safetensors").is_file()
    assert (run / "data" / "sites.json").is_file()  # the trial's own sites, uploaded with it
    assert (run / "sites" / "hospital_a").is_dir()
    assert cli.main(["export", folder, "--output", str(tmp_path / "pkg")]) == 0
    card = verify_package(tmp_path / "pkg")
    assert card["source_run"] == run.name and any(k.startswith("hospital_a") for k in card["data"])
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    fetched = sweeps.fetch_last_run(uploaded, workdir)
    assert fetched == workdir / run.name
    assert (fetched / "metrics.jsonl").read_bytes() == (run / "metrics.jsonl").read_bytes()
    assert sweeps.fetch_last_run(f"{folder}/trial_none", workdir) is None


@pytest.mark.ray
@pytest.mark.slow
def test_a_resumed_sweep_reruns_only_the_trial_that_did_not_finish(
        ray_session, tmp_path, capsys) -> None:
    """One site's image folder is missing, so its trial fails and the other completes. Once the
    folder exists, `fedray tune --resume` runs just that trial, continuing its own run folder,
    and leaves the completed trial as it was."""
    from fedray.data import synth

    images = synth.generate(n=240, size=32, seed=3, patients_per_class=6)
    ready, late = str(tmp_path / "ready"), str(tmp_path / "late")
    synth.write_folder(images, Path(ready))
    _write_base(tmp_path, **{"data.source": "folder", "data.path": ready})
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "resume", "base": "base.yaml", "search": "grid",
        "space": {"data.path": {"grid": [ready, late]}},
        "metric": "val_accuracy", "asha": {"enabled": False}}))
    assert cli.main(["tune", "--config", str(tmp_path / "sweep.yaml"),
                     "--output-dir", str(tmp_path / "sweeps")]) == 1
    assert "fedray tune --resume" in capsys.readouterr().out
    (folder,) = (tmp_path / "sweeps").iterdir()
    first = pd.read_csv(folder / "results.csv").set_index("data.path")
    assert list(first.loc[[ready, late], "status"]) == ["completed", "error"]
    assert late in first.loc[late, "error"]
    done = Path(first.loc[ready, "run_dir"])
    finished = {p: p.stat().st_mtime_ns for p in done.rglob("*") if p.is_file()}
    (failed,) = (p.parent for p in folder.glob("trial_*/*/config.yaml") if p.parent != done)

    synth.write_folder(images, Path(late))
    assert cli.main(["tune", "--resume", str(folder)]) == 0
    after = pd.read_csv(folder / "results.csv").set_index("data.path")
    assert list(after.loc[[ready, late], "status"]) == ["completed", "completed"]
    assert {p: p.stat().st_mtime_ns for p in done.rglob("*") if p.is_file()} == finished
    assert after.loc[ready, "run_dir"] == str(done)
    assert after.loc[late, "run_dir"] == str(failed)  # the same run folder, continued
    assert len(list(folder.glob("trial_*/*/config.yaml"))) == 2
    assert (failed / "model.safetensors").is_file()


def test_resume_refuses_a_folder_that_is_not_a_sweep(tmp_path, capsys) -> None:
    assert cli.main(["tune", "--resume", str(tmp_path)]) == 2
    assert "not a sweep folder" in capsys.readouterr().err
    assert cli.main(["tune", "--resume", str(tmp_path), "--set", "training.lr=0.1"]) == 2
    assert "drop --config, --set and --output-dir" in capsys.readouterr().err
