"""Tests for fastgrpo.data.sampling: dataset names, weighted mixtures, data reuse, curriculum order, resume."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from fastgrpo.config import ConfigError, load_config
from fastgrpo.data.sampling import PromptSampler
from fastgrpo.data.problems import SOURCE_KEY, load_training_data
from fastgrpo.data.sampling import MixtureSampler, make_sampler, select_unique
from fastgrpo.data.sources import dataset_label, resolve_dataset
from fastgrpo.preflight import check_run


def _problems(prefix: str, n: int) -> list[dict]:
    return [{"problem": f"{prefix} problem {i}?", "answer": str(i), "id": f"{prefix}-{i}"} for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"problem": r["problem"], "answer": r["answer"]}) + "\n" for r in rows))
    return path


def _source_of(problem: dict) -> str:
    return problem["id"].split("-")[0]


# ----------------------------------------------------------------------------------------------
# MixtureSampler
# ----------------------------------------------------------------------------------------------


def test_weights_are_respected_statistically():
    sources = {"hard": _problems("hard", 100), "mid": _problems("mid", 60), "easy": _problems("easy", 7)}
    weights = {"hard": 3.0, "mid": 3.0, "easy": 1.0}
    sampler = MixtureSampler(sources, weights, batch_size=70, seed=11)
    n_batches = 100
    counts = Counter(_source_of(p) for _ in range(n_batches) for p in next(sampler))
    n = 70 * n_batches
    for name, weight in weights.items():
        p = weight / 7.0
        sigma = math.sqrt(n * p * (1 - p))
        # 4.5 sigma: a correct sampler fails this about once in 150,000 seeds; a sampler that ignored
        # the weights (1/3 each) would be off by > 30 sigma for "easy".
        assert abs(counts[name] - n * p) < 4.5 * sigma, (name, counts, n * p)


def test_each_source_walks_its_problems_in_epochs():
    # "easy" (5 problems, weight 1) is revisited many times: every epoch is a permutation of it, and
    # the epochs are reshuffled (not one fixed order).
    sources = {"hard": _problems("hard", 40), "easy": _problems("easy", 5)}
    sampler = MixtureSampler(sources, {"hard": 1.0, "easy": 1.0}, batch_size=8, seed=3)
    easy = [p["id"] for _ in range(40) for p in next(sampler) if _source_of(p) == "easy"]
    assert len(easy) >= 100
    epochs = [easy[i : i + 5] for i in range(0, len(easy) - 4, 5)]
    assert all(sorted(e) == [f"easy-{i}" for i in range(5)] for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1


def test_same_seed_same_draws_other_seed_other_draws():
    sources = {"a": _problems("a", 30), "b": _problems("b", 30)}

    def draws(seed):
        sampler = MixtureSampler(sources, {"a": 2.0, "b": 1.0}, batch_size=6, seed=seed)
        return [p["id"] for _ in range(5) for p in next(sampler)]

    assert draws(5) == draws(5)
    assert draws(5) != draws(6)


@pytest.mark.parametrize("shuffle", [True, False])
def test_resume_continues_exactly(shuffle):
    sources = {"a": _problems("a", 13), "b": _problems("b", 4), "c": _problems("c", 9)}
    weights = {"a": 2.0, "b": 1.0, "c": 1.5}
    straight = MixtureSampler(sources, weights, batch_size=5, seed=9, shuffle=shuffle)
    expected = [[p["id"] for p in next(straight)] for _ in range(12)]

    first = MixtureSampler(sources, weights, batch_size=5, seed=9, shuffle=shuffle)
    head = [[p["id"] for p in next(first)] for _ in range(7)]
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints store it as JSON
    resumed = MixtureSampler(sources, weights, batch_size=5, seed=9, shuffle=shuffle)
    resumed.load_state_dict(state)
    tail = [[p["id"] for p in next(resumed)] for _ in range(5)]
    assert head + tail == expected


def test_without_shuffle_every_epoch_is_in_file_order():
    sampler = MixtureSampler({"cl": _problems("cl", 7)}, {"cl": 1.0}, batch_size=3, seed=0, shuffle=False)
    ids = [p["id"] for _ in range(7) for p in next(sampler)]
    assert ids == [f"cl-{i % 7}" for i in range(21)]


def test_sampler_errors_name_the_problem():
    good = {"a": _problems("a", 3)}
    with pytest.raises(ValueError, match="weight of 'a' must be a finite number > 0, got 0"):
        MixtureSampler(good, {"a": 0}, batch_size=2, seed=0)
    with pytest.raises(ValueError, match=r"mixture sources \['b'\] have no problems"):
        MixtureSampler({**good, "b": []}, {"a": 1, "b": 1}, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="must name the same datasets"):
        MixtureSampler(good, {"b": 1}, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
        MixtureSampler(good, {"a": 1}, batch_size=0, seed=0)

    sampler = MixtureSampler(good, {"a": 1}, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="not saved by a MixtureSampler"):
        sampler.load_state_dict(PromptSampler(good["a"], 2, seed=0).state_dict())
    other = MixtureSampler({"a": _problems("a", 4)}, {"a": 1}, batch_size=2, seed=0)
    with pytest.raises(ValueError, match=r"saved over sources \(name, size\) \[\('a', 4\)\]"):
        sampler.load_state_dict(other.state_dict())


# ----------------------------------------------------------------------------------------------
# Finding and loading datasets
# ----------------------------------------------------------------------------------------------


def test_resolve_dataset_by_name_or_path(tmp_path):
    train_file = _write_jsonl(tmp_path / "train" / "hard.jsonl", _problems("hard", 2))
    flat_file = _write_jsonl(tmp_path / "flat.jsonl", _problems("flat", 2))
    assert resolve_dataset("hard", tmp_path, "train") == train_file
    assert resolve_dataset("flat", tmp_path, "train") == flat_file  # <data_dir>/<name> also works
    assert resolve_dataset(str(train_file), "elsewhere", "train") == train_file  # a path is a path
    with pytest.raises(FileNotFoundError, match=r"no dataset 'harder'.*names available there: flat, hard"):
        resolve_dataset("harder", tmp_path, "train")
    assert dataset_label("hard") == "hard" and dataset_label("some/dir/aime24.jsonl") == "aime24"


def test_load_training_data_tags_sources_and_holds_out(tmp_path):
    _write_jsonl(tmp_path / "train" / "hard.jsonl", _problems("hard", 20))
    _write_jsonl(tmp_path / "train" / "easy.jsonl", _problems("easy", 10))
    cfg = load_config(None, [f"data.data_dir={tmp_path}", "data.mixture={hard: 2, easy: 1}", "data.num_eval=6"])
    train, held_out = load_training_data(cfg.data, seed=0)
    assert len(held_out) == 6 and len(train) == 24
    assert {p[SOURCE_KEY] for p in train} == {"hard", "easy"}
    assert not {p["problem"] for p in train} & {p["problem"] for p in held_out}
    assert all(p[SOURCE_KEY] == ("hard" if p["problem"].startswith("hard") else "easy") for p in train)

    # an eval_dataset given by name comes from <data_dir>/eval/
    _write_jsonl(tmp_path / "eval" / "bench.jsonl", _problems("hard", 3))
    cfg = load_config(None, [f"data.data_dir={tmp_path}", "data.mixture={hard: 2, easy: 1}",
                             "data.eval_dataset=bench", "data.num_eval=3"])
    train, held_out = load_training_data(cfg.data, seed=0)
    assert [p["problem"] for p in held_out] == [f"hard problem {i}?" for i in range(3)]
    assert len(train) == 27  # the three shared texts left the training set

    # no mixture: data.dataset by name
    cfg = load_config(None, [f"data.data_dir={tmp_path}", "data.dataset=easy", "data.num_eval=2"])
    train, held_out = load_training_data(cfg.data, seed=0)
    assert len(train) == 8 and len(held_out) == 2 and SOURCE_KEY not in train[0]


# ----------------------------------------------------------------------------------------------
# make_sampler: the trainer's entry point
# ----------------------------------------------------------------------------------------------


def test_plain_data_keeps_prompt_sampler_and_unique_problems_caps_reuse():
    problems = _problems("p", 50)
    cfg = load_config(None, ["rollout.prompts_per_step=4"])
    assert isinstance(make_sampler(cfg, problems), PromptSampler)

    cfg = load_config(None, ["rollout.prompts_per_step=4", "data.unique_problems=6", "train.seed=2"])
    sampler = make_sampler(cfg, problems)
    seen = [p["id"] for _ in range(30) for p in next(sampler)]  # 120 prompts from 6 problems: 20 epochs
    assert len(set(seen)) == 6 and Counter(seen).most_common()[-1][1] == 20
    assert set(seen) == {p["id"] for p in select_unique(problems, 6, seed=2)}


def test_curriculum_order_survives_a_unique_pick():
    problems = _problems("cl", 40)
    cfg = load_config(None, ["rollout.prompts_per_step=5", "data.unique_problems=10", "data.shuffle=false"])
    sampler = make_sampler(cfg, problems)
    ids = [p["id"] for _ in range(4) for p in next(sampler)]
    order = [int(i.split("-")[1]) for i in ids[:10]]
    assert order == sorted(order) and ids[10:20] == ids[:10]


def test_mixture_with_unique_problems_keeps_weight_shares():
    train = [{**p, SOURCE_KEY: name} for name in ("s1", "ds", "easy") for p in _problems(name, 50)]
    cfg = load_config(None, ["data.mixture={s1: 3000, ds: 3000, easy: 1000}", "data.unique_problems=70",
                             "rollout.prompts_per_step=10"])
    sampler = make_sampler(cfg, train)
    assert isinstance(sampler, MixtureSampler)
    assert [len(rows) for rows in sampler.sources] == [30, 30, 10]  # the 3,000 / 3,000 / 1,000 split, scaled
    with pytest.raises(ValueError, match="load a mixture with fastgrpo.data.problems.load_training_data"):
        make_sampler(cfg, _problems("s1", 5))


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.mixture={a: 0}", "data.mixture.a: the weight must be a finite number > 0, got 0.0"),
        ("data.mixture={a: -1, b: 1}", "data.mixture.a: the weight must be"),
        ("data.mixture={arithmetic: 1}", "the built-in arithmetic task cannot be mixed"),
        ("data.mixture={a: heavy}", "data.mixture.a: expected a number, got 'heavy'"),
        ("data.unique_problems=0", "data.unique_problems must be >= 1"),
        ("eval.suite_limit=0", "eval.suite_limit must be >= 1"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_suite_names_that_collide_fail_the_preflight_before_any_file_is_read(tmp_path):
    cfg = load_config(None, ["eval.suite=[aime24, x/aime24.jsonl]", f"model.path={tmp_path / 'absent'}"])
    with pytest.raises(ConfigError, match=r"eval.suite: the names \['aime24'\] occur twice") as caught:
        check_run(cfg)
    assert caught.value.key == "eval.suite"


def test_mixture_and_dataset_are_exclusive():
    with pytest.raises(ConfigError, match="data.mixture replaces data.dataset"):
        load_config(None, ["data.dataset=x.jsonl", "data.mixture={a: 1}"])
    with pytest.raises(ConfigError, match="cannot give each of the 3 mixture sources a problem"):
        load_config(None, ["data.mixture={a: 1, b: 1, c: 1}", "data.unique_problems=2"])
