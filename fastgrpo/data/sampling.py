"""Training data beyond one file: datasets found by name, weighted mixtures, data reuse, curriculum order.

- ``resolve_dataset("open-s1", "data", "train")`` finds ``data/train/open-s1.jsonl`` (or .parquet,
  .json, a saved-dataset folder); a path that exists is used as it is.
- ``data.mixture: {open-s1: 3, open-deepscaler: 3, deepscaler-easy: 1}``: every prompt's source is
  drawn with probability weight / sum(weights), and each source is walked in its own epochs
  (reshuffled per epoch, or in file order with ``data.shuffle: false``). This is how open-rs
  Exp 2 balances hard and easy problems.
- ``data.unique_problems: N``: train on a seeded pick of N problems, revisited every epoch. The
  scaling study found that reusing high-quality data up to ~25 times costs almost nothing: the
  number of optimization steps matters more than the number of unique problems. The reuse factor
  of a run is ``train.max_steps * rollout.prompts_per_step / N``.

``make_sampler(cfg, train)`` returns the sampler the
trainer draws prompt batches from: data.PromptSampler in the plain case, else a MixtureSampler.
Both are resumable at the exact draw through ``state_dict``/``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fastgrpo.data.problems import SOURCE_KEY

# ----------------------------------------------------------------------------------------------
# Sampling prompt batches
# ----------------------------------------------------------------------------------------------


class PromptSampler:
    """Endless batches of problems, reshuffled every epoch; resumable at the exact position.

    Epoch e visits the problems in the order of ``np.random.default_rng([seed, e]).permutation``,
    so the order depends only on (seed, epoch), not on how many batches came before. Batches are
    always full: a batch that reaches the end of an epoch continues into the next (reusing data
    is what longer training means: total optimization steps matter more than unique problems).
    """

    def __init__(self, problems: Sequence[dict], batch_size: int, seed: int):
        if len(problems) == 0:
            raise ValueError("PromptSampler needs at least one problem, got an empty list")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.problems = list(problems)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.problems))

    def __iter__(self) -> PromptSampler:
        return self

    def __next__(self) -> list[dict]:
        batch = []
        while len(batch) < self.batch_size:
            if self.position == len(self.problems):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(batch), len(self.problems) - self.position)
            batch.extend(self.problems[i] for i in self._order[self.position : self.position + take])
            self.position += take
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "n_problems": len(self.problems)}

    def load_state_dict(self, state: Mapping) -> None:
        missing = {"epoch", "position", "seed"} - set(state)
        if missing:
            raise ValueError(f"sampler state lacks {sorted(missing)}; expected epoch, position, seed")
        n_problems = state.get("n_problems", len(self.problems))
        if n_problems != len(self.problems):
            raise ValueError(
                f"sampler state was saved over {n_problems} problems, this sampler has {len(self.problems)}"
            )
        if not 0 <= int(state["position"]) <= len(self.problems):
            raise ValueError(f"sampler position {state['position']} is outside 0..{len(self.problems)}")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


# ----------------------------------------------------------------------------------------------
# Mixtures and data reuse
# ----------------------------------------------------------------------------------------------


def select_unique(problems: Sequence[dict], n: int | None, seed: int) -> list[dict]:
    """A seeded pick of `n` problems in their original order (all of them when n is None or >= len)."""
    if n is None or n >= len(problems):
        return list(problems)
    if n < 1:
        raise ValueError(f"the number of unique problems must be >= 1, got {n}")
    picked = np.random.default_rng([seed, 0x5EED]).choice(len(problems), size=n, replace=False)
    return [problems[i] for i in sorted(picked.tolist())]


def split_by_source(problems: Sequence[dict], names: Sequence[str]) -> dict[str, list[dict]]:
    """{source name: its problems} in the order of `names`, from problems tagged with SOURCE_KEY."""
    by_source: dict[str, list[dict]] = {name: [] for name in names}
    for problem in problems:
        source = problem.get(SOURCE_KEY)
        if source not in by_source:
            raise ValueError(
                f"problem {problem.get('id')!r} has {SOURCE_KEY}={source!r}, not one of the mixture's sources "
                f"{list(names)}; load a mixture with fastgrpo.data.problems.load_training_data"
            )
        by_source[source].append(problem)
    empty = [name for name, rows in by_source.items() if not rows]
    if empty:
        raise ValueError(f"the mixture sources {empty} have no training problems")
    return by_source


# ----------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------

_SOURCE_DRAW_STREAM = 1  # the seed-sequence tag of the source draws (epoch orders use the source index)


class MixtureSampler:
    """Endless batches of problems from weighted sources; resumable at the exact draw.

    Draw i (counting from 0 over the whole run) picks a source with probability weight / sum using
    ``np.random.default_rng([seed, 1, i])``, then takes that source's next problem. Source s walks
    its problems in epochs: epoch e in the order ``np.random.default_rng([seed, 1000 + s, e])
    .permutation(n_s)`` (or file order when shuffle is False), so every draw depends only on
    (seed, i) and the per-source positions, never on how batches were cut.
    """

    def __init__(self, sources: Mapping[str, Sequence[dict]], weights: Mapping[str, float], batch_size: int,
                 seed: int, shuffle: bool = True):
        if not sources:
            raise ValueError("MixtureSampler needs at least one source, got none")
        if set(sources) != set(weights):
            raise ValueError(f"sources {sorted(sources)} and weights {sorted(weights)} must name the same datasets")
        for name, weight in weights.items():
            if not (isinstance(weight, (int, float)) and np.isfinite(weight) and weight > 0):
                raise ValueError(f"mixture weight of {name!r} must be a finite number > 0, got {weight!r}")
        empty = [name for name, rows in sources.items() if len(rows) == 0]
        if empty:
            raise ValueError(f"mixture sources {empty} have no problems")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.names = list(sources)
        self.sources = [list(sources[name]) for name in self.names]
        total = float(sum(weights[name] for name in self.names))
        self.probabilities = [weights[name] / total for name in self.names]
        self._cumulative = np.cumsum(self.probabilities)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.draws = 0
        self.epochs = [0] * len(self.names)
        self.positions = [0] * len(self.names)
        self._orders = [self._order(s, 0) for s in range(len(self.names))]

    def _order(self, source: int, epoch: int) -> np.ndarray:
        n = len(self.sources[source])
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, 1000 + source, epoch]).permutation(n)

    def _pick_source(self, draw: int) -> int:
        u = np.random.default_rng([self.seed, _SOURCE_DRAW_STREAM, draw]).random()
        return min(int(np.searchsorted(self._cumulative, u, side="right")), len(self.names) - 1)

    def _take(self, source: int) -> dict:
        if self.positions[source] == len(self.sources[source]):
            self.epochs[source] += 1
            self.positions[source] = 0
            self._orders[source] = self._order(source, self.epochs[source])
        problem = self.sources[source][int(self._orders[source][self.positions[source]])]
        self.positions[source] += 1
        return problem

    def __iter__(self) -> MixtureSampler:
        return self

    def __next__(self) -> list[dict]:
        batch = []
        for _ in range(self.batch_size):
            batch.append(self._take(self._pick_source(self.draws)))
            self.draws += 1
        return batch

    def state_dict(self) -> dict:
        return {
            "kind": "mixture",
            "seed": self.seed,
            "draws": self.draws,
            "shuffle": self.shuffle,
            "sources": [{"name": name, "n_problems": len(rows), "epoch": e, "position": p}
                        for name, rows, e, p in zip(self.names, self.sources, self.epochs, self.positions)],
        }

    def load_state_dict(self, state: Mapping) -> None:
        if state.get("kind") != "mixture":
            raise ValueError(
                "sampler state was not saved by a MixtureSampler (a run started without data.mixture / "
                "unique_problems / shuffle: false cannot resume with them)"
            )
        saved = [(s["name"], s["n_problems"]) for s in state["sources"]]
        mine = [(name, len(rows)) for name, rows in zip(self.names, self.sources)]
        if saved != mine:
            raise ValueError(f"sampler state was saved over sources (name, size) {saved}, this sampler has {mine}")
        if bool(state["shuffle"]) != self.shuffle:
            raise ValueError(f"sampler state was saved with shuffle={state['shuffle']}, this sampler has {self.shuffle}")
        for s, entry in enumerate(state["sources"]):
            if not 0 <= int(entry["position"]) <= len(self.sources[s]):
                raise ValueError(f"sampler position {entry['position']} of {entry['name']!r} is outside 0..{len(self.sources[s])}")
        self.seed, self.draws = int(state["seed"]), int(state["draws"])
        self.epochs = [int(s["epoch"]) for s in state["sources"]]
        self.positions = [int(s["position"]) for s in state["sources"]]
        self._orders = [self._order(s, e) for s, e in enumerate(self.epochs)]


def make_sampler(cfg, train_problems: Sequence[dict]) -> PromptSampler | MixtureSampler:
    """The trainer's prompt sampler for a Config: ``rollout.prompts_per_step`` problems a batch,
    seeded with ``train.seed``.

    Plain data (no mixture, shuffle on): PromptSampler over the problems, or over a
    ``data.unique_problems`` pick of them. Otherwise a MixtureSampler: its sources are the mixture's
    (problems tagged by load_training_data), each capped at its weight share of unique_problems;
    without a mixture, one source holding everything.
    """
    d, seed, batch = cfg.data, cfg.train.seed, cfg.rollout.prompts_per_step
    if not d.mixture:
        problems = select_unique(train_problems, d.unique_problems, seed)
        if d.shuffle:
            return PromptSampler(problems, batch, seed=seed)
        return MixtureSampler({"dataset": problems}, {"dataset": 1.0}, batch, seed=seed, shuffle=False)
    sources = split_by_source(train_problems, list(d.mixture))
    if d.unique_problems is not None:
        total = sum(d.mixture.values())
        sources = {name: select_unique(rows, max(1, round(d.unique_problems * d.mixture[name] / total)), seed)
                   for name, rows in sources.items()}
    return MixtureSampler(sources, d.mixture, batch, seed=seed, shuffle=d.shuffle)
