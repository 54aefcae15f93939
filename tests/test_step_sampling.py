"""What one step samples: DAPO dynamic sampling of informative groups, and iterative lengthening."""

from __future__ import annotations

import pytest

from fastgrpo.config import ConfigError, load_config
from fastgrpo.metrics import read_metrics
from fastgrpo.phases import PhaseTimer
from fastgrpo.rollout.base import Completion
from fastgrpo.trainer import collect_groups, completion_limit, longest_completion, train

from helpers.trainer_setup import tiny_config


class ScriptedEngine:
    """Answers each prompt with G completions whose text is the prompt's scripted answers."""

    def __init__(self, answers_by_prompt: dict[int, list[str]]):
        self.answers_by_prompt = answers_by_prompt
        self.calls: list[dict] = []

    def generate(self, prompts, n, max_tokens, temperature, top_p, seed):
        self.calls.append({"n_prompts": len(prompts), "max_tokens": max_tokens, "seed": seed})
        out = []
        for j, prompt in enumerate(prompts):
            for text in self.answers_by_prompt[prompt[0]][:n]:
                out.append(Completion(prompt_index=j, token_ids=[1, 2], logprobs=[-0.1, -0.2], text=text, finish_reason="stop"))
        return out


class ListSampler:
    """Batches of problems in a fixed order; problem i has prompt token [i] and answer "1"."""

    def __init__(self, n: int, batch: int):
        self.problems = [{"id": i, "problem": f"p{i}", "answer": "1"} for i in range(n)]
        self.batch, self.position = batch, 0

    def __next__(self):
        out = self.problems[self.position: self.position + self.batch]
        self.position += self.batch
        return out


def encode(problems):
    return [[p["id"]] for p in problems]


RIGHT, WRONG = "\\boxed{1}", "\\boxed{2}"


def config(*extra):
    return load_config(None, ["rollout.prompts_per_step=2", "rollout.num_generations=2",
                              "reward_weights={accuracy: 1.0}", *extra])


def test_dynamic_sampling_replaces_flat_groups_with_fresh_prompts():
    # prompts 0 and 1 are all-right / all-wrong (flat), 2 is mixed, 3 is mixed
    engine = ScriptedEngine({0: [RIGHT, RIGHT], 1: [WRONG, WRONG], 2: [RIGHT, WRONG], 3: [WRONG, RIGHT]})
    batch = collect_groups(engine, ListSampler(4, 2), encode, config("rollout.dynamic_sampling_rounds=3"),
                           step=1, max_tokens=8, timer=PhaseTimer())
    assert batch.prompts == [[2], [3]]
    assert [s.prompt_index for s in batch.samples] == [0, 0, 1, 1]
    assert batch.rewards == [1.0, 0.0, 0.0, 1.0]
    assert batch.stats["dynamic_flat_frac"] == pytest.approx(2 / 4)
    assert batch.stats["dynamic_prompts_drawn"] == 4 and batch.stats["dynamic_flat_in_batch"] == 0
    assert len(engine.calls) == 2 and engine.calls[0]["seed"] != engine.calls[1]["seed"]


def test_dynamic_sampling_fills_with_flat_groups_when_rounds_run_out():
    engine = ScriptedEngine({0: [RIGHT, RIGHT], 1: [RIGHT, WRONG], 2: [WRONG, WRONG], 3: [WRONG, WRONG]})
    batch = collect_groups(engine, ListSampler(4, 2), encode, config("rollout.dynamic_sampling_rounds=1"),
                           step=1, max_tokens=8, timer=PhaseTimer())
    # one informative group (prompt 1), then the first flat group keeps the batch size at 2
    assert batch.prompts == [[1], [0]]
    assert batch.stats["dynamic_flat_in_batch"] == 1 and batch.stats["dynamic_flat_frac"] == pytest.approx(3 / 4)


def test_without_dynamic_sampling_flat_groups_stay():
    engine = ScriptedEngine({0: [RIGHT, RIGHT], 1: [WRONG, WRONG]})
    batch = collect_groups(engine, ListSampler(2, 2), encode, config(), step=3, max_tokens=8, timer=PhaseTimer())
    assert batch.prompts == [[0], [1]] and batch.rewards == [1.0, 1.0, 0.0, 0.0]
    assert batch.stats == {} and len(engine.calls) == 1 and engine.calls[0]["max_tokens"] == 8


def test_length_stages_switch_the_limit_at_their_steps():
    cfg = load_config(None, ["rollout.max_completion_length=16", "rollout.length_stages=[[3, 32], [5, 48]]",
                             "train.max_tokens_per_microbatch=256"])
    assert [completion_limit(cfg, s) for s in range(1, 7)] == [16, 16, 32, 32, 48, 48]
    assert longest_completion(cfg) == 48
    assert completion_limit(load_config(None, []), 7) == load_config(None, []).rollout.max_completion_length


@pytest.mark.parametrize("stages, message", [
    ("[[3, 32], [2, 48]]", "must increase"),
    ("[[0, 32]]", "must be >= 1"),
    ("[[2, 5000]]", "longest length stage"),
])
def test_bad_length_stages_name_the_key(stages, message):
    with pytest.raises(ConfigError, match="length_stages|max_tokens_per_microbatch") as err:
        load_config(None, [f"rollout.length_stages={stages}"])
    assert message in str(err.value)


def test_lengthening_and_dynamic_sampling_in_a_run(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(tiny_model_dir, out, "transformers", "eval.before_and_after=false", "train.max_steps=3",
                      "rollout.max_completion_length=6", "rollout.length_stages=[[3, 12]]",
                      "rollout.dynamic_sampling_rounds=2"))
    steps = [r for r in read_metrics(out) if "eval" not in r]
    assert [r["max_completion_length"] for r in steps] == [6, 6, 12]
    assert max(r["completion_len_mean"] for r in steps[:2]) <= 6
    for r in steps:
        assert 0 <= r["dynamic_flat_frac"] <= 1 and r["dynamic_prompts_drawn"] >= 2
