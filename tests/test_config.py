"""Config: defaults, YAML + key=value overrides, and errors that name the key."""

import re
from pathlib import Path

import pytest

from fastgrpo.config import Config, ConfigError, config_from_dict, load_config, parse_override, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.max_steps=7", "rollout.temperature=0.7", "loss.loss_type=dapo",
                             "data.levels=[1,3]", "reward_weights={accuracy: 1.0}"])
    assert cfg.train.max_steps == 7
    assert cfg.rollout.temperature == 0.7
    assert cfg.loss.loss_type == "dapo"
    assert cfg.data.levels == (1, 3)
    assert cfg.reward_weights == {"accuracy": 1.0}
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
    cfg = load_config(None, ["train.seed=3", "reward_weights={accuracy: 1.0}"])
    assert config_from_dict(to_dict(cfg)) == cfg
    assert config_from_dict(to_dict(cfg), ["train.seed=4"]) == load_config(None, ["reward_weights={accuracy: 1.0}", "train.seed=4"])
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


# --- the renamed sections: reward_weights (was rewards), reward_params (was reward) ------------


def test_old_section_names_still_load_with_a_warning_naming_the_new_key(tmp_path):
    with pytest.warns(FutureWarning, match="'rewards' is renamed 'reward_weights'"):
        cfg = load_config(None, ["rewards={accuracy: 2.0}"])
    assert cfg.reward_weights == {"accuracy": 2.0}
    with pytest.warns(FutureWarning, match="'reward' is renamed 'reward_params'"):
        cfg = load_config(None, ["reward.compat=open-rs"])
    assert cfg.reward_params.compat == "open-rs"
    recipe = tmp_path / "old.yaml"
    recipe.write_text("rewards:\n  format: 1.0\nreward:\n  cosine_max_len: 99\n")
    with pytest.warns(FutureWarning) as caught:
        cfg = load_config(recipe)
    assert {str(w.message).split(": ", 1)[1] for w in caught} == {
        "the config key 'rewards' is renamed 'reward_weights'; use 'reward_weights'",
        "the config key 'reward' is renamed 'reward_params'; use 'reward_params'"}
    assert (cfg.reward_weights, cfg.reward_params.cosine_max_len) == ({"format": 1.0}, 99)
    # the old and the new name together: one error naming both
    recipe.write_text("rewards:\n  format: 1.0\nreward_weights:\n  accuracy: 1.0\n")
    with pytest.raises(ConfigError, match="sets both 'rewards' and 'reward_weights'") as info:
        load_config(recipe)
    assert info.value.key == "reward_weights"


def test_an_error_in_an_old_named_section_still_points_at_its_line(tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text("train:\n  max_steps: 3\nreward:\n  grader_workers: -1\n")
    with pytest.warns(FutureWarning), pytest.raises(
            ConfigError, match=r"old.yaml:4: reward_params.grader_workers must be >= 0"):
        load_config(recipe)
    # set again by an override (by its old name): the file's line would mislead, the key alone is named
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match=r"^reward_params.grader_workers must be >= 0"):
        load_config(recipe, ["reward.grader_workers=-2"])


def test_new_section_names_load_without_a_warning(recwarn):
    cfg = load_config(None, ["reward_weights={format: 1.0}", "reward_params.cosine_max_len=7"])
    assert (cfg.reward_weights, cfg.reward_params.cosine_max_len) == ({"format": 1.0}, 7)
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]
    with pytest.warns(FutureWarning, match="renamed reward_weights"):
        assert cfg.rewards == {"format": 1.0}  # the attribute's old name too
    with pytest.warns(FutureWarning, match="renamed reward_params"):
        assert cfg.reward.cosine_max_len == 7


@pytest.mark.parametrize("overrides,key,message", [
    (["loss.sampler_mask=tokens"], "loss.sampler_mask", "loss.sampler_mask: 'tokens' is not one of none, token, sequence"),
    (["loss.sampler_mask=token", "loss.sampler_mask_cap=1.0"], "loss.sampler_mask_cap",
     "loss.sampler_mask_cap must be a finite number > 1 (tokens are kept inside [1/cap, cap]), got 1.0"),
    (["loss.sampler_mask_cap=0.5"], "loss.sampler_mask_cap", "loss.sampler_mask_cap must be a finite number > 1"),
    (["loss.sampler_mask=sequence", "loss.sampler_mask_cap=.inf"], "loss.sampler_mask_cap",
     "loss.sampler_mask_cap must be a finite number > 1"),
    (["loss.sampler_mask=sequence", "loss.tis_cap=2.0"], "loss.sampler_mask",
     "loss.tis_cap=2.0 and loss.sampler_mask=sequence are two corrections of the same mismatch"),
])
def test_sampler_mask_options_are_checked(overrides, key, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_config(None, overrides)
    assert info.value.key == key


def test_sampler_mask_options_load():
    cfg = load_config(None, ["loss.sampler_mask=sequence", "loss.sampler_mask_cap=3"])
    assert (cfg.loss.sampler_mask, cfg.loss.sampler_mask_cap, cfg.loss.tis_cap) == ("sequence", 3.0, 0.0)
    assert (Config().loss.sampler_mask, Config().loss.sampler_mask_cap) == ("none", 2.0)
