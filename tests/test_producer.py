"""The rollout producer on its own: the fixed-lag schedule (no rollout older than k steps, each
completion stamped with the version that sampled it), no sync inside a generation, the state a
checkpoint saves, and failures handed to the trainer. A fake engine whose tokens are its version
makes every claim checkable; random sleeps on both sides show the schedule does not depend on speed."""

from __future__ import annotations

import random
import threading
import time

import pytest

from fastgrpo.batch import StepBatch
from fastgrpo.phases import PhaseTimer
from fastgrpo.producer import RolloutFailed, RolloutProducer, produced_from_dict, staleness_metrics
from fastgrpo.rollout.base import Completion


class VersionedEngine:
    """Samples tokens equal to the version it holds; refuses a sync while a generation runs."""

    name = "fake"

    def __init__(self, jitter: float = 0.0, seed: int = 0):
        self.version, self.generating, self.jitter = 0, False, jitter
        self.rng = random.Random(seed)
        self.log: list[tuple[str, int]] = []

    def generate(self, prompt_ids, n, max_tokens, **_):
        self.generating = True
        try:
            held = self.version
            time.sleep(self.rng.random() * self.jitter)
            assert self.version == held, "the weights changed during a generation"
            return [Completion(i // n, [held] * 3, [0.0] * 3, "x", "stop") for i in range(len(prompt_ids) * n)]
        finally:
            self.generating = False

    def sync_weights(self, version):
        if self.generating:
            raise AssertionError("sync during a generation: a rollout would mix two versions")
        self.version = version
        self.log.append(("sync", version))
        return 0.0

    def sleep(self):
        self.log.append(("sleep", self.version))

    def wake_up(self):
        self.log.append(("wake", self.version))


class CountingSampler:
    def __init__(self):
        self.position = 0

    def draw(self):
        self.position += 1
        return self.position

    def state_dict(self):
        return {"position": self.position}


def make_collect(engine, sampler, rounds=2, fail_at=None):
    """Two generate calls per step (as dynamic sampling makes): both must see one version."""
    def collect(step, timer):
        if step == fail_at:
            raise ValueError(f"grader exploded at step {step}")
        samples = []
        for _ in range(rounds):
            sampler.draw()
            samples += engine.generate([[1], [2]], n=2, max_tokens=3)
        return StepBatch([[1], [2]], samples, [float(step)] * len(samples), {"accuracy": [0.0] * len(samples)})
    return collect


def run(k, steps, *, jitter=0.0, threaded=None, train_s=0.0, seed=0, stop_after=None, pending=None, first_step=1,
        engine=None, sampler=None):
    engine = engine or VersionedEngine(jitter, seed)
    if engine.version == 0:
        engine.version = first_step - 1
    sampler = sampler or CountingSampler()
    producer = RolloutProducer(engine, make_collect(engine, sampler), sampler, max_staleness=k, first_step=first_step,
                               last_step=steps, timer=PhaseTimer(), pending=pending, threaded=threaded)
    rng, seen, states = random.Random(seed + 1), [], {}
    try:
        for step in range(first_step, steps + 1):
            produced, _ = producer.next_batch(step)
            seen.append(produced)
            with producer.training():
                time.sleep(rng.random() * train_s)
            producer.sync(step, step)
            states[step] = producer.checkpoint_state(step)
            if step == stop_after:
                break
    finally:
        producer.close()
    return seen, states, engine


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_step_t_is_sampled_by_exactly_version_t_minus_1_minus_k_whatever_the_speeds(k):
    for seed, (jitter, train_s) in enumerate([(0.0, 0.0), (0.01, 0.0), (0.0, 0.01), (0.005, 0.005)]):
        seen, _, engine = run(k, 7, jitter=jitter, train_s=train_s, seed=seed)
        assert [p.step for p in seen] == list(range(1, 8))
        for p in seen:
            assert p.version == max(0, p.step - 1 - k), (k, p.step, p.version)
            # every completion carries the version that generated it: the engine wrote it into the tokens
            assert all(s.policy_version == s.token_ids[0] == p.version for s in p.batch.samples)
            lag = staleness_metrics(p, p.step)
            assert lag["staleness_max"] <= k and lag["staleness_mean"] == p.step - 1 - p.version
        assert [v for what, v in engine.log if what == "sync"] == list(range(1, 8))


def test_the_synchronous_loop_samples_in_the_trainers_thread_and_lets_the_engine_sleep():
    engine = VersionedEngine()
    threads = []
    original = engine.generate
    engine.generate = lambda *a, **kw: threads.append(threading.current_thread()) or original(*a, **kw)
    seen, _, _ = run(0, 3, engine=engine)
    assert set(threads) == {threading.main_thread()}
    assert [p.version for p in seen] == [0, 1, 2]
    assert [what for what, _ in engine.log] == ["sleep", "wake", "sync"] * 3
    threaded, _, engine = run(1, 3)
    assert "sleep" not in [what for what, _ in engine.log]  # the engine samples while the trainer trains


def test_threaded_with_no_staleness_matches_the_synchronous_loop():
    inline, inline_states, _ = run(0, 5)
    threaded, threaded_states, _ = run(0, 5, threaded=True, jitter=0.01)
    assert [(p.step, p.version, p.batch.rewards) for p in inline] == [(p.step, p.version, p.batch.rewards) for p in threaded]
    assert inline_states == threaded_states


@pytest.mark.parametrize("k", [1, 2])
def test_a_checkpoint_holds_the_rollouts_sampled_ahead_and_a_resume_continues_exactly(k):
    straight, straight_states, _ = run(k, 7, jitter=0.005)
    _, states, _ = run(k, 7, jitter=0.005, stop_after=3)
    saved = states[3]
    assert [p["step"] for p in saved["pending_rollouts"]] == list(range(4, 4 + k))
    # the data sampler is saved as it was after the last of those steps drew its prompts (2 per step)
    assert saved["sampler"] == {"position": 2 * (3 + k)}
    sampler = CountingSampler()
    sampler.position = saved["sampler"]["position"]
    resumed, resumed_states, _ = run(k, 7, jitter=0.005, pending=saved["pending_rollouts"], first_step=4, sampler=sampler)
    assert [(p.step, p.version, [s.token_ids for s in p.batch.samples]) for p in resumed] == \
           [(p.step, p.version, [s.token_ids for s in p.batch.samples]) for p in straight[3:]]
    assert {s: v for s, v in resumed_states.items()} == {s: v for s, v in straight_states.items() if s >= 4}


def test_saved_rollouts_round_trip_through_json():
    import json

    _, states, _ = run(1, 4, stop_after=2)
    saved = json.loads(json.dumps(states[2]))["pending_rollouts"][0]
    produced = produced_from_dict(saved)
    assert produced.step == 3 and produced.version == 1
    assert all(isinstance(s, Completion) and s.policy_version == 1 for s in produced.batch.samples)


def test_resuming_with_rollouts_for_the_wrong_steps_is_refused():
    _, states, _ = run(1, 4, stop_after=2)
    with pytest.raises(ValueError, match=r"saved rollouts are for steps \[3\], expected \[5\] after step 4"):
        RolloutProducer(VersionedEngine(), make_collect(VersionedEngine(), CountingSampler()), CountingSampler(),
                        max_staleness=1, first_step=5, last_step=6, timer=PhaseTimer(),
                        pending=states[2]["pending_rollouts"])


@pytest.mark.parametrize("k", [0, 1, 2])
def test_a_failure_in_the_producer_reaches_the_trainer_with_what_can_be_saved(k):
    engine, sampler = VersionedEngine(), CountingSampler()
    producer = RolloutProducer(engine, make_collect(engine, sampler, fail_at=3), sampler, max_staleness=k,
                               first_step=1, last_step=6, timer=PhaseTimer())
    try:
        for step in (1, 2):
            producer.next_batch(step)
            producer.sync(step, step)  # with k > 0 the wait for step + k ends at the failure
        with pytest.raises(ValueError if k == 0 else RolloutFailed, match="grader exploded at step 3"):
            producer.next_batch(3)
        state = producer.checkpoint_state(2)
        assert state["pending_rollouts"] == [] and state["sampler"] == {"position": 4}
    finally:
        producer.close()


def test_closing_stops_a_producer_that_waits_for_weights():
    engine, sampler = VersionedEngine(), CountingSampler()
    producer = RolloutProducer(engine, make_collect(engine, sampler), sampler, max_staleness=1, first_step=1,
                               last_step=10, timer=PhaseTimer())
    producer.next_batch(1)
    time.sleep(0.05)  # it samples step 2 (version 0), then waits for version 1
    producer.close()
    assert producer._thread is None and sampler.position == 4
