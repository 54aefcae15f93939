"""Every recipe in configs/ loads and validates, says where it comes from, and a broken copy fails
naming the bad key; the recipes' relations to each other and to their sources are checked."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from fastgrpo.config import ConfigError, load_config, to_dict
from fastgrpo.rewards import get_reward

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ALL = sorted(CONFIGS.glob("*.yaml"))
RECIPES = ["default", "r1-distill-qwen-1.5b-a40", "open-rs-exp1", "open-rs-exp2", "open-rs-exp3",
           "deepscaler-1.5b", "qwen2.5-0.5b-scaling", "tina-r1-distill-1.5b-lora", "open-rs-exp3-24gb"]


def _cfg(name: str):
    return load_config(CONFIGS / f"{name}.yaml")


def test_the_recipes_exist():
    assert {p.stem for p in ALL} >= set(RECIPES)


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_config_loads_validates_and_documents_itself(path):
    cfg = load_config(path)
    for name in cfg.reward_weights:
        get_reward(name)  # every reward a recipe names is registered
    text = path.read_text()
    header = text[: text.index("\n" + next(line for line in text.splitlines() if line and not line.startswith("#")))]
    assert header.startswith("#") and header.count("\n") >= 3, "a config starts with a comment header"
    assert "fastgrpo train" in header, "the header says how to run it"
    # a file holds overrides only, and every section it names is a real one
    assert set(yaml.safe_load(text)) <= set(to_dict(cfg))


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_a_bad_key_in_a_copy_fails_naming_it(path, tmp_path):
    text = path.read_text()
    sections = [m.group(1) for m in re.finditer(r"^(\w+):\s*$", text, flags=re.M) if m.group(1) != "reward_weights"]
    assert sections
    for section in sections:
        broken = tmp_path / path.name
        broken.write_text(re.sub(rf"^{section}:\s*$", f"{section}:\n  bogus_key: 1", text, count=1, flags=re.M))
        line = broken.read_text().splitlines().index("  bogus_key: 1") + 1
        # the message names the file (and, where the loader reports it, the line) and the dotted key
        with pytest.raises(ConfigError, match=rf"{re.escape(path.name)}(:{line})?: unknown config key '{section}\.bogus_key'"):
            load_config(broken)
    broken.write_text(text + "\ntrainer:\n  max_steps: 3\n")
    with pytest.raises(ConfigError, match="unknown config key 'trainer'"):
        load_config(broken)


@pytest.mark.parametrize("path", [p for p in ALL if "max_steps:" in p.read_text()], ids=lambda p: p.name)
def test_a_wrong_type_in_a_copy_fails_naming_the_key(path, tmp_path):
    broken = tmp_path / path.name
    broken.write_text(re.sub(r"max_steps: \d+", "max_steps: many", path.read_text(), count=1))
    with pytest.raises(ConfigError, match="train.max_steps: expected an integer, got 'many'"):
        load_config(broken)


def _differences(a, b, prefix=""):
    out = set()
    for key in a:
        if isinstance(a[key], dict) and isinstance(b[key], dict) and key != "reward_weights" and key != "mixture":
            out |= _differences(a[key], b[key], f"{prefix}{key}.")
        elif a[key] != b[key]:
            out.add(f"{prefix}{key}")
    return out


def test_open_rs_experiments_differ_only_where_the_paper_says():
    exp1, exp2, exp3 = (to_dict(_cfg(f"open-rs-exp{i}")) for i in (1, 2, 3))
    # Exp 2 = Exp 1 with the easy + hard mixture and a 3,584-token limit
    assert _differences(exp1, exp2) == {"data.dataset", "data.mixture", "data.unique_problems",
                                        "rollout.max_completion_length", "log.output_dir"}
    # Exp 3 = Exp 2 with the cosine reward
    assert _differences(exp2, exp3) == {"reward_weights", "reward_params.compat", "reward_params.cosine_max_len", "log.output_dir"}
    assert exp3["reward_weights"] == {"accuracy": 0.0, "think_format": 1.0, "cosine": 2.0}
    assert (exp3["reward_params"]["compat"], exp3["reward_params"]["cosine_max_len"]) == ("open-rs", 3584)
    e1 = _cfg("open-rs-exp1")
    assert (e1.rollout.num_generations, e1.rollout.temperature, e1.train.learning_rate) == (6, 0.7, 1e-6)
    assert (e1.rollout.prompts_per_step, e1.train.max_steps, e1.rollout.max_completion_length) == (12, 500, 4096)
    e2 = _cfg("open-rs-exp2")
    assert e2.rollout.max_completion_length == 3584 and e2.data.unique_problems == 7000
    assert list(e2.data.mixture.values()) == [3000.0, 3000.0, 1000.0]


def test_deepscaler_lengthens_its_context_at_the_blog_steps():
    from fastgrpo.trainer import completion_limit

    cfg = _cfg("deepscaler-1.5b")
    limits = {step: completion_limit(cfg, step) for step in (1, 1039, 1040, 1519, 1520, cfg.train.max_steps)}
    assert limits == {1: 8192, 1039: 8192, 1040: 16384, 1519: 16384, 1520: 24576, 1750: 24576}
    assert (cfg.rollout.prompts_per_step, cfg.rollout.num_generations, cfg.rollout.temperature) == (128, 8, 0.6)
    assert (cfg.loss.beta, cfg.train.learning_rate) == (0.001, 1e-6)
    assert cfg.train.max_tokens_per_microbatch > 24576


def test_scaling_study_keeps_its_curriculum_for_one_epoch():
    cfg = _cfg("qwen2.5-0.5b-scaling")
    assert cfg.data.shuffle is False and cfg.data.unique_problems is None
    assert cfg.train.max_steps == 53904 // 512 and cfg.rollout.num_generations == 8
    # the documented data-reuse run is a valid override of it
    reuse = load_config(CONFIGS / "qwen2.5-0.5b-scaling.yaml", ["data.unique_problems=2156"])
    assert reuse.train.max_steps * reuse.rollout.prompts_per_step / reuse.data.unique_problems == pytest.approx(25, rel=0.01)


def test_the_overrides_the_headers_suggest_work():
    # open-rs-exp2.yaml: train on the released 7,000-problem file instead of the mixture
    cfg = load_config(CONFIGS / "open-rs-exp2.yaml", ["data.mixture={}", "data.dataset=open-rs", "data.unique_problems=null"])
    assert (cfg.data.mixture, cfg.data.dataset, cfg.data.unique_problems) == ({}, "open-rs", None)
    # a mixture given on the command line replaces the file's whole mixture (like reward_weights)
    assert load_config(CONFIGS / "open-rs-exp2.yaml", ["data.mixture={a: 1}"]).data.mixture == {"a": 1.0}
    # deepscaler-1.5b.yaml: G = 16 from the 16K stage on
    assert load_config(CONFIGS / "deepscaler-1.5b.yaml", ["rollout.num_generations=16"]).rollout.num_generations == 16
    for name in ("open-rs-exp1", "open-rs-exp2", "open-rs-exp3"):
        assert load_config(CONFIGS / f"{name}.yaml", ["eval.every_n_steps=0"]).eval.every_n_steps == 0


def test_lora_recipes_are_open_rs_exp3_with_tinas_adapters():
    exp3 = to_dict(_cfg("open-rs-exp3"))
    lora_keys = {"lora.rank", "lora.alpha", "lora.dropout"}
    for name in ("tina-r1-distill-1.5b-lora", "open-rs-exp3-24gb"):
        cfg = _cfg(name)
        assert _differences(exp3, to_dict(cfg)) == lora_keys | {"log.output_dir"}, name
        assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (32, 128.0, 0.05)
        assert set(cfg.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    tina = _cfg("tina-r1-distill-1.5b-lora")
    assert (tina.train.learning_rate, tina.rollout.num_generations, tina.rollout.max_completion_length) == (1e-6, 6, 3584)
    assert set(tina.reward_weights) >= {"think_format", "cosine"}


def test_the_24gb_recipe_fits_a_24gb_card_by_the_planner():
    from fastgrpo.perf.plan import plan_memory
    from fastgrpo.perf.shapes import PRESETS

    cfg = _cfg("open-rs-exp3-24gb")
    plan = plan_memory(PRESETS["deepseek-r1-distill-qwen-1.5b"], "rtx4090-24gb", max_len=cfg.train.max_tokens_per_microbatch,
                       group=cfg.rollout.num_generations, prompts_per_step=cfg.rollout.prompts_per_step,
                       gradient_checkpointing=cfg.model.gradient_checkpointing, beta=cfg.loss.beta,
                       vllm_share=cfg.rollout.gpu_memory_utilization, lora_rank=cfg.lora.rank)
    assert plan.fits, plan.reasons
