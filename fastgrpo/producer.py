"""Where each step's rollouts come from, and with which weights: the synchronous loop, or a producer
thread that samples up to ``rollout.max_staleness`` steps ahead of the trainer (one-step-off and beyond).

Versions. The policy version is the number of optimizer steps behind a set of weights: the trainer
trains step t on version t - 1, and `sync` after step v loads version v into the engine. Every
completion carries the version that sampled it (``Completion.policy_version``).

The schedule is a fixed lag, not "as fresh as the race allows": with k = max_staleness, step t's
rollouts are sampled by exactly version max(v0, t - 1 - k) (v0: the version the run started or
resumed at). Two waits make it so:
- the producer starts step t's rollouts once the engine holds version >= t - 1 - k;
- the trainer's sync after step v waits until step v + k's rollouts are sampled (they need v - 1).
So a run is reproducible bit for bit whatever the two sides' speeds, staleness never exceeds k, and
a checkpoint after step v holds exactly the rollouts of steps v+1..v+k: they are saved with it
(``checkpoint_state``) and a resume trains on them instead of regenerating (exact resume). With
k = 1 the trainer trains step t while the engine samples step t + 1: generation and training overlap,
and each side waits only for the longer of the two.

Weight syncs never tear a rollout: generation (all of a step's rounds) and the sync take the same
engine lock, so each step's rollouts come from one version. k = 0 runs in the trainer's thread with
no lock: today's synchronous loop, call for call.

Where it runs: in-process engines (vLLM colocated, or the transformers engine on its own copy of the
model) sample in the producer thread while the trainer's thread trains - on CPU the two share the
cores; with ``rollout.mode=server`` the producer thread only waits on HTTP while the server's
device or machine generates. Sleep mode (freeing the engine's memory while training) cannot
overlap anything and is refused with k > 0 (config checks).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from fastgrpo.batch import StepBatch
from fastgrpo.phases import PhaseTimer

log = logging.getLogger("fastgrpo")

# collect(step, timer) -> the step's StepBatch (fastgrpo.trainer.collect_groups with its arguments bound).
Collect = Callable[[int, PhaseTimer], StepBatch]


class RolloutFailed(RuntimeError):
    """Sampling or grading a step's rollouts failed (in the producer thread when k > 0)."""


@dataclass
class ProducedBatch:
    """One step's rollouts and how they were made."""

    step: int
    batch: StepBatch
    version: int  # the policy version that sampled every completion of it
    sampler_state: dict  # the data sampler's state right after this step drew its prompts
    phase_s: dict[str, float] = field(default_factory=dict)  # rollout_s/reward_s, producer side (k > 0)
    producer_wait_s: float = 0.0  # how long the producer waited for the weights it needed


