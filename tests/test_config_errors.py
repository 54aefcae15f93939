"""Bad configuration and data: one clear error naming the key, the file (and line) and what is
allowed, raised before any model loads.

``no_model_loading`` makes every model load fail the test: if a check moved after the loading
(or went away), the run would reach it and the test would fail with "a model was loaded".
"""

from __future__ import annotations

import json
import re

import pytest

from fastgrpo.config import ConfigError, load_config
from fastgrpo.trainer import train


@pytest.fixture
def no_model_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the configuration error")

    import fastgrpo.model
    import fastgrpo.trainer

    for name in ("load_policy", "load_reference", "make_engine"):
        monkeypatch.setattr(fastgrpo.trainer, name, refuse)
    monkeypatch.setattr(fastgrpo.model, "convert_gguf", refuse)


def tiny(model_dir, out, *extra):
    return load_config(None, [f"model.path={model_dir}", f"log.output_dir={out}", "rollout.engine=transformers",
                              "rollout.prompts_per_step=2", "rollout.num_generations=2",
                              "rollout.max_completion_length=12", "data.num_train=20", "data.num_eval=2",
                              "train.max_tokens_per_microbatch=400", *extra])


def fails(cfg, *patterns):
    """train(cfg) raises one ConfigError whose message holds every pattern (regexes)."""
    with pytest.raises(ConfigError) as info:
        train(cfg)
    for pattern in patterns:
        assert re.search(pattern, str(info.value)), (pattern, str(info.value))
    return str(info.value)


def jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


# --- the config alone ---------------------------------------------------------------------------


