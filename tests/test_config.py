"""Config: defaults, YAML + key=value overrides, and errors that name the key."""

from pathlib import Path

import pytest

from fastgrpo.config import Config, ConfigError, config_from_dict, load_config, parse_override, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.max_steps=7", "rollout.temperature=0.7", "loss.loss_type=dapo",
                             "data.levels=[1,3]", "rewards={accuracy: 1.0}"])
    assert cfg.train.max_steps == 7
    assert cfg.rollout.temperature == 0.7
    assert cfg.loss.loss_type == "dapo"
    assert cfg.data.levels == (1, 3)
    assert cfg.rewards == {"accuracy": 1.0}
    assert cfg.model == Config().model  # untouched sections keep their defaults


def test_int_and_exponent_forms_are_accepted_for_float():
    assert load_config(None, ["train.learning_rate=1"]).train.learning_rate == 1.0
    # YAML 1.1 reads "1e-6" as a string; a user writing it means the number
    assert load_config(None, ["train.learning_rate=1e-6"]).train.learning_rate == 1e-6
    with pytest.raises(ConfigError, match="train.learning_rate: expected a number, got 'fast'"):
        load_config(None, ["train.learning_rate=fast"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_stepz=3", "unknown config key 'train.max_stepz'"),
        ("trian.max_steps=3", "unknown config key 'trian'"),
        ("train.max_steps=many", "train.max_steps: expected an integer, got 'many'"),
        ("train.max_steps=2.5", "train.max_steps: expected an integer"),
        ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing: expected true or false"),
        ("loss.loss_type=ppo", "loss.loss_type: 'ppo' is not one of grpo, bnpo, dr_grpo, dapo"),
        ("rollout.num_generations=1", "rollout.num_generations must be >= 2"),
        ("train.max_tokens_per_microbatch=50", "smaller than one sequence"),
        ("rollout.temperature=0", "rollout.temperature must be > 0"),
        ("noequals", "not of the form key=value"),
    ],
)
def test_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [override])


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 1e-6\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2: unknown config key 'train.lr'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_roundtrip_through_dict(tmp_path):
    import yaml

    cfg = load_config(None, ["train.seed=3"])
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_config(f) == cfg


def test_config_from_dict_round_trips_and_its_errors_are_load_configs():
    cfg = load_config(None, ["train.seed=3", "rewards={accuracy: 1.0}"])
    assert config_from_dict(to_dict(cfg)) == cfg
    assert config_from_dict(to_dict(cfg), ["train.seed=4"]) == load_config(None, ["rewards={accuracy: 1.0}", "train.seed=4"])
    for data, override in [({"train": {"max_stepz": 3}}, "train.max_stepz=3"),
                           ({"train": {"max_steps": "many"}}, "train.max_steps=many"),
                           ({"rollout": {"num_generations": 1}}, "rollout.num_generations=1")]:
        with pytest.raises(ConfigError) as from_dict:
            config_from_dict(data)
        with pytest.raises(ConfigError) as from_override:
            load_config(None, [override])
        assert str(from_dict.value) == str(from_override.value)
    with pytest.raises(ConfigError, match="a config must be a mapping of sections, got list"):
        config_from_dict([1])


def test_parse_override_nests():
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert isinstance(load_config(path), Config)