class RolloutProducer:
    """The trainer's one source of rollouts: ``next_batch(step)``, ``sync(policy, step)``,
    ``training()`` around an update, ``engine_lock()`` around other engine use (evaluation),
    ``checkpoint_state(step)``, ``close()``.

    ``pending``: saved ProducedBatch dicts of the steps after the one resumed from (checkpoint_state).
    ``threaded`` runs the producer thread even with max_staleness 0 (tests prove that thread and lock
    change nothing then).
    """

    def __init__(self, engine: Any, collect: Collect, sampler: Any, *, max_staleness: int, first_step: int,
                 last_step: int, timer: PhaseTimer, pending: list[dict] | None = None,
                 producer_timer: PhaseTimer | None = None, threaded: bool | None = None) -> None:
        if max_staleness < 0:
            raise ValueError(f"max_staleness must be >= 0, got {max_staleness}")
        self.engine, self.collect, self.sampler = engine, collect, sampler
        self.k, self.last_step = max_staleness, last_step
        self.version = first_step - 1  # what the engine holds: the weights after step first_step - 1
        self.timer = timer
        self.threaded = max_staleness > 0 if threaded is None else threaded
        self.producer_timer = producer_timer or PhaseTimer()
        self._ready: dict[int, ProducedBatch] = {}
        for saved in pending or []:
            produced = produced_from_dict(saved)
            self._ready[produced.step] = produced
        expected = list(range(first_step, first_step + len(self._ready)))
        if sorted(self._ready) != expected:
            raise ValueError(f"saved rollouts are for steps {sorted(self._ready)}, expected {expected} after step {first_step - 1}")
        # The sampler state after the newest produced step; before any: the state it starts in.
        self._sampler_after: dict[int, dict] = {first_step - 1: copy.deepcopy(sampler.state_dict())}
        for produced in self._ready.values():
            self._sampler_after[produced.step] = produced.sampler_state
        self._next_step = first_step + len(self._ready)  # the next step to produce
        self._produced_through = self._next_step - 1
        self._cond = threading.Condition()
        self._engine_lock = threading.Lock() if self.threaded else None
        self._error: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        if self.threaded and self._next_step <= last_step:
            self._thread = threading.Thread(target=self._produce_all, name="fastgrpo-rollouts", daemon=True)
            self._thread.start()

    # ---- the trainer's side -------------------------------------------------------------------

    def next_batch(self, step: int) -> tuple[ProducedBatch, float]:
        """Step ``step``'s rollouts and the seconds the trainer waited for them (0 when sampled here)."""
        if not self.threaded:
            produced = self._ready.pop(step, None)
            if produced is None:
                if step != self._next_step:
                    raise RuntimeError(f"rollouts are produced in step order: asked for step {step}, next is {self._next_step}")
                produced = self._produce(step, self.timer)
            return produced, 0.0
        t0 = time.perf_counter()
        with self._cond:
            while step not in self._ready and self._error is None:
                self._cond.wait()
            if step not in self._ready:
                raise RolloutFailed(f"the rollout producer failed before step {step} "
                                    f"({type(self._error).__name__}: {self._error})") from self._error
            produced = self._ready.pop(step)
        return produced, time.perf_counter() - t0

    @contextmanager
    def training(self) -> Iterator[None]:
        """Around an update: the synchronous loop lets the engine free its memory (sleep mode);
        with a producer thread the engine keeps sampling."""
        if self.threaded:
            yield
            return
        self.engine.sleep()
        yield
        self.engine.wake_up()

    def sync(self, policy: Any, step: int) -> float:
        """Load the weights after optimizer step ``step`` into the engine; returns the seconds the
        trainer waited for the producer first (the fixed lag: step + k must be sampled)."""
        if not self.threaded:
            self.engine.sync_weights(policy)
            self.version = step
            return 0.0
        needed = min(step + self.k, self.last_step)
        t0 = time.perf_counter()
        with self._cond:
            while self._produced_through < needed and self._error is None:
                self._cond.wait()
        waited = time.perf_counter() - t0
        with self._engine_lock:
            self.engine.sync_weights(policy)
            with self._cond:
                self.version = step
                self._cond.notify_all()
        return waited

    def engine_lock(self):
        """Hold this while using the engine for anything else (evaluation): no sync or rollout runs meanwhile."""
        return self._engine_lock if self.threaded else nullcontext()

    def checkpoint_state(self, step: int) -> dict[str, Any]:
        """What a checkpoint after ``step`` needs to resume exactly: the data sampler's state and the
        rollouts already sampled for the steps after it (with k > 0, steps step+1..step+k once
        ``sync(policy, step)`` returned). Batches trained on are never in it."""
        with self._cond:
            ahead = []
            while step + len(ahead) + 1 in self._ready:
                ahead.append(self._ready[step + len(ahead) + 1])
            sampler = self._sampler_after.get(step + len(ahead))
        if sampler is None:
            raise RuntimeError(f"no data-sampler state recorded after step {step + len(ahead)}")
        return {"sampler": sampler, "pending_rollouts": [produced_to_dict(p) for p in ahead]}

    def close(self) -> None:
        """Stop the producer thread (it finishes the generation it is in) and wait for it."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # ---- the producer's side -------------------------------------------------------------------

    def _produce(self, step: int, timer: PhaseTimer, waited: float = 0.0) -> ProducedBatch:
        with self.engine_lock():
            version = self.version
            batch = self.collect(step, timer)
        batch.samples = [dataclasses.replace(s, policy_version=version) for s in batch.samples]
        produced = ProducedBatch(step, batch, version, copy.deepcopy(self.sampler.state_dict()), producer_wait_s=waited)
        with self._cond:
            self._sampler_after[step] = produced.sampler_state
            for old in [s for s in self._sampler_after if s < step - self.k - 1]:
                del self._sampler_after[old]  # only the newest k + 1 can still be asked for
            self._next_step = step + 1
            self._produced_through = step
        return produced

    def _produce_all(self) -> None:
        try:
            for step in range(self._next_step, self.last_step + 1):
                t0 = time.perf_counter()
                with self._cond:
                    while self.version < step - 1 - self.k and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        return
                produced = self._produce(step, self.producer_timer, waited=time.perf_counter() - t0)
                produced.phase_s = self.producer_timer.pop()
                with self._cond:
                    self._ready[step] = produced
                    self._cond.notify_all()
        except BaseException as exc:  # handed to the trainer, which stops with a checkpoint
            log.error("the rollout producer stopped: %s: %s", type(exc).__name__, exc)
            with self._cond:
                self._error = exc
                self._cond.notify_all()


def staleness_metrics(produced: ProducedBatch, step: int) -> dict[str, float]:
    """How many optimizer steps behind the trained weights (version step - 1) each completion was sampled."""
    lags = [step - 1 - s.policy_version for s in produced.batch.samples]
    return {"staleness_mean": sum(lags) / len(lags), "staleness_max": float(max(lags))}


def produced_to_dict(produced: ProducedBatch) -> dict[str, Any]:
    """A JSON-able form of a produced batch (it goes into the checkpoint's trainer_state.json)."""
    b = produced.batch
    return {"step": produced.step, "version": produced.version, "sampler_state": produced.sampler_state,
            "batch": {"prompts": b.prompts, "samples": [dataclasses.asdict(s) for s in b.samples], "rewards": b.rewards,
                      "per_reward": b.per_reward, "stats": b.stats, "reward_metrics": b.reward_metrics}}


def produced_from_dict(data: dict[str, Any]) -> ProducedBatch:
    from fastgrpo.rollout.base import Completion  # the engines' record; imported late (batch.py does the same)

    b = data["batch"]
    batch = StepBatch(b["prompts"], [Completion(**s) for s in b["samples"]], b["rewards"], b["per_reward"],
                      stats=b["stats"], reward_metrics=b["reward_metrics"])
    return ProducedBatch(int(data["step"]), batch, int(data["version"]), data["sampler_state"])
