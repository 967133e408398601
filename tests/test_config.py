from pathlib import Path

import pytest

from fedray.config import ConfigError, ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", [n for n in CONFIGS if not n.startswith("sweep-")])
def test_shipped_configs_validate(name: str) -> None:
    config = load_config(ROOT / "configs" / name)
    assert isinstance(config, ExperimentConfig)


@pytest.mark.parametrize("name", [n for n in CONFIGS if n.startswith("sweep-")])
def test_shipped_sweeps_validate(name: str) -> None:
    from fedray.experiments.tune import load_sweep

    sweep = load_sweep(ROOT / "configs" / name)
    assert isinstance(sweep.base, ExperimentConfig) and sweep.config.space


def test_paper_recipe_values() -> None:
    c = load_config(ROOT / "configs" / "paper-fedavg-resnet50.yaml")
    assert (c.model.backbone, c.federation.hospitals, c.federation.rounds) == ("resnet50", 4, 10)
    assert (c.training.local_epochs, c.training.lr, c.training.weight_decay) == (5, 1e-4, 1e-4)
    assert (c.training.plateau.factor, c.training.plateau.patience) == (0.2, 5)
    assert c.training.plateau.min_lr == 1e-6 and c.training.early_stopping_patience == 10
    d = load_config(ROOT / "configs" / "paper-dp-inceptionv3.yaml")
    assert d.data.flip_x4 and (d.data.split.train, d.data.split.val, d.data.split.test) == (0.7, 0.2, 0.1)


def test_overrides_keep_yaml_types() -> None:
    c = load_config(None, ["federation.rounds=3", "training.lr=1e-3", "data.augment=false",
                           "model.backbone=resnet18"])
    assert c.federation.rounds == 3 and c.training.lr == pytest.approx(1e-3)
    assert c.data.augment is False and c.model.backbone == "resnet18"



def test_overrides_as_a_mapping_keep_python_values() -> None:
    """A {"a.b": value} mapping is not re-read as YAML: the string "1e-3" stays a string (and
    fails as a learning rate), a float stays the float it is, a "yes" name stays "yes"."""
    c = load_config(None, {"federation.rounds": 3, "training.lr": 1e-3, "data.augment": False,
                           "name": "yes"})
    assert c.federation.rounds == 3 and c.training.lr == 1e-3
    assert c.data.augment is False and c.name == "yes"
    with pytest.raises(ConfigError, match="valid string"):  # as a string, YAML reads true
        load_config(None, ["name=yes"])
    with pytest.raises(ConfigError, match=r"training\.lr"):
        load_config(None, {"training.lr": [1e-3]})
    with pytest.raises(ConfigError, match="empty key"):
        load_config(None, {"": 1})


def test_a_mapping_config_equals_its_yaml_and_is_left_untouched() -> None:
    from_file = load_config(ROOT / "configs" / "demo.yaml", ["federation.rounds=2"])
    raw = from_file.model_dump(mode="json")
    before = repr(raw)
    from_dict = load_config(raw, {"federation.rounds": 2, "training.lr": 0.5})
    assert repr(raw) == before  # the caller's mapping is not changed
    assert from_dict.training.lr == 0.5
    assert from_dict.model_copy(update={"training": from_file.training}) == from_file
    with pytest.raises(ConfigError, match=r"invalid config \(a mapping"):
        load_config({"training": {"learning_rate": 0.1}})


def test_unknown_key_names_its_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"training\.learning_rate: unknown key") as err:
        load_config(bad)
    assert str(bad) in str(err.value)


def test_bad_value_names_field_and_value() -> None:
    with pytest.raises(ConfigError, match=r"federation\.rounds.*greater than or equal to 1.*0"):
        load_config(None, ["federation.rounds=0"])
    with pytest.raises(ConfigError, match=r"data\.partition\.scheme"):
        load_config(None, ["data.partition.scheme=random"])


def test_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match="must equal 1.0"):
        load_config(None, ["data.split.train=0.9"])
    with pytest.raises(ConfigError, match=r"min_clients \(5\) exceeds hospitals \(4\)"):
        load_config(None, ["federation.min_clients=5"])
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config(None, ["data.source=folder"])


def test_malformed_inputs(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["federation.rounds"])
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
    with pytest.raises(ConfigError, match="not a section"):
        load_config(None, ["seed=1", "seed.x=2"])


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    c = load_config(ROOT / "configs" / "demo.yaml", ["federation.rounds=2"])
    out = tmp_path / "config.yaml"
    out.write_text(c.to_yaml())
    assert load_config(out) == c