def test_unknown_key_names_file_line_and_the_valid_keys(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  path: default\ntrain:\n  max_steps: 3\n  lr: 1.0e-6\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml:5: unknown config key 'train.lr'; valid keys here: .*learning_rate"):
        load_config(recipe)


def test_wrong_type_names_file_line_key_and_the_type(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("rollout:\n  engine: vllm\n  num_generations: eight\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml:3: rollout.num_generations: expected an integer, got 'eight'"):
        load_config(recipe)
    with pytest.raises(ConfigError, match=r"recipe.yaml:2: rollout.engine: 'vlm' is not one of vllm, transformers"):
        recipe.write_text("rollout:\n  engine: vlm\n")
        load_config(recipe)


def test_group_of_one_names_the_line_in_the_file_and_not_when_overridden(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("rollout:\n  num_generations: 1\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml:2: rollout.num_generations must be >= 2 \(group-relative"):
        load_config(recipe)
    # set on the command line: the file's line would mislead, the key alone is named
    with pytest.raises(ConfigError, match=r"^rollout.num_generations must be >= 2"):
        load_config(None, ["rollout.num_generations=1"])


def test_the_error_carries_its_key_and_the_file_line_comes_from_it(tmp_path):
    # The message names epsilon_low first; the key at fault is epsilon_high, and its line is found.
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("loss:\n  epsilon_low: 0.2\n  epsilon_high: -0.1\n")
    with pytest.raises(ConfigError, match=r"^.*recipe.yaml:3: loss.epsilon_low/epsilon_high must be >= 0") as info:
        load_config(recipe)
    assert info.value.key == "loss.epsilon_high"
    # a list entry's error points at the list's line
    recipe.write_text("train:\n  max_tokens_per_microbatch: 4096\nrollout:\n  length_stages:\n    - [0, 8]\n")
    with pytest.raises(ConfigError, match=r"recipe.yaml:4: rollout.length_stages\[0\] = \[0, 8\]") as info:
        load_config(recipe)
    assert info.value.key == "rollout.length_stages[0]"
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "absent.yaml")
    assert info.value.key is None


def test_config_error_needs_its_key_and_survives_pickling():
    import pickle

    with pytest.raises(TypeError):
        ConfigError("train.max_steps must be >= 1")  # noqa: the key is required
    error = pickle.loads(pickle.dumps(ConfigError("train.max_steps must be >= 1", key="train.max_steps")))
    assert (str(error), error.key) == ("train.max_steps must be >= 1", "train.max_steps")


def test_every_config_error_raised_in_the_package_names_its_key():
    import ast

    from helpers.paths import REPO

    missing = []
    for path in sorted([*(REPO / "fastgrpo").rglob("*.py"), *(REPO / "kernels").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "ConfigError"
                    and not any(k.arg == "key" for k in node.keywords)):
                missing.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not missing, f"ConfigError without key=: {missing}"


@pytest.mark.parametrize("override, message", [
    ("log.checkpoint_every=0", r"log.checkpoint_every must be >= 1, got 0"),
    ("eval.max_completion_length=0", r"eval.max_completion_length must be >= 1, got 0"),
    ("train.max_grad_norm=0", r"train.max_grad_norm must be > 0"),
    ("loss.beta=-0.1", r"loss.beta must be >= 0, got -0.1"),
    ("train.max_tokens_per_microbatch=50", r"train.max_tokens_per_microbatch=50 is smaller than one sequence"),
])
def test_impossible_values_without_files(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


# --- checks that read files, run by train() before any model loads ------------------------------


def test_unknown_reward(tiny_model_dir, tmp_path, no_model_loading):
    fails(tiny(tiny_model_dir, tmp_path, "reward_weights={accuracy: 1.0, acuracy: 1.0}"),
          r"^reward_weights.acuracy: unknown reward 'acuracy'; valid rewards: \[.*'accuracy'")
    assert not tmp_path.joinpath("metrics.jsonl").exists()


def test_missing_dataset(tiny_model_dir, tmp_path, no_model_loading):
    missing = tmp_path / "nope.jsonl"
    fails(tiny(tiny_model_dir, tmp_path / "run", f"data.dataset={missing}"),
          rf"^data.dataset='{re.escape(str(missing))}': no dataset", r"Allowed: 'arithmetic' \(built in\)")


def test_empty_dataset(tiny_model_dir, tmp_path, no_model_loading):
    empty = jsonl(tmp_path / "empty.jsonl", [])
    fails(tiny(tiny_model_dir, tmp_path / "run", f"data.dataset={empty}"),
          rf"^data.dataset: {re.escape(str(empty))}: the dataset is empty")


def test_rows_without_answers_name_file_and_line(tiny_model_dir, tmp_path, no_model_loading):
    rows = [{"problem": "1+1?", "answer": "2"}, {"problem": "2+2?", "answer": "4"}, {"problem": "3+3?"},
            {"problem": "4+4?", "answer": ""}, {"problem": "5+5?", "answer": "10"}]
    bad = jsonl(tmp_path / "train.jsonl", rows * 3)
    message = fails(tiny(tiny_model_dir, tmp_path / "run", f"data.dataset={bad}"),
                    rf"^data.dataset: {re.escape(str(bad))}: line 3: missing key 'answer'",
                    r"line 4: 'answer' is empty", r"data.on_bad_rows=skip drops bad rows",
                    r"Allowed: rows with a non-empty 'problem' string and a non-empty 'answer'")
    assert "on_error" not in message  # the function's argument name means nothing to a config's user


def test_bad_eval_rows_name_the_eval_key(tiny_model_dir, tmp_path, no_model_loading):
    good = jsonl(tmp_path / "train.jsonl", [{"problem": f"{i}+1?", "answer": str(i + 1)} for i in range(10)])
    bad = jsonl(tmp_path / "held_out.jsonl", [{"problem": "2+2?", "answer": "4"}, "{not json"])
    fails(tiny(tiny_model_dir, tmp_path / "run", f"data.dataset={good}", f"data.eval_dataset={bad}"),
          rf"^data.eval_dataset: {re.escape(str(bad))}: line 2: invalid JSON")


def test_held_out_set_takes_every_row(tiny_model_dir, tmp_path, no_model_loading):
    small = jsonl(tmp_path / "small.jsonl", [{"problem": f"{i}+1?", "answer": str(i + 1)} for i in range(3)])
    fails(tiny(tiny_model_dir, tmp_path / "run", f"data.dataset={small}", "data.num_eval=3"),
          r"^data: num_eval=3 leaves no training problems")


def test_reference_model_folder_must_exist_when_beta_is_positive(tmp_path, no_model_loading):
    """With loss.beta > 0 the frozen KL reference is model.path's weights (there is no separate
    reference key): a model.path without a model is the one way to have no reference."""
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    fails(tiny(not_a_model, tmp_path / "run", "loss.beta=0.04"),
          rf"^model.path='{re.escape(str(not_a_model))}'.*has no config.json", r"KL reference is loaded from it",
          r"Allowed: 'default'")


def test_completion_longer_than_the_model_takes(tiny_model_dir, tmp_path, no_model_loading):
    # the tiny model's config.json: max_position_embeddings = 1024
    fails(tiny(tiny_model_dir, tmp_path, "rollout.max_completion_length=1000", "train.max_tokens_per_microbatch=4000"),
          r"^rollout.max_completion_length: the longest prompt \(\d+ tokens, problem 'arith-",
          r"more than the model takes \(1024, max_position_embeddings in .*config.json\)",
          r"Allowed: completions of at most \d+ tokens")
    fails(tiny(tiny_model_dir, tmp_path, "eval.max_completion_length=1020"), r"^eval.max_completion_length: ")
    fails(tiny(tiny_model_dir, tmp_path, "rollout.length_stages=[[5, 1000]]", "train.max_tokens_per_microbatch=4000"),
          r"^rollout.length_stages\[0\]: ")


def test_max_model_len_beyond_the_model_or_below_one_sequence(tiny_model_dir, tmp_path, no_model_loading):
    fails(tiny(tiny_model_dir, tmp_path, "rollout.max_model_len=2048"),
          r"^rollout.max_model_len=2048 is more than the model takes \(1024", r"Allowed: \d+\.\.1024, or null")
    fails(tiny(tiny_model_dir, tmp_path, "rollout.max_model_len=16"),
          r"^rollout.max_model_len=16 is smaller than the longest prompt", r"Allowed: >= \d+")


def test_micro_batch_smaller_than_prompt_plus_completion(tiny_model_dir, tmp_path, no_model_loading):
    """config.validate only knows the completion (12 + 1 <= 20); the prompt (~60 tokens with the
    one-shot example) makes one sequence longer than the budget."""
    message = fails(tiny(tiny_model_dir, tmp_path, "train.max_tokens_per_microbatch=20"),
                    r"^train.max_tokens_per_microbatch=20 is smaller than one training sequence",
                    r"rollout.max_completion_length=12", r"Allowed: >= \d+")
    need = int(re.search(r"Allowed: >= (\d+)", message).group(1))
    assert need > 20 + 12  # the prompt counted
    from fastgrpo.preflight import check_run

    shape = check_run(tiny(tiny_model_dir, tmp_path, f"train.max_tokens_per_microbatch={need}"))
    assert shape.longest_prompt + 12 == need and shape.model_max_length == 1024


def test_cli_prints_one_line_and_exits_2(tiny_model_dir, tmp_path, capsys, no_model_loading):
    from fastgrpo.cli import main

    rc = main(["train", f"model.path={tiny_model_dir}", f"log.output_dir={tmp_path}", "rollout.max_model_len=4096"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("fastgrpo: error: rollout.max_model_len=4096 is more than the model takes")
    assert "Traceback" not in err


def test_longest_prompt_walk_equals_encoding_every_problem(tiny_model_dir):
    from fastgrpo.data.prompts import build_messages, encode_prompt
    from fastgrpo.model import load_tokenizer
    from fastgrpo.preflight import longest_prompt

    tokenizer = load_tokenizer(tiny_model_dir)
    # bytes and tokens disagree on purpose: multi-byte characters, digits, LaTeX
    texts = ["What is 2+2?", "é" * 40, "\\frac{1}{2} + \\sqrt{3}" * 5, "x" * 100, "数学" * 30, "1234567890" * 12]
    problems = [{"problem": t, "id": str(i)} for i, t in enumerate(texts)]
    for template, one_shot in (("boxed", True), ("r1", False)):
        every = [len(encode_prompt(tokenizer, build_messages(t, template, one_shot))) for t in texts]
        assert longest_prompt(tokenizer, problems, template, one_shot) == (max(every), str(every.index(max(every))))


def test_default_model_limit_is_the_embedded_gguf_context_length():
    """The check uses DEFAULT_MODEL_MAX_POSITIONS before the default model is converted."""
    from gguf import GGUFReader

    from fastgrpo.model import DEFAULT_MODEL_MAX_POSITIONS, gguf_source

    folder, name = gguf_source()
    field = GGUFReader(str(folder / name)).fields["llama.context_length"]
    assert int(field.parts[field.data[0]][0]) == DEFAULT_MODEL_MAX_POSITIONS


@pytest.mark.parametrize("config, expected", [
    ({"max_position_embeddings": 4096}, 4096),
    ({"n_positions": 1024}, 1024),  # GPT-2's name for it
    ({"max_position_embeddings": 4096, "rope_scaling": {"rope_type": "linear", "factor": 2.0}}, 8192),
    ({"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, 131072),  # already stretched
    ({"text_config": {"max_position_embeddings": 2048}}, 2048),  # multimodal configs nest it
    ({"hidden_size": 64}, None),
])
def test_model_max_length_reads_config_json_only(tmp_path, config, expected):
    from fastgrpo.model import model_max_length

    (tmp_path / "config.json").write_text(json.dumps(config))
    assert model_max_length(tmp_path) == expected


# --- models whose logits are post-processed (the fused LM head computes plain log_softmax) -------


def _model_folder(tmp_path, name, config) -> str:
    """A model folder holding only config.json: the check reads nothing else."""
    folder = tmp_path / name
    folder.mkdir()
    if isinstance(config, dict):
        (folder / "config.json").write_text(json.dumps(config))
    else:
        config.to_json_file(folder / "config.json")
    return folder


def _tiny_configs():
    from transformers import CohereConfig, Gemma2Config, Gemma3Config, GraniteConfig

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1)
    return {
        "gemma2": (Gemma2Config(**small, head_dim=8), "final_logit_softcapping=30.0"),
        "gemma3": (Gemma3Config(text_config=dict(small, head_dim=8, final_logit_softcapping=30.0)),
                   "text_config.final_logit_softcapping=30.0"),
        "granite": (GraniteConfig(**small, logits_scaling=8.0), "logits_scaling=8.0"),
        "cohere": (CohereConfig(**small), "logit_scale=0.0625"),
        # config.json leaves it out: Cohere's class default (0.0625) still scales the logits
        "cohere_default": ({"model_type": "cohere", **small}, "logit_scale=0.0625"),
        # a model type this transformers does not know: config.json as it is
        "unknown_type": ({"model_type": "not_in_transformers", "lm_head_multiplier": 2.0}, "lm_head_multiplier=2.0"),
    }


@pytest.mark.parametrize("name", sorted(_tiny_configs()))
def test_models_that_post_process_their_logits_are_refused_before_loading(tmp_path, name, no_model_loading):
    config, attribute = _tiny_configs()[name]
    folder = _model_folder(tmp_path, name, config)
    fails(tiny(folder, tmp_path / "run"),
          rf"^model.path='{re.escape(str(folder))}': the model in .* has {re.escape(attribute)} ",
          r"post-processes its logits", r"Allowed: a model that leaves its logits as they are \(final_logit_softcapping=null")


def test_models_with_plain_logits_pass_the_head_check(tmp_path, tiny_model_dir):
    from transformers import Gemma3TextConfig, GraniteConfig

    from fastgrpo.preflight import check_logits_are_the_heads

    for name, config in [("granite_default", GraniteConfig()), ("gemma3_text", Gemma3TextConfig()),
                         ("unknown_type", {"model_type": "not_in_transformers", "logit_scale": 1.0})]:
        check_logits_are_the_heads(_model_folder(tmp_path, name, config), "model.path")
    check_logits_are_the_heads(tiny_model_dir, "model.path")  # the tests' Llama
